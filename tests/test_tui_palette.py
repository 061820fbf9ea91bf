"""Every action is findable: the command palette lists each key binding of each screen by name (with its key), and
the footer shows what fits at 80 and 120 columns, whole (nothing cut mid-word).

The list of actions is read from the bindings themselves, so a new binding without a palette entry fails here.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from textual.binding import Binding
from textual.command import CommandInput, CommandList, CommandPalette
from textual.widgets._footer import FooterKey

from gpt2term.core.config import GPTConfig
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.tui.app import make_app
from gpt2term.tui.keymap import DEFAULT_KEYS
from gpt2term.tui.screens.data_view import DataView
from gpt2term.tui.screens.inspect import AttentionScreen
from gpt2term.tui.screens.loss_view import LossView
from gpt2term.tui.screens.prompt import PromptScreen
from gpt2term.tui.widgets.footer import FittedFooter
from tests.pilot_helpers import settle

TINY = GPTConfig(emb_dim=32, n_heads=4, n_layers=2, context_length=64)


def tiny_app():
    torch.manual_seed(0)
    return make_app(model=GPTModel(TINY).eval(), model_name="tiny", keymap={})


def all_bindings(app, screen) -> set[str]:
    """Every binding id on the app, the screen and its widgets, read from Textual's own binding tables."""
    ids = set()
    for node in (app, screen, *screen.walk_children()):
        for bindings in node._bindings.key_to_bindings.values():
            ids |= {binding.id for binding in bindings if binding.id}
    return ids


async def palette_finds(pilot, query: str, wanted: str) -> list[str]:
    """Type `query` in the open palette; the prompts it offers once one of them contains `wanted` (or all)."""
    palette = pilot.app.screen
    assert isinstance(palette, CommandPalette)
    palette.query_one(CommandInput).value = query
    options = palette.query_one(CommandList)

    def shown() -> list[str]:
        return [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]

    for _ in range(200):
        if any(wanted in prompt for prompt in shown()):
            break
        await pilot.pause(0.01)
    return shown()


async def check_palette(pilot, screen) -> list[str]:
    app = pilot.app
    ids = all_bindings(app, screen)
    assert ids, "no bindings found"
    await pilot.press("ctrl+p")
    await settle(pilot, lambda: isinstance(app.screen, CommandPalette), "the palette opened")
    checked = []
    for binding_id in sorted(ids):
        spec = DEFAULT_KEYS[binding_id]
        key = app.get_key_display(Binding(spec.keys.split(",")[0], ""))
        wanted = f"{spec.description} ({key}"
        prompts = await palette_finds(pilot, spec.description.lower(), wanted)
        assert any(wanted in prompt for prompt in prompts), (binding_id, wanted, prompts[:5])
        checked.append(binding_id)
    await pilot.press("escape")
    await settle(pilot, lambda: not isinstance(app.screen, CommandPalette), "the palette closed")
    return checked


def test_the_palette_finds_every_binding_of_every_screen_by_name():
    async def scenario() -> None:
        app = tiny_app()
        async with app.run_test(size=(120, 36)) as pilot:
            await settle(pilot, lambda: app.app_model is not None, "the model loaded")
            checked = set(await check_palette(pilot, app.screen))
            # the words a learner tries (issue 14): each names the action it should find
            await pilot.press("ctrl+p")
            for query, wanted in (("beam", "Compare ("), ("versus", "Versus ("), ("compare", "Compare (")):
                assert any(wanted in p for p in await palette_finds(pilot, query, wanted)), query
            await pilot.press("escape")
            for key in ("f3", "f4"):
                await pilot.press(key)
                await settle(pilot, lambda: app.screen.is_mounted and app.screen.id != "_default", "mode shown")
                checked |= set(await check_palette(pilot, app.screen))
            await pilot.press("f3", "ctrl+t")  # the data view, from the train screen
            await settle(pilot, lambda: isinstance(app.screen, DataView), "the data view opened")
            checked |= set(await check_palette(pilot, app.screen))
            await pilot.press("escape")
            await pilot.press("f2")
            screen = app.screen
            assert isinstance(screen, PromptScreen)
            screen.settings = screen.settings.__class__(max_new_tokens=3, top_n=5)
            await pilot.press(*"Hello", "enter")
            await settle(pilot, lambda: screen.turns[-1].state == "done", "the generation finished")
            await pilot.press("tab", "left", "a")
            assert isinstance(app.screen, AttentionScreen)
            checked |= set(await check_palette(pilot, app.screen))
            for name in ("attention", "lens"):
                assert f"tokens.{name}" in checked
            await pilot.press("escape", "ctrl+f")  # the loss view, from the prompt screen
            assert isinstance(app.screen, LossView)
            checked |= set(await check_palette(pilot, app.screen))
            # every binding of the three modes, the attention view and the loss view was found
            assert {i for i in DEFAULT_KEYS if not i.startswith("dialog.")} - {"prompt.newline"} <= checked | {
                "prompt.history-previous",
                "prompt.history-next",
            }

    asyncio.run(scenario())


def footer_keys(screen) -> list[FooterKey]:
    return list(screen.query_one(FittedFooter).query(FooterKey))


@pytest.mark.parametrize("size", [(80, 24), (120, 36)])
def test_footers_fit_the_width_whole_and_keep_what_a_newcomer_needs_first(size):
    async def scenario() -> None:
        torch.manual_seed(0)
        CheckpointStore().save("tiny", GPTModel(TINY).eval(), meta={"step": 0})  # the checkpoints keys all apply
        app = tiny_app()
        async with app.run_test(size=size) as pilot:
            await settle(pilot, lambda: app.app_model is not None, "the model loaded")
            for key, must in (("f2", ("Quit", "Settings")), ("f3", ("Quit", "Start")), ("f4", ("Quit", "Load"))):
                await pilot.press(key)
                await pilot.pause()
                screen = app.screen
                if key == "f4":
                    await settle(pilot, lambda s=screen: s.listed, "the store listed")
                    await pilot.pause()
                await settle(pilot, lambda s=screen: bool(footer_keys(s)), "the footer drew")
                footer = screen.query_one(FittedFooter)
                keys = footer_keys(screen)
                palette = [k for k in keys if k.has_class("-command-palette")]
                assert palette, "the palette key is on the right"
                right_edge = palette[0].region.x
                descriptions = [k.description for k in keys]
                for k in keys:
                    if k in palette:
                        continue
                    assert k.region.right <= right_edge, f"{k.description!r} is cut at {size}"
                    assert k.region.width == len(k.key_display) + 1 + len(k.description)
                for word in must:
                    assert word in descriptions, (word, descriptions)
                if size[0] >= 120 and key == "f2":
                    # at 120 columns the Prompt footer has room for compare, save, copy and versus
                    for word in ("Compare", "Save", "Copy", "Versus"):
                        assert word in descriptions, (word, descriptions)
                if size[0] == 80:
                    assert footer.left_out or key != "f4", "80 columns cannot hold every checkpoints key"

    asyncio.run(scenario())
