"""Every command, fed bad values: one line on stderr (or click's usage error), exit status 2, never a traceback.

One table drives all of it. The rows run in-process through click's runner with `catch_exceptions=False`, so an
unhandled exception fails the test with its traceback; the rows marked `SUBPROCESS` also run as a real
`python -m gpt2term`, which checks what a user's terminal would show.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from gpt2term.cli import cli
from gpt2term.core import memory
from gpt2term.core.config import GPTConfig
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore

BIG = str(2**70)
SMALL_MACHINE = 2 << 30  # in-process rows see a machine with 2 GiB free, so memory refusals do not depend on the host
SUBPROCESS = "subprocess"

G = ("generate", "Hello", "-c", "tiny")  # tiny: context 32, so -n may go up to 512
T = ("train", "{corpus}", "--name", "run", "--emb-dim", "32", "--n-heads", "2", "--n-layers", "1")
E = ("eval", "{corpus}", "-c", "tiny")
A = ("inspect", "attention", "Hello there", "-c", "tiny")
L = ("inspect", "lens", "Hello there", "-c", "tiny")
BG = ("bench", "generate", "--preset", "tiny", "--repeats", "1")
BT = ("bench", "train", "--preset", "tiny")

CASES = [
    # generate: sampling settings (core/generation.py)
    ((*G, "-t", "nan"), "temperature", SUBPROCESS),
    ((*G, "-t", "inf"), "temperature", None),
    ((*G, "-t", "-inf"), "temperature", None),
    ((*G, "-t", "-1"), "temperature", None),
    ((*G, "-t", "warm"), "not a valid float", None),
    ((*G, "--top-p", "nan"), "top-p", None),
    ((*G, "--top-p", "0"), "--top-p", None),
    ((*G, "--top-p", "1.5"), "--top-p", None),
    ((*G, "--top-p", "inf"), "--top-p", None),
    ((*G, "--top-k", "0"), "--top-k", None),
    ((*G, "--top-k", "-3"), "--top-k", None),
    ((*G, "--seed", BIG), "seed", SUBPROCESS),
    ((*G, "--seed", str(2**64)), "seed", None),
    ((*G, "--seed", "-1"), "seed", None),
    ((*G, "--seed", "2**70"), "not a valid integer", None),
    ((*G, "--beams", "1000000"), "beams", SUBPROCESS),
    ((*G, "--beams", "65"), "beams", None),
    ((*G, "--beams", "0"), "--beams", None),
    ((*G, "-n", "1000000000"), "--no-limit", SUBPROCESS),
    ((*G, "-n", BIG), "--no-limit", None),
    ((*G, "-n", "513"), "at most 512", None),
    ((*G, "--beams", "2", "-n", "1000000000"), "--no-limit", None),
    ((*G, "-n", "-1"), "--max-new-tokens", None),
    ((*G, "--top-n", "0"), "--top-n", None),
    ((*G, "--threads", "0"), "--threads", None),
    ((*G, "--threads", BIG), "--threads", None),
    ((*G, "--threads", "100000"), "--threads", None),
    ((*G, "--dtype", "fp8"), "--dtype", None),
    (("generate", "   ", "-c", "tiny"), "prompt is empty", None),
    (("generate", "Hello", "-c", "/nonexistent/weights"), "/nonexistent/weights", None),
    # train: TrainingSettings.validate and the memory estimate (core/training/settings.py, core/memory.py)
    ((*T, "--lr", "nan"), "--lr", SUBPROCESS),
    ((*T, "--lr", "inf"), "--lr", None),
    ((*T, "--lr", "0"), "--lr", None),
    ((*T, "--lr", "-1"), "--lr", None),
    ((*T, "--weight-decay", "nan"), "--weight-decay", None),
    ((*T, "--weight-decay", "inf"), "--weight-decay", None),
    ((*T, "--weight-decay", "-0.1"), "--weight-decay", None),
    ((*T, "--epochs", "nan"), "--epochs", None),
    ((*T, "--epochs", "inf"), "--epochs", None),
    ((*T, "--epochs", "-inf"), "--epochs", None),
    ((*T, "--epochs", "0"), "--epochs", None),
    ((*T, "--grad-clip", "nan"), "--grad-clip", None),
    ((*T, "--grad-clip", "inf"), "--grad-clip", None),
    ((*T, "--grad-accum", "1000000000"), "--grad-accum", None),
    ((*T, "--grad-accum", "0"), "--grad-accum", None),
    ((*T, "--val-ratio", "nan"), "--val-ratio", None),
    ((*T, "--drop-rate", "nan"), "drop_rate", None),
    ((*T, "--seed", BIG), "seed", None),
    ((*T, "--seed", "-5"), "seed", None),
    ((*T, "--threads", BIG), "--threads", None),
    ((*T, "--sample-tokens", "1000000000"), "--no-limit", None),
    ((*T, "--max-steps", "0"), "--max-steps", None),
    ((*T, "--epochs", "1", "--max-steps", "3"), "not both", None),
    ((*T, "--emb-dim", "1000000000"), "too large", SUBPROCESS),  # past any config's ceiling
    ((*T, "--n-layers", "1000000"), "too large", SUBPROCESS),
    ((*T, "--context-length", "1000000000"), "too large", None),
    ((*T, "--emb-dim", "8192"), "needs at least", None),  # a config that can exist, but not in the free memory
    ((*T, "--emb-dim", "33"), "not divisible", None),
    ((*T, "--n-heads", "1000000"), "too large", None),
    ((*T, "--device", "tpu"), "unknown device", None),
    ((*T, "--dtype", "fp8"), "--dtype", None),
    (("train", "{corpus}", "--name", "../up"), "invalid checkpoint name", None),
    (("train", "/nonexistent/corpus.txt", "--name", "run"), "corpus not found", None),
    (("train", "{corpus}", "--name", "never-trained", "--resume"), "no checkpoint named", None),
    # eval
    ((*E, "--batch-size", "1000000000"), "needs at least", None),
    ((*E, "--batch-size", "0"), "--batch-size", None),
    ((*E, "--context-length", "0"), "--context-length", None),
    ((*E, "--threads", BIG), "--threads", None),
    (("eval", "{corpus}", "-c", "nope"), "nope", None),
    (("eval", "/nonexistent/corpus.txt", "-c", "tiny"), "corpus not found", None),
    # inspect
    ((*A, "--layer", BIG), "layer", None),
    ((*A, "--layer", "-2"), "layer", None),
    ((*A, "--layer", "x"), "--layer", None),
    (("inspect", "attention", "", "-c", "tiny"), "empty", None),
    ((*L, "--position", BIG), "position", None),
    ((*L, "--position", "-" + BIG), "position", None),
    ((*L, "--top-k", "0"), "--top-k", None),
    (("inspect", "lens", "Hi", "-c", "nope"), "nope", None),
    # ckpt
    (("ckpt", "list", "--bogus"), "--bogus", None),
    (("ckpt", "show", "nope"), "nope", None),
    (("ckpt", "show", "../tiny"), "../tiny", None),
    (("ckpt", "import", "/nonexistent/model.safetensors"), "/nonexistent/model.safetensors", None),
    (("ckpt", "import", "/etc/hostname"), "/etc/hostname", None),
    (("ckpt", "import", "{corpus}", "--n-heads", "0"), "--n-heads", None),
    (("ckpt", "export", "tiny", "--format", "hf", "-o", "/proc/x"), "/proc/x", SUBPROCESS),
    (("ckpt", "export", "tiny", "--format", "pth", "-o", "/proc/x/model.pth"), "/proc/x", None),
    (("ckpt", "export", "tiny", "--format", "pth-optimizer", "-o", "/proc/version/x.pth"), "/proc/version", None),
    (("ckpt", "export", "tiny", "--format", "safetensors", "-o", "out"), "--format", None),
    (("ckpt", "export", "nope", "--format", "hf", "-o", "{tmp}/out"), "nope", None),
    (("ckpt", "mv", "tiny", "../evil"), "../evil", None),
    (("ckpt", "mv", "nope", "other"), "nope", None),
    (("ckpt", "cp", "tiny", "a/b"), "a/b", None),
    (("ckpt", "cp", "nope", "other"), "nope", None),
    (("ckpt", "rm", "nope", "--yes"), "nope", None),
    (("ckpt", "download", "gpt5"), "gpt5", None),
    (("locate", "--bogus"), "--bogus", None),
    # bench
    ((*BG, "--tokens", "1000000000"), "--no-limit", None),
    ((*BG, "--tokens", "1"), "--tokens", None),
    ((*BG, "--repeats", "0"), "--repeats", None),
    ((*BG, "--threads", BIG), "--threads", None),
    (("bench", "generate", "--preset", "huge"), "unknown preset", None),
    ((*BT, "--batch-size", "1000000000"), "needs at least", None),
    ((*BT, "--steps", "1000000000"), "needs at least", None),
    ((*BT, "--context-length", "1000000000"), "too large", None),
    ((*BT, "--threads", BIG), "--threads", None),
    (("bench", "train", "--preset", "huge"), "unknown preset", None),
    (("--bogus",), "--bogus", None),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A home with checkpoint `tiny` (GPT-2's vocabulary, a 32-token context) and a small corpus."""
    home = tmp_path_factory.mktemp("bad-input-home")
    corpus = home / "corpus.txt"
    corpus.write_text("Every effort moves you forward, one small step at a time. " * 2000, encoding="utf-8")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0))
    mp = pytest.MonkeyPatch()
    mp.setenv("GPT2TERM_HOME", str(home))
    CheckpointStore().save("tiny", model, meta={"source": "test"})
    mp.undo()
    return home, corpus


