"""One perplexity rule: training, the store, generation and the checkpoint table give the same number for the same
loss, and a loss too large for exp() (a diverged model) is the same huge finite number everywhere, never a crash."""

from __future__ import annotations

import math

import pytest

from gpt2term.core.config import GPTConfig
from gpt2term.core.generation import Continuation, Score
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.training import perplexity
from gpt2term.tui.widgets.checkpoint_table import describe

TINY = GPTConfig(vocab_size=64, context_length=8, emb_dim=8, n_heads=2, n_layers=1)


@pytest.mark.parametrize("loss", [0.0, 3.5, 750.0])
def test_every_place_computes_the_same_perplexity(tmp_path, loss):
    expected = math.exp(min(loss, 700.0))
    assert perplexity(loss) == expected
    assert Score([1, 2], [-loss]).perplexity == expected  # a prompt's perplexity
    assert Continuation((1, 2), "ab", -2 * loss).perplexity == expected  # a beam's
    store = CheckpointStore(tmp_path / "store")
    store.save("run", GPTModel(TINY), meta={"train_loss": loss, "val_loss": loss, "val_perplexity": None})
    row = store.info("run")
    assert row.get("train_perplexity") == expected  # filled in by the store
    assert f"val {loss:.3f} (ppl {expected:,.1f})" in describe(row).plain  # computed by the table
