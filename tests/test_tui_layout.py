"""The screens read whole at 80x24 and 120x36: checked on the text the terminal shows, not on widget state."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.tui.app import make_app
from gpt2term.tui.screens.inspect import LensScreen
from gpt2term.tui.screens.prompt import PromptScreen
from tests.pilot_helpers import screen_text, settle

CONFIG = GPTConfig(emb_dim=64, n_heads=4, n_layers=4, context_length=64)
NAME = "tiny-model-with-a-name"


@pytest.fixture
def stored() -> str:
    torch.manual_seed(0)
    CheckpointStore().save(NAME, GPTModel(CONFIG).eval(), meta={"step": 0, "source": "new from preset tiny"})
    return NAME


async def generated(pilot, prompt: str = "Hello there my good friend") -> PromptScreen:
    app = pilot.app
    await settle(pilot, lambda: app.app_model is not None, "the model loaded")
    screen = app.screen
    assert isinstance(screen, PromptScreen)
    screen.settings = screen.settings.__class__(max_new_tokens=8, top_n=30)
    await pilot.press(*prompt, "enter")
    await settle(pilot, lambda: screen.turns and screen.turns[-1].state == "done", "the generation finished")
    return screen


@pytest.mark.parametrize("size", [(80, 24), (120, 36)])
def test_header_modes_and_checkpoint_columns_read_whole(stored, size):
    async def scenario() -> None:
        app = make_app(stored, keymap={})
        async with app.run_test(size=size) as pilot:
            await generated(pilot)
            header = screen_text(app).splitlines()[0]
            assert "f2 Prompt  f3 Train  f4 Checkpoints" in header, header
            await pilot.press("f4")
            screen = app.screen
            await settle(pilot, lambda: screen.listed, "the store listed")
            await pilot.pause()
            lines = screen_text(app).splitlines()
            head = next(line for line in lines if "name" in line and "source" in line)
            labels = re.findall(r"\S+(?: \S+)*", head.strip("│ ╭╮"))
            for label in labels:  # every column header shown is a whole word of the table's own headers
                assert label.rstrip(" ▼▲") in {"name", "params", "step", "tokens", "val loss", "size", "updated"} | {
                    "source"
                }, (label, head)
            row = next(line for line in lines if NAME in line and "│" in line)
            assert "new from preset tiny" in row, row  # the source reads whole
            if size[0] >= 120:
                assert {"params", "tokens", "updated"} <= set(labels) or "updated ▼" in labels

    asyncio.run(scenario())


@pytest.mark.parametrize("size", [(80, 24), (120, 36)])
def test_probability_bars_show_an_untrained_models_tiny_probabilities_on_a_log_scale(stored, size):
    async def scenario() -> None:
        app = make_app(stored, keymap={})
        async with app.run_test(size=size) as pilot:
            screen = await generated(pilot)
            assert max(screen.turns[-1].steps[-1].top[0].prob, 0) < 0.001  # untrained: every token below 0.1%
            text = screen_text(app)
            assert "log bars" in text  # the scale is said on screen
            rows = [line for line in text.splitlines() if re.search(r"│ [▶ ] '.*%", line)]
            assert len(rows) >= 5
            for line in rows:
                assert "█" in line, f"no visible bar at {size}: {line!r}"

    asyncio.run(scenario())


def test_the_logit_lens_keeps_each_layer_on_one_line_at_120_columns(stored):
    async def scenario() -> None:
        app = make_app(stored, keymap={})
        async with app.run_test(size=(120, 36)) as pilot:
            await generated(pilot)
            await pilot.press("tab", "left", "left", "l")
            view = app.screen
            assert isinstance(view, LensScreen)
            await settle(pilot, lambda: view.lens_layers is not None, "the lens computed")
            await pilot.pause()
            lines = screen_text(app).splitlines()
            rows = [line for line in lines if re.search(r"[★·] (embeddings|layer \d|output \d)", line)]
            assert len(rows) == CONFIG.n_layers + 1, rows  # one line per layer: no fifth column wrapped below
            for line in rows:
                assert len(re.findall(r"\d%", line)) == 5, line  # five predictions, each with its probability

    asyncio.run(scenario())


def test_a_widget_that_grew_is_laid_out_at_its_new_height_on_the_first_refresh():
    """`refresh_in_place` measures the new content, not the render Textual cached for the old one: otherwise the
    view is one redraw behind the stream, and the last tokens before a pause stay below the view's edge."""
    from textual.app import App
    from textual.widget import Widget

    from gpt2term.tui.widgets import refresh_in_place

    class Lines(Widget):
        DEFAULT_CSS = "Lines { height: auto; }"
        count = 2

        def render(self) -> str:
            return "\n".join(f"line {n}" for n in range(self.count))

    class Host(App):
        def compose(self):
            yield Lines()

    async def scenario() -> None:
        app = Host()
        async with app.run_test(size=(40, 20)) as pilot:
            lines = app.query_one(Lines)
            await pilot.pause()
            assert lines.size.height == 2
            lines.refresh()  # a repaint at the same height (a stream's frame that filled no new line)
            await pilot.pause()
            lines.count = 7
            refresh_in_place(lines)
            await settle(pilot, lambda: lines.size.height == 7, "the widget laid out at 7 lines")
            assert "line 6" in screen_text(app)

    asyncio.run(scenario())
