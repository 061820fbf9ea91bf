"""Training on a CPU keeps the memory it frees for its next step, and gives it back when the run ends."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap

import pytest

from gpt2term.core import accel
from gpt2term.core.accel import allocator

pytestmark = pytest.mark.skipif(not allocator.available(), reason="the allocator is not glibc's")

BLOCK_MB = 64  # above the 32 MB that glibc's own mmap threshold reaches: such a block goes back when freed

PROBE = textwrap.dedent(
    f"""
    import ctypes, json, resource
    from gpt2term.core.accel.allocator import freed_memory_kept

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    SIZE = {BLOCK_MB} << 20

    def faults(times):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(times):
            block = libc.malloc(SIZE)
            ctypes.memset(block, 1, SIZE)  # every page written, as a tensor's would be
            libc.free(block)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def resident_mb():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / 2**20

    faults(1)
    plain = faults(4)
    with freed_memory_kept() as kept:
        faults(1)  # the first block's pages come in once
        held = faults(4)
        resident_open = resident_mb()
    print(json.dumps({{"kept": kept, "plain": plain, "held": held, "after": faults(4),
                      "resident_open": resident_open, "resident_closed": resident_mb()}}))
    """
)


def test_a_freed_block_is_reused_while_kept_and_given_back_after_in_a_real_process():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["kept"] is True
    assert got["plain"] > 1000, got  # each block comes from the kernel again: its pages fault in
    assert got["held"] < got["plain"] / 20, got  # reused from the heap: no new pages
    assert got["after"] > got["plain"] / 2, got  # closed: glibc's own thresholds again
    assert got["resident_open"] - got["resident_closed"] > BLOCK_MB / 2, got  # the kept block went back


@pytest.mark.once  # with GPT2TERM_ACCEL=0 the trainer keeps nothing, as it should
def test_the_trainers_steps_reuse_their_memory_instead_of_faulting_it_in_again():
    from gpt2term.core.bench import _run_trainer
    from gpt2term.core.config import preset

    assert accel.enabled()
    faults: list[int] = []
    mark = [resource.getrusage(resource.RUSAGE_SELF).ru_minflt]

    def between(_step: int) -> None:
        now = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        faults.append(now - mark[0])
        mark[0] = now

    cfg = preset("tiny").with_(context_length=32)  # the token table's and the head's gradients: 51 MB each
    _run_trainer("tiny", cfg, batch_size=2, context_length=32, total_steps=6, dtype="float32", seed=0,
                 between_steps=between)  # fmt: skip
    # Without it every step faults about 34,000 pages in (its gradients and the loss's slices, anew); now steps
    # 3 to 6 fault almost none, or now and then one 51 MB gradient's 12,500 (a small allocation settled in its
    # freed block and left it short), so the four together stay under one step's worth from before.
    assert sum(faults[2:]) < 30_000, faults
