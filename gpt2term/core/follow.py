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
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HEAD_BYTES = 4096  # enough of the first line (the start event) to tell one run's file from another's
CHUNK_BYTES = 1 << 21  # at most this much per poll, so following a long run's file never blocks its reader
MAX_NUMBER = 1e300  # larger values (1e308, or 1e309 which JSON reads as inf) would overflow sums and plots

# The fields of training events that screens compute with and format, and what they must hold. A line where one
# holds something else (a damaged or hand-edited file) is skipped like a line that is not JSON.
_INT_FIELDS = {"step", "total_steps", "epoch", "tokens_seen", "parameters", "world_size", "train_tokens",
               "val_tokens", "tokens_per_step", "last_good_step"}  # fmt: skip
_FLOAT_FIELDS = {"loss", "lr", "grad_norm", "tokens_per_second", "elapsed_s", "eta_s", "train_loss", "val_loss",
                 "train_perplexity", "val_perplexity", "steps_per_epoch"}  # fmt: skip
_OPTIONAL_FIELDS = {"eta_s", "train_loss", "val_loss", "last_good_step"}


def _sane_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return abs(value) < 2**63 if isinstance(value, int) else math.isfinite(value) and abs(value) <= MAX_NUMBER


def parse_metrics_line(line: bytes | str) -> dict[str, Any] | None:
    """One metrics.jsonl line as a record, or None when it is not one that can be shown: not JSON, not an object,
    or a training field holding a non-finite, huge or wrongly typed value."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None  # a line cut off by a crash, then appended to
    if not isinstance(record, dict):
        return None
    for key, value in record.items():
        if value is None and key in _OPTIONAL_FIELDS:
            continue
        if key in _INT_FIELDS and not (isinstance(value, int) and _sane_number(value)):
            return None
        if key in _FLOAT_FIELDS and not _sane_number(value):
            return None
        if isinstance(value, float) and not _sane_number(value):
            return None
    return record


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
        if not self.path.is_file():  # a FIFO or a device would block or never end
            return None
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
        """The complete lines added since the last poll, parsed; lines `parse_metrics_line` refuses are skipped."""
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
            record = parse_metrics_line(line)
            if record is not None:
                update.records.append(record)
        return update
