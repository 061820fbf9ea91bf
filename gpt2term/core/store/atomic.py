"""Write-then-rename: every file the program writes goes to a temporary name beside its target, is flushed to
disk and only then renamed into place, so a crash leaves the old file or the new one, never half of one.
Also the one rule for a write the disk refuses (`storage_error`) and for symbolic links (never written through).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from gpt2term.core.errors import CheckpointError, StorageError
from gpt2term.formatting import format_bytes

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


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (so a rename inside it survives a power cut), to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows; their renames are durable there anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, for a moment, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_user_permissions(path: Path) -> None:
    """The mode a plain `open(path, "w")` gives (0o666 less the umask), for files a library creates privately:
    safetensors writes through a 0600 temporary file, so the weights alone would be unreadable to the user's group."""
    os.chmod(path, 0o666 & ~_umask())


def temp_beside(target: Path) -> Path:
    """A temporary name in the target's folder (a rename never crosses file systems), hidden, unique per process."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def replace_atomically(tmp: Path, target: Path) -> None:
    os.replace(tmp, target)
    fsync_path(target.parent)


class WriteRecorder:
    """A file for torch.save that remembers the OSError of a failed write, which torch replaces by a RuntimeError."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def torch_save_synced(obj: Any, path: Path) -> None:
    """torch.save, flushed to disk, a failed write raised as the OSError it is (a full disk names itself)."""
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


def write_json_synced(path: Path, obj: Any, default: Any = None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, default=default, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_new_file(path: Path, data: bytes) -> None:
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


def append_line(path: Path, data: bytes) -> None:
    """Append all of `data` or nothing: a write cut short (a full disk) is truncated away, so no half line is left
    for the next line to be glued to. Never through a symbolic link (see open_for_append)."""
    fd = open_for_append(path.parent, path.name)
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


# ----------------------------------------------------------------------------------------------------- symlinks
# The store writes only real files in real folders of its own: a symbolic link (a checkpoint folder, or a
# metrics.jsonl, pointing elsewhere) is read through, but never written through, and removing one removes the link.


def lexists(path: Path) -> bool:
    """Whether anything is there, a dangling symbolic link included (Path.exists() follows links)."""
    return os.path.lexists(path)


def remove_entry(path: Path) -> None:
    """Remove a staging leftover or a checkpoint: a link (or file) is unlinked, never followed; a folder is removed."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def open_for_append(folder: Path, filename: str) -> int:
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
