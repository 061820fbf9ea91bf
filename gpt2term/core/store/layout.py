"""What a checkpoint folder is: its file names, the names a checkpoint may have, and meta.json read loosely.

Every module of the store agrees on these, so they live in one place below the rest.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

from gpt2term.core.errors import InputError

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
METRICS_FILE = "metrics.jsonl"
FORMAT_VERSION = 1
MAX_NAME_LENGTH = 100
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
STAGING_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|deleted)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})$")
META_KEYS = (
    "step",
    "epoch",
    "tokens_seen",
    "train_loss",
    "val_loss",
    "train_perplexity",
    "val_perplexity",
    "source",
)


def validate_name(name: str) -> str:
    """A checkpoint name is one plain folder name: no separators, no `..`, not hidden, not too long."""
    if not isinstance(name, str) or not name:
        raise InputError("a checkpoint name cannot be empty; pick one such as my-run-1")
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.match(name) or ".." in name:
        raise InputError(
            f"invalid checkpoint name {name!r}: use letters, digits, '.', '_', '-', '+' (at most {MAX_NAME_LENGTH}, "
            "starting with a letter or digit, no '..' or slashes), e.g. my-run-1"
        )
    return name


def suggest_name(text: str) -> str:
    """A valid name made from arbitrary text (a file name, a repository id)."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip(".-_+")
    name = re.sub(r"\.{2,}", ".", name)[:MAX_NAME_LENGTH].strip(".-_+")
    return name or "imported"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def json_default(value: Any) -> Any:
    """Numbers from torch/numpy and paths, as JSON: trainers pass tensors for losses without thinking about it."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable; store plain numbers and strings in meta")


def read_meta(folder: Path) -> dict:
    """meta.json as a dict, or {} when it is missing or unreadable (for merging and messages, never for loading)."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def what_is_kept(folder: Path, name: str) -> str:
    """For a failed write's message: the checkpoint as it was before (a failed write never touches it)."""
    meta = read_meta(folder)
    if not meta:
        return "nothing was saved"
    step = f" (step {meta['step']})" if meta.get("step") is not None else ""
    return f"the previous checkpoint {name!r}{step} is intact"


def is_checkpoint_folder(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file() and (path / WEIGHTS_FILE).is_file()
