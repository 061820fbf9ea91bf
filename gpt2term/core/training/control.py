"""How a run is paused, stopped or saved from outside: another thread (the app) or a signal (Ctrl-C, SIGTERM)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterable, Iterator


class TrainingControl:
    """Pause, resume, stop or save a run from any thread (or a signal handler); the trainer obeys between steps.

    A paused trainer blocks on a condition variable (no polling) until resumed, stopped or asked to save.
    The lock is re-entrant so a signal handler that interrupts the main thread while it holds the lock cannot hang.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._paused = False
        self._stop_reason: str | None = None
        self._save_requested = False
        self._saving = False

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Marks a checkpoint being written: a second Ctrl-C then waits for it instead of breaking it half-way."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    @property
    def saving_now(self) -> bool:
        return self._saving

    def pause(self) -> None:
        with self._cond:
            self._paused = True
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def stop(self, reason: str = "stopped") -> None:
        """Finish the current step, save, and end the run ("interrupted" is Ctrl-C's reason, "terminated" SIGTERM's)."""
        with self._cond:
            if self._stop_reason is None:
                self._stop_reason = reason
            self._cond.notify_all()

    def save_now(self) -> None:
        with self._cond:
            self._save_requested = True
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def stop_requested(self) -> bool:
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def take_save_request(self) -> bool:
        with self._cond:
            requested, self._save_requested = self._save_requested, False
            return requested

    def wait_while_paused(self) -> None:
        """Block while paused; return early when a stop or a save is asked for (the trainer handles it)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._paused or self._stop_reason is not None or self._save_requested)


@contextlib.contextmanager
def stop_on_signals(
    control: TrainingControl,
    signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM),
    *,
    second_interrupts: bool = True,
) -> Iterator[None]:
    """First Ctrl-C (or any SIGTERM, what `kill`, systemd, Docker and job schedulers send): stop after the current
    step and save. A second Ctrl-C interrupts at once (nothing new saved), unless `second_interrupts` is False: under
    torchrun the launcher passes the user's Ctrl-C on to its workers again. During a save the second one waits for
    the save to finish (the run then ends): raised inside torch.save it would come out as a RuntimeError.

    Only the main thread can own signal handlers; elsewhere this does nothing (the app stops runs with the control).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = list(signals)

    def handler(signum: int, frame: object) -> None:
        if signum == signal.SIGTERM or not control.stop_requested or not second_interrupts:
            control.stop("terminated" if signum == signal.SIGTERM else "interrupted")
        elif not control.saving_now:  # a stop is already asked for, so the run ends right after the save
            for sig in signals:
                signal.signal(sig, signal.SIG_DFL)
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
