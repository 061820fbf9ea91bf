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
    bf16 is emulated, as oneDNN float32 matmuls on the bf16-rounded operands), the softmax in float32, weight
    gradients accumulate in float32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
        n, vocab = x.shape[0], weight.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fp32 = dtype == torch.float32
        emulated = not fp32 and linear.bf16_emulated()
        onednn = fp32 or emulated  # the matmuls run on oneDNN in float32
        w = weight.to(dtype)
        if emulated:
            w = w.float()
        # oneDNN reads the transposed weight as a view (no copy of the head every step) where it can.
        w_t = (w.t() if onednn and probes.onednn_strided() else w.t().contiguous()) if need_x else None
        rows = max(1, LOSS_CHUNK_BYTES // (4 * vocab))
        grad_x = torch.empty(x.shape, dtype=torch.float32) if need_x else None
        # float32 starts the weight gradient with the first slice's product (beta 0), already divided by n (alpha).
        grad_w = (torch.empty if onednn else torch.zeros)(weight.shape, dtype=torch.float32) if need_w else None
        # bf16: slices' output gradients are kept for a block of rows (half the size of float32 logits), then one
        # weight-gradient matmul per block, accumulated in float32; float32 accumulates slice by slice.
        block = max(rows, min(n, LOSS_GRAD_BLOCK_ROWS))
        kept = torch.empty(block, vocab, dtype=dtype) if need_w and not onednn else None
        kept_from = 0
        total = torch.zeros((), dtype=torch.float64)
        x_c = x.to(dtype)
        if emulated:
            x_c = x_c.float()
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            xs, ts = x_c[start:stop], targets[start:stop, None]
            logits = probes.onednn_linear(xs, w, None) if onednn else F.linear(xs, w)
            if emulated:
                logits = logits.bfloat16()
            # One softmax pass gives both the gradient and (from each target's probability) the loss.
            logits = logits.float()
            probs = torch.softmax(logits, dim=-1)
            total -= _target_log_probs(logits, probs, ts)
            if need_x or need_w:
                probs.scatter_add_(1, ts, torch.full(ts.shape, -1.0))  # softmax minus one-hot: d(sum)/d(logits)
                g = probs if fp32 else probs.to(dtype)
                if emulated:
                    g = g.float()
                if need_x:
                    # bf16: `F.linear(g, w_t)`, both operands contiguous along the vocabulary it sums over; `g @ w`
                    # is the same product but, without bf16 instructions, PyTorch's generic bf16 matmul runs it
                    # many times slower in that layout.
                    if onednn:
                        gx = probes.onednn_linear(g, w_t, None)
                        grad_x[start:stop] = gx.bfloat16() if emulated else gx
                    else:
                        grad_x[start:stop] = F.linear(g, w_t)
                if need_w and onednn:
                    grad_w.addmm_(g.t(), xs, beta=0 if start == 0 else 1, alpha=1 / n)
                elif need_w:
                    if stop - kept_from > block:
                        grad_w += (kept[: start - kept_from].t() @ x_c[kept_from:start]).float()
                        kept_from = start
                    kept[start - kept_from : stop - kept_from] = g
        if kept is not None and n > kept_from:
            grad_w += (kept[: n - kept_from].t() @ x_c[kept_from:n]).float()
        if grad_w is not None and not onednn:
            grad_w.div_(n)
        # Kept on ctx, not saved: backward hands the head's gradient on as it is (no copy the size of the head),
        # and autograd then takes it as the parameter's .grad.
        ctx.grads = (grad_x.div_(n) if grad_x is not None else None, grad_w)
        ctx.input_dtype = x.dtype
        return (total / n).to(torch.float32)

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


TINY_PROBABILITY = 1e-30  # below it a float32 probability has lost digits, or is 0: its log comes from log_softmax


def _target_log_probs(logits: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of log p(target), from the softmax; a row whose target's probability underflows (a loss of
    about 69 or more) takes it from log_softmax instead."""
    p = probs.gather(1, targets).double()
    logp = p.log()
    tiny = (p < TINY_PROBABILITY).squeeze(1)
    if bool(tiny.any()):
        rows = tiny.nonzero().squeeze(1)
        logp[rows] = torch.log_softmax(logits[rows], dim=-1).gather(1, targets[rows]).double()
    return logp.sum()


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
