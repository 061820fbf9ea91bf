"""Shared fixtures. Every test runs against its own empty gpt2term home, never the user's real data dir."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("gpt2term-home")
    monkeypatch.setenv("GPT2TERM_HOME", str(home))
    return home


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
