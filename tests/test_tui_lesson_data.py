"""Pilot tests of the data view (issue 15 part 2): opened from the Train screen with the form's settings, it shows
the engine's counts and rows, steps through batches, says what it computes while it reads, and reports a corpus
that is too small in its title."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from gpt2term.core import data_view as core_data_view
from gpt2term.core.config import GPTConfig
from gpt2term.core.data_view import data_pipeline, id_matrix
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.training import TrainingSettings
from gpt2term.tui.app import make_app
from gpt2term.tui.screens.data_view import DataView
from gpt2term.tui.screens.train import TrainScreen
from tests.pilot_helpers import drain, screen_text, settle


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(f"word{i} is number {i}." for i in range(30)))
    return path


def small_app():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(emb_dim=32, n_heads=2, n_layers=1, context_length=16))
    return make_app(model=model, model_name="small", keymap={})


def text_of(screen, selector: str) -> str:
    return str(screen.query_one(selector).render())


async def open_data(pilot, **fields: str) -> DataView:
    await pilot.press("f3")
    train = pilot.app.screen
    assert isinstance(train, TrainScreen)
    await drain(pilot)  # filled after the form's own refill from the store, which would undo the test's values
    for field_id, value in fields.items():
        train.form.query_one(f"#{field_id}").value = value
    await pilot.press("ctrl+t")
    view = pilot.app.screen
    assert isinstance(view, DataView), [n.message for n in pilot.app._notifications]
    return view


def engine(corpus_file, step: int = 1):
    settings = TrainingSettings(corpus=[str(corpus_file)], context_length=8, batch_size=3, seed=7)
    return data_pipeline(settings, step=step)


def test_the_data_view_shows_the_engines_rows_and_counts_and_steps_through_batches(corpus_file):
    CheckpointStore().save("taken", GPTModel(GPTConfig(emb_dim=16, n_heads=2, n_layers=1, context_length=8)))

    async def scenario() -> None:
        async with small_app().run_test(size=(130, 50)) as pilot:
            fields = {"corpus": str(corpus_file), "context_length": "8", "batch_size": "3", "seed": "7"}
            view = await open_data(pilot, name="taken", **fields)  # a taken Name does not matter here
            await settle(pilot, lambda: view.pipeline is not None, "the pipeline computed")
            expected = engine(corpus_file)
            assert view.pipeline == expected
            stages = text_of(view, "#data-stages")
            assert f"{expected.train_tokens:,} training tokens, {expected.val_tokens:,} validation tokens" in stages
            assert f"{expected.windows:,} training windows, {expected.val_windows:,} validation windows" in stages
            assert f"{expected.batches_per_epoch:,} batches per epoch" in stages
            assert f"at character {expected.split_at:,}" in stages
            windows = text_of(view, "#data-windows")
            assert "inputs  = " + id_matrix([w.input_ids for w in expected.first_windows], 8, indent=10) in windows
            assert "targets = " + id_matrix([w.target_ids for w in expected.first_windows], 8, indent=10) in windows
            batch = text_of(view, "#data-batch")
            assert "step 1: batch 1 of" in batch and "shape (3, 8)" in batch
            assert "targets = " + id_matrix([w.target_ids for w in expected.batch], 8, indent=10) in batch

            for step in (2, 3, 4, 5, 6):  # on into the second epoch
                await pilot.press("right")
                shown = engine(corpus_file, step)
                assert view.pipeline.step == step and view.pipeline.batch == shown.batch
                assert "inputs  = " + id_matrix([w.input_ids for w in shown.batch], 8, indent=10) in text_of(
                    view, "#data-batch"
                )
            assert view.pipeline.epoch == engine(corpus_file, 6).epoch
            for _ in range(8):
                await pilot.press("left")
            assert view.pipeline.step == 1 and view.pipeline.batch == expected.batch  # no step 0
            await pilot.press("escape")
            assert isinstance(pilot.app.screen, TrainScreen)

    asyncio.run(scenario())


def test_the_view_says_what_it_computes_while_the_corpus_is_read(corpus_file, monkeypatch):
    release = threading.Event()
    original = core_data_view.load_corpus

    def slow_load(*args, **kwargs):
        assert release.wait(60), "the test never released the tokenizer"
        return original(*args, **kwargs)

    monkeypatch.setattr(core_data_view, "load_corpus", slow_load)

    async def scenario() -> None:
        async with small_app().run_test(size=(120, 40)) as pilot:
            view = await open_data(pilot, corpus=str(corpus_file), context_length="8")
            await settle(
                pilot, lambda: "tokenizing" in text_of(view, "#data-progress"), "the progress line", workers=False
            )
            assert str(corpus_file) in text_of(view, "#data-progress")
            assert "reading and tokenizing" in screen_text(pilot.app)  # on screen, not under the spinner
            assert view.query_one(".inspect-body").loading and view.pipeline is None
            release.set()
            await settle(pilot, lambda: view.pipeline is not None, "the pipeline computed")
            assert text_of(view, "#data-progress") == "" and not view.query_one(".inspect-body").loading

    asyncio.run(scenario())


def test_a_too_small_corpus_is_named_in_the_title_and_the_app_goes_on(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("far too short")

    async def scenario() -> None:
        async with small_app().run_test(size=(120, 40)) as pilot:
            view = await open_data(pilot, corpus=str(small))
            await settle(pilot, lambda: view.failure is not None, "the failure")
            title = text_of(view, "#data-title")
            assert "too short for context length 128" in title and "lower --context-length" in title
            await pilot.press("escape")
            assert isinstance(pilot.app.screen, TrainScreen)

    asyncio.run(scenario())
