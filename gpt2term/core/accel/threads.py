"""One-token matmuls split by columns across `torch.get_num_threads()` threads.

Decoding one token multiplies a vector by each matrix: memory-bound work that one core cannot stream at the
memory's full speed, and that MKL runs on one thread whatever `torch.set_num_threads` says. Splitting each
matrix into column blocks, one per thread, reads it with that many cores.

On a busy machine a helper may not get a core. A block no helper has started by the time the caller finished its
own, the caller runs itself; a helper that started and then stalled (the caller waited longer than its own block
took, and over `STALL_S`) halves the number of threads used for `PAUSE_S`, then all are tried again.

A stall the pool cannot see is the one inside a kernel that threads itself (oneDNN's bf16 matmul, the int8
kernels): its OpenMP threads spin at a barrier while one of them waits for a core, and a token can take ten
times longer on two threads than on one. `Governor` watches what each kind of matmul takes with each thread count
it may use, keeps the fastest, and now and then tries the others again, so decoding backs off to the cores it
does get and returns to all of them when they are free. `governed(key, fn)` runs a self-threading kernel under
it; `SplitPool.run(..., threads=governor().choose(...))` does the same for the column split.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

MIN_PART_COLUMNS = 64  # a block must take longer than waking a thread to be worth one
GOVERNOR_SWITCH = "GPT2TERM_THREAD_BACKOFF"  # =0: always use every thread (to compare with and without back-off)

T = TypeVar("T")


def ways() -> int:
    """How many threads a one-token matmul is split across."""
    return max(1, torch.get_num_threads())


def column_blocks(columns: int, parts: int) -> list[slice]:
    """`columns` cut into at most `parts` contiguous blocks of nearly equal size, none under MIN_PART_COLUMNS."""
    parts = max(1, min(parts, columns // MIN_PART_COLUMNS))
    bounds = [columns * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


class _Task:
    """Blocks `lo` to `hi` offered to the helpers; whoever claims them first (a helper or the caller) runs them."""

    __slots__ = ("block", "lo", "hi", "claim", "done", "error")

    def __init__(self, block: Callable[[int], None], lo: int, hi: int) -> None:
        self.block, self.lo, self.hi = block, lo, hi
        self.claim = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run_if_unclaimed(self) -> bool:
        if not self.claim.acquire(blocking=False):
            return False
        try:
            for i in range(self.lo, self.hi):
                self.block(i)
        except BaseException as exc:  # handed to the caller, which re-raises it
            self.error = exc
        finally:
            self.done.set()
        return True

    def cancel_if_unclaimed(self) -> bool:
        if not self.claim.acquire(blocking=False):
            return False
        self.done.set()
        return True


class SplitPool:
    """Helper threads that run blocks of a split matmul while the caller runs its own."""

    PAUSE_S = 0.5
    STALL_S = 0.001  # a wake-up takes microseconds; a thread waiting for a core waits milliseconds

    def __init__(self, pause_s: float = PAUSE_S, stall_s: float = STALL_S) -> None:
        self.pause_s, self.stall_s = pause_s, stall_s
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._limit = 0  # while backed off: the most threads used
        self._limited_until = 0.0
        # A thread that has run MKL/OpenMP code must end before the interpreter does: left running, the C++
        # runtime's exit destroys its thread pool under it and aborts ("terminate called without an active
        # exception", exit status 134 after a successful run).
        atexit.register(self.shut_down)

    def shut_down(self) -> None:
        threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(timeout=5)

    def _work(self) -> None:
        with torch.inference_mode():  # the caller's outputs are inference tensors
            while (task := self._queue.get()) is not None:
                task.run_if_unclaimed()

    def _ensure_helpers(self, count: int) -> None:
        if len(self._threads) >= count:
            return
        with self._lock:  # two decoding threads (the app's prompt and a training run's samples) may share the pool
            while len(self._threads) < count:
                name = f"gpt2term-split-{len(self._threads) + 1}"
                thread = threading.Thread(target=self._work, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def threads_now(self, parts: int) -> int:
        """Threads the next call with `parts` blocks uses (fewer while backed off)."""
        if time.perf_counter() < self._limited_until:
            return max(1, min(parts, self._limit))
        return parts

    def run(self, block: Callable[[int], None], parts: int, threads: int | None = None) -> None:
        """`block(i)` for every i in range(parts), spread over up to `parts` threads (at most `threads`), the
        caller's included."""
        started = time.perf_counter()
        threads = self.threads_now(parts if threads is None else max(1, min(parts, threads)))
        if threads <= 1:
            for i in range(parts):
                block(i)
            return
        bounds = [parts * g // threads for g in range(threads + 1)]
        self._ensure_helpers(threads - 1)
        tasks = [_Task(block, bounds[g], bounds[g + 1]) for g in range(1, threads)]
        for task in tasks:
            self._queue.put(task)
        try:
            for i in range(bounds[1]):
                block(i)
        except BaseException:
            for task in tasks:  # nothing may still write into the caller's output once this returns
                if not task.cancel_if_unclaimed():
                    task.done.wait()
            raise
        mine = time.perf_counter() - started
        stalled = False
        for task in tasks:
            if not task.run_if_unclaimed():
                waited_from = time.perf_counter()
                task.done.wait()
                stalled = stalled or time.perf_counter() - waited_from > max(mine, self.stall_s)
        if stalled:  # a helper has no core to itself
            self._limit = threads // 2
            self._limited_until = time.perf_counter() + self.pause_s
        for task in tasks:
            if task.error is not None:
                raise task.error


_pool: SplitPool | None = None
_pool_lock = threading.Lock()


def pool() -> SplitPool:
    """The process's pool (a fresh one after a fork: threads do not survive it)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._pid != os.getpid():
            _pool = SplitPool()
        return _pool


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


def governor() -> Governor:
    """The process's governor (shared by every decoding thread: they compete for the same cores)."""
    global _governor
    with _pool_lock:
        if _governor is None:
            _governor = Governor()
        return _governor


def governed(key: Hashable, fn: Callable[[], T], most: int | None = None) -> T:
    """`fn()`, a kernel that threads itself with OpenMP (oneDNN, int8), run with the thread count the governor
    picks for `key` (its shape, say), and timed for it. PyTorch's thread count is restored before returning."""
    gov = governor()
    most = ways() if most is None else most
    use = gov.choose(key, most)
    started = gov.clock()
    previous = torch.get_num_threads() if use != most else None
    try:
        if previous is not None:
            torch.set_num_threads(use)
        return fn()
    finally:
        if previous is not None:
            torch.set_num_threads(previous)
        gov.record(key, use, gov.clock() - started)  # also after an error, so a try never stays open
