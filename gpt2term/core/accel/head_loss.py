"""The training loss without the [tokens, vocabulary] logits: the output head and cross-entropy, a slice at a time.

The course computes `F.cross_entropy(logits.flatten(0, 1), targets.flatten())` on the whole logits tensor. For
GPT-2 those logits and their gradient are training's largest tensors and, on a CPU, its slowest passes; here
they only ever exist a few hundred rows at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2term.core.accel import linear, probes

LOSS_CHUNK_BYTES = 24 << 20  # float32 logits per slice: under glibc's 32 MB mmap ceiling, so slices reuse memory
LOSS_GRAD_BLOCK_ROWS = 1024  # bf16: rows of output gradient kept per weight-gradient matmul


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `x @ weight.T` against `targets`, with its gradients, one slice of rows at a time.

    Forward computes the gradients too (softmax minus one-hot is at hand while the slice's logits are), so the
    full logits are never stored. Matmuls run in `dtype` (bf16 under autocast, as the plain path would; where
    bf16 is emulated, as oneDNN float32 matmuls on the bf16-rounded operands); weight gradients accumulate in
    float32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = max(1, LOSS_CHUNK_BYTES // (4 * weight.shape[0]))
        if dtype == torch.float32 or linear.bf16_emulated():
            total, grad_x, grad_w = _float32_slices(x, weight, targets, dtype, need_x, need_w, rows)
        else:
            total, grad_x, grad_w = _bf16_slices(x, weight, targets, need_x, need_w, rows)
        # Kept on ctx, not saved: backward hands the head's gradient on as it is (no copy the size of the head),
        # and autograd then takes it as the parameter's .grad.
        ctx.grads = (grad_x, grad_w)
        ctx.input_dtype = x.dtype
        return (total / x.shape[0]).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_w = ctx.grads
        ctx.grads = (None, None)
        if grad_w is not None and not bool(grad_loss == 1):  # the loss's gradient is 1 unless it was scaled
            grad_w.mul_(grad_loss)
        return (
            (grad_x * grad_loss).to(ctx.input_dtype) if grad_x is not None else None,
            grad_w,
            None,
            None,
        )


def _float32_slices(x, weight, targets, dtype, need_x, need_w, rows):
    """float32, or bf16 emulated (oneDNN float32 matmuls on bf16-rounded operands): the sum of -log p(target),
    and the mean loss's gradients, accumulated slice by slice."""
    n = x.shape[0]
    emulated = dtype != torch.float32
    w = weight.to(dtype).float() if emulated else weight
    # float32 on an Intel CPU runs on MKL (PyTorch's own matmul), elsewhere on oneDNN; both read the transposed
    # weight as a view (no copy of the head every step) where they can.
    mkl = not emulated and not linear.onednn_head()
    matmul = _plain_linear if mkl else probes.onednn_linear
    w_t = (w.t() if mkl or probes.onednn_strided() else w.t().contiguous()) if need_x else None
    grad_x = torch.empty(x.shape, dtype=torch.float32) if need_x else None
    # The weight gradient starts with the first slice's product (beta 0), already divided by n (alpha).
    grad_w = torch.empty(weight.shape, dtype=torch.float32) if need_w else None
    total = torch.zeros((), dtype=torch.float64)
    x_c = x.to(dtype).float() if emulated else x
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        xs, ts = x_c[start:stop], targets[start:stop, None]
        logits = matmul(xs, w, None)
        if emulated:
            logits = logits.bfloat16().float()
        # One softmax pass gives both the gradient and (from each target's probability) the loss.
        probs = torch.softmax(logits, dim=-1)
        log_p, g_target = _target_terms(logits, probs, ts)
        total -= log_p
        if need_x or need_w:
            _put_targets(probs, ts, g_target)  # softmax minus one-hot: d(sum)/d(logits)
            g = probs.bfloat16().float() if emulated else probs
            if need_x:
                gx = matmul(g, w_t, None)
                grad_x[start:stop] = gx.bfloat16() if emulated else gx
            if need_w:
                grad_w.addmm_(g.t(), xs, beta=0 if start == 0 else 1, alpha=1 / n)
    return total, grad_x.div_(n) if need_x else None, grad_w


def _plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: None) -> torch.Tensor:
    return F.linear(x, weight)


