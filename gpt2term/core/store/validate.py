"""Whether a checkpoint can be trusted, read from meta.json and the safetensors header alone (listing stays fast),
and whether state given to save can be read back: each problem is one line naming the field or tensor.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import struct
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from gpt2term.core.accel.skeleton import meta_device
from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import Gpt2termError
from gpt2term.core.model import GPTModel
from gpt2term.core.store.layout import META_FILE, WEIGHTS_FILE

_WEIGHTS_ONLY_TYPES = (str, bytes, int, float, bool, complex, type(None), torch.Tensor, torch.Size, torch.dtype)


def check_loadable_state(value: Any, where: str) -> None:
    """Refuse, at save time, state that `torch.load(weights_only=True)` would refuse at resume time."""
    if isinstance(value, (dict, OrderedDict)):
        for k, v in value.items():
            check_loadable_state(k, where)
            check_loadable_state(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple, set)):
        for i, v in enumerate(value):
            check_loadable_state(v, f"{where}[{i}]")
    elif not isinstance(value, (*_WEIGHTS_ONLY_TYPES, torch.device)):
        raise TypeError(
            f"{where} is a {type(value).__name__}; checkpoint state may hold only tensors, numbers, strings, "
            "lists, tuples and dicts (it is read back with weights_only=True)"
        )


@lru_cache(maxsize=16)
def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    with meta_device():
        return {k: tuple(v.shape) for k, v in GPTModel(cfg).state_dict().items()}


_SAFETENSORS_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # float weights only: the model computes in floats
MAX_HEADER_BYTES = 100_000_000
MAX_META_BYTES = 16_000_000


def _is_int(value: Any) -> bool:
    """A JSON whole number that every formatter can show (a 400-digit one overflows float conversions)."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_date(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        dt.datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


# meta.json's fields and what the store writes in them (None is always allowed: not known, or not yet trained).
# Everything that shows or sorts a listing relies on these types, so a field of another type marks the checkpoint
# damaged (with the field named) instead of crashing whoever reads it.
_META_FIELDS: dict[str, tuple[Any, str]] = {
    "step": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "epoch": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "tokens_seen": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "parameters": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "format": (_is_int, "a whole number"),
    "train_loss": (_is_number, "a number"),
    "val_loss": (_is_number, "a number"),
    "train_perplexity": (_is_number, "a number"),
    "val_perplexity": (_is_number, "a number"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "copied_from": (lambda v: isinstance(v, str), "a string"),
    "created": (_is_date, "an ISO date string"),
    "updated": (_is_date, "an ISO date string"),
    "notices": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of strings"),
    "training": (lambda v: isinstance(v, dict), "an object"),
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def meta_problem(meta: dict) -> tuple[GPTConfig | None, str | None]:
    """meta.json's config, or why meta.json cannot be trusted (one line, naming the field)."""
    for key, (ok, what) in _META_FIELDS.items():
        value = meta.get(key)
        if value is not None and not ok(value):
            return None, f"{META_FILE}: {key} must be {what}, got {_short(value)}"
    if "config" not in meta:
        return None, f"{META_FILE} has no config"
    try:
        return GPTConfig.from_dict(meta["config"], complete=True), None
    except Gpt2termError as exc:
        return None, f"{META_FILE} has an invalid config: {exc}"


def safetensors_problem(path: Path, cfg: GPTConfig) -> str | None:
    """Why a weights file cannot be loaded for `cfg`, read from its header alone (listing stays fast)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{WEIGHTS_FILE} is truncated ({size} bytes)"
            header_len = struct.unpack("<Q", raw)[0]
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                return f"{WEIGHTS_FILE} is truncated or not a safetensors file (bad header length)"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        return f"{WEIGHTS_FILE} is unreadable ({str(exc)[:100]})"
    if not isinstance(header, dict):
        return f"{WEIGHTS_FILE} has a malformed header (a JSON {type(header).__name__}, not an object)"
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        return f"{WEIGHTS_FILE} has a malformed header (__metadata__ is not an object of strings)"
    end = 0
    for k, t in header.items():
        problem = _tensor_entry_problem(t)
        if problem:
            return f"{WEIGHTS_FILE} has a malformed header ({k}: {problem})"
        end = max(end, t["data_offsets"][1])
    if 8 + header_len + end > size:
        return f"{WEIGHTS_FILE} is truncated ({size} of {8 + header_len + end} bytes); it was cut off while written"
    expected = _expected_shapes(cfg)
    missing = [k for k in expected if k not in header]
    if missing:
        return f"{WEIGHTS_FILE} lacks {len(missing)} tensors of the config, e.g. {missing[0]}"
    unexpected = [k for k in header if k not in expected and not k.endswith(".att.mask")]
    if unexpected:
        return f"{WEIGHTS_FILE} holds {len(unexpected)} tensors the config has no place for, e.g. {unexpected[0]}"
    for k, shape in expected.items():
        if tuple(header[k]["shape"]) != shape:
            return f"{k} has shape {list(header[k]['shape'])} but meta.json's config expects {list(shape)}"
    for k, t in header.items():
        if t["dtype"] not in _SAFETENSORS_SIZES:
            return f"{k} has dtype {t['dtype']}; weights must be floats ({', '.join(_SAFETENSORS_SIZES)})"
    return None


def _tensor_entry_problem(t: Any) -> str | None:
    if not isinstance(t, dict):
        return "not an object"
    dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    if not isinstance(dtype, str):
        return "no dtype"
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        return "bad shape"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) and n >= 0 for n in offsets)):
        return "bad data_offsets"
    if offsets[0] > offsets[1]:
        return "bad data_offsets"
    if dtype in _SAFETENSORS_SIZES and offsets[1] - offsets[0] != math.prod(shape) * _SAFETENSORS_SIZES[dtype]:
        return f"its {offsets[1] - offsets[0]} bytes do not hold a {dtype} tensor of shape {shape}"
    return None


def displayable(meta: dict) -> dict:
    """A damaged checkpoint's meta without the fields of a wrong type, so tables and details can still show the rest."""
    return {k: v for k, v in meta.items() if k not in _META_FIELDS or v is None or _META_FIELDS[k][0](v)}


def non_finite_tensor(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The first floating-point tensor holding NaN or inf (weights of a run that diverged), or None.

    Every load checks every weight, so the common case is one pass: a sum reads the tensor once and allocates
    nothing, and it is finite whenever every element is (a NaN or an inf always reaches it). Only a sum that is not
    finite, which huge but finite weights can also give by overflowing, is settled element by element.
    """
    for key, value in state_dict.items():
        if value.is_floating_point() and not _surely_finite(value) and not bool(torch.isfinite(value).all()):
            return key
    return None


def _surely_finite(value: torch.Tensor) -> bool:
    try:
        total = value.sum(dtype=torch.float64 if value.dtype == torch.float64 else torch.float32)
    except (RuntimeError, TypeError):  # a dtype sum has no kernel for: the exact check decides
        return False
    return bool(torch.isfinite(total))
