"""Real crashes: another process is `kill -9`ed in the middle of a save, or while it holds a checkpoint's lock.

The child process pauses at a chosen point inside the save (it prints a line, then blocks reading stdin), so the kill
lands exactly there: no sleeps, no timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.model import GPTModel
from gpt2term.core.store.locks import CheckpointLocked
from gpt2term.core.store.store import CheckpointStore

TINY = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch
    from gpt2term.core.store.store import CheckpointStore
    from gpt2term.core.config import GPTConfig
    from gpt2term.core.model import GPTModel

    root, point, config = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    store = CheckpointStore(root)

    def pause(what):
        print(what, flush=True)
        sys.stdin.readline()  # the test kills this process while it waits here
        os._exit(0)

    if point == "weights-written":  # the first fsync of a save follows the weights file
        real_fsync = os.fsync
        def fsync(fd):
            real_fsync(fd)
            pause("inside-save")
        os.fsync = fsync
    elif point == "between-renames":  # the old folder is moved aside, the new one not yet in place
        real_rename = os.rename
        def rename(src, dst):
            real_rename(src, dst)
            if ".old-" in str(dst):
                pause("inside-save")
        os.rename = rename
    elif point == "holding-lock":
        store.lock("run").acquire()
        pause("locked")

    torch.manual_seed(2)
    model = GPTModel(GPTConfig(**config))
    opt = torch.optim.AdamW(model.parameters())
    store.save("run", model, meta={"step": 2}, optimizer_state=opt.state_dict())
    print("saved", flush=True)
    """
)


def tiny_model(seed: int) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(TINY).eval()


def start_child(root: Path, point: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), point, json.dumps(TINY.to_dict())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(child: subprocess.Popen, line: str) -> None:
    got = child.stdout.readline().strip()  # blocks until the child reaches its pause point (or dies)
    if got != line:
        child.kill()
        raise AssertionError(f"child said {got!r}, not {line!r}; stderr: {child.stderr.read()}")


def kill_9(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    child.stdin.close()
    child.stdout.close()
    child.stderr.close()


@pytest.mark.parametrize("point", ["weights-written", "between-renames"])
def test_kill_9_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path, point):
    store = CheckpointStore(tmp_path / "store")
    previous = tiny_model(1)
    store.save("run", previous, meta={"step": 1})
    store.append_metrics("run", {"step": 1})

    child = start_child(store.root, point)
    wait_for(child, "inside-save")
    kill_9(child)

    # The kill landed mid-save: the new checkpoint's temporary folder is on disk, and for the second point the
    # previous checkpoint has already been moved aside.
    leftovers = sorted(p.name for p in store.root.iterdir() if p.name.startswith(".run."))
    assert any(".tmp-" in name for name in leftovers), leftovers
    assert (store.root / "run").exists() == (point == "weights-written")
    assert ".run.lock" in leftovers  # the dead process's lock

    [row] = store.list()  # repairs what the crash left
    assert (row.name, row.damaged, row.meta["step"], row.has_optimizer) == ("run", None, 1, False)
    loaded = store.load("run")
    for k, v in previous.state_dict().items():
        assert torch.equal(loaded.state_dict[k], v), k
    assert store.read_metrics("run") == [{"step": 1}]
    assert sorted(p.name for p in store.root.iterdir()) == ["run"]  # temp folders and the stale lock are gone

    store.save("run", tiny_model(3), meta={"step": 3})  # and the store keeps working
    assert store.info("run").meta["step"] == 3


def test_a_second_process_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    store.save("run", tiny_model(1), meta={"step": 1})

    child = start_child(store.root, "holding-lock")
    wait_for(child, "locked")
    try:
        assert store.lock_holder("run").pid == child.pid
        with pytest.raises(CheckpointLocked, match=rf"being written by process {child.pid} "):
            store.save("run", tiny_model(2))
        with pytest.raises(CheckpointLocked):
            store.delete("run")
    finally:
        kill_9(child)

    assert store.lock_path("run").exists()  # stale: left by the dead process
    assert store.lock_holder("run") is None
    store.save("run", tiny_model(2), meta={"step": 2})
    assert store.info("run").meta["step"] == 2 and not store.lock_path("run").exists()
