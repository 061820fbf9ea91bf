"""How a run is paused, stopped or saved from outside: another thread (the app) or a signal (Ctrl-C, SIGTERM)."""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator


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
def watch_signals(signals: Iterable[int], on_signal: Callable[[int], None]) -> Iterator[bool]:
    """Calls `on_signal(signum)` from a helper thread as soon as one of `signals` arrives, even while the main
    thread is inside a long PyTorch call (a backward pass, an evaluation batch), where Python's own handlers wait
    for the call to return. Python's handlers still run as usual.

    Uses the interpreter's wakeup fd (the C-level handler writes each signal's number to it). Only the main thread
    can set it; elsewhere, or when something else (an event loop) owns it, nothing is watched: yields False.
    """
    wanted = {int(sig) for sig in signals}
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:
        previous = None
    if previous != -1:
        if previous is not None:
            signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)
        yield False
        return

    def pump() -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in wanted:
                    with contextlib.suppress(Exception):  # a failing message must not end the watching
                        on_signal(signum)

    watcher = threading.Thread(target=pump, name="gpt2term-signals", daemon=True)
    watcher.start()
    try:
        yield True
    finally:
        signal.set_wakeup_fd(-1)
        os.close(write_fd)  # the watcher reads end-of-file and returns
        watcher.join(timeout=1.0)
        os.close(read_fd)


SignalAction = str  # "stop", "stopping" (already stopping), "wait" (for the save under way), "quit"


@contextlib.contextmanager
def stop_on_signals(
    control: TrainingControl,
    signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM),
    *,
    second_interrupts: bool = True,
    on_signal: Callable[[int, SignalAction], None] | None = None,
) -> Iterator[None]:
    """First Ctrl-C (or any SIGTERM, what `kill`, systemd, Docker and job schedulers send): stop after the current
    step and save. A second Ctrl-C interrupts at once (nothing new saved), unless `second_interrupts` is False: under
    torchrun the launcher passes the user's Ctrl-C on to its workers again. During a save the second one waits for
    the save to finish (the run then ends): raised inside torch.save it would come out as a RuntimeError.

    With `on_signal`, each signal is decided the moment it arrives (see `watch_signals`), and `on_signal(signum,
    action)` is told what it does, so a face can say so at once; the main thread then only raises the
    KeyboardInterrupt a "quit" asks for. (Deciding in the Python handler instead would merge two Ctrl-Cs pressed
    during one long backward pass into one.)

    Only the main thread can own signal handlers; elsewhere this does nothing (the app stops runs with the control).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = list(signals)
    lock = threading.Lock()
    state = {"quit": False, "raised": False, "watched": False}

    def decide(signum: int) -> SignalAction:
        if not control.stop_requested:
            control.stop("terminated" if signum == signal.SIGTERM else "interrupted")
            return "stop"
        if signum == signal.SIGTERM or not second_interrupts:
            return "stopping"
        if control.saving_now:  # a stop is already asked for, so the run ends right after the save
            return "wait"
        return "quit"

    def handler(signum: int, frame: object) -> None:
        if state["watched"]:
            with lock:
                if not state["quit"] or state["raised"]:
                    return
                state["raised"] = True
            raise KeyboardInterrupt
        action = decide(signum)
        if on_signal is not None:
            on_signal(signum, action)
        if action == "quit":
            for sig in signals:
                signal.signal(sig, signal.SIG_DFL)
            raise KeyboardInterrupt

    def watched(signum: int) -> None:
        action = decide(signum)
        assert on_signal is not None
        on_signal(signum, action)
        if action == "quit":
            with lock:
                state["quit"] = True
                if not state["raised"]:
                    _thread.interrupt_main(signal.SIGINT)  # in case the main thread's handler already ran

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        with watch_signals(signals, watched) if on_signal is not None else contextlib.nullcontext(False) as active:
            state["watched"] = bool(active)
            yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
