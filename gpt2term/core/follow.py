"""Follow a run's metrics.jsonl while another process (a headless `gpt2term train`, a torchrun job) writes it.

The writer appends one JSON line per event and flushes it. A follower polls: each `poll()` reads only the bytes
added since the last one and returns the complete lines among them (a line still being written waits for the
next poll). A save renames the checkpoint folder into place and carries metrics.jsonl over as a hard link (the
same file) or, where hard links are missing, as a copy (a new file with the same beginning): the follower notices
the path now names another file (its inode changed), reopens it, and goes on where it was if the new file starts
with the same history, or from its beginning (`reset`) if it is another run's (`train --overwrite`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HEAD_BYTES = 4096  # enough of the first line (the start event) to tell one run's file from another's
CHUNK_BYTES = 1 << 21  # at most this much per poll, so following a long run's file never blocks its reader


@dataclass
class FollowUpdate:
    records: list[dict[str, Any]] = field(default_factory=list)  # new events, oldest first
    reset: bool = False  # the file now holds another history: forget what earlier polls returned
    more: bool = False  # more bytes are waiting (the chunk limit was reached): poll again soon


class MetricsFollower:
    """Reads a metrics.jsonl as it grows, from the start, by byte offset; survives the file being replaced."""

    def __init__(self, path: Path, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        self._file: IO[bytes] | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the open file
        self._offset = 0  # bytes of complete lines consumed
        self._head = b""  # the file's first bytes, once known
        self.reopened = 0  # how many times the path was found naming another file (for tests and curiosity)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsFollower:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open(self) -> tuple[IO[bytes], tuple[int, int]] | None:
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 (kept open across polls)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return None
        stat = os.fstat(handle.fileno())
        return handle, (stat.st_dev, stat.st_ino)

    def _switch_if_replaced(self) -> bool:
        """Reopen when the path names another file than the one open; True when the history starts over."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return False  # between a save's two renames, or not written yet: keep what is open, try next time
        if self._file is not None and (stat.st_dev, stat.st_ino) == self._identity:
            if stat.st_size < self._offset:  # truncated in place: a new history
                self._offset, self._head = 0, b""
                return True
            return False
        opened = self._open()
        if opened is None:
            return False
        handle, identity = opened
        reset = False
        if self._file is not None:
            self.reopened += 1
            self._file.close()
            head = handle.read(len(self._head)) if self._head else b""
            size = os.fstat(handle.fileno()).st_size
            if head != self._head or size < self._offset:
                self._offset, self._head = 0, b""
                reset = True
        self._file, self._identity = handle, identity
        return reset

    def poll(self) -> FollowUpdate:
        """The complete lines added since the last poll, parsed; lines that are not JSON objects are skipped."""
        reset = self._switch_if_replaced()
        update = FollowUpdate(reset=reset)
        if self._file is None:
            return update
        if not self._head:
            self._file.seek(0)
            self._head = self._file.read(HEAD_BYTES).split(b"\n", 1)[0]
        self._file.seek(self._offset)
        data = self._file.read(self.chunk_bytes)
        end = data.rfind(b"\n")
        if end < 0:
            return update
        update.more = len(data) == self.chunk_bytes
        self._offset += end + 1
        for line in data[: end + 1].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut off by a crash, then appended to
            if isinstance(record, dict):
                update.records.append(record)
        return update
