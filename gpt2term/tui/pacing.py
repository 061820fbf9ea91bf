"""How often a stream of tokens may redraw the screen, and what else on the UI side must not stall it.

A redraw is Python on the UI thread: while it runs it holds the GIL, and the decoding thread, which needs the GIL
between two of PyTorch's kernels, waits. So the decoder loses about the share of the wall clock that the UI thread
spends on its CPU. `FramePacer` measures that cost (the UI thread's own CPU time from one redraw to the next, which
takes in Textual's painting of the previous one) and spaces redraws so that it stays under a set share: on a fast
machine the stream moves at the full frame rate, on a slow one it moves in larger steps instead of slowing down.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable


class FramePacer:
    """When the next redraw may happen: at most `fps` a second, at least one every `slowest` seconds, and otherwise
    as often as keeps the UI thread's CPU time under `ui_share` of the wall clock."""

    SMOOTHING = 0.5  # weight of the newest frame's cost in the running estimate: one slow frame must not stall it

    def __init__(
        self,
        fps: float,
        ui_share: float,
        slowest: float = 1.0,
        clock: Callable[[], float] = time.perf_counter,
        cpu: Callable[[], float] = time.thread_time,
    ) -> None:
        self.fps, self.ui_share, self.slowest = fps, ui_share, slowest
        self._clock, self._cpu = clock, cpu
        self.frame_cost: float | None = None  # the UI thread's CPU seconds per redraw, smoothed
        self._last: tuple[float, float] | None = None  # (clock, cpu) at the last redraw

    def restart(self) -> None:
        """A new stream: its first redraw happens at once; the cost measured so far still holds."""
        self._last = None

    @property
    def interval(self) -> float:
        """The seconds between two redraws: 0 when `fps` is 0 (a redraw for every token, for tests)."""
        if self.fps <= 0:
            return 0.0
        fastest = 1 / self.fps
        if self.frame_cost is None or self.ui_share <= 0:
            return fastest
        return min(max(fastest, self.frame_cost / self.ui_share), max(fastest, self.slowest))

    def wait(self) -> float:
        """Seconds until the next redraw may happen (0: now)."""
        if self._last is None:
            return 0.0
        return max(0.0, self._last[0] + self.interval - self._clock())

    def drew(self) -> None:
        """Call on the UI thread at each redraw: the CPU it used since the previous one is one frame's cost."""
        now, cpu = self._clock(), self._cpu()
        if self._last is not None:
            cost = cpu - self._last[1]
            if self.frame_cost is None:
                self.frame_cost = cost
            else:
                self.frame_cost += self.SMOOTHING * (cost - self.frame_cost)
        self._last = (now, cpu)


class CollectorPause:
    """Python's cyclic garbage collector held off while a stream runs.

    A full collection walks every object the app holds (Textual's widgets, each turn's steps and their alternatives)
    with the GIL held, and the decoder waits for the GIL between two of PyTorch's kernels: with a few turns on screen
    one such pass stalls the stream longer than all its redraws together, and it grows with the transcript.
    Refcounting still frees all garbage without cycles at once; the rest waits for the first collection after the
    stream. Pauses may overlap (two screens streaming): the collector runs again when the last one ends, and only if
    it ran before the first began.
    """

    _lock = threading.Lock()
    _open = 0  # pauses begun and not yet ended, across the app
    _resume = False  # whether the collector ran when the first of them began

    def __init__(self) -> None:
        self.active = False

    def begin(self) -> None:
        cls = type(self)
        with cls._lock:
            if self.active:
                return
            self.active = True
            if cls._open == 0:
                cls._resume = gc.isenabled()
                gc.disable()
            cls._open += 1

    def end(self) -> None:
        cls = type(self)
        with cls._lock:
            if not self.active:
                return
            self.active = False
            cls._open -= 1
            if cls._open == 0 and cls._resume:
                gc.enable()
