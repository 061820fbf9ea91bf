"""`torchrun --nproc_per_node=2 -m gpt2term train` (gloo, CPU) learns exactly what one process learns with the same
global batch, writes one log and one checkpoint (rank 0), and that checkpoint loads in a single process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from gpt2term.cli import cli
from gpt2term.core.store.store import CheckpointStore

# No dropout: each rank draws its own dropout masks, which one process cannot reproduce.
MODEL = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "2", "--drop-rate", "0", "--context-length", "16"]
RUN = ["--max-steps", "4", "--eval-interval", "2", "--eval-iters", "2", "--sample-tokens", "2", "--lr", "3e-3"]


@pytest.mark.once  # both sides run the same model code in either pass: the second pass would repeat the first
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i}: the cat sat on mat number {i % 7}." for i in range(200)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "gpt2term", "train", str(corpus), "--name", "ddp", "--batch-size", "2", *MODEL, *RUN]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    single = CliRunner().invoke(cli, ["train", str(corpus), "--name", "single", "--batch-size", "4", *MODEL, *RUN])
    assert single.exit_code == 0, single.output

    store = CheckpointStore()
    ddp_log, single_log = store.read_metrics("ddp"), store.read_metrics("single")
    assert [r["type"] for r in ddp_log].count("start") == 1  # only rank 0 writes
    assert ddp_log[0]["world_size"] == 2 and ddp_log[0]["tokens_per_step"] == single_log[0]["tokens_per_step"]

    def numbers(log, kind, keys):
        return [r[k] for r in log if r["type"] == kind for k in keys]

    ddp_steps = numbers(ddp_log, "step", ["step", "loss"])
    assert ddp_steps[::2] == [1, 2, 3, 4]
    assert ddp_steps == pytest.approx(numbers(single_log, "step", ["step", "loss"]), rel=1e-5)
    keys = ["step", "train_loss", "val_loss"]
    assert numbers(ddp_log, "eval", keys) == pytest.approx(numbers(single_log, "eval", keys), rel=1e-5)
    assert ddp_steps[-1] < ddp_steps[1] - 0.3  # and it did learn

    ddp_model = store.load_model("ddp")  # a torchrun checkpoint loads in one process, no "module." prefixes
    single_model = store.load_model("single")
    for (name, a), (_, b) in zip(ddp_model.state_dict().items(), single_model.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    assert store.load("ddp", with_state=True).trainer_state["world_size"] == 2

    # And the run continues in one process (same data order; a warning says it is no longer bit for bit).
    resumed = CliRunner().invoke(cli, ["train", "--name", "ddp", "--resume", "--max-steps", "5"])
    assert resumed.exit_code == 0, resumed.output
    log = store.read_metrics("ddp")
    assert [r["kind"] for r in log if r["type"] == "warning"] == ["world-size-changed"]
    assert [r["step"] for r in log if r["type"] == "step"][-1] == 5
