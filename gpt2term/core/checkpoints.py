"""The checkpoint store: one folder per checkpoint under the data directory, written so that a crash never breaks one.

Layout of `<root>/<name>/`:

    model.safetensors   the weights, our (the course's) names
    meta.json           config, parameter count, step, epoch, tokens seen, losses, source, created/updated times
    optimizer.pt        optional: the optimizer's state_dict, for resuming (torch.save; read with weights_only=True)
    trainer.pt          optional: the trainer's state (RNG, data position, ...), same rules
    metrics.jsonl       optional: one JSON object per training event, appended while a run goes on

Why it is safe:
- A save writes a new folder `.<name>.tmp-<pid>-<token>` beside the checkpoint, fsyncs every file and the folder,
  then renames it into place. Overwriting first renames the old folder to `.<name>.old-<pid>-<token>` and deletes
  it only once the new one is in place, so `kill -9` at any instant leaves the old checkpoint or the new one.
  A crash between the two renames is repaired on next use (the old folder is put back); leftover temporary
  folders of dead processes are removed.
- Loading reads weights with safetensors and the optional state with `torch.load(..., weights_only=True)`, so no
  file can run code. Listing reads only headers: a damaged checkpoint is reported with its reason, never raised.
- Writers hold a lock file `.<name>.lock` (pid, host, process start time); a second writer is refused with the
  holder's pid, and a lock left by a dead process is taken over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import math
import os
import re
import secrets
import shutil
import socket
import struct
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from gpt2term import locations
from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import CheckpointError, Gpt2termError, InputError, StorageError
from gpt2term.core.interop import (
    EXPORT_FORMATS,
    ExportResult,
    WriteRecorder,
    export_book_pth,
    export_hf,
    find_hf_cached,
    fsync_path,
    load_hf_cached,
    load_state_dict_checked,
    load_weights_file,
    read_safetensors,
    torch_load_safely,
    write_safetensors,
)
from gpt2term.core.metrics import perplexity
from gpt2term.core.model import GPTModel
from gpt2term.formatting import format_bytes

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


class CheckpointLocked(CheckpointError):
    """Another process (or another run in this one) is writing this checkpoint."""


_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def storage_error(exc: OSError, doing: str, where: Path, kept: str) -> StorageError:
    """One line for a write the disk refused: what failed, why, where (and how much room is left), what is kept."""
    reason = _WRITE_FAILURES.get(exc.errno or 0, exc.strerror or str(exc))
    room = ""
    for folder in (where, *where.parents):
        with contextlib.suppress(OSError):
            usage = shutil.disk_usage(folder)
            room = f" ({format_bytes(usage.free)} free of {format_bytes(usage.total)})"
            break
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space there (or set GPT2TERM_HOME to a folder on a larger disk) and retry"
    else:
        fix = "make it writable (or set GPT2TERM_HOME to a writable folder) and retry"
    return StorageError(f"could not {doing}: {reason} at {where}{room}; {kept}; {fix}")


def _what_is_kept(folder: Path, name: str) -> str:
    """For a failed write's message: the checkpoint as it was before (a failed write never touches it)."""
    meta = CheckpointStore._read_meta(folder)
    if not meta:
        return "nothing was saved"
    step = f" (step {meta['step']})" if meta.get("step") is not None else ""
    return f"the previous checkpoint {name!r}{step} is intact"


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


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _json_default(value: Any) -> Any:
    """Numbers from torch/numpy and paths, as JSON: trainers pass tensors for losses without thinking about it."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable; store plain numbers and strings in meta")


_WEIGHTS_ONLY_TYPES = (str, bytes, int, float, bool, complex, type(None), torch.Tensor, torch.Size, torch.dtype)


def _check_loadable_state(value: Any, where: str) -> None:
    """Refuse, at save time, state that `torch.load(weights_only=True)` would refuse at resume time."""
    if isinstance(value, (dict, OrderedDict)):
        for k, v in value.items():
            _check_loadable_state(k, where)
            _check_loadable_state(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple, set)):
        for i, v in enumerate(value):
            _check_loadable_state(v, f"{where}[{i}]")
    elif not isinstance(value, (*_WEIGHTS_ONLY_TYPES, torch.device)):
        raise TypeError(
            f"{where} is a {type(value).__name__}; checkpoint state may hold only tensors, numbers, strings, "
            "lists, tuples and dicts (it is read back with weights_only=True)"
        )


# ----------------------------------------------------------------------------------------------------- symlinks
# The store writes only real files in real folders of its own: a symbolic link (a checkpoint folder, or a
# metrics.jsonl, pointing elsewhere) is read through, but never written through, and removing one removes the link.


def _lexists(path: Path) -> bool:
    """Whether anything is there, a dangling symbolic link included (Path.exists() follows links)."""
    return os.path.lexists(path)


def _remove_entry(path: Path) -> None:
    """Remove a staging leftover or a checkpoint: a link (or file) is unlinked, never followed; a folder is removed."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _open_for_append(folder: Path, filename: str) -> int:
    """A file descriptor appending to `folder/filename`, refusing (CheckpointError) where either is a symbolic link:
    lines meant for the store never land in a file elsewhere."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | nofollow | getattr(os, "O_CLOEXEC", 0)
    try:
        if nofollow and hasattr(os, "O_DIRECTORY") and os.open in os.supports_dir_fd:
            folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | nofollow)
            try:
                return os.open(filename, flags, 0o644, dir_fd=folder_fd)
            finally:
                os.close(folder_fd)
        if folder.is_symlink() or (folder / filename).is_symlink():
            raise OSError(errno.ELOOP, "is a symbolic link")
        return os.open(folder / filename, flags, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
            raise
        link = folder if folder.is_symlink() else folder / filename
        raise CheckpointError(
            f"{link} is a symbolic link; the store never writes through links: replace it with a real "
            f"{'folder' if link == folder else 'file'} (or delete it) and retry"
        ) from exc


# ------------------------------------------------------------------------------------------------------ listing


@dataclass
class CheckpointInfo:
    """One row of a listing. Building it never raises: a checkpoint that cannot be loaded has `damaged` set."""

    name: str
    path: Path
    meta: dict | None
    damaged: str | None
    size_bytes: int
    has_optimizer: bool
    updated: str | None  # ISO time

    def get(self, key: str, default: Any = None) -> Any:
        """A meta.json value, or `default` (damaged checkpoints may have no meta)."""
        return (self.meta or {}).get(key, default)

    @property
    def config(self) -> GPTConfig | None:
        try:
            return GPTConfig.from_dict(self.get("config") or {}) if self.get("config") else None
        except (Gpt2termError, TypeError, ValueError):
            return None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object `ckpt list --json` prints: the row's fields and meta.json's main values."""
        row: dict[str, Any] = {
            "name": self.name,
            "damaged": self.damaged,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "has_optimizer": self.has_optimizer,
            "updated": self.updated,
            "created": self.get("created"),
            "parameters": self.get("parameters"),
        }
        row.update({k: self.get(k) for k in META_KEYS})
        row["config"] = self.get("config")
        return row


