"""int8 weights for decoding: a quarter of float32's bytes per token, which is what bounds one-token speed on a CPU.

Weights are quantised per output channel, symmetric: row `n` is stored as int8 `q[n]` with one float32 scale `s[n]`
(`w ≈ q * s`, every element within `s[n] / 2`). Where gpt2term's own kernels are built (`native`) they multiply
these weights by the float32 activations as they are. Elsewhere the product runs here, on fbgemm's int8 kernel,
which also wants 8-bit activations; 8 bits of GPT-2's activations (a few large outliers set the scale) would move
the greedy tokens, so each activation row is sent as two: its 7-bit rounding and that rounding's error scaled up
by 64. One call multiplies both with the same weights (still one read of the matrix, the speed limit), and
`hi + lo / 64` is the product to about 13 bits of the activation, close to weight-only int8.
fbgemm threads each call itself with OpenMP; `decode` runs it under `threads.governed`, which gives it fewer
threads when the machine is busy.
Where this PyTorch build lacks the kernel, the dequantised float32 weights are used (exact, no faster).
The candidates a step chooses among are rescored from the float32 head by `decode`, as for bf16.

Checked on torch 2.13.0+cpu: `torch.ops.aten._weight_int8pack_mm` (weight-only int8) exists there but on AVX2 it
was several times slower than float32's `mm` for one row, so it is not used.
"""

from __future__ import annotations

import warnings

import torch

from gpt2term.core.accel import probes

QMAX = 127  # symmetric: -127..127, so the scale maps the largest |w| of a row exactly


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [out, in] as int8 [out, in] and float32 scales [out]: `|w - q * s| <= s / 2` element-wise."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


ZERO_POINT = 64  # 7-bit activations (0..127): AVX2's u8 x s8 pair sums cannot saturate int16
LO_GAIN = 64.0  # the rounding error (within half a step) times this still fits the 7-bit range


def _pack_fbgemm(q: torch.Tensor, scale: torch.Tensor):  # a LinearPackedParams
    with warnings.catch_warnings():  # quantised tensors are "deprecated" in 2.13; the probe falls back if gone
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None)


class Activations:
    """Float32 `x` [rows, in] for the int8 kernel, in units of one 7-bit step: its rounding over its scaled-up
    error, stacked into one [2 * rows, in] matrix (made once per layer input)."""

    __slots__ = ("x", "both", "step", "rows")

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.contiguous()
        self.rows = rows = x.shape[0]
        step = float(x.abs().max()) / (ZERO_POINT - 1)  # |x| / step <= 63: the rounding needs no clamp
        self.step = step if step > 0 else 1.0
        self.both = both = torch.empty(2 * rows, x.shape[1], dtype=torch.float32, device=x.device)
        hi, lo = both[:rows], both[rows:]
        torch.div(self.x, self.step, out=lo)
        torch.round(lo, out=hi)
        lo.sub_(hi).mul_(LO_GAIN)


_kernel: list = []


def _linear_q_dq():
    """fbgemm's linear on float32 activations quantised with a given scale (raises AttributeError where missing)."""
    if not _kernel:
        _kernel.append(probes.direct(torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default))
    return _kernel[0]


def _fbgemm_product(a: Activations, packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ (q * s).T + bias`: both halves of the activations in one call (at scale 1), then
    `(hi + lo / LO_GAIN) * step + bias`."""
    y = _linear_q_dq()(a.both, 1.0, ZERO_POINT, packed)
    out = y[: a.rows].add_(y[a.rows :], alpha=1.0 / LO_GAIN)
    return out.mul_(a.step) if bias is None else torch.add(bias, out, alpha=a.step)


def _check_fbgemm() -> bool:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen) * 0.02
    x = torch.randn(3, 64, generator=gen)
    q, s = quantize(w)
    y = _fbgemm_product(Activations(x), _pack_fbgemm(q, s))
    expected = x @ dequantize(q, s).t()
    return y.shape == expected.shape and bool((y - expected).abs().max() <= 1e-3 * expected.abs().max())


def fbgemm() -> bool:
    """Whether fbgemm's int8 linear runs here and gives the dequantised product (checked once)."""
    return probes._probe("fbgemm_int8", _check_fbgemm)


class Int8Matrix:
    """An int8 linear layer: `__call__(x)` is `x @ (q * s).T + bias`, `x` float32 [rows, in]."""

    __slots__ = ("q", "scale", "bias", "packed", "shape")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, use_fbgemm: bool | None = None) -> None:
        self.shape = tuple(weight.shape)
        q, self.scale = quantize(weight)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        on_fbgemm = fbgemm() if use_fbgemm is None else use_fbgemm
        self.packed = _pack_fbgemm(q, self.scale) if on_fbgemm else None
        self.q = None if on_fbgemm else q  # fbgemm keeps its own copy: holding both would double the memory

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.q, self.scale, self.bias) if t is not None]

    def nbytes(self) -> int:
        """Memory held: one byte a weight (in fbgemm's copy or ours), the scales and the bias."""
        small = sum(t.numel() * t.element_size() for t in (self.scale, self.bias) if t is not None)
        return self.shape[0] * self.shape[1] + small

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ (q * s).T + bias` for float32 `x` [rows, in], on as many threads as PyTorch's setting says."""
        if self.packed is None:
            w = dequantize(self.q, self.scale).t()
            return torch.addmm(self.bias, x, w) if self.bias is not None else torch.mm(x, w)
        return _fbgemm_product(Activations(x), self.packed, self.bias)