def _argv(argv: tuple[str, ...], world, tmp_path) -> list[str]:
    home, corpus = world
    return [a.format(corpus=corpus, tmp=tmp_path) for a in argv]


def assert_one_line_error(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    if lines and lines[0].startswith("Usage:"):  # click's usage error: Usage / Try ... --help / Error: ...
        assert len(lines) == 3 and lines[1].startswith("Try ") and lines[2].startswith("Error: "), stderr
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[-1], stderr


@pytest.mark.parametrize(("argv", "expected", "how"), CASES, ids=[" ".join(c[0][:6]) for c in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, expected, how, world, tmp_path, monkeypatch):
    home, _ = world
    monkeypatch.setenv("GPT2TERM_HOME", str(home))
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: SMALL_MACHINE)
    result = CliRunner().invoke(cli, _argv(argv, world, tmp_path), catch_exceptions=False)
    assert_one_line_error(result.stderr, expected)
    assert result.exit_code == 2, result.stderr
    assert [c.name for c in CheckpointStore().list()] == ["tiny"]  # a refused command leaves the store as it was


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(c[0], c[1]) for c in CASES if c[2] == SUBPROCESS],
    ids=[" ".join(c[0][:6]) for c in CASES if c[2] == SUBPROCESS],
)
def test_bad_input_in_a_real_process(argv, expected, world, tmp_path):
    home, _ = world
    env = {"GPT2TERM_HOME": str(home), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2term", *_argv(argv, world, tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert_one_line_error(proc.stderr, expected)
    assert proc.returncode == 2, proc.stderr
