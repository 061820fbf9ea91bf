"""The training loss without the [tokens, vocabulary] logits: the output head and cross-entropy, a slice at a time.

The course computes `F.cross_entropy(logits.flatten(0, 1), targets.flatten())` on the whole logits tensor. For
GPT-2 those logits and their gradient are training's largest tensors and, on a CPU, its slowest passes; here
they only ever exist a few hundred rows at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2term.core.accel import probes

LOSS_CHUNK_BYTES = 24 << 20  # float32 logits per slice: under glibc's 32 MB mmap ceiling, so slices reuse memory
LOSS_GRAD_BLOCK_ROWS = 1024  # bf16: rows of output gradient kept per weight-gradient matmul


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `x @ weight.T` against `targets`, with its gradients, one slice of rows at a time.

    Forward computes the gradients too (softmax minus one-hot is at hand while the slice's logits are), so the
    full logits are never stored. Matmuls run in `dtype` (bf16 under autocast, as the plain path would), the
    softmax in float32, weight gradients accumulate in float32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
        n, vocab = x.shape[0], weight.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fp32 = dtype == torch.float32
        w = weight.to(dtype)
        w_t = w.t().contiguous() if need_x else None
        rows = max(1, LOSS_CHUNK_BYTES // (4 * vocab))
        grad_x = torch.empty(x.shape, dtype=torch.float32) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32) if need_w else None
        # bf16: slices' output gradients are kept for a block of rows (half the size of float32 logits), then one
        # weight-gradient matmul per block, accumulated in float32; float32 accumulates slice by slice.
        block = max(rows, min(n, LOSS_GRAD_BLOCK_ROWS))
        kept = torch.empty(block, vocab, dtype=dtype) if need_w and not fp32 else None
        kept_from = 0
        total = torch.zeros((), dtype=torch.float64)
        x_c = x.to(dtype)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            xs, ts = x_c[start:stop], targets[start:stop, None]
            logits = probes.onednn_linear(xs, w, None) if fp32 else F.linear(xs, w)
            logp = torch.log_softmax(logits.float(), dim=-1)
            total -= logp.gather(1, ts).sum(dtype=torch.float64)
            if need_x or need_w:
                probs = logp.exp_()  # softmax; minus one at each target = d(sum of losses)/d(logits)
                probs.scatter_add_(1, ts, torch.full(ts.shape, -1.0))
                g = probs if fp32 else probs.to(dtype)
                if need_x:
                    # bf16: `F.linear(g, w_t)`, both operands contiguous along the vocabulary it sums over; `g @ w`
                    # is the same product but, without bf16 instructions, PyTorch's generic bf16 matmul runs it
                    # many times slower in that layout.
                    grad_x[start:stop] = probes.onednn_linear(g, w_t, None) if fp32 else F.linear(g, w_t)
                if need_w and fp32:
                    grad_w.addmm_(g.t(), xs)
                elif need_w:
                    if stop - kept_from > block:
                        grad_w += (kept[: start - kept_from].t() @ x_c[kept_from:start]).float()
                        kept_from = start
                    kept[start - kept_from : stop - kept_from] = g
        if kept is not None and n > kept_from:
            grad_w += (kept[: n - kept_from].t() @ x_c[kept_from:n]).float()
        ctx.save_for_backward(
            grad_x.div_(n) if grad_x is not None else None, grad_w.div_(n) if grad_w is not None else None
        )
        ctx.input_dtype = x.dtype
        return (total / n).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return (
            (grad_x * grad_loss).to(ctx.input_dtype) if grad_x is not None else None,
            grad_w * grad_loss if grad_w is not None else None,
            None,
            None,
        )


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
