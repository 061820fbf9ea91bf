"""Pilot test of the versus view: two checkpoints answer one prompt, each column showing the engine's numbers."""

from __future__ import annotations

import asyncio

import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.generation import DecodingSettings, Summary, generate
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.formatting import format_prob
from gpt2term.tui.app import make_app
from gpt2term.tui.screens.prompt import PromptScreen
from gpt2term.tui.screens.versus import VersusScreen
from tests.pilot_helpers import settle

TINY = GPTConfig(emb_dim=32, n_heads=4, n_layers=2, context_length=64)
PROMPT = "The quick brown fox"
NEW_TOKENS = 5


def expected_column(model: GPTModel, tokenizer, prompt_ids: list[int]) -> tuple[str, str]:
    """The probabilities line and the summary line the engine's own greedy decoding gives."""
    steps = list(generate(model, tokenizer, prompt_ids, DecodingSettings(max_new_tokens=NEW_TOKENS, top_n=1)))
    summary = Summary.of(steps)
    probs = "probabilities: " + " ".join(format_prob(step.prob) for step in steps)
    tail = f"mean probability {format_prob(summary.mean_prob)} · perplexity {summary.perplexity:.2f}"
    return probs, tail


def test_versus_view_shows_both_checkpoints_greedy_answers_with_the_engines_probabilities():
    store = CheckpointStore()
    torch.manual_seed(0)
    store.save("early", GPTModel(TINY).eval(), meta={"step": 0})
    torch.manual_seed(1)
    store.save("late", GPTModel(TINY).eval(), meta={"step": 10})

    async def scenario() -> None:
        app = make_app("early", keymap={})
        async with app.run_test(size=(120, 36)) as pilot:
            await settle(pilot, lambda: app.app_model is not None, "the model loaded")
            screen = app.screen
            assert isinstance(screen, PromptScreen)
            screen.settings = DecodingSettings(max_new_tokens=NEW_TOKENS, top_n=5)
            await pilot.press(*PROMPT, "enter")
            await settle(pilot, lambda: screen.turns and screen.turns[-1].state == "done", "the generation finished")
            await pilot.press("ctrl+n")
            view = app.screen
            assert isinstance(view, VersusScreen)
            await settle(pilot, lambda: view.names is not None, "the store listed")  # read in a worker
            assert view.names == ["late"]  # the model on screen is not offered against itself
            await pilot.press("enter")
            await settle(pilot, lambda: view.results is not None, "both models decoded")
            prompt_ids = screen.turns[-1].prompt_ids
            models = [("early", app.app_model.model), ("late", store.load_model("late"))]
            assert models[0][1] is not models[1][1]
            shown_lines = []
            for widget_id, (name, model) in zip(("#versus-left", "#versus-right"), models, strict=True):
                shown = str(view.query_one(widget_id).render())
                assert shown.startswith(name)
                probs, tail = expected_column(model, app.tokenizer, prompt_ids)
                assert probs in shown, (probs, shown)
                assert shown.rstrip().endswith(tail), (tail, shown)
                shown_lines.append(probs)
            assert shown_lines[0] != shown_lines[1]  # two different models, two different answers
            await pilot.press("escape")
            assert app.screen is screen

    asyncio.run(scenario())


def test_with_no_other_checkpoint_the_versus_view_says_so_and_computes_nothing():
    torch.manual_seed(0)
    CheckpointStore().save("only", GPTModel(TINY).eval(), meta={"step": 0})

    async def scenario() -> None:
        app = make_app("only", keymap={})
        async with app.run_test(size=(120, 36)) as pilot:
            await settle(pilot, lambda: app.app_model is not None, "the model loaded")
            screen = app.screen
            screen.settings = DecodingSettings(max_new_tokens=2, top_n=3)
            await pilot.press(*PROMPT, "enter")
            await settle(pilot, lambda: screen.turns and screen.turns[-1].state == "done", "the generation finished")
            await pilot.press("ctrl+n")
            view = app.screen
            assert isinstance(view, VersusScreen)
            await settle(pilot, lambda: view.names is not None, "the store listed")
            assert view.names == [] and view.failure is None and view.results is None
            assert str(view.query_one("#versus-title").render()) == "No other checkpoint to compare"
            assert not view.query_one("#versus-columns").loading

    asyncio.run(scenario())
