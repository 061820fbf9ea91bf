"""How many threads each one-token matmul gets: all of PyTorch's, or fewer when the machine is busy.

Decoding one token multiplies a vector by each matrix: memory-bound work that two cores stream faster than one, in
kernels (gpt2term's own, oneDNN, fbgemm, MKL) that thread themselves with OpenMP. On a busy machine that collapses:
OpenMP's threads spin at a barrier while one of them waits for a core, and a token can take ten times longer on two
threads than on one. `Governor` watches what each kind of matmul takes with each thread count it may use, keeps the
fastest, and now and then tries the others again, so decoding backs off to the cores it does get and returns to all
of them when they are free. `GovernedStep` runs one decoding step under it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

GOVERNOR_SWITCH = "GPT2TERM_THREAD_BACKOFF"  # =0: always use every thread (to compare with and without back-off)

T = TypeVar("T")


def ways() -> int:
    """How many threads a one-token matmul may use at most."""
    return max(1, torch.get_num_threads())


# ------------------------------------------------------------------------------------------------- governor


def thread_choices(most: int) -> list[int]:
    """The thread counts a governed matmul may use: all of them, then halves down to one."""
    choices = [max(1, most)]
    while choices[-1] > 1:
        choices.append(choices[-1] // 2)
    return choices


class _Stats:
    __slots__ = ("most", "current", "seconds", "seen_at", "next_try", "interval", "trying")

    def __init__(self, most: int, now: float, first_interval: float) -> None:
        self.most = most
        self.current = most  # the thread count used between tries
        self.seconds: dict[int, float] = {}  # recent time of one call, per thread count
        self.seen_at: dict[int, float] = {}
        self.interval = first_interval
        self.next_try = now + first_interval
        self.trying: int | None = None


class Governor:
    """Which thread count is fastest now for each kind of matmul (`key`), learnt from the calls themselves.

    Calls use the current choice; its time is a moving average. Every `interval` one call tries the thread count
    measured longest ago; when that one was clearly faster it becomes the choice and the interval starts again
    short, else the interval doubles (up to `max_interval_s`), so a steady machine pays for a try rarely. The clock
    is injectable so the logic can be tested without timing anything.
    """

    MIN_INTERVAL_S = 0.05
    MAX_INTERVAL_S = 5.0
    SMOOTHING = 0.3  # weight of the newest call in the current choice's average
    MARGIN = 0.85  # another count must take under this fraction of the current one's time to replace it

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        min_interval_s: float = MIN_INTERVAL_S,
        max_interval_s: float = MAX_INTERVAL_S,
        enabled: bool | None = None,
    ) -> None:
        self.clock = clock
        self.min_interval_s, self.max_interval_s = min_interval_s, max_interval_s
        self.enabled = backoff_enabled() if enabled is None else enabled
        self._stats: dict[Hashable, _Stats] = {}
        self._lock = threading.Lock()

    def choose(self, key: Hashable, most: int) -> int:
        """The thread count the next call of `key` should use, out of at most `most`."""
        if not self.enabled or most <= 1:
            return max(1, most)
        with self._lock:
            now = self.clock()
            stats = self._stats.get(key)
            if stats is None or stats.most != most:
                stats = self._stats[key] = _Stats(most, now, self.min_interval_s)
            if stats.trying is None and now >= stats.next_try:
                others = [n for n in thread_choices(most) if n != stats.current]
                stats.trying = min(others, key=lambda n: stats.seen_at.get(n, -1.0))
                return stats.trying
            return stats.current

    def budget(self, key: Hashable, threads: int) -> float | None:
        """While `threads` is being tried for `key`: what a call at the current choice takes (else None)."""
        with self._lock:
            stats = self._stats.get(key)
            if stats is None or stats.trying != threads:
                return None
            return stats.seconds.get(stats.current)

    def record(self, key: Hashable, threads: int, seconds: float) -> None:
        """What the call of `key` that `choose` sent to `threads` threads took."""
        if not self.enabled:
            return
        with self._lock:
            stats = self._stats.get(key)
            if stats is None or threads > stats.most:
                return
            now = self.clock()
            if threads == stats.trying:
                stats.trying = None
                stats.seconds[threads], stats.seen_at[threads] = seconds, now
                mine = stats.seconds.get(stats.current)
                if mine is not None and seconds < mine * self.MARGIN:
                    stats.current = threads  # the machine changed: follow it, and look again soon
                    stats.interval = self.min_interval_s
                else:
                    stats.interval = min(self.max_interval_s, stats.interval * 2)
                stats.next_try = now + stats.interval
            elif threads == stats.current:
                old = stats.seconds.get(threads)
                stats.seconds[threads] = seconds if old is None else old + self.SMOOTHING * (seconds - old)
                stats.seen_at[threads] = now

    def current(self, key: Hashable) -> int | None:
        """The choice for `key` between tries (None before its first call)."""
        stats = self._stats.get(key)
        return None if stats is None else stats.current


def backoff_enabled() -> bool:
    """False when GPT2TERM_THREAD_BACKOFF=0: every matmul uses every thread, busy machine or not."""
    return os.environ.get(GOVERNOR_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


_governor: Governor | None = None
_governor_lock = threading.Lock()


def governor() -> Governor:
    """The process's governor (shared by every decoding thread: they compete for the same cores)."""
    global _governor
    with _governor_lock:
        if _governor is None:
            _governor = Governor()
        return _governor


class GovernedStep:
    """One decoding step (every matmul of a token) at the thread count the governor picked for `key`, timed for it.

    A whole step, not each matmul, is the unit: a busy machine slows every kernel alike, and one choice per step
    costs one change of PyTorch's thread count, not one per matmul. While another count is being tried, `check()`
    between layers gives the try up as soon as it has taken longer than a whole step at the current choice, so a
    try on a collapsed machine costs at most about one extra step.
    """

    def __init__(self, key: Hashable, most: int | None = None, gov: Governor | None = None) -> None:
        self.gov = governor() if gov is None else gov
        self.key = key
        self.most = ways() if most is None else most
        self.use = self.gov.choose(key, self.most)
        self.budget = self.gov.budget(key, self.use)  # set only while trying: the current choice's step time
        self.previous = torch.get_num_threads()
        self.started = 0.0
        self.open = True

    def __enter__(self) -> GovernedStep:
        if self.use != self.previous:
            torch.set_num_threads(self.use)
        self.started = self.gov.clock()
        return self

    def check(self) -> None:
        if self.budget is None or not self.open:
            return
        spent = self.gov.clock() - self.started
        if spent > self.budget:  # already slower than the current choice: record it so, and go back to that
            self.open = False
            self.gov.record(self.key, self.use, spent)
            current = self.gov.current(self.key) or self.previous
            torch.set_num_threads(current)

    def __exit__(self, *exc: object) -> None:
        if self.open:  # also after an error, so a try never stays open
            self.gov.record(self.key, self.use, self.gov.clock() - self.started)
        if torch.get_num_threads() != self.previous:
            torch.set_num_threads(self.previous)
