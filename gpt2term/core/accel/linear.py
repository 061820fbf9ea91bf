"""Training's linear layers on oneDNN: `nn.Linear`'s parameters and state_dict, a faster CPU float32 kernel.

PyTorch sends float32 matmuls to MKL, which on AMD CPUs is much slower than oneDNN on the same shapes (see the
README's Speed section), and matmuls are most of a training step. bfloat16 (autocast) already goes to oneDNN;
torch.compile, GPUs and float64 keep the standard path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt2term.core.accel import probes

# Above this many output features the weight gradient stays with the default BLAS: oneDNN would first need the
# output gradient transposed, a copy as large as the logits for GPT-2's head, which eats its advantage.
ONEDNN_WEIGHT_GRAD_MAX_OUT = 16384


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b with all three matrix multiplies (forward, input and weight gradients) run by oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return probes.onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = probes.onednn_linear(grad2d, weight.t().contiguous(), None).view(x.shape)
        if ctx.needs_input_grad[1]:
            x2d = x.reshape(-1, x.shape[-1])
            if weight.shape[0] <= ONEDNN_WEIGHT_GRAD_MAX_OUT:
                grad_w = probes.onednn_linear(grad2d.t().contiguous(), x2d.t().contiguous(), None)
            else:
                grad_w = grad2d.t() @ x2d
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2d.sum(0)
        return grad_x, grad_w, grad_b


class OneDnnLinear(nn.Linear):
    """`nn.Linear` whose CPU float32 matrix multiplies run on oneDNN; `swap_in` turns a model's linears into these."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            and probes.onednn_fp32()
        ):
            return _OneDnnLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def swap_in(model: nn.Module) -> None:
    """Every plain `nn.Linear` of `model` becomes a `OneDnnLinear` (same object, same parameters)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDnnLinear


def swap_out(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is OneDnnLinear:
            module.__class__ = nn.Linear