def _bf16_slices(x, weight, targets, need_x, need_w, rows):
    """bf16 on a CPU with bf16 instructions: logits, softmax and output gradient stay bf16 (what autocast's
    matmuls would round them to), written straight into the block kept for the weight gradient, which
    accumulates in float32 one block of rows at a time."""
    n, vocab = x.shape[0], weight.shape[0]
    w, xb = weight.to(torch.bfloat16), x.to(torch.bfloat16)
    grad_x = torch.empty(x.shape, dtype=torch.float32) if need_x else None
    grad_w = torch.empty(weight.shape, dtype=torch.float32) if need_w else None
    block = max(rows, min(n, LOSS_GRAD_BLOCK_ROWS))
    kept = torch.empty(block, vocab, dtype=torch.bfloat16) if need_w else None
    kept_from = 0
    total = torch.zeros((), dtype=torch.float64)

    def add_block(stop: int) -> None:
        product = kept[: stop - kept_from].t() @ xb[kept_from:stop]
        grad_w.copy_(product) if kept_from == 0 else grad_w.add_(product)

    for start in range(0, n, rows):
        stop = min(n, start + rows)
        xs, ts = xb[start:stop], targets[start:stop, None]
        logits = F.linear(xs, w)
        if need_w and stop - kept_from > block:
            add_block(start)
            kept_from = start
        out = kept[start - kept_from : stop - kept_from] if need_w else None
        probs = torch.softmax(logits, dim=-1, out=out) if need_w else torch.softmax(logits, dim=-1)
        log_p, g_target = _target_terms(logits, probs, ts)
        total -= log_p
        if need_x or need_w:
            _put_targets(probs, ts, g_target)
            if need_x:
                grad_x[start:stop] = probs @ w
    if need_w:
        add_block(n)
        grad_w.div_(n)
    return total, grad_x.div_(n) if need_x else None, grad_w


def _put_targets(probs: torch.Tensor, targets: torch.Tensor, values: torch.Tensor) -> None:
    """probs[i, targets[i]] = values[i] through flat indices: bf16 `scatter_` copies the whole slice to float32
    and back."""
    flat = torch.arange(0, probs.numel(), probs.shape[1]) + targets.squeeze(1)
    probs.view(-1)[flat] = values.squeeze(1).to(probs.dtype)


TINY_PROBABILITY = 1e-30  # below it a float32 probability has lost digits, or is 0: its log comes from log_softmax


def _target_terms(logits: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor):
    """Sum over rows of log p(target), and each row's d(-log p(target))/d(logit of target) = p - 1 (float32).

    A row whose target's probability underflows (a loss of about 69 or more) takes it from log_softmax. In bf16 a
    probability near 1 has lost the digits its loss lives in (1 - p); those rows take 1 - p from the sum of the
    other probabilities instead, for the loss and for the gradient.
    """
    p = probs.gather(1, targets).float()
    logp = p.double().log()
    g_target = p - 1
    if probs.dtype != torch.float32:
        sure = (p >= 0.5).squeeze(1)
        if bool(sure.any()):
            rows = sure.nonzero().squeeze(1)
            rest = probs.sum(dim=1, keepdim=True, dtype=torch.float32)[rows] - p[rows]
            g_target[rows] = -rest
            logp[rows] = torch.log1p(-rest.double())
    tiny = (p < TINY_PROBABILITY).squeeze(1)
    if bool(tiny.any()):
        rows = tiny.nonzero().squeeze(1)
        logp[rows] = torch.log_softmax(logits[rows].float(), dim=-1).gather(1, targets[rows]).double()
    return logp.sum(), g_target


def _dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype


def applies(weight: torch.Tensor, targets: torch.Tensor) -> bool:
    """CPU float32 weights, float32 or bf16 (autocast) matmuls, no torch.compile, and no ignored targets (the
    course's ignore_index -100 is for `F.cross_entropy`)."""
    dtype = _dtype(weight)
    return not (
        weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or dtype not in (torch.float32, torch.bfloat16)
        or torch.compiler.is_compiling()
        or (dtype == torch.float32 and not probes.onednn_fp32())
        or targets.numel() == 0
        or int(targets.min()) < 0
    )


def head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the output head's logits `x @ weight.T` against `targets`, where `applies`."""
    flat_x, flat_t = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    dtype = _dtype(weight)
    with torch.autocast("cpu", enabled=False):
        return _ChunkedHeadLoss.apply(flat_x.float().contiguous(), weight, flat_t.contiguous(), dtype)
