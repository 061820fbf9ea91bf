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
import json
import os
import re
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt2term import locations
from gpt2term.core.accel.skeleton import meta_device
from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import CheckpointError, Gpt2termError, InputError
from gpt2term.core.interop import (
    EXPORT_FORMATS,
    ExportResult,
    export_book_pth,
    export_hf,
    load_state_dict_checked,
    read_safetensors,
    torch_load_safely,
    write_safetensors,
)
from gpt2term.core.metrics import perplexity
from gpt2term.core.model import GPTModel
from gpt2term.core.store.atomic import (
    append_line,
    fsync_path,
    lexists,
    remove_entry,
    storage_error,
    torch_save_synced,
    write_json_synced,
)
from gpt2term.core.store.layout import (
    FORMAT_VERSION,
    META_FILE,
    META_KEYS,
    METRICS_FILE,
    NAME_RE,
    OPTIMIZER_FILE,
    STAGING_RE,
    TRAINER_FILE,
    WEIGHTS_FILE,
    is_checkpoint_folder,
    json_default,
    read_meta,
    suggest_name,
    utc_now,
    validate_name,
    what_is_kept,
)
from gpt2term.core.store.locks import CheckpointLock, LockHolder, held_in_this_process, name_mutex
from gpt2term.core.store.state import LastUsed
from gpt2term.core.store.validate import (
    MAX_META_BYTES,
    check_loadable_state,
    displayable,
    meta_problem,
    non_finite_tensor,
    safetensors_problem,
)

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
        """A GPTModel with these weights, in eval mode (call `.train()` to train it), in the dtype they were saved.

        The meta skeleton's parameters become the loaded tensors themselves (`assign=True`), with no `to_empty`:
        allocating a model's worth of memory only to drop it cost a cold start more than reading the weights (torch's
        reference `empty_like` imports sympy on first use). The tensors safetensors returns map the file privately
        (copy-on-write), so training them in place never writes to the checkpoint on disk.
        """
        with meta_device():
            model = GPTModel(self.config)
        load_state_dict_checked(model, self.state_dict, self.name)
        return model.to(device).eval()


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
        cfg, damaged = meta_problem(meta)
        if cfg is not None:
            if not (path / WEIGHTS_FILE).is_file():
                damaged = f"{WEIGHTS_FILE} is missing"
            else:
                damaged = safetensors_problem(path / WEIGHTS_FILE, cfg)
    if damaged is not None and meta is not None:
        meta = displayable(meta)
    updated = (meta or {}).get("updated")
    if not updated:
        with contextlib.suppress(OSError):
            updated = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
    return CheckpointInfo(name, path, meta, damaged, size, has_optimizer, updated)


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

    @property
    def _last_used(self) -> LastUsed:
        return LastUsed(self._state_path())

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
        return held_in_this_process(self.lock_path(name), by_this_thread=by_this_thread)

    @contextlib.contextmanager
    def _writing(self, name: str, purpose: str, *, any_thread: bool = False) -> Iterator[None]:
        """Exclusive access for one write: the in-process mutex, and the lock file. The thread holding the lock
        (a training run) may write; with `any_thread` (saves) so may the rest of its process; the rest of the
        process may not delete or rename a checkpoint under a run."""
        with name_mutex(self.path(name)):
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
        with name_mutex(self.path(name)):
            if self._held_here(name) or self.lock_holder(name) is not None:
                return
            try:
                lock = CheckpointLock(self.lock_path(name), name, "repair").acquire()
            except (CheckpointError, OSError):
                return
            try:
                final = self.root / name
                for path, match in sorted(entries, key=lambda e: e[1]["kind"] != "old"):
                    if not lexists(path):
                        continue
                    if match["kind"] == "old" and not lexists(final):
                        os.rename(path, final)
                        fsync_path(self.root)
                    else:
                        remove_entry(path)
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
        line = json.dumps(record, default=json_default, ensure_ascii=False)
        with name_mutex(self.path(name)):
            path = path or self.metrics_path(name)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                append_line(path, (line + "\n").encode("utf-8"))
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
            check_loadable_state(optimizer_state, "optimizer_state")
        if trainer_state is not None:
            check_loadable_state(trainer_state, "trainer_state")
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
            kept = what_is_kept(final, name)
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
            if match["kind"] == "old" and not lexists(final):
                os.rename(path, final)
            else:
                remove_entry(path)

    _read_meta = staticmethod(read_meta)

    @staticmethod
    def _merged_meta(old: dict, new: dict, model: GPTModel) -> dict:
        now = utc_now()
        record: dict[str, Any] = {k: None for k in META_KEYS}
        record.update(displayable(old))  # a field of a wrong type in the old meta.json is dropped, not carried
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

    _torch_save = staticmethod(torch_save_synced)

    @staticmethod
    def _write_json(path: Path, obj: Any) -> None:
        write_json_synced(path, obj, default=json_default)

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
        if lexists(final):
            old = self._staging(name, "old")
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None and not lexists(final):
                os.rename(old, final)  # interrupted between the renames: put the old one back
            raise
        fsync_path(self.root)
        if old is not None:
            remove_entry(old)

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
            if lexists(self.path(new)):
                raise CheckpointError(f"a checkpoint named {new!r} already exists; rm it first or pick another name")
            os.rename(self.path(old), self.path(new))
            fsync_path(self.root)
        self._last_used.renamed(old, new)

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
                remove_entry(doomed)
        self._last_used.forget(name)

    # ---------------------------------------------------------------- import

    def import_weights(self, spec: str, name: str | None = None, *, n_heads: int | None = None) -> ImportResult:
        """`ckpt import`: a HF safetensors file/folder, a HF-cache name, a book .pth, or a checkpoint folder of ours."""
        path = Path(spec).expanduser()
        if is_checkpoint_folder(path):
            name = validate_name(name or suggest_name(path.name))
            return ImportResult(self.import_folder(path, name), [])
        if name is not None and self.exists(validate_name(name)):  # before reading gigabytes of weights
            raise CheckpointError(f"a checkpoint named {name!r} already exists; pick another --name, or rm it first")
        from gpt2term.core.store.resolve import resolve_weights  # resolving builds on the store

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
        run_lr = (checkpoint.meta.get("training") or {}).get("lr")
        return export_book_pth(
            checkpoint.state_dict,
            checkpoint.config,
            path,
            optimizer_state=checkpoint.optimizer_state,
            with_optimizer=fmt == "pth-optimizer",
            overwrite=overwrite,
            lr=float(run_lr) if isinstance(run_lr, int | float) and not isinstance(run_lr, bool) else None,
        )

    # ---------------------------------------------------------------- app state

    def mark_used(self, name: str) -> None:
        """Remember `name` as the checkpoint to open next time (the app starts with it)."""
        self._last_used.set(validate_name(name))

    def last_used(self) -> str | None:
        """The checkpoint `mark_used` remembered, whether or not it still exists or loads."""
        return self._last_used.get()

    def most_recent(self) -> str | None:
        """The last checkpoint used, if it still loads; else the most recently updated loadable one; else None."""
        rows = [row for row in self.list() if row.damaged is None]
        wanted = self._last_used.get()
        if any(row.name == wanted for row in rows):
            return wanted
        rows.sort(key=lambda row: row.updated or "", reverse=True)
        return rows[0].name if rows else None


@dataclass
class ImportResult:
    info: CheckpointInfo
    notices: list[str]
