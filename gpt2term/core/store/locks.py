"""Who writes a checkpoint: one lock file per name (pid, host, process start time), plus in-process mutexes.

A second writer is refused with the holder named; a lock whose process is gone (or whose pid now belongs to
another process, told apart by its start time in /proc) is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpt2term.core.errors import CheckpointError
from gpt2term.core.store.atomic import storage_error, write_new_file
from gpt2term.core.store.layout import utc_now, what_is_kept


class CheckpointLocked(CheckpointError):
    """Another process (or another run in this one) is writing this checkpoint."""


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


_PROCESS_LOCKS: dict[str, tuple[str, int]] = {}  # lock file path -> (token, thread id), for locks held here
_PROCESS_LOCKS_GUARD = threading.Lock()
_NAME_MUTEXES: dict[str, threading.RLock] = {}


def name_mutex(path: Path) -> threading.RLock:
    """One in-process mutex per checkpoint folder: saves, appends and renames of one name never interleave."""
    with _PROCESS_LOCKS_GUARD:
        return _NAME_MUTEXES.setdefault(str(path), threading.RLock())


def held_in_this_process(lock_path: Path, *, by_this_thread: bool = False) -> bool:
    """Whether a lock of this process (of this very thread, with `by_this_thread`) holds `lock_path`."""
    with _PROCESS_LOCKS_GUARD:
        held = _PROCESS_LOCKS.get(str(lock_path))
    return held is not None and (not by_this_thread or held[1] == threading.get_ident())


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
                kept = what_is_kept(self.path.parent / self.name, self.name)
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
            "since": utc_now(),
            "purpose": self.purpose,
            "token": token,
        }
        data = json.dumps(record).encode("utf-8")
        new = self.path.with_name(f"{self.path.name}.new-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            write_new_file(new, data)
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
                write_new_file(self.path, data)
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
