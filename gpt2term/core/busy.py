"""Spinning processes beside a benchmark, to measure speed on a machine that something else keeps busy.

Each spinner is a separate Python process running an arithmetic loop (one core's worth of load, no memory
traffic to speak of). They are always stopped when the measurement ends, however it ends; a spinner whose parent
died without stopping it (SIGKILL) notices within a second or two that its parent changed and exits.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

from gpt2term.core.errors import InputError

# The parent's pid is argv[1]; the loop checks it every few million iterations (about a second).
SPINNER_CODE = (
    "import os, sys\n"
    "parent = int(sys.argv[1])\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    if n % 4_000_000 == 0 and os.getppid() != parent:\n"
    "        break\n"
)
SPINNER_MARK = "gpt2term-busy-spinner"  # in each spinner's command line, so tools and tests can find them
MAX_BUSY = 256


def start_spinners(count: int) -> list[subprocess.Popen]:
    if count < 0 or count > MAX_BUSY:
        raise InputError(f"--busy takes 0 to {MAX_BUSY} spinning processes, got {count}")
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", SPINNER_CODE, str(os.getpid()), SPINNER_MARK],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,  # a Ctrl-C reaches them too (same process group): no tracebacks
                )
            )
    except BaseException:
        stop_spinners(procs)
        raise
    return procs


def stop_spinners(procs: list[subprocess.Popen]) -> None:
    """Kill and reap every spinner (SIGKILL: a spinner holds nothing worth a graceful exit)."""
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.kill()
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.wait()


@contextlib.contextmanager
def busy(count: int) -> Iterator[list[int]]:
    """`count` spinning processes for the duration of the block; yields their pids."""
    procs = start_spinners(count)
    try:
        yield [p.pid for p in procs]
    finally:
        stop_spinners(procs)
