"""Thread workers, harlequin-style: they do the slow part and only post messages; when one raises, the exception
ends in the one handler here, which turns it into one line and lets its owner put itself right.

Textual posts a worker's state change to the node that started it, and that message does not bubble, so the app
and each screen with workers mix this in rather than each writing its own handler.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from textual.worker import Worker, WorkerState

from gpt2term.core.errors import Gpt2termError


def describe_error(exc: BaseException | None) -> str:
    """A user's error as its message (it names the fix); a full disk or a permission as the system says it and
    where; anything else (a bug) with its type, so it can be reported."""
    if isinstance(exc, Gpt2termError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


class WorkerErrors:
    """The one handler for workers that raised. Override `worker_failed` to show the failure where it belongs."""

    if TYPE_CHECKING:  # what the app or screen this is mixed into provides

        def notify(self, message: str, *, title: str = "", severity: str = "information", timeout: float) -> None: ...

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.worker_failed(event.worker, describe_error(event.worker.error))

    def worker_failed(self, worker: Worker, error: str) -> None:
        self.notify(error, title="Failed", severity="error", timeout=15)


DECODING_SWITCH_INTERVAL_S = 0.0005
_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


@contextmanager
def decoding_switch_interval(seconds: float = DECODING_SWITCH_INTERVAL_S) -> Iterator[None]:
    """While a thread decodes beside the event loop, make the loop hand the GIL over sooner.

    PyTorch's kernels release the GIL but each needs it back to return; with Python's default interval a redraw
    on the UI thread keeps the decoder (and the decode pool's helpers, which then look stalled) waiting between
    kernels. The interval is process-wide, so uses are counted and the last one out restores the value it found.
    """
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(seconds, _switch_saved))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)
