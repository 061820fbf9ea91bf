"""Pilot tests of the attention and logit-lens views: opened from a generated token, showing the engine's numbers."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.generation import DecodingSettings, beam_search, generate, sequence_logprob
from gpt2term.core.inspection import attention_weights, first_layer_with_final_answer, logit_lens
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.formatting import format_prob
from gpt2term.tui.app import make_app
from gpt2term.tui.screens.inspect import COMPARE_BEAMS, AttentionScreen, CompareScreen, LensScreen
from gpt2term.tui.screens.prompt import PromptScreen
from gpt2term.tui.widgets.probabilities import show_token
from tests.pilot_helpers import settle

TINY = GPTConfig(emb_dim=32, n_heads=4, n_layers=2, context_length=64)
PROMPT = "The quick brown fox"
NEW_TOKENS = 4


@pytest.fixture
def tiny_checkpoint() -> str:
    torch.manual_seed(0)
    CheckpointStore().save("tiny", GPTModel(TINY).eval(), meta={"step": 0})
    return "tiny"


async def generated(pilot) -> PromptScreen:
    app = pilot.app
    await settle(pilot, lambda: app.app_model is not None, "the model loaded")
    screen = app.screen
    assert isinstance(screen, PromptScreen)
    screen.settings = screen.settings.__class__(max_new_tokens=NEW_TOKENS, top_n=5)
    await pilot.press(*PROMPT, "enter")
    await settle(pilot, lambda: screen.turns and screen.turns[-1].state == "done", "the generation finished")
    return screen


def token_ids_up_to(screen: PromptScreen, index: int) -> list[int]:
    turn = screen.turns[-1]
    return turn.prompt_ids + [step.token_id for step in turn.steps[: index + 1]]


def shown_weights(screen: AttentionScreen) -> list[tuple[int, float]]:
    """(position, weight) of each 'strongest' weight the view prints."""
    text = str(screen.query_one("#attention-top").render())
    return [(int(pos), float(w)) for pos, w in re.findall(r"@(\d+) (\d\.\d{4})", text)]


def expected_top(row: torch.Tensor) -> list[tuple[int, float]]:
    values, positions = torch.topk(row, 5)
    return [(int(p), round(float(v), 4)) for v, p in zip(values, positions, strict=True)]


def test_attention_view_shows_the_selected_tokens_row_for_each_layer_and_head(tiny_checkpoint):
    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(120, 36)) as pilot:
            screen = await generated(pilot)
            await pilot.press("a")  # in the prompt, "a" is only text
            assert not isinstance(app.screen, AttentionScreen)
            await pilot.press("backspace", "tab", "left")  # the cursor on the second-to-last token
            await pilot.press("a")
            view = app.screen
            assert isinstance(view, AttentionScreen)
            await settle(pilot, lambda: view.weights is not None, "the attention computed")
            expected = attention_weights(app.app_model.model, token_ids_up_to(screen, NEW_TOKENS - 2))
            query = expected.shape[2] - 1
            assert "layer 1/2 · mean of heads" in str(view.query_one("#attention-title").render())
            assert shown_weights(view) == expected_top(expected[0, :, query].mean(dim=0))
            await pilot.press("right", "right")  # mean -> head 1 -> head 2
            assert "head 2" in str(view.query_one("#attention-title").render())
            assert shown_weights(view) == expected_top(expected[0, 1, query])
            await pilot.press("down")
            assert "layer 2/2 · head 2" in str(view.query_one("#attention-title").render())
            assert shown_weights(view) == expected_top(expected[1, 1, query])
            await pilot.press("left", "left")  # back past head 1 to the mean
            assert shown_weights(view) == expected_top(expected[1, :, query].mean(dim=0))
            tokens = str(view.query_one("#attention-tokens").render())
            labels = [app.tokenizer.token_text(i).replace("\n", "↵\n") for i in token_ids_up_to(screen, 2)]
            labels = [label if label.strip() else label.replace(" ", "·") for label in labels]
            assert tokens == "".join(labels)
            await pilot.press("escape")
            assert app.screen is screen

    asyncio.run(scenario())


def test_lens_view_shows_each_layers_top_prediction_and_marks_where_the_final_answer_appears(tiny_checkpoint):
    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(140, 36)) as pilot:
            screen = await generated(pilot)
            await pilot.press("tab", "home", "right")  # the second generated token
            await pilot.press("l")
            view = app.screen
            assert isinstance(view, LensScreen)
            await settle(pilot, lambda: view.lens_layers is not None, "the lens computed")
            context = token_ids_up_to(screen, 0)  # what the model had read when it chose token 1
            expected = logit_lens(app.app_model.model, app.tokenizer, context, -1, 5)
            lines = str(view.query_one("#lens-table").render()).splitlines()
            rows = lines[: len(expected)]
            assert len(rows) == TINY.n_layers + 1  # the embeddings, then each block (the last: the real output)
            first = first_layer_with_final_answer(expected)
            for row, lens in zip(rows, expected, strict=True):
                best = lens.top[0]
                cell = f"{show_token(best.text)} {format_prob(best.prob)}"
                assert row[14:].startswith(cell[:20]), (row, cell)
                assert row.startswith("★") == (lens.layer == first)
            # the greedy choice is the output layer's top prediction
            assert expected[-1].top[0].token_id == screen.turns[-1].steps[1].token_id
            assert f"already the final answer: {first}" in lines[-1]
            await pilot.press("escape")
            assert app.screen is screen

    asyncio.run(scenario())


def test_compare_view_shows_greedy_sampled_and_beam_with_the_engines_log_probabilities(tiny_checkpoint):
    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(120, 36)) as pilot:
            screen = await generated(pilot)
            await pilot.press("ctrl+b")
            view = app.screen
            assert isinstance(view, CompareScreen)
            await settle(pilot, lambda: view.results is not None, "the three decodings finished")
            model, prompt_ids = app.app_model.model, screen.turns[-1].prompt_ids
            greedy = list(generate(model, app.tokenizer, prompt_ids, DecodingSettings(max_new_tokens=NEW_TOKENS)))
            greedy_ids = [step.token_id for step in greedy]
            beam = beam_search(model, app.tokenizer, prompt_ids, COMPARE_BEAMS, NEW_TOKENS)[0]
            shown = str(view.query_one("#compare-table").render())
            heads = [line for line in shown.splitlines() if "log-probability" in line]
            assert len(heads) == 3 and "greedy" in heads[0] and "beam search" in heads[2]
            assert f"log-probability {sequence_logprob(model, prompt_ids, greedy_ids):.3f}" in heads[0]
            assert f"log-probability {beam.logprob:.3f} · perplexity {beam.perplexity:.2f}" in heads[2]
            assert beam.logprob >= sequence_logprob(model, prompt_ids, greedy_ids) - 1e-4  # the search is no worse
            logprobs = [float(head.split("log-probability ")[1].split(" ")[0]) for head in heads]
            assert heads[logprobs.index(max(logprobs))].startswith("★")
            await pilot.press("escape")
            assert app.screen is screen

    asyncio.run(scenario())


def test_a_view_whose_computation_raises_says_so_in_its_title_instead_of_loading_forever(tiny_checkpoint, monkeypatch):
    from gpt2term.tui.screens import inspect

    def broken(model, token_ids):
        raise RuntimeError("shape mismatch in layer 1")

    monkeypatch.setattr(inspect, "attention_weights", broken)

    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(120, 36)) as pilot:
            await generated(pilot)
            await pilot.press("tab", "left", "a")
            view = app.screen
            assert isinstance(view, AttentionScreen)
            await settle(pilot, lambda: view.failure is not None, "the failure shown")
            assert view.failure == "RuntimeError: shape mismatch in layer 1"
            title = str(view.query_one("#attention-title").render())
            assert title == "Attention could not be computed: RuntimeError: shape mismatch in layer 1"
            assert not view.query_one(".inspect-dialog").loading
            await pilot.press("escape")  # the app goes on
            assert isinstance(app.screen, PromptScreen)

    asyncio.run(scenario())
