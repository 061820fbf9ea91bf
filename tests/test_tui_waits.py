"""Every wait says what it waits for: checked while the work is held at a gate (a threading.Event the test opens),
so the words are on screen while the work really runs, and gone once it is done."""

from __future__ import annotations

import asyncio
import threading

import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.model import GPTModel
from gpt2term.tui import app as app_module
from gpt2term.tui.app import FIRST_TRAIN_NOTICE, make_app
from gpt2term.tui.screens import inspect, prompt
from gpt2term.tui.screens.inspect import CompareScreen
from gpt2term.tui.screens.prompt import FIRST_TOKEN_NOTE, PromptScreen
from gpt2term.tui.screens.train import TrainScreen
from tests.pilot_helpers import screen_text, settle

TINY = GPTConfig(emb_dim=32, n_heads=4, n_layers=2, context_length=64)
GATE_S = 60  # a gate never left closed longer than this (a failing test must not hang)


def tiny_app():
    torch.manual_seed(0)
    return make_app(model=GPTModel(TINY).eval(), model_name="tiny", keymap={})


def test_the_first_token_wait_says_it_reads_the_prompt(monkeypatch):
    gate = threading.Event()
    real = prompt.generate

    def held(*args, **kwargs):
        gate.wait(GATE_S)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(prompt, "generate", held)

    async def scenario() -> None:
        app = tiny_app()
        async with app.run_test(size=(140, 36)) as pilot:
            await settle(pilot, lambda: app.app_model is not None, "the model loaded")
            screen = app.screen
            assert isinstance(screen, PromptScreen)
            screen.settings = screen.settings.__class__(max_new_tokens=3, top_n=5)
            await pilot.press(*"Hello", "enter")
            try:
                await settle(
                    pilot, lambda: FIRST_TOKEN_NOTE in screen_text(app), "the first-token note on screen", workers=False
                )
                assert not screen.turns[-1].steps  # still waiting: the note is shown while the work runs
            finally:
                gate.set()
            await settle(pilot, lambda: screen.turns[-1].state == "done", "the generation finished")
            assert FIRST_TOKEN_NOTE not in screen_text(app)

    asyncio.run(scenario())


def test_compare_shows_each_decoding_as_it_comes_and_says_which_one_runs(monkeypatch):
    greedy_gate, beam_gate = threading.Event(), threading.Event()
    real_generate, real_beam = inspect.generate, inspect.beam_search
    calls = []

    def generate(*args, **kwargs):
        calls.append(1)
        for n, step in enumerate(real_generate(*args, **kwargs)):
            yield step
            if len(calls) == 1 and n == 0:  # greedy, after its first token
                greedy_gate.wait(GATE_S)

    def beam_search(*args, **kwargs):
        beam_gate.wait(GATE_S)
        return real_beam(*args, **kwargs)

    monkeypatch.setattr(inspect, "generate", generate)
    monkeypatch.setattr(inspect, "beam_search", beam_search)

    async def scenario() -> None:
        app = tiny_app()
        async with app.run_test(size=(120, 36)) as pilot:
            await settle(pilot, lambda: app.app_model is not None, "the model loaded")
            screen = app.screen
            screen.settings = screen.settings.__class__(max_new_tokens=4, top_n=5)
            await pilot.press(*"Hello", "enter")
            await settle(pilot, lambda: screen.turns[-1].state == "done", "the generation finished")
            await pilot.press("ctrl+b")
            view = app.screen
            assert isinstance(view, CompareScreen)
            try:
                # greedy holds after its first token: it streams, and the others wait with a word
                await settle(pilot, lambda: "greedy: decoding…" in screen_text(app), "greedy streaming", workers=False)
                text = screen_text(app)
                assert "beam search (4 beams): waiting" in text and "sampled: waiting" in text
                first = view.progress[0][1]
                assert first and first.strip()[:4] in text  # its first token is on screen already
                greedy_gate.set()
                # beam search holds: greedy and sampling are finished and shown with their numbers
                await settle(
                    pilot, lambda: "beam search (4 beams): decoding…" in screen_text(app), "beam running", workers=False
                )
                text = screen_text(app)
                assert "greedy: 4 tokens, log-probability" in text
                assert "seed 1): 4 tokens, log-probability" in text
                assert view.results is None
            finally:
                greedy_gate.set()
                beam_gate.set()
            await settle(pilot, lambda: view.results is not None, "the three decodings finished")
            assert "decoding…" not in screen_text(app)

    asyncio.run(scenario())


def test_the_first_f3_says_it_is_opening_the_train_screen_before_building_it(monkeypatch):
    seen_at_mount: list[list[str]] = []
    real_mount = TrainScreen.on_mount

    def on_mount(self) -> None:
        seen_at_mount.append([n.message for n in self.app._notifications])
        real_mount(self)

    monkeypatch.setattr(TrainScreen, "on_mount", on_mount)
    assert app_module.FIRST_TRAIN_NOTICE == FIRST_TRAIN_NOTICE

    async def scenario() -> None:
        app = tiny_app()
        async with app.run_test(size=(120, 36)) as pilot:
            await settle(pilot, lambda: app.app_model is not None, "the model loaded")
            await pilot.press("f3")
            await settle(pilot, lambda: isinstance(app.screen, TrainScreen), "the train screen shown")
            assert seen_at_mount == [[FIRST_TRAIN_NOTICE]]  # said before the slow part ran, not after
            app.clear_notifications()
            await pilot.press("f2", "f3")
            await settle(pilot, lambda: isinstance(app.screen, TrainScreen), "the train screen again")
            assert not [n for n in app._notifications if n.message == FIRST_TRAIN_NOTICE]  # once is enough

    asyncio.run(scenario())
