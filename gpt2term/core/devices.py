"""Which device and number format a run uses, chosen in one place so training and evaluation agree."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from gpt2term.core.errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
MAX_THREADS = 1024


def check_threads(threads: int | None) -> None:
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise InputError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")


def set_threads(threads: int | None) -> None:
    """PyTorch's intra-op thread count (None: leave PyTorch's choice)."""
    check_threads(threads)
    if threads:
        torch.set_num_threads(threads)


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; under torchrun each process takes its own GPU."""
    spec = (spec or "auto").lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        return torch.device("mps") if mps_available() else torch.device("cpu")
    kind = spec.split(":")[0]
    if kind not in DEVICES:
        raise InputError(f"unknown device {spec!r}; choose one of: {', '.join(DEVICES)}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device auto or cpu")
        return torch.device(spec) if ":" in spec else torch.device("cuda", local_rank % torch.cuda.device_count())
    if kind == "mps" and not mps_available():
        raise InputError("--device mps was asked for but Apple's MPS is not available; use --device auto or cpu")
    return torch.device(spec)


def resolve_dtype(spec: str = "float32") -> torch.dtype | None:
    """The autocast dtype for `--dtype` (None: plain float32). Weights and optimizer state always stay float32."""
    key = (spec or "float32").lower()
    if key == "int8":
        raise InputError("int8 is for decoding only (generate --dtype int8); train and evaluate in float32 or bfloat16")
    if key not in DTYPES:
        raise InputError(f"unknown dtype {spec!r}; choose float32 or bfloat16")
    return DTYPES[key]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed precision when asked for (bf16 matmuls, float32 weights), nothing otherwise."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
