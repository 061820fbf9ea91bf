"""What `gpt2term train` and `gpt2term eval` say while they work: rich bars on a terminal, plain lines in a pipe,
Ctrl-C acknowledged at once (real processes, real signals), and eval's limit and default checkpoint."""

from __future__ import annotations

import json
import os
import pty
import queue
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from gpt2term.cli import cli
from gpt2term.core.data import load_corpus
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.training import evaluate_ids

SMALL = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "2", "--context-length", "16", "--batch-size", "4"]
# Steps of a second or so, so "before the next step event" means something on a quiet machine too.
SLOW = [
    "--preset",
    "tiny",
    "--context-length",
    "128",
    "--batch-size",
    "8",
    "--save-interval",
    "0",
    "--no-eval-at-start",
]
MESSAGE = "Ctrl-C: stopping after this step, then saving; Ctrl-C again to quit without saving"


@pytest.fixture
def big_corpus(tmp_path):
    """About 60K tokens of varied text: enough windows for long evaluations."""
    path = tmp_path / "big.txt"
    words = ["model", "token", "train", "count", "small", "time", "layer", "head", "learn", "text", "word", "loss"]
    lines = [" ".join(words[(i * k) % len(words)] for k in range(1, 13)) + f" {i}." for i in range(5000)]
    path.write_text("\n".join(lines))
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


