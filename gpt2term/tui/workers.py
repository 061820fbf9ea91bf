"""Thread workers, harlequin-style: they do the slow part and only post messages; when one raises, the exception
ends in the one handler here, which turns it into one line and lets its owner put itself right.

Textual posts a worker's state change to the node that started it, and that message does not bubble, so the app
and each screen with workers mix this in rather than each writing its own handler.
"""

from __future__ import annotations

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
