"""Training's linear layers: `nn.Linear`'s parameters and state_dict, on the faster CPU float32 kernel.

Where the CPU has AVX-512, training's linears run forward and backward on oneDNN (`_OneDnnLinear`): PyTorch sends
float32 matmuls to MKL, which on AMD CPUs keeps to its AVX2 code while oneDNN uses AVX-512 (on the AVX-512
machine this was first measured on, MKL was much slower). On an AVX2-only CPU (this project's Zen 3) the two
share the same vector width: MKL is as fast forward and faster backward, where oneDNN reads the transposed
operands slowly (see the README's Speed section), so training's float32 linears stay PyTorch's own there
(`onednn_training`). On an Intel CPU MKL uses AVX-512 itself and was the faster of the two: they stay PyTorch's.
bfloat16 (autocast) goes to oneDNN's bf16 kernels where the CPU has bf16 instructions; elsewhere PyTorch's bf16
matmul is a generic loop, and autocast's linear is computed here with oneDNN's float32 kernels instead
(`_Bf16Linear`).
torch.compile, GPUs and float64 keep the standard path.
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn

from gpt2term.core.accel import probes

# Above this many output features the weight gradient stays with the default BLAS: oneDNN would first need the
# output gradient transposed, a copy as large as the logits for GPT-2's head, which eats its advantage.
ONEDNN_WEIGHT_GRAD_MAX_OUT = 16384


AVX512_CAPABILITIES = ("AVX512",)  # what torch.backends.cpu.get_cpu_capability() says on such CPUs (a prefix)


def onednn_training() -> bool:
    """Whether training's float32 linear products go to oneDNN (a CPU with AVX-512, not Intel's) rather than
    PyTorch's own matmul. Decided by the CPU, never by timing, so every process on a machine computes the same
    sums."""
    return probes.onednn_fp32() and _has_avx512() and not mkl_on_intel()


def onednn_head() -> bool:
    """Whether the sliced loss's float32 head products go to oneDNN: everywhere it works but on Intel CPUs, where
    MKL was faster for them (on AMD, even AVX2-only, oneDNN's were)."""
    return probes.onednn_fp32() and not mkl_on_intel()


def mkl_on_intel() -> bool:
    """PyTorch's float32 matmul is MKL on an Intel CPU: MKL then uses the CPU's widest vectors, where on AMD it
    keeps to AVX2."""
    return torch.backends.mkl.is_available() and cpu_vendor() == INTEL_VENDOR


INTEL_VENDOR = "GenuineIntel"


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor string (/proc/cpuinfo's vendor_id; else what `platform.processor()` says), "" if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return INTEL_VENDOR if "Intel" in platform.processor() else ""


@functools.cache
def _has_avx512() -> bool:
    return str(torch.backends.cpu.get_cpu_capability()).startswith(AVX512_CAPABILITIES)


def _transposed(m: torch.Tensor) -> torch.Tensor:
    return m.t()


def _transposed_copy(m: torch.Tensor) -> torch.Tensor:
    return m.t().contiguous()


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
        # oneDNN reads the transposed operands as views where it can: no copy of each matrix every step.
        t = _transposed if probes.onednn_strided() else _transposed_copy
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = probes.onednn_linear(grad2d, t(weight), None).view(x.shape)
        if ctx.needs_input_grad[1]:
            x2d = x.reshape(-1, x.shape[-1])
            if weight.shape[0] <= ONEDNN_WEIGHT_GRAD_MAX_OUT:
                grad_w = probes.onednn_linear(t(grad2d), t(x2d), None)
            else:
                grad_w = grad2d.t() @ x2d
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2d.sum(0)
        return grad_x, grad_w, grad_b


def bf16_emulated() -> bool:
    """bf16 matmuls run as float32 ones on bf16-rounded operands: a CPU without bf16 instructions, where
    PyTorch's own bf16 matmul is a generic loop many times slower than float32."""
    return probes.onednn_fp32() and not probes.onednn_bf16()


class _Bf16Linear(torch.autograd.Function):
    """What autocast's bf16 `F.linear` computes (operands and result rounded to bf16, float32 sums), forward and
    backward, with the matrix multiplies run by oneDNN in float32 on the rounded values."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        ctx.save_for_backward(xb, wb)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        b = bias.to(torch.bfloat16).float() if bias is not None else None
        return (
            probes.onednn_linear(xb.float().reshape(-1, x.shape[-1]), wb.float(), b)
            .bfloat16()
            .view(*x.shape[:-1], weight.shape[0])
        )

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xb, wb = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(torch.bfloat16).float()
        t = _transposed if probes.onednn_strided() else _transposed_copy
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = probes.onednn_linear(g, t(wb.float()), None).bfloat16().to(ctx.x_dtype).view(xb.shape)
        if ctx.needs_input_grad[1]:
            x2d = xb.reshape(-1, xb.shape[-1]).float()
            grad_w = probes.onednn_linear(t(g), t(x2d), None).bfloat16().float()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).bfloat16().float()
        return grad_x, grad_w, grad_b


class OneDnnLinear(nn.Linear):
    """`nn.Linear` whose CPU float32 matrix multiplies run on oneDNN where `onednn_training`; `swap_in` turns a
    model's linears into these.

    Under CPU bf16 autocast on a CPU without bf16 instructions it computes autocast's bf16 linear through oneDNN's
    float32 kernels (`_Bf16Linear`, measured faster there than PyTorch's matmul for tiny's shapes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and self.weight.dtype == torch.float32
            and not torch.compiler.is_compiling()
            and probes.onednn_fp32()
        ):
            if not torch.is_autocast_enabled("cpu"):
                if x.dtype == torch.float32 and onednn_training():
                    return _OneDnnLinear.apply(x, self.weight, self.bias)
            elif (
                torch.get_autocast_dtype("cpu") == torch.bfloat16
                and x.dtype in (torch.float32, torch.bfloat16)
                and bf16_emulated()
            ):
                with torch.autocast("cpu", enabled=False):
                    return _Bf16Linear.apply(x, self.weight, self.bias)
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
