"""`gpt2term train` and `gpt2term eval`: a real Ctrl-C, bad corpora, progress output, resume, eval numbers."""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading

import pytest
import torch
from click.testing import CliRunner

from gpt2term.cli import cli
from gpt2term.core.data import load_corpus
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.training import evaluate_ids

SMALL = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "2", "--context-length", "16", "--batch-size", "4"]


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.once  # the signal's and the store's plumbing: GPT2TERM_ACCEL=0 cannot change it
def test_ctrl_c_finishes_the_step_saves_and_exits_130_then_resume_continues(corpus_file):
    command = [sys.executable, "-m", "gpt2term", "train", str(corpus_file), "--name", "sig", *SMALL,
               "--max-steps", "100000", "--eval-interval", "100000", "--save-interval", "0", "--json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    events = []
    try:
        while not any(e["type"] == "step" and e["step"] >= 2 for e in events):
            line = lines.get(timeout=180)
            assert line is not None, process.stderr.read()
            events.append(json.loads(line))
        # Another process (this one) follows the run through metrics.jsonl while it is going.
        live = CheckpointStore().read_metrics("sig")
        assert live[0]["type"] == "start" and any(r["type"] == "step" for r in live)
        process.send_signal(signal.SIGINT)
        while (line := lines.get(timeout=180)) is not None:
            events.append(json.loads(line))
        assert process.wait(timeout=180) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read()
    last_step = max(e["step"] for e in events if e["type"] == "step")
    assert f"interrupted at step {last_step}; saved checkpoint 'sig'" in stderr
    assert "gpt2term train --name sig --resume" in stderr
    assert [e["type"] for e in events][-2:] == ["checkpoint", "finished"]
    assert events[-2]["reason"] == "interrupted" and events[-1]["status"] == "interrupted"

    store = CheckpointStore()
    checkpoint = store.load("sig", with_state=True)  # weights by safetensors, state by weights_only=True
    assert checkpoint.meta["step"] == last_step and checkpoint.trainer_state["step"] == last_step
    state = torch.load(store.path("sig") / "trainer.pt", weights_only=True)
    assert state["settings"]["name"] == "sig" and isinstance(state["rng"]["torch_cpu"], torch.Tensor)
    assert all(torch.isfinite(t).all() for t in checkpoint.state_dict.values())

    # --resume picks up every saved setting (small model, corpus, batch) and continues from the saved step.
    result = invoke("train", "--name", "sig", "--resume", "--max-steps", last_step + 2, "--json")
    assert result.exit_code == 0, result.output
    resumed = json_lines(result.stdout)
    assert resumed[0]["type"] == "start" and resumed[0]["resumed"] and resumed[0]["step"] == last_step
    assert [e["step"] for e in resumed if e["type"] == "step"] == [last_step + 1, last_step + 2]
    assert resumed[0]["settings"]["model"]["emb_dim"] == 32


def test_progress_samples_and_checkpoints_are_printed(corpus_file):
    result = invoke("train", corpus_file, "--name", "shown", *SMALL, "--max-steps", 2, "--eval-interval", 1,
                    "--sample-prompt", "Once upon", "--sample-tokens", 3)  # fmt: skip
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "training 'shown'" in err and "2 layers, 32 dims, context 16" in err
    assert "step 1: train loss" in err and "step 2: train loss" in err and "val perplexity" in err
    assert err.count("sample: Once upon") == 2
    assert "saved checkpoint 'shown' at step 2 (final)" in err and "finished 2 steps" in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "corpus not found"),
        (b"", "the corpus is empty"),
        (b"Too short to train on.", "needs about 170 tokens"),
        (b"fine text \xff\xfe more", "invalid UTF-8 at byte 10"),
    ],
)
def test_bad_corpora_give_one_clear_line_and_exit_2(tmp_path, content, expected):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    result = invoke("train", path, "--name", "bad", *SMALL, "--max-steps", 1)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    if content is not None and b"\xff" in content:
        assert str(path) in lines[0] and "--encoding-errors replace" in lines[0]
    assert not CheckpointStore().exists("bad")  # nothing left behind by a run that never started


def test_encoding_errors_replace_reads_a_bad_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Café au lait, s'il vous plaît. ".encode("latin-1") * 60)
    result = invoke("train", path, "--name", "latin", *SMALL, "--max-steps", 1, "--encoding-errors", "replace")
    assert result.exit_code == 0, result.output
    assert CheckpointStore().info("latin").meta["step"] == 1


def test_eval_prints_loss_perplexity_and_tokens(corpus_file):
    assert invoke("train", corpus_file, "--name", "ev", *SMALL, "--max-steps", 3).exit_code == 0
    result = invoke("eval", corpus_file, "--checkpoint", "ev", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    ids = load_corpus([corpus_file], val_ratio=0.0).train_ids
    expected = evaluate_ids(CheckpointStore().load_model("ev"), ids)
    assert report["tokens"] == ids.numel() - 1 == expected.tokens
    assert report["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))

    text = invoke("eval", corpus_file, "-c", "ev")
    line = f"loss {report['loss']:.4f}  perplexity {report['perplexity']:.2f}  tokens {report['tokens']:,}"
    assert line in text.output
    missing = invoke("eval", corpus_file, "-c", "no-such-checkpoint")
    assert missing.exit_code == 2 and "no-such-checkpoint" in missing.stderr
