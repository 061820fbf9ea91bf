"""Key bindings: every one has an id, the user's keymap.toml remaps them, and the README documents them all."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import torch

from gpt2term import locations
from gpt2term.core.config import GPTConfig
from gpt2term.core.model import GPTModel
from gpt2term.tui.app import Gpt2termApp, make_app
from gpt2term.tui.dialogs import (
    ConfirmScreen,
    ExportScreen,
    FollowScreen,
    ImportScreen,
    LeaveRunScreen,
    NameScreen,
    SavePathScreen,
    SettingsScreen,
)
from gpt2term.tui.keymap import DEFAULT_KEYS, KeymapError, load_keymap, parse_keymap, read_keymap
from gpt2term.tui.screens.checkpoints import CheckpointsScreen
from gpt2term.tui.screens.data_view import DataView
from gpt2term.tui.screens.inspect import AttentionScreen, CompareScreen, LensScreen
from gpt2term.tui.screens.loss_view import LossView
from gpt2term.tui.screens.prompt import PromptScreen
from gpt2term.tui.screens.train import TrainScreen
from gpt2term.tui.widgets.prompt_input import PromptInput
from gpt2term.tui.widgets.transcript import Transcript

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_binding_of_the_app_has_an_id_from_the_table():
    ids = []
    owners = (
        *(Gpt2termApp, PromptScreen, PromptInput, Transcript, SettingsScreen, SavePathScreen, TrainScreen),
        *(CheckpointsScreen, ConfirmScreen, LeaveRunScreen, NameScreen, ExportScreen, ImportScreen, FollowScreen),
        *(AttentionScreen, LensScreen, CompareScreen),
        DataView,
        LossView,
    )
    for owner in owners:
        for binding in owner.BINDINGS:
            assert binding.id in DEFAULT_KEYS, f"{owner.__name__}: {binding.key} -> {binding.action} has no known id"
            assert binding.key == DEFAULT_KEYS[binding.id].keys
            ids.append(binding.id)
    assert set(ids) == set(DEFAULT_KEYS)  # and every id in the table is used


def test_keymap_toml_accepts_dotted_ids_and_tables():
    text = '"prompt.generate" = "ctrl+r"\n[prompt]\ncopy = "f8, ctrl+b"\n'
    assert parse_keymap(text) == {"prompt.generate": "ctrl+r", "prompt.copy": "f8,ctrl+b"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('"prompt.generat" = "ctrl+r"', "unknown binding id 'prompt.generat'; valid ids: app.quit"),
        ('"prompt.generate" = 5', 'must be a key name in quotes, e.g. "ctrl+r"'),
        ('"prompt.generate" = ', "not valid TOML/JSON"),
    ],
)
def test_a_bad_keymap_names_the_problem_and_the_fix(text, message):
    with pytest.raises(KeymapError, match=re.escape(message)):
        parse_keymap(text)


def test_keymap_is_read_from_the_config_dir():
    folder = locations.config_dir()
    folder.mkdir(parents=True)
    assert load_keymap() == {}
    (folder / "keymap.toml").write_text('[prompt]\ngenerate = "ctrl+r"\n')
    assert load_keymap() == {"prompt.generate": "ctrl+r"}


def test_a_remapped_key_generates_and_enter_becomes_a_newline():
    folder = locations.config_dir()
    folder.mkdir(parents=True)
    (folder / "keymap.toml").write_text('[prompt]\ngenerate = "ctrl+r"\n[mode]\ntrain = "f9"\n')
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(emb_dim=32, n_heads=2, n_layers=1, context_length=32))

    async def scenario() -> None:
        app = make_app(model=model, model_name="small")  # reads keymap.toml, as `gpt2term` does
        async with app.run_test(size=(100, 30)) as pilot:
            for _ in range(100):
                if app.app_model is not None:
                    break
                await app.workers.wait_for_complete()
                await pilot.pause()
            screen = app.screen
            screen.settings = screen.settings.__class__(max_new_tokens=3)
            await pilot.press("a", "enter", "b")
            assert screen.prompt_input.text == "a\nb" and not screen.turns
            await pilot.press("ctrl+r")
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert len(screen.turns) == 1 and screen.turns[0].prompt == "a\nb"
            assert "^r" in screen.prompt_input.placeholder  # the hint follows the keymap
            await pilot.press("f9")
            assert app.current_mode == "train"

    asyncio.run(scenario())


def test_a_broken_keymap_is_reported_in_the_app_which_uses_the_default_keys():
    folder = locations.config_dir()
    folder.mkdir(parents=True)
    (folder / "keymap.toml").write_text('"nope" = "x"\n')
    app = make_app(model=GPTModel(GPTConfig(emb_dim=32, n_heads=2, n_layers=1, context_length=32)))

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert any("unknown binding id 'nope'" in n.message for n in app._notifications)
            await pilot.press("f3")
            assert app.current_mode == "train"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'"mode.train" = "f9"\n# caf\xe9\n', "not UTF-8 text"),
        (b'"mode.checkpoints" = "not a key!!,ctrl+"\n"mode.train" = "f9"\n', "'notakey!!' is not a key"),
        (b'"mode.checkpoints" = "ctl+x"\n"mode.train" = "f9"\n', "'ctl+x' is not a key name"),
        (b'"mode.checkpoints" = "f99"\n"nope" = "x"\n"mode.train" = "f9"\n', "unknown binding id 'nope'"),
    ],
)
def test_a_bad_keymap_entry_is_reported_and_every_binding_still_works(content, message):
    folder = locations.config_dir()
    folder.mkdir(parents=True)
    (folder / "keymap.toml").write_bytes(content)
    app = make_app(model=GPTModel(GPTConfig(emb_dim=32, n_heads=2, n_layers=1, context_length=32)))

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            shown = [n.message for n in app._notifications]
            assert any(message in m for m in shown), shown
            await pilot.press("f4")  # mode.checkpoints keeps its default key
            assert app.current_mode == "checkpoints"
            await pilot.press("f2")
            assert app.current_mode == "prompt"
            # the good entry of a file with bad entries still applies; an unreadable file applies none
            await pilot.press("f9" if b"\xe9" not in content else "f3")
            assert app.current_mode == "train"

    asyncio.run(scenario())


def test_read_keymap_keeps_the_good_entries_and_names_each_bad_one():
    folder = locations.config_dir()
    folder.mkdir(parents=True)
    (folder / "keymap.toml").write_text(
        '"mode.train" = "f9"\n"mode.prompt" = "ctrl+"\n[prompt]\ncopy = "question_mark"\ngenerate = "meh+r"\n'
    )
    keymap, problems = read_keymap()
    assert keymap == {"mode.train": "f9", "prompt.copy": "question_mark"}
    assert len(problems) == 2
    assert "mode.prompt" in problems[0] and "'ctrl+' is not a key name" in problems[0]
    assert "prompt.generate" in problems[1] and "'meh+r'" in problems[1]
    with pytest.raises(KeymapError, match="is not a key name"):
        load_keymap()  # the strict reader refuses the file


def test_readme_lists_every_binding_with_its_default_key():
    text = README.read_text(encoding="utf-8")
    section = text.split("## The app", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z.-]+)` \| ([^|]+) \|", section, flags=re.MULTILINE))
    assert set(rows) == set(DEFAULT_KEYS)
    for binding_id, spec in DEFAULT_KEYS.items():
        documented = sorted(k.strip(" `") for k in rows[binding_id].split(","))
        assert documented == sorted(spec.keys.split(",")), binding_id
