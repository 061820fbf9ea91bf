"""One-token matmuls split by columns across `torch.get_num_threads()` threads.

Decoding one token multiplies a vector by each matrix: memory-bound work that one core cannot stream at the
memory's full speed, and that MKL runs on one thread whatever `torch.set_num_threads` says. Splitting each
matrix into column blocks, one per thread, reads it with that many cores.

On a busy machine a helper may not get a core. A block no helper has started by the time the caller finished its
own, the caller runs itself; a helper that started and then stalled (the caller waited longer than its own block
took, and over `STALL_S`) halves the number of threads used for `PAUSE_S`, then all are tried again.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
from collections.abc import Callable

import torch

MIN_PART_COLUMNS = 64  # a block must take longer than waking a thread to be worth one


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

    def run(self, block: Callable[[int], None], parts: int) -> None:
        """`block(i)` for every i in range(parts), spread over up to `parts` threads, the caller's included."""
        started = time.perf_counter()
        threads = self.threads_now(parts)
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
