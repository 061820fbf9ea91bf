"""Shared fixtures. Every test runs against its own empty gpt2term home, never the user's real data dir."""

from __future__ import annotations

import signal

import pytest
import torch

# A suite started in the background by a shell without job control inherits SIGINT ignored, and so would every
# process its tests start (an ignored signal survives exec, and Python then installs no Ctrl-C handler): the
# tests that send a real Ctrl-C to a real process would wait for a stop that cannot come.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("gpt2term-home")
    monkeypatch.setenv("GPT2TERM_HOME", str(home))
    return home


# Tests of what the model's speed-ups cannot change: the screens (they show the numbers the core computes), the
# store and its files, the CLI's plumbing, the tokenizer and the data. The second pass (GPT2TERM_ACCEL=0,
# `-m "not once"`) checks the numbers without the speed-ups and leaves these to the first. A test of such plumbing in
# another file carries `@pytest.mark.once` itself.
ONCE = ("test_tui_", "test_store_", "test_ckpt_crash", "test_bad_input", "test_cli_progress", "test_tokenizer",
        "test_data", "test_metrics_follow", "test_formatting", "test_readme_promises", "test_lesson_",
        "test_bench_peers", "test_load", "test_train_gpu_path", "test_native")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name.startswith(ONCE):
            item.add_marker(pytest.mark.once)


@pytest.fixture
def corpus_file(tmp_path):
    """A small text for training runs; a module that needs other text defines its own `corpus_file`."""
    path = tmp_path / "corpus.txt"
    lines = ["Once upon a time there was a small model.", "It learned to count: one, two, three."]
    path.write_text("\n".join(lines * 40))
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores on CI; keep torch from oversubscribing when tests spawn subprocesses.
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    yield
