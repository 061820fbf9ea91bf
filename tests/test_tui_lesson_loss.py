"""Pilot tests of the loss view: opened from the prompt screen and the checkpoints screen, it shows the engine's
numbers (the loss, the perplexity, the worst token) and what model.eval() does to dropout."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.loss_steps import COURSE_TEXT, loss_steps
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.formatting import format_prob
from gpt2term.tui.app import make_app
from gpt2term.tui.screens.loss_view import LossTextScreen, LossView
from gpt2term.tui.screens.prompt import PromptScreen
from gpt2term.tui.widgets.probabilities import show_token
from tests.pilot_helpers import screen_text, settle

TINY = GPTConfig(emb_dim=32, n_heads=4, n_layers=2, context_length=64, drop_rate=0.1)
PROMPT = "The quick brown fox"
NEW_TOKENS = 4


@pytest.fixture
def tiny_checkpoint() -> str:
    torch.manual_seed(0)
    CheckpointStore().save("tiny", GPTModel(TINY).eval(), meta={"step": 0})
    return "tiny"


def shown(view: LossView, widget: str) -> str:
    return str(view.query_one(f"#{widget}").render())


def title_numbers(view: LossView) -> tuple[float, float]:
    title = shown(view, "loss-title")
    found = re.search(r": (\d+\.\d{4}) · perplexity ([\d,]+\.\d\d)", title)
    assert found, title
    return float(found.group(1)), float(found.group(2).replace(",", ""))


def assert_shows(view: LossView, expected) -> None:
    loss, perplexity = title_numbers(view)
    assert loss == round(expected.loss, 4)
    assert perplexity == round(expected.perplexity, 2)
    steps = shown(view, "loss-steps")
    assert f"(batch, seq_len, vocab_size) = (1, {expected.shape[1]}, 50257)" in steps
    assert f"= {expected.loss:.4f}  ← the loss" in steps
    worst = expected.worst(1)[0]
    first_worst = shown(view, "loss-worst").splitlines()[1]
    assert f"@{worst.position} " in first_worst
    assert re.search(rf"p +{re.escape(format_prob(worst.prob))} -log p +{worst.nll:.3f} ", first_worst), first_worst
    assert "this text" in shown(view, "loss-table") and "random guessing" in shown(view, "loss-table")


def test_loss_view_from_the_prompt_screen_shows_the_engines_numbers_for_the_turns_text(tiny_checkpoint):
    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(130, 44)) as pilot:
            await settle(pilot, lambda: app.app_model is not None, "the model loaded")
            screen = app.screen
            assert isinstance(screen, PromptScreen)
            screen.settings = screen.settings.__class__(max_new_tokens=NEW_TOKENS, top_n=5)
            await pilot.press(*PROMPT, "enter")
            await settle(pilot, lambda: screen.turns and screen.turns[-1].state == "done", "the generation finished")
            await pilot.press("ctrl+f")
            view = app.screen
            assert isinstance(view, LossView)
            await settle(pilot, lambda: view.steps is not None, "the loss computed")
            turn = screen.turns[-1]
            ids = turn.prompt_ids + [step.token_id for step in turn.steps]
            assert view.token_ids == ids
            expected = loss_steps(app.app_model.model, ids, app.tokenizer)
            assert_shows(view, expected)
            targets = "".join(app.tokenizer.token_text(i).replace("\n", "↵\n") or "∅" for i in ids[1:])
            assert shown(view, "loss-tokens").endswith(targets)  # every target, in order, shaded
            assert not app.app_model.model.training

            await pilot.press("d")  # dropout: two train-mode losses differ, two eval-mode ones are the plain loss
            await settle(pilot, lambda: view.dropout is not None, "the dropout runs finished")
            text = shown(view, "loss-dropout")
            train = re.search(r"train mode \(model.train\(\)\): +(\d+\.\d{4}) +(\d+\.\d{4})", text)
            evals = re.search(r"eval mode +\(model.eval\(\)\): +(\d+\.\d{4}) +(\d+\.\d{4})", text)
            assert train and evals, text
            assert train.group(1) != train.group(2)
            assert evals.group(1) == evals.group(2) == f"{expected.loss:.4f}"
            assert view.dropout.train_losses[0] != view.dropout.train_losses[1]
            assert "drop_rate 0.1" in text
            assert not app.app_model.model.training  # eval mode again, for the next generation
            await pilot.press("escape")
            assert app.screen is screen

    asyncio.run(scenario())


def test_loss_view_from_the_checkpoints_screen_asks_for_a_text_then_shows_the_checkpoints_loss(tiny_checkpoint):
    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(130, 44)) as pilot:
            await settle(pilot, lambda: app.app_model is not None, "the model loaded")
            await pilot.press("f4")
            screen = app.screen
            await settle(pilot, lambda: screen.listed, "the store listed")
            await pilot.press("x")
            dialog = app.screen
            assert isinstance(dialog, LossTextScreen)
            assert dialog.query_one("#loss-text").value == COURSE_TEXT  # the course's example, ready to run
            await pilot.press("enter")
            view = app.screen
            assert isinstance(view, LossView)
            await settle(pilot, lambda: view.steps is not None, "the checkpoint loaded and the loss computed")
            ids = app.tokenizer.encode(COURSE_TEXT)
            assert view.token_ids == ids
            torch.manual_seed(0)
            saved = GPTModel(TINY).state_dict()
            assert all(torch.equal(saved[k], v) for k, v in view.model.state_dict().items())  # it opened "tiny"
            expected = loss_steps(view.model, ids, app.tokenizer)
            assert_shows(view, expected)
            first = expected.tokens[0]
            assert f"{show_token(first.token_text)} → {show_token(first.target_text)}" in shown(view, "loss-steps")
            await pilot.press("escape")
            assert app.screen is screen

    asyncio.run(scenario())


def test_a_text_of_one_token_says_so_in_the_view(tiny_checkpoint):
    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(120, 36)) as pilot:
            await settle(pilot, lambda: app.app_model is not None, "the model loaded")
            await pilot.press("f4")
            screen = app.screen
            await settle(pilot, lambda: screen.listed, "the store listed")
            await pilot.press("x")
            dialog = app.screen
            dialog.query_one("#loss-text").value = "Hello"
            await pilot.press("enter")
            view = app.screen
            assert isinstance(view, LossView)
            await settle(pilot, lambda: view.failure is not None, "the computation failed")
            assert "nothing to predict" in shown(view, "loss-title")
            await pilot.press("escape")
            assert app.screen is screen  # the app goes on

    asyncio.run(scenario())


def test_the_token_line_reads_exactly_as_the_tokens_at_every_line_wrap():
    """A token starting with a space at a wrap point keeps its space: the rows, joined, are the text itself."""
    text = "Every effort moves you forward, and a small model learns to count one two three four five six seven"

    async def scenario() -> None:
        torch.manual_seed(0)
        app = make_app(model=GPTModel(TINY).eval(), model_name="tiny", keymap={})
        async with app.run_test(size=(70, 60)) as pilot:
            await settle(pilot, lambda: app.app_model is not None, "the model loaded")
            view = LossView(app.tokenizer, app.tokenizer.encode(text), model=app.app_model.model)
            await app.push_screen(view)
            await settle(pilot, lambda: view.steps is not None, "the loss computed")
            for width in (70, 64, 57, 51):  # the wrap points fall on different tokens, some of them " model"-like
                await pilot.resize_terminal(width, 60)
                await settle(pilot, lambda w=width: app.size.width == w, "the resize")
                box = view.query_one("#loss-tokens").content_region
                rows = [row[box.x : box.right] for row in screen_text(app).splitlines()[box.y : box.bottom]]
                assert len(rows) > 1, rows  # it wraps
                assert text in "".join(rows), rows

    asyncio.run(scenario())