@dataclass
class Checkpoint:
    """A loaded checkpoint: what the model needs (config, weights) and, when asked, what a resumed run needs."""

    name: str
    config: GPTConfig
    state_dict: dict[str, torch.Tensor]
    meta: dict
    optimizer_state: dict | None = None
    trainer_state: dict | None = None
    notices: list[str] = field(default_factory=list)  # what the user should be told about how it was read
    store_name: str | None = None  # set when it came from the store (not from a path)

    def build_model(self, device: torch.device | str = "cpu") -> GPTModel:
        """A GPTModel with these weights, in eval mode (call `.train()` to train it), in the dtype they were saved."""
        with torch.device("meta"):
            model = GPTModel(self.config)
        model = model.to_empty(device=device)
        load_state_dict_checked(model, self.state_dict, self.name)
        return model.eval()


@lru_cache(maxsize=16)
def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
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


def _meta_problem(meta: dict) -> tuple[GPTConfig | None, str | None]:
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


def _safetensors_problem(path: Path, cfg: GPTConfig) -> str | None:
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


def _folder_size(path: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def inspect_folder(path: Path, name: str | None = None) -> CheckpointInfo:
    """A listing row for any checkpoint folder (in the store or not). Never raises."""
    name = name or path.name
    meta: dict | None = None
    damaged: str | None = None
    if path.is_symlink() and not path.is_dir():
        target = os.readlink(path)
        reason = f"a symbolic link to {target}, which is not a folder; rm removes the link (not what it points to)"
        return CheckpointInfo(name, path, None, reason, 0, False, None)
    size = _folder_size(path)
    optimizer = path / OPTIMIZER_FILE
    has_optimizer = optimizer.is_file() and zipfile.is_zipfile(optimizer)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        if not (path / WEIGHTS_FILE).exists() and (path / METRICS_FILE).is_file():
            damaged = "no weights yet: only metrics.jsonl (a run that has not saved); wait for its first save or rm it"
        else:
            damaged = f"{META_FILE} is missing; re-import the weights or rm this checkpoint"
    else:
        try:
            if meta_file.stat().st_size > MAX_META_BYTES:  # e.g. a link to a huge file: not read into memory
                raise ValueError(f"{meta_file.stat().st_size:,} bytes, far more than any meta.json")
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            meta, damaged = None, f"{META_FILE} is unreadable ({str(exc)[:100]})"
    if damaged is None:
        assert meta is not None
        cfg, damaged = _meta_problem(meta)
        if cfg is not None:
            if not (path / WEIGHTS_FILE).is_file():
                damaged = f"{WEIGHTS_FILE} is missing"
            else:
                damaged = _safetensors_problem(path / WEIGHTS_FILE, cfg)
    if damaged is not None and meta is not None:
        meta = _displayable(meta)
    updated = (meta or {}).get("updated")
    if not updated:
        with contextlib.suppress(OSError):
            updated = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
    return CheckpointInfo(name, path, meta, damaged, size, has_optimizer, updated)


def _displayable(meta: dict) -> dict:
    """A damaged checkpoint's meta without the fields of a wrong type, so tables and details can still show the rest."""
    return {k: v for k, v in meta.items() if k not in _META_FIELDS or v is None or _META_FIELDS[k][0](v)}


def load_folder(path: Path, name: str | None = None, *, with_state: bool = False) -> Checkpoint:
    """Load a checkpoint folder of ours, safely: weights by safetensors, state by `weights_only=True`."""
    name = name or path.name
    info = inspect_folder(path, name)
    if info.damaged:
        raise CheckpointError(f"checkpoint {name!r} is damaged: {info.damaged}")
    assert info.meta is not None
    cfg = GPTConfig.from_dict(info.meta["config"])
    state_dict = read_safetensors(path / WEIGHTS_FILE)
    optimizer_state = trainer_state = None
    if with_state:
        if (path / OPTIMIZER_FILE).is_file():
            optimizer_state = torch_load_safely(path / OPTIMIZER_FILE)
        if (path / TRAINER_FILE).is_file():
            trainer_state = torch_load_safely(path / TRAINER_FILE)
    return Checkpoint(name, cfg, state_dict, info.meta, optimizer_state, trainer_state)


def non_finite_tensor(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The first floating-point tensor holding NaN or inf (weights of a run that diverged), or None."""
    for key, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def _usable(checkpoint: Checkpoint) -> Checkpoint:
    """Weights with NaN or inf would only print `perplexity nan`: refuse them in one line instead."""
    bad = non_finite_tensor(checkpoint.state_dict)
    if bad is not None:
        raise CheckpointError(
            f"{checkpoint.name!r} has non-finite weights (nan or inf in {bad}): the run that wrote it diverged; "
            "use an earlier checkpoint, or train again with a lower --lr"
        )
    return checkpoint


def is_checkpoint_folder(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


# -------------------------------------------------------------------------------------------------------- locks


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), so a lock is not kept alive by an unrelated process reusing it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, started: str | None = None) -> bool:
    if not 0 < pid <= MAX_PID:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        ctypes.windll.kernel32.CloseHandle(handle)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):  # killed, not yet reaped: it will never release its lock
            return False
    if started is not None:
        now = _process_start(pid)
        if now is not None and now != started:
            return False
    return True


MAX_PID = 2**31 - 1  # pid_t is 32 bits: a lock naming a larger process id was not written by a process
LOCK_GRACE_S = 10.0  # a lock file that cannot be read is taken as being written for this long, then as abandoned


@dataclass
class LockHolder:
    pid: int
    host: str
    since: str | None
    purpose: str | None
    token: str | None
    started: str | None = None
    unreadable_for: float | None = None  # seconds since a lock file that cannot be parsed was last written
    invalid: str | None = None  # why the lock path cannot be a lock of ours (a folder, an impossible process id)

    @classmethod
    def read(cls, path: Path) -> LockHolder | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            return cls(-1, socket.gethostname(), None, None, None, invalid="is a folder, not a lock file")
        except OSError:
            text = ""
        try:
            data = json.loads(text)
            holder = cls(
                int(data["pid"]),
                str(data.get("host", "")),
                data.get("since"),
                data.get("purpose"),
                data.get("token"),
                data.get("started"),
            )
        except (ValueError, KeyError, TypeError):
            # Being written by a process that has just created it (older versions wrote it after creating it),
            # or left half-written by one killed in between: held while young, abandoned once old.
            try:
                age = max(0.0, time.time() - path.stat().st_mtime)
            except FileNotFoundError:
                return None
            except OSError:
                age = LOCK_GRACE_S
            return cls(-1, socket.gethostname(), None, None, None, unreadable_for=age)
        if not 0 < holder.pid <= MAX_PID:
            holder.invalid = f"names process id {holder.pid}, which no process can have"
        return holder

    def alive(self) -> bool:
        if self.invalid:
            return False
        if self.host and self.host != socket.gethostname():
            return True  # another machine sharing the folder: we cannot tell, so we respect it
        if self.unreadable_for is not None:
            return self.unreadable_for < LOCK_GRACE_S
        return _pid_alive(self.pid, self.started)

    def describe(self) -> str:
        if self.unreadable_for is not None:
            return "a process that is creating its lock file right now"
        what = f" ({self.purpose})" if self.purpose else ""
        return f"process {self.pid} on {self.host or 'this machine'}{what} since {self.since or '?'}"


def _write_new_file(path: Path, data: bytes) -> None:
    """Create `path` (never an existing one) holding `data`; on a failed write (a full disk) it is removed again."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)


def _append_line(path: Path, data: bytes) -> None:
    """Append all of `data` or nothing: a write cut short (a full disk) is truncated away, so no half line is left
    for the next line to be glued to. Never through a symbolic link (see _open_for_append)."""
    fd = _open_for_append(path.parent, path.name)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


_PROCESS_LOCKS: dict[str, tuple[str, int]] = {}  # lock file path -> (token, thread id), for locks held here
_PROCESS_LOCKS_GUARD = threading.Lock()
_NAME_MUTEXES: dict[str, threading.RLock] = {}


def _name_mutex(path: Path) -> threading.RLock:
    """One in-process mutex per checkpoint folder: saves, appends and renames of one name never interleave."""
    with _PROCESS_LOCKS_GUARD:
        return _NAME_MUTEXES.setdefault(str(path), threading.RLock())


class CheckpointLock:
    """The lock file of one checkpoint. A training run holds it for its whole run; `save()` takes it briefly."""

    def __init__(self, path: Path, name: str, purpose: str | None = None) -> None:
        self.path = path
        self.name = name
        self.purpose = purpose
        self.token: str | None = None

    def acquire(self) -> CheckpointLock:
        with _PROCESS_LOCKS_GUARD:
            if str(self.path) in _PROCESS_LOCKS:
                raise CheckpointLocked(
                    f"checkpoint {self.name!r} is already being written by another run in this program; "
                    "wait for it to finish or stop it first"
                )
            try:
                return self._acquire()
            except OSError as exc:
                kept = _what_is_kept(self.path.parent / self.name, self.name)
                raise storage_error(exc, f"lock checkpoint {self.name!r}", self.path.parent, kept) from exc

    def _acquire(self) -> CheckpointLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        for _ in range(5):
            if self._create(token):
                _PROCESS_LOCKS[str(self.path)] = (token, threading.get_ident())
                self.token = token
                return self
            holder = LockHolder.read(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            if holder.invalid:
                raise CheckpointLocked(
                    f"the lock file {self.path} of checkpoint {self.name!r} {holder.invalid}; "
                    f"remove it if no gpt2term is writing {self.name!r}, then retry"
                )
            if holder.alive() and holder.unreadable_for is not None:
                raise CheckpointLocked(
                    f"checkpoint {self.name!r} is being locked by another process right now; try again in a "
                    f"moment (if no other gpt2term is running, delete {self.path})"
                )
            if holder.alive():
                raise CheckpointLocked(
                    f"checkpoint {self.name!r} is being written by {holder.describe()}; wait for it to finish "
                    f"or stop it (if that process is gone, delete {self.path})"
                )
            self._take_over(holder)
        raise CheckpointLocked(f"could not lock checkpoint {self.name!r} ({self.path}); try again")

    def _create(self, token: str) -> bool:
        """Put a complete lock file in place unless one exists: written beside it, then hard-linked (the link
        fails if the name is taken), so no other process ever reads a lock without its owner in it."""
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _process_start(os.getpid()),
            "since": _now(),
            "purpose": self.purpose,
            "token": token,
        }
        data = json.dumps(record).encode("utf-8")
        new = self.path.with_name(f"{self.path.name}.new-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            _write_new_file(new, data)
            try:
                os.link(new, self.path)
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
            # No hard links on this file system: create it exclusively, then write (readers wait LOCK_GRACE_S).
            try:
                _write_new_file(self.path, data)
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(OSError):
                new.unlink()

    def _take_over(self, stale: LockHolder) -> None:
        """Remove a dead process's lock, unless another process took it over first (then leave theirs alone)."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = LockHolder.read(aside)
        if moved is not None and (moved.token, moved.pid) != (stale.token, stale.pid):
            # We moved a fresh lock someone else had just created: put it back if nobody took the place since.
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        with _PROCESS_LOCKS_GUARD:
            if self.token is None or _PROCESS_LOCKS.get(str(self.path), ("",))[0] != self.token:
                return
            del _PROCESS_LOCKS[str(self.path)]
            holder = LockHolder.read(self.path)
            if holder is not None and holder.token == self.token:
                self.path.unlink(missing_ok=True)
            self.token = None

    def __enter__(self) -> CheckpointLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


# -------------------------------------------------------------------------------------------------------- store


class CheckpointStore:
    """Every checkpoint the user keeps, by name. Safe to use from several threads and processes at once."""

    def __init__(self, root: Path | None = None) -> None:
        # Absolute, so that every store object of this process names a lock file the same way.
        self.root = (Path(root) if root is not None else locations.checkpoints_dir()).expanduser().absolute()

    # ---------------------------------------------------------------- paths

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def metrics_path(self, name: str) -> Path:
        return self.path(name) / METRICS_FILE

    def lock_path(self, name: str) -> Path:
        return self.root / f".{validate_name(name)}.lock"

    def _state_path(self) -> Path:
        default = locations.checkpoints_dir().expanduser().absolute()
        return locations.state_path() if self.root == default else self.root / ".state.json"

    def _staging(self, name: str, kind: str) -> Path:
        return self.root / f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"

    # ---------------------------------------------------------------- locks

    def lock(self, name: str, purpose: str | None = "training") -> CheckpointLock:
        """Hold this for a whole training run: other writers (other processes, other runs here) are refused."""
        return CheckpointLock(self.lock_path(name), name, purpose)

    def lock_holder(self, name: str) -> LockHolder | None:
        """Who writes this checkpoint now (a live process), or None."""
        holder = LockHolder.read(self.lock_path(name))
        return holder if holder is not None and holder.alive() else None

    def _held_here(self, name: str, *, by_this_thread: bool = False) -> bool:
        with _PROCESS_LOCKS_GUARD:
            held = _PROCESS_LOCKS.get(str(self.lock_path(name)))
        return held is not None and (not by_this_thread or held[1] == threading.get_ident())

    @contextlib.contextmanager
    def _writing(self, name: str, purpose: str, *, any_thread: bool = False) -> Iterator[None]:
        """Exclusive access for one write: the in-process mutex, and the lock file. The thread holding the lock
        (a training run) may write; with `any_thread` (saves) so may the rest of its process; the rest of the
        process may not delete or rename a checkpoint under a run."""
        with _name_mutex(self.path(name)):
            if self._held_here(name, by_this_thread=not any_thread):
                yield
            else:
                with CheckpointLock(self.lock_path(name), name, purpose):
                    yield

    # ---------------------------------------------------------------- crash repair

    def _staging_entries(self) -> list[tuple[Path, re.Match]]:
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        return [(Path(e.path), m) for e in entries if (m := STAGING_RE.match(e.name))]

    def _recover(self, name: str, entries: list[tuple[Path, re.Match]] | None = None) -> None:
        """Repair what a crash of a writer left: put back an old folder whose replacement never arrived, remove
        temporary and half-deleted folders of dead processes. Skipped while a live writer holds the lock."""
        entries = [(p, m) for p, m in (entries or self._staging_entries()) if m["name"] == name]
        if not entries:
            return
        with _name_mutex(self.path(name)):
            if self._held_here(name) or self.lock_holder(name) is not None:
                return
            try:
                lock = CheckpointLock(self.lock_path(name), name, "repair").acquire()
            except (CheckpointError, OSError):
                return
            try:
                final = self.root / name
                for path, match in sorted(entries, key=lambda e: e[1]["kind"] != "old"):
                    if not _lexists(path):
                        continue
                    if match["kind"] == "old" and not _lexists(final):
                        os.rename(path, final)
                        fsync_path(self.root)
                    else:
                        _remove_entry(path)
            except OSError:
                pass
            finally:
                lock.release()

    def _old_in_flight(self, name: str) -> Path | None:
        """During an overwrite's two renames the checkpoint lives at `.<name>.old-...`: readers use it there."""
        for path, match in self._staging_entries():
            if match["name"] == name and match["kind"] == "old" and is_checkpoint_folder(path):
                return path
        return None

    def _existing_path(self, name: str) -> Path | None:
        self._recover(name)
        path = self.path(name)
        if path.is_dir() or path.is_symlink():
            return path
        return self._old_in_flight(name)

    # ---------------------------------------------------------------- reading

    def exists(self, name: str) -> bool:
        return self._existing_path(name) is not None

    def _require(self, name: str) -> Path:
        path = self._existing_path(name)
        if path is None:
            raise CheckpointError(f"no checkpoint named {name!r}; see `gpt2term ckpt list` for the names")
        return path

    def info(self, name: str) -> CheckpointInfo:
        return inspect_folder(self._require(name), name)

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint, sorted by name; damaged ones included, with their reason."""
        entries = self._staging_entries()
        for name in {m["name"] for _, m in entries}:
            with contextlib.suppress(Gpt2termError):
                validate_name(name)
                self._recover(name, entries)
        rows = {}
        try:
            children = list(os.scandir(self.root))
        except OSError:
            return []
        for entry in children:
            if entry.name.startswith(".") or not NAME_RE.match(entry.name):
                continue
            if not entry.is_dir() and not entry.is_symlink():
                continue
            rows[entry.name] = inspect_folder(Path(entry.path), entry.name)
        for path, match in self._staging_entries():  # overwrites caught between their two renames
            if match["kind"] == "old" and match["name"] not in rows and is_checkpoint_folder(path):
                rows[match["name"]] = inspect_folder(path, match["name"])
        return [rows[k] for k in sorted(rows, key=str.lower)]

    def load(self, name: str, *, with_state: bool = False) -> Checkpoint:
        """Weights, config and meta; with `with_state`, also the optimizer and trainer state (for resuming)."""
        checkpoint = load_folder(self._require(name), name, with_state=with_state)
        checkpoint.store_name = name
        return checkpoint

    def load_model(self, name: str, device: torch.device | str = "cpu") -> GPTModel:
        return self.load(name).build_model(device)

    def read_metrics(self, name: str) -> list[dict]:
        """The run's events, oldest first. A line still being written (or cut off by a crash), or holding values no
        screen can show (non-finite, huge, wrongly typed), is skipped."""
        from gpt2term.core.follow import parse_metrics_line

        path = self.metrics_path(name)
        if not path.is_file():  # missing; or a FIFO or device behind a link, which would block or never end
            return []
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return [record for line in text.splitlines() if (record := parse_metrics_line(line)) is not None]

    # ---------------------------------------------------------------- writing

    def pending_metrics(self, name: str) -> Path:
        """Where a run that will replace `name` (train --overwrite) logs until its first save moves the file in:
        a temporary folder beside it, so the old checkpoint keeps its own history until then (and a crash
        leaves it as it was; the folder is removed like any a dead writer left)."""
        folder = self._staging(validate_name(name), "tmp")
        self.root.mkdir(parents=True, exist_ok=True)
        folder.mkdir()
        return folder / METRICS_FILE

    def append_metrics(self, name: str, record: dict, path: Path | None = None) -> None:
        """One JSON line, flushed, so another process (the app following a headless run) sees it at once.
        Works before the first save: the folder then holds only metrics.jsonl until the weights arrive.
        `path`: a file from `pending_metrics` instead of the checkpoint's own."""
        line = json.dumps(record, default=_json_default, ensure_ascii=False)
        with _name_mutex(self.path(name)):
            path = path or self.metrics_path(name)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _append_line(path, (line + "\n").encode("utf-8"))
            except OSError as exc:
                raise storage_error(
                    exc, f"append to {METRICS_FILE} of {name!r}", path.parent, "the lines written before are intact"
                ) from exc

    def save(
        self,
        name: str,
        model: GPTModel,
        *,
        meta: dict | None = None,
        optimizer_state: dict | None = None,
        trainer_state: dict | None = None,
        metrics_from: Path | None = None,
    ) -> CheckpointInfo:
        """Save atomically: the old checkpoint (if any) stays intact until the new one is complete on disk.

        `meta` is merged into the existing meta.json; `created` is kept, `updated` set now, `config` and
        `parameters` come from the model. Losses without perplexities get them filled in.
        With `metrics_from` (a `pending_metrics` file) the checkpoint starts over: nothing of the old one's meta
        is kept and its metrics are that file's."""
        validate_name(name)
        model = getattr(model, "_orig_mod", model)  # torch.compile'd
        model = getattr(model, "module", model)  # DistributedDataParallel
        if not isinstance(getattr(model, "cfg", None), GPTConfig):
            raise TypeError("save() takes a GPTModel (it reads the model's cfg)")
        if optimizer_state is not None:
            _check_loadable_state(optimizer_state, "optimizer_state")
        if trainer_state is not None:
            _check_loadable_state(trainer_state, "trainer_state")
        bad = non_finite_tensor(model.state_dict())
        if bad is not None:
            raise CheckpointError(
                f"not saving {name!r}: its weights hold nan or inf ({bad}); the previous version (if any) is kept"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, f"save checkpoint {name!r}", self.root, "nothing was written") from exc
        with self._writing(name, "save", any_thread=True):
            self._recover_own(name)
            final = self.root / name
            old_meta = self._read_meta(final) if metrics_from is None else {}
            kept = _what_is_kept(final, name)
            record = self._merged_meta(old_meta, meta or {}, model)
            tmp = self._staging(name, "tmp")
            try:
                tmp.mkdir()
                write_safetensors(model.state_dict(), tmp / WEIGHTS_FILE)
                if optimizer_state is not None:
                    self._torch_save(optimizer_state, tmp / OPTIMIZER_FILE)
                if trainer_state is not None:
                    self._torch_save(trainer_state, tmp / TRAINER_FILE)
                self._write_json(tmp / META_FILE, record)
                metrics = final / METRICS_FILE if metrics_from is None else metrics_from
                if metrics.is_file():
                    self._carry_metrics(metrics, tmp / METRICS_FILE)
                fsync_path(tmp)
                self._put_in_place(tmp, final, name)
            except OSError as exc:
                raise storage_error(exc, f"save checkpoint {name!r}", self.root, kept) from exc
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return inspect_folder(final, name)

    def _recover_own(self, name: str) -> None:
        """Crash repair while this process holds the lock (before a save): same as _recover, lock already ours."""
        final = self.root / name
        for path, match in self._staging_entries():
            if match["name"] != name or int(match["pid"]) == os.getpid():
                continue
            if match["kind"] == "old" and not _lexists(final):
                os.rename(path, final)
            else:
                _remove_entry(path)

    @staticmethod
    def _read_meta(folder: Path) -> dict:
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            return meta if isinstance(meta, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _merged_meta(old: dict, new: dict, model: GPTModel) -> dict:
        now = _now()
        record: dict[str, Any] = {k: None for k in META_KEYS}
        record.update(_displayable(old))  # a field of a wrong type in the old meta.json is dropped, not carried
        record.update(new)
        record["config"] = model.cfg.to_dict()
        record["parameters"] = model.num_parameters()
        record["created"] = old.get("created") or new.get("created") or now
        record["updated"] = now
        record["format"] = FORMAT_VERSION
        for split in ("train", "val"):
            if f"{split}_loss" in new and f"{split}_perplexity" not in new:
                try:
                    record[f"{split}_perplexity"] = perplexity(new[f"{split}_loss"])
                except (TypeError, ValueError):  # a loss that is not a number has no perplexity
                    record[f"{split}_perplexity"] = None
        return record

    @staticmethod
    def _torch_save(obj: Any, path: Path) -> None:
        with open(path, "wb") as f:
            writer = WriteRecorder(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is not None:  # torch reports a failed write as "enforce fail at inline_container"
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _write_json(path: Path, obj: Any) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2, default=_json_default, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _carry_metrics(src: Path, dst: Path) -> None:
        """Hard-link the run's metrics into the new folder: one file, so lines appended meanwhile are kept.
        A link is carried as the link itself (appends refuse it), and nothing is carried out of a linked folder:
        a hard link to a file outside the store would let the store write there."""
        if src.parent.is_symlink():
            return
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:  # filesystems without hard links
            shutil.copy2(src, dst, follow_symlinks=False)

    def _put_in_place(self, tmp: Path, final: Path, name: str) -> None:
        """Rename the complete new folder into place; an existing one is moved aside first and deleted last."""
        old = None
        if _lexists(final):
            old = self._staging(name, "old")
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None and not _lexists(final):
                os.rename(old, final)  # interrupted between the renames: put the old one back
            raise
        fsync_path(self.root)
        if old is not None:
            _remove_entry(old)

    def rename(self, old: str, new: str) -> None:
        """`ckpt mv`: one atomic rename of the folder; refused while either name is being written."""
        validate_name(new)
        self._require(old)
        if self.path(new).exists():
            raise CheckpointError(f"a checkpoint named {new!r} already exists; rm it first or pick another name")
        with self._writing(old, "rename"), self._writing(new, "rename"):
            self._recover_own(old)
            if not self.path(old).is_dir() and not self.path(old).is_symlink():
                raise CheckpointError(f"no checkpoint named {old!r}; see `gpt2term ckpt list` for the names")
            if _lexists(self.path(new)):
                raise CheckpointError(f"a checkpoint named {new!r} already exists; rm it first or pick another name")
            os.rename(self.path(old), self.path(new))
            fsync_path(self.root)
        self._rename_in_state(old, new)

    def copy(self, src: str, dst: str) -> CheckpointInfo:
        """`ckpt cp`: an independent copy (metrics included), written to a temporary folder and renamed in."""
        source = self._require(src)
        return self.import_folder(source, dst, copied_from=src)

    def import_folder(self, source: Path, name: str, *, copied_from: str | None = None) -> CheckpointInfo:
        """Copy a checkpoint folder of ours (from the store or anywhere) in under `name`, atomically."""
        validate_name(name)
        if self.path(name).exists():
            raise CheckpointError(f"a checkpoint named {name!r} already exists; rm it first or pick another name")
        info = inspect_folder(source, source.name)
        if info.damaged:
            raise CheckpointError(f"{source} is damaged ({info.damaged}); it cannot be copied")
        self.root.mkdir(parents=True, exist_ok=True)
        with self._writing(name, "copy"):
            if self.path(name).exists():
                raise CheckpointError(f"a checkpoint named {name!r} already exists; rm it first or pick another name")
            tmp = self._staging(name, "tmp")
            try:
                for _ in range(3):  # a run may save over the source meanwhile: copy again until it is stable
                    before = self._fingerprint(source)
                    shutil.rmtree(tmp, ignore_errors=True)
                    shutil.copytree(source, tmp)
                    if self._fingerprint(source) == before:
                        break
                meta = self._read_meta(tmp)
                if copied_from:
                    meta["copied_from"] = copied_from
                else:
                    meta.setdefault("source", f"checkpoint-folder:{source}")
                self._write_json(tmp / META_FILE, meta)
                for child in tmp.iterdir():
                    fsync_path(child)
                fsync_path(tmp)
                os.rename(tmp, self.path(name))
                fsync_path(self.root)
            except OSError as exc:
                raise CheckpointError(f"could not copy into {name!r} ({exc}); free disk space and retry") from exc
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return self.info(name)

    @staticmethod
    def _fingerprint(folder: Path) -> tuple:
        try:
            return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(folder)))
        except OSError:
            return ()

    def delete(self, name: str) -> None:
        """`ckpt rm`: refused while a run writes it. The folder disappears at once (renamed aside), then is removed."""
        self._require(name)
        with self._writing(name, "delete"):
            self._recover_own(name)
            path = self.path(name)
            if path.is_symlink():  # the link goes, never what it points to
                path.unlink()
                fsync_path(self.root)
            elif not path.is_dir():
                raise CheckpointError(f"no checkpoint named {name!r}; see `gpt2term ckpt list` for the names")
            else:
                doomed = self._staging(name, "deleted")
                os.rename(path, doomed)
                fsync_path(self.root)
                _remove_entry(doomed)
        state = self._read_state()
        if state.get("most_recent_checkpoint") == name:
            state.pop("most_recent_checkpoint")
            self._write_state(state)

    # ---------------------------------------------------------------- import

    def import_weights(self, spec: str, name: str | None = None, *, n_heads: int | None = None) -> ImportResult:
        """`ckpt import`: a HF safetensors file/folder, a HF-cache name, a book .pth, or a checkpoint folder of ours."""
        path = Path(spec).expanduser()
        if is_checkpoint_folder(path):
            name = validate_name(name or suggest_name(path.name))
            return ImportResult(self.import_folder(path, name), [])
        if name is not None and self.exists(validate_name(name)):  # before reading gigabytes of weights
            raise CheckpointError(f"a checkpoint named {name!r} already exists; pick another --name, or rm it first")
        loaded = resolve_weights(spec, self, n_heads=n_heads, prefer_store=False)
        if name is None:
            name = suggest_name(loaded.name)
        validate_name(name)
        if self.exists(name):
            raise CheckpointError(
                f"a checkpoint named {name!r} already exists; pass --name to pick another, or rm it first"
            )
        meta: dict[str, Any] = {"source": loaded.meta.get("source", spec)}
        if loaded.notices:
            meta["notices"] = loaded.notices
        info = self.save(name, loaded.build_model(), meta=meta, optimizer_state=loaded.optimizer_state)
        return ImportResult(info, loaded.notices)

    # ---------------------------------------------------------------- export

    def export(self, name: str, fmt: str, path: Path, *, overwrite: bool = False) -> ExportResult:
        """`ckpt export` and the TUI's export dialog: checkpoint `name` written in format `fmt` (a key of
        `EXPORT_FORMATS`), read with its optimizer state only when the format carries it."""
        if fmt not in EXPORT_FORMATS:
            raise InputError(f"unknown export format {fmt!r}; use one of: {', '.join(EXPORT_FORMATS)}")
        checkpoint = self.load(name, with_state=fmt == "pth-optimizer")
        if fmt == "hf":
            return export_hf(checkpoint.state_dict, checkpoint.config, path, overwrite=overwrite)
        return export_book_pth(
            checkpoint.state_dict,
            checkpoint.config,
            path,
            optimizer_state=checkpoint.optimizer_state,
            with_optimizer=fmt == "pth-optimizer",
            overwrite=overwrite,
        )

    # ---------------------------------------------------------------- app state

    def _read_state(self) -> dict:
        try:
            state = json.loads(self._state_path().read_text(encoding="utf-8"))
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_state(self, state: dict) -> None:
        """Best effort: the app state (the last checkpoint used) is a convenience, so a full or read-only data
        folder must not stop `generate` or the app from using a model."""
        path = self._state_path()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _rename_in_state(self, old: str, new: str) -> None:
        state = self._read_state()
        if state.get("most_recent_checkpoint") == old:
            state["most_recent_checkpoint"] = new
            self._write_state(state)

    def mark_used(self, name: str) -> None:
        """Remember `name` as the checkpoint to open next time (the app starts with it)."""
        validate_name(name)
        state = self._read_state()
        state["most_recent_checkpoint"] = name
        self._write_state(state)

    def last_used(self) -> str | None:
        """The checkpoint `mark_used` remembered, whether or not it still exists or loads."""
        name = self._read_state().get("most_recent_checkpoint")
        return name if isinstance(name, str) else None

    def most_recent(self) -> str | None:
        """The last checkpoint used, if it still loads; else the most recently updated loadable one; else None."""
        rows = [row for row in self.list() if row.damaged is None]
        wanted = self._read_state().get("most_recent_checkpoint")
        if any(row.name == wanted for row in rows):
            return wanted
        rows.sort(key=lambda row: row.updated or "", reverse=True)
        return rows[0].name if rows else None


@dataclass
class ImportResult:
    info: CheckpointInfo
    notices: list[str]


def resolve_weights(
    spec: str,
    store: CheckpointStore | None = None,
    *,
    n_heads: int | None = None,
    prefer_store: bool = True,
) -> Checkpoint:
    """What a user means by `--checkpoint SPEC`: a store name, else a path (a checkpoint folder of ours, HF
    safetensors file or folder, a book .pth), else a GPT-2 in the local Hugging Face cache ("gpt2", ...)."""
    store = store or CheckpointStore()
    spec = str(spec)
    is_name = bool(NAME_RE.match(spec)) and ".." not in spec and len(spec) <= MAX_NAME_LENGTH
    if prefer_store and is_name and store.exists(spec):
        return _usable(store.load(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if is_checkpoint_folder(path):
            return _usable(load_folder(path, suggest_name(path.name)))
        if path.name == WEIGHTS_FILE and is_checkpoint_folder(path.parent):  # our model.safetensors, by its path
            return _usable(load_folder(path.parent, suggest_name(path.parent.name)))
        loaded = load_weights_file(path)
        stem = path.parent.name if path.is_file() and path.stem in ("model", "pytorch_model") else path.stem
    else:
        cached = find_hf_cached(spec) if is_name or spec.count("/") == 1 else None
        if cached is None:
            if not is_name or path.suffix in (".safetensors", ".pth", ".pt", ".bin"):
                load_weights_file(path)  # raises its "no such file" error naming the path
            raise CheckpointError(
                f"{spec!r}: no checkpoint of that name, no such file or folder, and no GPT-2 of that name in the "
                "Hugging Face cache; see `gpt2term ckpt list`, check the path, or run `gpt2term ckpt download gpt2`"
            )
        loaded = load_hf_cached(cached)
        stem = cached.name
    if n_heads is not None:
        loaded.config = loaded.config.with_(n_heads=n_heads)
        loaded.notices = [n for n in loaded.notices if "heads" not in n]
        loaded.notices.append(f"using {n_heads} attention heads of {loaded.config.head_dim} dims, as given")
    checkpoint = Checkpoint(
        name=suggest_name(stem),
        config=loaded.config,
        # Half-precision files compute in float32 on CPU, as they did before the store existed.
        state_dict={k: v.float() if v.is_floating_point() else v for k, v in loaded.state_dict.items()},
        meta={"source": loaded.source, "config": loaded.config.to_dict()},
        optimizer_state=loaded.optimizer_state,
        trainer_state=None,
        notices=list(loaded.notices),
    )
    return _usable(checkpoint)
