"""A lower bound on the memory a model needs, checked against what the machine has before anything is allocated.

A size that cannot fit would otherwise end in an allocator traceback, or worse, with the kernel killing the
process (or its neighbours) halfway through. The estimates are deliberately low (only what surely must exist at
once), so a refusal is always right; what passes may still be tight.
"""

from __future__ import annotations

import os

import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import InputError

FLOAT32 = 4
ADAMW_TRAINING_BYTES_PER_PARAM = 4 * FLOAT32  # weights, gradients and AdamW's two moments, all float32


def parameter_count(cfg: GPTConfig) -> int:
    """Parameters of `GPTModel(cfg)` (output head untied, as the course builds it), from the shapes alone."""
    e, v, c = cfg.emb_dim, cfg.vocab_size, cfg.context_length
    qkv_bias = 3 * e if cfg.qkv_bias else 0
    block = 3 * e * e + qkv_bias + e * e + e + 2 * 4 * e * e + 4 * e + e + 2 * 2 * e
    return v * e + c * e + cfg.n_layers * block + 2 * e + e * v


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Memory free for a new allocation on `device` (None: unknown, then nothing is refused)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _size(n: float) -> str:
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1024:,.1f} KB"


def require_memory(needed: int, what: str, fix: str, device: torch.device | str | None = None) -> None:
    """Refuse up front, with the estimate, a size that cannot fit in the memory `device` has free."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise InputError(f"{what} needs at least {_size(needed)} but only {_size(free)} is free; {fix}")


def require_training_memory(
    cfg: GPTConfig, batch_size: int, context_length: int, device: torch.device | str | None = None
) -> None:
    """Weights, gradients, AdamW state and the logits of one micro-batch (with their gradient)."""
    params = parameter_count(cfg)
    logits = 2 * batch_size * context_length * cfg.vocab_size * FLOAT32
    needed = params * ADAMW_TRAINING_BYTES_PER_PARAM + logits
    require_memory(
        needed,
        f"training this model ({params:,} parameters, batch {batch_size} x {context_length} tokens)",
        "choose a smaller preset, --emb-dim, --n-layers, --context-length or --batch-size",
        device,
    )


def require_inference_memory(
    cfg: GPTConfig, batch_size: int, context_length: int, device: torch.device | str | None = None
) -> None:
    """The logits of one batch (a forward pass over `batch_size` windows of `context_length` tokens)."""
    needed = batch_size * context_length * cfg.vocab_size * FLOAT32
    require_memory(
        needed,
        f"a batch of {batch_size} x {context_length} tokens",
        "choose a smaller --batch-size or --context-length",
        device,
    )
