"""What `gpt2term train` promises across processes: exact resume after a real Ctrl-C, a last good checkpoint that is
good after a divergence, `--overwrite` that keeps the old checkpoint until the new one is saved, SIGTERM handled
like Ctrl-C, and a second Ctrl-C during a save that leaves no traceback. Real processes, real signals."""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from gpt2term.core.data import load_corpus
from gpt2term.core.errors import CheckpointError
from gpt2term.core.interop import torch_load_safely, write_safetensors
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.training import evaluate_ids

SMALL = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "2", "--context-length", "16", "--batch-size", "4"]
QUIET = ["--eval-interval", "100000", "--sample-tokens", "0"]
DEADLINE_S = 120


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = ["Once upon a time there was a small model.", "It learned to count: one, two, three, four."]
    path.write_text("\n".join(lines * 40))
    return path


class Train:
    """A `gpt2term train ... --json` process whose stdout events are read as they come."""

    def __init__(self, *args: str, nice: int = 0) -> None:
        command = [sys.executable, "-m", "gpt2term", "train", *map(str, args), "--json"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": ""}
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        self.events: list[dict] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.stderr = ""

    def _pump(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def until(self, predicate) -> dict:
        """Read events until one matches (fails if the process ends first)."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"the run ended first: {self.finish()}"
            if line.startswith("{"):
                self.events.append(json.loads(line))
                if predicate(self.events[-1]):
                    return self.events[-1]

    def finish(self) -> int:
        """Wait for the exit; all events and stderr are read."""
        try:
            rc = self.process.wait(timeout=DEADLINE_S)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        while (line := self._lines.get(timeout=DEADLINE_S)) is not None:
            if line.startswith("{"):
                self.events.append(json.loads(line))
        self.stderr = self.process.stderr.read()
        return rc

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def train(*args: str) -> Train:
    run = Train(*args)
    run.finish()
    return run


def invoke(*args: str):
    """In this process, where no signal or crash is part of the test (quicker than starting one)."""
    from click.testing import CliRunner

    from gpt2term.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def step_is(n: int):
    return lambda e: e["type"] == "step" and e["step"] >= n


def losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records if r["type"] == "step"]


def weights(name: str) -> dict[str, torch.Tensor]:
    return CheckpointStore().load(name).state_dict


def tensors_equal(a, b) -> bool:
    """Exact equality of nested state (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# ----------------------------------------------------------------------------------- 1: resume in a fresh process


@pytest.mark.once  # the signal and the fresh process; resume's numbers on the plain model: test_training
def test_sigint_then_resume_in_a_fresh_process_is_bit_exact_with_dropout_on(corpus_file):
    """A straight run and one interrupted by a real SIGINT and resumed by another process end with the same weights,
    optimizer state and logged losses, exactly (dropout on, so every random number drawn counts)."""
    common = [corpus_file, *SMALL, "--drop-rate", "0.1", "--max-steps", "12", *QUIET, "--save-interval", "0"]
    straight = Train("--name", "straight", *common)  # a process like the others (one thread each): the same sums
    split = Train("--name", "split", *common)  # at the same time as the straight run: a core each
    split.until(step_is(3))
    split.process.send_signal(signal.SIGINT)
    assert split.finish() == 130, split.stderr
    stopped = max(s for s, _ in losses(split.events))
    assert 3 <= stopped < 12, "the run must stop between its steps, after the signal"
    resumed = train("--name", "split", "--resume")
    assert resumed.process.returncode == 0, resumed.stderr
    assert losses(resumed.events)[0][0] == stopped + 1
    assert straight.finish() == 0, straight.stderr

    store = CheckpointStore()
    assert losses(store.read_metrics("split")) == losses(store.read_metrics("straight"))
    assert losses(split.events + resumed.events) == losses(straight.events)
    a, b = weights("straight"), weights("split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    optimizers = [torch_load_safely(store.path(n) / "optimizer.pt") for n in ("straight", "split")]
    assert tensors_equal(*optimizers)
    rng = [torch_load_safely(store.path(n) / "trainer.pt")["rng"]["torch_cpu"] for n in ("straight", "split")]
    assert torch.equal(*rng)


def test_sampling_without_a_seed_leaves_the_global_rng_alone():
    """The app samples while a run trains in another thread: reseeding the global RNG would change its dropout."""
    from gpt2term.core.config import GPTConfig
    from gpt2term.core.generation import DecodingSettings, generate
    from gpt2term.core.model import GPTModel
    from gpt2term.core.tokenizer import default_tokenizer

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1)).eval()
    before = torch.get_rng_state()
    settings = DecodingSettings(max_new_tokens=3, temperature=1.0)
    steps = list(generate(model, default_tokenizer(), [1, 2, 3], settings))
    assert len(steps) == 3 and torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------------- 2: the last good checkpoint is good


def test_after_a_divergence_the_kept_checkpoint_is_the_last_good_one(corpus_file):
    """A huge learning rate without clipping: the weights grow by orders of magnitude each step until the loss is
    NaN. Saving every step, the checkpoint kept must still give a finite loss, and be the step the message names."""
    run = train(corpus_file, "--name", "div", *SMALL, "--lr", "1e6", "--grad-clip", "0", "--max-steps", "30",
                *QUIET, "--save-interval", "1")  # fmt: skip
    assert run.process.returncode == 2, run.stderr
    failed = CheckpointStore().read_metrics("div")[-1]
    assert failed["type"] == "failed" and failed["kind"] == "diverged"
    good = failed["last_good_step"]
    assert good is not None and f"'div' (step {good}) is kept" in run.stderr
    assert len([line for line in run.stderr.splitlines() if line.startswith("error:")]) == 1
    checkpoint = CheckpointStore().load("div", with_state=True)
    assert checkpoint.meta["step"] == good and checkpoint.trainer_state["step"] == good
    assert all(torch.isfinite(t).all() for t in checkpoint.state_dict.values())
    model = checkpoint.build_model()
    assert math.isfinite(evaluate_ids(model, load_corpus([str(corpus_file)], val_ratio=0.0).train_ids).loss)


def test_non_finite_weights_are_never_saved_and_generate_refuses_them_in_one_line(tmp_path):
    from click.testing import CliRunner

    from gpt2term.cli import cli
    from gpt2term.core.config import GPTConfig
    from gpt2term.core.model import GPTModel

    store = CheckpointStore()
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    store.save("broken", model, meta={"step": 1})
    with torch.no_grad():
        model.out_head.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="nan or inf"):
        store.save("broken", model, meta={"step": 2})
    assert store.load("broken").meta["step"] == 1  # the previous version is kept

    # A file written by something else (or an older version) with NaN weights: refused where it is loaded.
    state = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    write_safetensors(state, store.path("broken") / "model.safetensors")
    result = CliRunner().invoke(cli, ["generate", "Hello", "-c", "broken", "-n", "3"])
    assert result.exit_code == 2, result.output
    assert "non-finite weights" in result.stderr and "perplexity" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------- 5: --overwrite keeps the old one until it saves


@pytest.mark.once  # the store's and the signals' plumbing: GPT2TERM_ACCEL=0 cannot change it
def test_overwrite_keeps_the_old_checkpoint_and_its_history_until_the_new_run_saves(corpus_file):
    first = invoke("train", corpus_file, "--name", "keep", *SMALL, "--max-steps", "2", *QUIET)
    assert first.exit_code == 0, first.output
    store = CheckpointStore()
    old_metrics = store.read_metrics("keep")

    # Killed (no chance to clean up) before its first save: the old checkpoint loads as it was, history and all.
    doomed = Train(corpus_file, "--name", "keep", "--overwrite", *SMALL, "--max-steps", "100000", *QUIET,
                   "--save-interval", "0")  # fmt: skip
    doomed.until(step_is(2))
    doomed.process.send_signal(signal.SIGKILL)
    doomed.finish()
    checkpoint = store.load("keep", with_state=True)
    assert checkpoint.meta["step"] == 2 and checkpoint.trainer_state["step"] == 2
    assert checkpoint.meta["training"]["max_steps"] == 2
    assert store.read_metrics("keep") == old_metrics
    assert [info.name for info in store.list()] == ["keep"] and store.info("keep").damaged is None

    # An overwrite that saves replaces it: new weights, new history only, no leftovers of the killed run.
    second = invoke("train", corpus_file, "--name", "keep", "--overwrite", *SMALL, "--max-steps", "3", "--seed", "7",
                    *QUIET, "--json")  # fmt: skip
    assert second.exit_code == 0, second.output
    checkpoint = store.load("keep", with_state=True)
    assert checkpoint.meta["step"] == 3 and checkpoint.meta["training"]["seed"] == 7
    records = store.read_metrics("keep")
    assert [r["type"] for r in records].count("start") == 1 and records[0]["settings"]["seed"] == 7
    assert records == json_lines(second.stdout)
    assert not list(store.root.glob(".keep.*tmp*")) and not list(store.root.glob(".keep.old*"))


# ------------------------------------------------------------------------------------------ 6: SIGTERM, 2nd Ctrl-C


@pytest.mark.once  # the store's and the signals' plumbing: GPT2TERM_ACCEL=0 cannot change it
def test_sigterm_saves_at_the_step_reached_exits_143_and_releases_the_lock(corpus_file):
    run = Train(corpus_file, "--name", "term", *SMALL, "--max-steps", "100000", *QUIET, "--save-interval", "0")
    run.until(step_is(2))
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 143, run.stderr
    reached = max(s for s, _ in losses(run.events))
    assert [e["type"] for e in run.events][-2:] == ["checkpoint", "finished"]
    assert f"at step {reached}; saved checkpoint 'term'" in run.stderr and "SIGTERM" in run.stderr
    assert "Traceback" not in run.stderr
    store = CheckpointStore()
    assert not store.lock_path("term").exists()
    checkpoint = store.load("term", with_state=True)
    assert checkpoint.meta["step"] == reached and checkpoint.trainer_state["step"] == reached
    resumed = invoke("train", "--name", "term", "--resume", "--max-steps", reached + 1, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert losses(json_lines(resumed.stdout))[0][0] == reached + 1


def _saving_now(store: CheckpointStore, name: str) -> bool:
    """A save of `name` is under way: its temporary folder exists and has files in it."""
    return any(any(p.iterdir()) for p in store.root.glob(f".{name}.tmp-*"))


@pytest.mark.once  # the store's and the signals' plumbing: GPT2TERM_ACCEL=0 cannot change it
def test_a_second_ctrl_c_during_the_save_lets_it_finish_no_traceback(corpus_file):
    """Raised inside torch.save, a KeyboardInterrupt comes out as a RuntimeError with a traceback (exit 1)."""
    # A wider model than the others, so that its save lasts long enough to be caught in the middle; the run is
    # niced so that this process, watching for the save, is not the one kept waiting for a core.
    args = ["--emb-dim", "96", "--n-layers", "1", "--n-heads", "2", "--context-length", "8", "--batch-size", "2"]
    run = Train(corpus_file, "--name", "twice", *args, "--max-steps", "100000", *QUIET, "--save-interval", "0", nice=10)
    run.until(step_is(2))
    store = CheckpointStore()
    run.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + DEADLINE_S
    while not _saving_now(store, "twice"):
        assert run.process.poll() is None and time.monotonic() < deadline, f"no save was seen: {run.finish()}"
    run.process.send_signal(signal.SIGINT)
    rc = run.finish()
    assert "Traceback" not in run.stderr, run.stderr
    assert rc == 130, run.stderr
    reached = max(s for s, _ in losses(run.events))
    assert f"interrupted at step {reached}; saved checkpoint 'twice'" in run.stderr
    assert not store.lock_path("twice").exists()
    assert not list(store.root.glob(".twice.*")), "a temporary folder is left"
    checkpoint = store.load("twice", with_state=True)
    assert checkpoint.meta["step"] == reached and checkpoint.trainer_state["step"] == reached