class Process:
    """A real `gpt2term` process whose stdout and stderr lines are read as they come, each with its arrival time."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "gpt2term", *map(str, args)]
        self.popen = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[tuple[str, float, str | None]] = queue.Queue()
        self.seen: list[tuple[str, float, str]] = []
        for name, stream in (("out", self.popen.stdout), ("err", self.popen.stderr)):
            threading.Thread(target=self._pump, args=(name, stream), daemon=True).start()

    def _pump(self, name: str, stream) -> None:
        for line in stream:
            self.lines.put((name, time.monotonic(), line.rstrip("\n")))
        self.lines.put((name, time.monotonic(), None))

    def wait_for(self, predicate, timeout: float = 300) -> tuple[str, float, str]:
        deadline = time.monotonic() + timeout
        while True:
            name, at, line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, f"the process ended first: {self.seen}"
            self.seen.append((name, at, line))
            if predicate(name, line):
                return name, at, line

    def finish(self, timeout: float = 300) -> int:
        code = self.popen.wait(timeout=timeout)
        ended = 0
        while ended < 2:
            name, at, line = self.lines.get(timeout=timeout)
            if line is None:
                ended += 1
            else:
                self.seen.append((name, at, line))
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def events(self) -> list[dict]:
        return [json.loads(line) for name, _, line in self.seen if name == "out" and line.startswith("{")]


def is_step(name: str, line: str) -> bool:
    return name == "out" and line.startswith('{"type": "step"')


def test_first_ctrl_c_in_train_is_acknowledged_at_once_and_before_the_next_step(big_corpus):
    run = Process("train", big_corpus, "--name", "ack", *SLOW, "--max-steps", "100000", "--eval-interval", "100000",
                  "--json")  # fmt: skip
    try:
        run.wait_for(is_step)
        sent = time.monotonic()
        run.popen.send_signal(signal.SIGINT)
        name, said, line = run.wait_for(lambda n, text: n == "err" and "Ctrl-C" in text or is_step(n, text))
        assert name == "err", f"a step event came before any word on stderr: {line}"
        assert line == MESSAGE
        assert said - sent < 0.5
        assert run.finish() == 130
    finally:
        run.kill()
    events = run.events()
    assert [e["type"] for e in events][-2:] == ["checkpoint", "finished"]
    assert events[-1]["status"] == "interrupted" and events[-1]["checkpoint"] == "ack"


def test_ctrl_c_during_an_evaluation_cuts_it_short_and_logs_no_eval(big_corpus):
    # An evaluation of 2 x 400 batches after step 1: minutes, unless the Ctrl-C cuts it.
    run = Process("train", big_corpus, "--name", "cut", *SLOW, "--max-steps", "100000", "--eval-interval", "1",
                  "--eval-iters", "400", "--json")  # fmt: skip
    try:
        run.wait_for(is_step)  # step 1 done: its evaluation starts now
        sent = time.monotonic()
        run.popen.send_signal(signal.SIGINT)
        _, said, line = run.wait_for(lambda n, text: n == "err" and "Ctrl-C" in text)
        assert line == MESSAGE and said - sent < 0.5
        assert run.finish(timeout=120) == 130
    finally:
        run.kill()
    events = run.events()
    assert not [e for e in events if e["type"] in ("eval", "sample")]  # a cut evaluation is not reported
    assert [e["type"] for e in events][-2:] == ["checkpoint", "finished"]
    assert CheckpointStore().info("cut").meta["val_loss"] is None


def test_ctrl_c_stops_eval_with_one_line_and_exit_130(big_corpus):
    assert invoke("train", big_corpus, "--name", "evc", *SMALL, "--max-steps", 1).exit_code == 0
    run = Process("eval", big_corpus, "-c", "evc", "--batch-size", "1", "--context-length", "2")
    try:
        run.wait_for(lambda n, text: n == "err" and " batches of up to " in text)
        sent = time.monotonic()
        run.popen.send_signal(signal.SIGINT)
        _, said, line = run.wait_for(lambda n, text: n == "err" and "Ctrl-C" in text)
        assert line == "Ctrl-C: evaluation stopped; no result" and said - sent < 0.5
        assert run.finish(timeout=60) == 130
    finally:
        run.kill()
    assert not [line for name, _, line in run.seen if name == "out"]  # no result printed
    err = [line for name, _, line in run.seen if name == "err"]
    assert err[-1] == "Ctrl-C: evaluation stopped; no result" and "Traceback" not in "\n".join(err)


def test_eval_max_tokens_scores_only_the_first_tokens(corpus_file):
    assert invoke("train", corpus_file, "--name", "ev", *SMALL, "--max-steps", 2).exit_code == 0
    result = invoke("eval", corpus_file, "-c", "ev", "--max-tokens", 50, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    ids = load_corpus([corpus_file], val_ratio=0.0).train_ids
    assert ids.numel() > 200 and report["tokens"] == 50
    expected = evaluate_ids(CheckpointStore().load_model("ev"), ids[:51])
    assert report["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert "its first 50 tokens" in result.stderr.splitlines()[0]


def test_eval_and_generate_default_to_the_same_checkpoint_and_say_so(corpus_file):
    for seed, name in enumerate(("older", "newer")):
        assert invoke("train", corpus_file, "--name", name, *SMALL, "--max-steps", 2, "--seed", seed).exit_code == 0
    CheckpointStore().mark_used("older")  # the last used, though "newer" was written after it

    evaluated = invoke("eval", corpus_file, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["checkpoint"] == "older"
    first = evaluated.stderr.splitlines()[0]
    assert first == f"evaluating older (the last one used) on {corpus_file}"

    def tokens(*extra):
        result = invoke("generate", "Once upon", "-n", 8, "--json", *extra)
        assert result.exit_code == 0, result.output
        return [json.loads(line)["token_id"] for line in result.stdout.splitlines() if '"token_id"' in line], result

    by_default, result = tokens()
    assert "no --checkpoint given: using 'older', the last one used" in result.stderr
    assert by_default == tokens("-c", "older")[0] != tokens("-c", "newer")[0]
    for command in ("eval", "generate"):
        assert "the last one used, else the newest in the store, else an untrained GPT-2 124M" in " ".join(
            invoke(command, "--help").output.split()
        )


def run_in_pty(*args: str, timeout: float = 300) -> tuple[int, str]:
    """A real process with a terminal for stdin, stdout and stderr (what a user's shell gives it)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120", "LINES": "30", "TERM": "xterm-256color"}
    process = subprocess.Popen([sys.executable, "-m", "gpt2term", *map(str, args)], stdin=follower, stdout=follower,
                               stderr=follower, env=env, close_fds=True)  # fmt: skip
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # the follower side closed: the process is gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        return process.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)


def test_train_and_eval_show_rich_bars_on_a_terminal_and_plain_lines_in_a_pipe(corpus_file):
    args = ("train", corpus_file, "--name", "bar", *SMALL, "--max-steps", 3, "--eval-interval", 2,
            "--sample-prompt", "Once upon", "--sample-tokens", 2)  # fmt: skip
    code, screen = run_in_pty(*args)
    assert code == 0, screen
    assert "━" in screen and "3/3" in screen and "[#" not in screen  # rich's bar, not the hand-made one
    assert "tok/s" in screen and "lr " in screen and "elapsed" in screen and "ETA" in screen
    assert "step 2: train loss" in screen and "sample: Once upon" in screen and "finished 3 steps" in screen

    code, screen = run_in_pty("eval", corpus_file, "-c", "bar")
    assert code == 0, screen
    assert "evaluating" in screen and "━" in screen and "batches" in screen and "tokens/s" in screen
    assert "loss " in screen and "perplexity" in screen

    piped = invoke(*args[:3], "bar2", *args[4:])  # CliRunner: stderr is not a terminal
    assert piped.exit_code == 0, piped.output
    assert "━" not in piped.stderr and "\r" not in piped.stderr and "\x1b" not in piped.stderr
    assert "step 2: train loss" in piped.stderr and "finished 3 steps" in piped.stderr
    evaluated = invoke("eval", corpus_file, "-c", "bar")
    assert "━" not in evaluated.stderr and "\x1b" not in evaluated.stderr
    assert evaluated.stderr.splitlines()[0].startswith("evaluating bar (given with --checkpoint) on ")
