"""Every private PyTorch API gpt2term uses, each behind a probe and with a public fallback.

Verified on torch 2.13.0. A probe runs its API once on small inputs and checks the numbers against the public
equivalent; if the API is missing, renamed or wrong, only what depends on it falls back to plain PyTorch.
Probes draw their inputs from a local generator: a resumed training run restores the global RNG and then runs
the first forward (and so the probes), and must still replay the original run bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_results: dict[str, bool] = {}


def _probe(name: str, check: Callable[[], bool]) -> bool:
    if name not in _results:
        try:
            # Outside inference mode and autocast whatever the caller runs under: both would change the answers.
            with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
                _results[name] = bool(check())
        except (AttributeError, RuntimeError, TypeError, NotImplementedError):
            _results[name] = False
    return _results[name]


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ oneDNN linears


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """x @ weight.T + bias (then GELU, tanh approximation) by oneDNN; `weight` plain float32 or packed bf16."""
    # torch.ops.mkldnn._linear_pointwise(input, weight, bias, attr, scalars, algorithm): verified on torch 2.13.0
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """`weight` ([out, in]) in oneDNN's packed bf16 layout, for `onednn_linear` with one-token inputs."""
    # torch.ops.mkldnn._reorder_linear_weight(weight, batch_size): verified on torch 2.13.0
    return torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16).contiguous(), 1)


def _check_onednn_fp32() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    w, x = _randn(8, 16), _randn(3, 16)
    return torch.allclose(onednn_linear(x, w, None), x @ w.t(), atol=1e-5, rtol=1e-5)


def _check_onednn_bf16() -> bool:
    # torch.ops.mkldnn._is_mkldnn_bf16_supported(): verified on torch 2.13.0
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    w, x = _randn(8, 16), _randn(1, 16)
    y = onednn_linear(x.bfloat16(), onednn_pack_bf16(w), None).float()
    return torch.allclose(y, x @ w.t(), atol=0.1, rtol=0.05)


def onednn_fp32() -> bool:
    """oneDNN's float32 matmul works here (else training's linears stay `F.linear`)."""
    return _probe("onednn_fp32", _check_onednn_fp32)


def _check_onednn_strided() -> bool:
    if not onednn_fp32():
        return False
    a, b = _randn(16, 8), _randn(16, 5)  # transposed views: [8, 16] and [5, 16] with strides (1, 8) and (1, 5)
    return torch.allclose(onednn_linear(a.t(), b.t(), None), a.t() @ b, atol=1e-5, rtol=1e-5)


def onednn_strided() -> bool:
    """oneDNN's float32 matmul reads transposed views as they are (else backward copies them contiguous first)."""
    return _probe("onednn_strided", _check_onednn_strided)


def onednn_bf16() -> bool:
    """oneDNN's packed bf16 matmul works here (else bf16 decoding uses `F.linear` on a bf16 copy)."""
    return _probe("onednn_bf16", _check_onednn_bf16)


# ------------------------------------------------------------------------------------------ operator calls


def direct(overload: Callable) -> Callable:
    """The C++ function behind a `torch.ops` overload, called without the Python wrapper: for an op that takes a
    TorchBind object (fbgemm's packed weights) the wrapper walks every argument looking for fake objects on each
    call, a good part of a small layer's time. The overload itself where that function is not found."""
    # OpOverload._op: verified on torch 2.13.0 (the callers' probes check the numbers through it)
    op = getattr(overload, "_op", None)
    return op if callable(op) else overload


# ------------------------------------------------------------------------------------------ version counters


def _check_version_counters() -> bool:
    t = torch.zeros(2)
    before = t._version
    t.add_(1)
    return t._version != before


def version_counters() -> bool:
    """In-place changes of a tensor can be seen (else the packed decoding copy cannot know when it is stale)."""
    return _probe("version_counters", _check_version_counters)


def stamp(tensors: list[torch.Tensor]) -> list[tuple[int, int]] | None:
    """Address and in-place change count of each tensor, to tell later whether any changed; None when that cannot
    be known (inference tensors have no version counter), and then nothing may be cached from them."""
    if not version_counters():
        return None
    try:
        # Tensor._version: verified on torch 2.13.0; an inference tensor raises RuntimeError
        return [(t.data_ptr(), t._version) for t in tensors]
    except RuntimeError:
        return None


def results() -> dict[str, bool]:
    """Every probe's answer (runs those not run yet)."""
    return {
        "onednn_fp32": onednn_fp32(),
        "onednn_strided": onednn_strided(),
        "onednn_bf16": onednn_bf16(),
        "version_counters": version_counters(),
    }
