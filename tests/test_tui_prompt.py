"""Pilot tests of the app's prompt screen, driven by keys as a user would, with a tiny model from the store.

Every wait is on a real condition (a worker finishing, a message handled, a thread reaching a gate), never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch
from click.testing import CliRunner

from gpt2term.cli import cli
from gpt2term.core.config import GPTConfig
from gpt2term.core.generation import DecodingSettings, generate
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.tokenizer import default_tokenizer
from gpt2term.formatting import format_prob
from gpt2term.tui.app import make_app
from gpt2term.tui.dialogs import SettingsScreen
from gpt2term.tui.screens.prompt import PromptScreen
from gpt2term.tui.widgets.header import ModelHeader
from gpt2term.tui.widgets.perplexity import PerplexityPanel
from gpt2term.tui.widgets.probabilities import ProbabilityPanel, show_token
from tests.pilot_helpers import screen_text, settle

TINY = GPTConfig(emb_dim=64, n_heads=4, n_layers=2, context_length=64)
PROMPT = "The quick brown fox"


def tiny_model(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(TINY).eval()


@pytest.fixture
def tiny_checkpoint() -> str:
    """A tiny untrained model saved in the test's own store, so the CLI and the app load the same weights."""
    CheckpointStore().save("tiny", tiny_model(), meta={"step": 0})
    return "tiny"


async def loaded(pilot) -> PromptScreen:
    await settle(pilot, lambda: pilot.app.app_model is not None, "the model loaded")
    screen = pilot.app.screen
    assert isinstance(screen, PromptScreen)
    return screen


async def generate_in_app(pilot, prompt: str) -> PromptScreen:
    screen = await loaded(pilot)
    count = len(screen.turns)
    await pilot.press(*prompt, "enter")
    await settle(
        pilot, lambda: len(screen.turns) > count and screen.turns[-1].state != "generating", "the generation finished"
    )
    return screen


async def set_max_new_tokens(pilot, n: int) -> None:
    """Through the decoding settings dialog, as a user would."""
    await pilot.press("ctrl+o")
    assert isinstance(pilot.app.screen, SettingsScreen)
    pilot.app.screen.query_one("#max_new_tokens").value = str(n)
    await pilot.press("ctrl+s")
    assert isinstance(pilot.app.screen, PromptScreen)


def panel_rows(panel: ProbabilityPanel) -> list[tuple[str, str]]:
    """(token label, percentage) of each candidate row the panel draws."""
    rows = []
    for line in panel.render().plain.splitlines()[2:]:
        label, percent = line[2:].rsplit(" ", 1)
        rows.append((label.split("  ")[0].rstrip(" ▏▎▍▌▋▊▉█"), percent.strip()))
    return rows


def test_screen_shows_what_gpt2term_generate_prints(tiny_checkpoint):
    cli_run = CliRunner().invoke(cli, ["generate", PROMPT, "--checkpoint", tiny_checkpoint, "-n", "20"])
    assert cli_run.exit_code == 0, cli_run.output

    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(120, 40)) as pilot:
            await loaded(pilot)
            await set_max_new_tokens(pilot, 20)
            screen = await generate_in_app(pilot, PROMPT)
            turn = screen.turns[-1]
            assert turn.state == "done" and len(turn.steps) == 20
            shown = screen.transcript.views[turn.id].body.plain  # the turn as drawn: prompt, then each token's text
            assert shown + "\n" == cli_run.stdout
            assert "20 tokens" in str(screen.transcript.views[turn.id].stats.render())

    asyncio.run(scenario())


def test_probability_panel_shows_the_engines_probabilities_for_the_token_under_the_cursor(tiny_checkpoint):
    tokenizer = default_tokenizer()
    settings = DecodingSettings(max_new_tokens=6, top_n=30)
    expected = list(generate(CheckpointStore().load_model("tiny"), tokenizer, tokenizer.encode(PROMPT), settings))

    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(120, 40)) as pilot:
            await loaded(pilot)
            await set_max_new_tokens(pilot, 6)
            screen = await generate_in_app(pilot, PROMPT)
            assert [s.token_id for s in screen.turns[-1].steps] == [s.token_id for s in expected]
            panel = screen.query_one(ProbabilityPanel)

            def check(step_index: int) -> None:
                step = expected[step_index]
                rows = panel_rows(panel)
                assert len(rows) >= 10  # a 40-line terminal has room for many alternatives
                want = [(show_token(c.text), format_prob(c.prob)) for c in step.top[: len(rows)]]
                assert rows == want
                header = panel.render().plain.splitlines()[1]
                assert f"chose {show_token(step.token_text)} rank {step.rank}" in header
                assert panel.border_subtitle.startswith(f"token {step_index + 1}/6 ")

            check(5)  # the latest token
            await pilot.press("tab", "left", "left")  # the token cursor, two tokens back
            check(3)
            await pilot.press("home")
            check(0)
            ppl = screen.query_one(PerplexityPanel).numbers.render()
            assert f"{expected[-1].perplexity:.2f}" in str(ppl)

    asyncio.run(scenario())


class Gate:
    """Blocks the model's forward pass number `at` until released, so a test knows exactly where generation is."""

    def __init__(self, model: GPTModel, at: int) -> None:
        self.calls = 0
        self.at = at
        self.reached = threading.Event()
        self.release = threading.Event()
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.reached.set()
            assert self.release.wait(timeout=60), "the test never released the gate"


def test_escape_stops_between_two_tokens_and_the_ui_answers_keys_meanwhile():
    model = tiny_model()
    gate = Gate(model, at=4)  # forward 1 reads the prompt; forwards 2 and 3 follow tokens 1 and 2; 4 follows token 3

    async def scenario() -> None:
        app = make_app(model=model, model_name="gated", keymap={})
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await loaded(pilot)
            screen.settings = DecodingSettings(max_new_tokens=40, stop_at_eos=False)
            await pilot.press(*PROMPT, "enter")
            assert await asyncio.to_thread(gate.reached.wait, 60)  # the worker thread is inside forward 4
            turn = screen.turns[-1]
            await settle(pilot, lambda: len(turn.steps) == 3, "three tokens on screen", workers=False)
            assert turn.state == "generating"
            # The UI answers while the generation thread is busy: a toggle, typing into the prompt.
            await pilot.press("ctrl+t", *"next")
            assert screen.display_mode.boundaries
            assert screen.prompt_input.text == "next"
            assert "generating 3/40" in str(screen.query_one("#status").render())
            await pilot.press("escape")
            gate.release.set()
            await settle(pilot, lambda: turn.state != "generating", "the generation stopped")
            assert turn.state == "stopped"
            assert len(turn.steps) == 3  # not one more token after Esc
            assert "stopped" in str(screen.transcript.views[turn.id].stats.render())
            assert screen.generating is None

    asyncio.run(scenario())


def test_the_garbage_collector_and_the_cursor_blink_rest_while_a_turn_streams_however_it_ends():
    """A full collection holds the GIL the decoder needs, and each blink is a screen update: both are held off from
    a turn's start to its end, and back once it is over, whether it finished, was stopped or failed."""
    import gc

    model = tiny_model()
    gate = Gate(model, at=4)  # the worker is held inside the forward pass after token 3
    failing = {"on": False}

    def fail_when_asked(module, args) -> None:
        if failing["on"]:
            raise RuntimeError("the model broke")

    model.register_forward_pre_hook(fail_when_asked)

    async def scenario() -> None:
        app = make_app(model=model, model_name="gated", keymap={})
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await loaded(pilot)
            assert gc.isenabled() and screen.prompt_input.cursor_blink
            screen.settings = DecodingSettings(max_new_tokens=40, stop_at_eos=False)
            turn = screen.start_generation(PROMPT)
            assert await asyncio.to_thread(gate.reached.wait, 60)
            await settle(pilot, lambda: len(turn.steps) == 3, "three tokens on screen", workers=False)
            assert not gc.isenabled() and not screen.prompt_input.cursor_blink  # mid-stream
            await pilot.press("escape")
            gate.release.set()
            await settle(pilot, lambda: turn.state == "stopped", "the turn stopped")
            assert gc.isenabled() and screen.prompt_input.cursor_blink

            screen.settings = DecodingSettings(max_new_tokens=5, stop_at_eos=False)
            done = screen.start_generation(PROMPT)
            await settle(pilot, lambda: done.state == "done", "the turn finished")
            assert gc.isenabled() and screen.prompt_input.cursor_blink

            failing["on"] = True
            broken = screen.start_generation(PROMPT)
            await settle(pilot, lambda: broken.state == "error", "the turn failed")
            assert "the model broke" in broken.error
            assert gc.isenabled() and screen.prompt_input.cursor_blink

            gc.disable()  # someone turned the collector off before a turn: it stays off after
            failing["on"] = False
            try:
                last = screen.start_generation(PROMPT)
                await settle(pilot, lambda: last.state == "done", "the last turn finished")
                assert not gc.isenabled()
            finally:
                gc.enable()

    asyncio.run(scenario())


def test_the_view_follows_new_tokens_only_while_the_user_has_not_scrolled_up():
    model = tiny_model()
    gate = Gate(model, at=50)

    async def scenario() -> None:
        app = make_app(model=model, model_name="gated", keymap={})
        async with app.run_test(size=(60, 16)) as pilot:
            screen = await loaded(pilot)
            screen.settings = DecodingSettings(max_new_tokens=100, stop_at_eos=False)
            transcript = screen.transcript
            await pilot.press(*PROMPT, "enter")
            assert await asyncio.to_thread(gate.reached.wait, 60)
            turn = screen.turns[-1]
            # The tokens land first, the layout that makes room for them at the next refresh: wait for both.
            await settle(
                pilot,
                lambda: len(turn.steps) == 49 and transcript.max_scroll_y > 0,
                "49 tokens on screen, more than the view holds",
                workers=False,
            )
            await settle(
                pilot, lambda: transcript.scroll_y == transcript.max_scroll_y, "the view following", workers=False
            )
            await pilot.press("tab", "pageup")  # the user scrolls up to read
            await pilot.pause()
            where = transcript.scroll_y
            assert where < transcript.max_scroll_y
            gate.release.set()
            await settle(pilot, lambda: turn.state == "done", "the generation finished")
            assert len(turn.steps) == 100
            assert transcript.scroll_y == where < transcript.max_scroll_y  # new tokens did not pull the view down
            transcript.scroll_end(animate=False, immediate=True)  # back at the bottom: following again
            screen.settings = DecodingSettings(max_new_tokens=30, stop_at_eos=False)
            bottom = transcript.max_scroll_y
            await pilot.press("escape", *"Again", "enter")
            await settle(pilot, lambda: len(screen.turns) == 2 and screen.turns[1].state == "done", "second turn")
            await settle(
                pilot,
                lambda: bottom < transcript.max_scroll_y == transcript.scroll_y,
                "the view following the second turn down",
            )

    asyncio.run(scenario())


def test_history_copy_save_and_toggles(tiny_checkpoint, tmp_path):
    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(100, 30)) as pilot:
            await loaded(pilot)
            await set_max_new_tokens(pilot, 5)
            screen = await generate_in_app(pilot, "Hello")
            await generate_in_app(pilot, "Once upon a time")
            first, second = screen.turns
            # Up on the prompt's first line recalls earlier prompts; down comes back to the (empty) draft.
            await pilot.press("up")
            assert screen.prompt_input.text == "Once upon a time"
            await pilot.press("up")
            assert screen.prompt_input.text == "Hello"
            await pilot.press("down", "down")
            assert screen.prompt_input.text == ""
            # Ctrl+J is a newline, not a submission.
            await pilot.press("a", "ctrl+j", "b")
            assert screen.prompt_input.text == "a\nb" and len(screen.turns) == 2
            # Copy the last completion.
            await pilot.press("ctrl+g")
            assert app.clipboard == second.completion and second.completion
            # Token boundaries: each token's own text, the prompt's too, in alternating backgrounds.
            body = screen.transcript.views[second.id].body
            await pilot.press("ctrl+t")
            pieces = [s.token_text.replace("\n", "↵\n") or "∅" for s in second.steps]
            assert body.plain == second.prompt + "".join(pieces)
            spans = [span for span in body.render().spans if "on #" in str(span.style)]
            assert len({str(span.style).rpartition("on ")[2] for span in spans}) == 2
            prompt_tokens = [app.tokenizer.token_text(i) for i in second.prompt_ids]
            assert len(prompt_tokens) > 1
            drawn = [body.plain[span.start : span.end] for span in spans[: len(prompt_tokens)]]
            assert drawn == prompt_tokens  # one background per prompt token, not one for the whole prompt
            backs = [str(span.style).rpartition("on ")[2] for span in spans]
            assert all(a != b for a, b in zip(backs, backs[1:], strict=False)), "neighbouring tokens share a background"
            # Colours by probability: every token gets a colour.
            await pilot.press("ctrl+l")
            coloured = [span for span in body.render().spans if str(span.style).startswith("#")]
            assert len(coloured) == len(second.steps)
            # Save the transcript: Markdown and JSON.
            for name in ("t.md", "t.json"):
                await pilot.press("ctrl+s")
                pilot.app.screen.query_one("#path").value = str(tmp_path / name)
                await pilot.press("enter")
            markdown = (tmp_path / "t.md").read_text()
            assert first.prompt + first.completion in markdown and second.prompt + second.completion in markdown
            saved = json.loads((tmp_path / "t.json").read_text())
            assert [t["completion"] for t in saved["turns"]] == [first.completion, second.completion]
            assert saved["turns"][1]["tokens"][0]["prob"] == second.steps[0].prob

    asyncio.run(scenario())


def test_header_modes_and_bad_settings(tiny_checkpoint):
    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await loaded(pilot)
            header = screen.query_one(ModelHeader).render().plain
            for part in ("tiny", "6.5M", "ctx 64", "untrained", "cpu float32", "Prompt", "Train", "Checkpoints"):
                assert part in header
            for key, mode in (("f3", "train"), ("f4", "checkpoints"), ("f2", "prompt")):
                await pilot.press(key)
                assert app.current_mode == mode
                assert app.screen.query_one(ModelHeader).render().plain.count("tiny") == 1
            # A bad value in the settings dialog is explained in the dialog, which stays open.
            await pilot.press("ctrl+o")
            dialog = app.screen
            dialog.query_one("#temperature").value = "-1"
            await pilot.press("ctrl+s")
            assert app.screen is dialog
            assert "temperature must be 0 (greedy) or positive" in str(dialog.query_one("#settings-error").render())
            await pilot.press("escape")
            assert app.screen is screen and screen.settings.temperature == 0

    asyncio.run(scenario())


def test_the_app_opens_the_most_recent_checkpoint_and_gpt2term_opens_the_app(tiny_checkpoint, monkeypatch):
    from gpt2term.tui import app as app_module
    from gpt2term.tui.model_source import load_app_model

    assert load_app_model(None).name == "tiny"  # the store's most recent checkpoint
    opened = []

    class FakeApp:
        def __init__(self, checkpoint: str | None, n_heads: int | None = None) -> None:
            self.checkpoint = checkpoint

        def run(self) -> None:
            opened.append(self.checkpoint)

    monkeypatch.setattr(app_module, "make_app", FakeApp)
    assert CliRunner().invoke(cli, ["--checkpoint", "tiny"]).exit_code == 0
    assert CliRunner().invoke(cli, []).exit_code == 0
    assert opened == ["tiny", None]


def test_with_an_empty_store_the_app_loads_an_untrained_gpt2_124m():
    from gpt2term.tui.model_source import load_app_model

    app_model = load_app_model(None, device="cpu")
    assert app_model.untrained and app_model.context_length == 1024
    # 163.0M: the course's count for GPT-2 124M with its own output head (124M when tied to the embedding)
    assert app_model.header_parts()[1:4] == ["163.0M params", "ctx 1024", "untrained"]


def test_a_missing_checkpoint_is_reported_in_the_app_which_keeps_running():
    async def scenario() -> None:
        app = make_app("no-such-model", keymap={})
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot, lambda: app.loading_label == "no model loaded", "the load failed")
            # notify() posts a message: the notification is recorded when the app handles it, not at once.
            await settle(
                pilot,
                lambda: any("no checkpoint of that name" in n.message for n in app._notifications),
                "the failure was notified",
            )
            hint = str(app.screen.query_one("#transcript-hint").render())
            assert hint.startswith("Could not load the model: 'no-such-model': no checkpoint of that name")
            assert not app.screen.query_one("#body").loading
            await pilot.press(*"hi", "enter")
            assert isinstance(app.screen, PromptScreen) and not app.screen.turns

    asyncio.run(scenario())


def test_ctrl_s_saves_where_the_dialog_says_under_the_data_folders_exports_never_the_cwd(
    tiny_checkpoint, tmp_path, monkeypatch, isolated_home
):
    cwd = tmp_path / "a-git-clone"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(100, 30)) as pilot:
            await set_max_new_tokens(pilot, 3)
            await generate_in_app(pilot, PROMPT)
            await pilot.press("ctrl+s")
            dialog = app.screen
            shown = dialog.query_one("#path").value
            assert shown.startswith(str(isolated_home / "exports")), shown  # said before saving
            assert str(isolated_home / "exports") in screen_text(app)
            await pilot.press("enter")
            await settle(pilot, lambda: (isolated_home / "exports").is_dir(), "the transcript saved")

    asyncio.run(scenario())
    saved = list((isolated_home / "exports").iterdir())
    assert [p.suffix for p in saved] == [".md"] and PROMPT in saved[0].read_text()
    assert list(cwd.iterdir()) == []  # the current folder is untouched


def test_batched_redraws_end_showing_every_token_probability_and_perplexity_of_the_engine(tiny_checkpoint):
    """Tokens faster than the screen redraws: the widgets are drawn a few times, and the final state is the engine's."""
    tokenizer = default_tokenizer()
    settings = DecodingSettings(max_new_tokens=40, top_n=30, stop_at_eos=False)
    model = CheckpointStore().load_model("tiny")
    expected = list(generate(model, tokenizer, tokenizer.encode(PROMPT), settings))

    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await loaded(pilot)
            await set_max_new_tokens(pilot, 40)
            screen.settings = DecodingSettings(max_new_tokens=40, top_n=30, stop_at_eos=False)
            screen.stream_fps = 0.001  # one redraw in 1000 s: every token after the first waits for the end
            screen.shown_at = {}  # record the redraws (off unless asked)
            await generate_in_app(pilot, PROMPT)
            await pilot.pause()
            turn = screen.turns[-1]
            assert [s.token_id for s in turn.steps] == [s.token_id for s in expected]
            redraws = screen.shown_at[turn.id]
            assert len(redraws) < len(expected) and redraws[-1][1] == len(expected)
            shown = screen.transcript.views[turn.id].body.plain
            assert shown == PROMPT + "".join(s.text for s in expected)
            assert "40 tokens" in str(screen.transcript.views[turn.id].stats.render())
            panel = screen.query_one(ProbabilityPanel)
            rows = panel_rows(panel)
            assert rows == [(show_token(c.text), format_prob(c.prob)) for c in expected[-1].top[: len(rows)]]
            assert panel.border_subtitle.startswith("token 40/40 ")
            ppl = screen.query_one(PerplexityPanel)
            assert f"{expected[-1].perplexity:.2f}" in str(ppl.numbers.render())
            assert ppl.sparkline.probs == pytest.approx([s.prob for s in expected], rel=1e-4)

    asyncio.run(scenario())


def test_the_decoding_thread_hands_tokens_over_in_batches_and_redraw_times_are_kept_only_when_asked(tiny_checkpoint):
    """One message per token would wake the UI thread, and take the decoder's GIL, for every token: the worker posts
    a message only when none is waiting, and the screen takes every waiting token at its next frame."""
    tokenizer = default_tokenizer()
    settings = DecodingSettings(max_new_tokens=40, top_n=30, stop_at_eos=False)
    expected = list(generate(CheckpointStore().load_model("tiny"), tokenizer, tokenizer.encode(PROMPT), settings))

    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await loaded(pilot)
            screen.settings = settings
            screen.stream_fps = 0.001  # the first tokens are drawn at once; the next frame would be in 1000 s
            posted: list[str] = []
            post = screen.post_message

            def spy(message) -> bool:
                if threading.current_thread() is not threading.main_thread():
                    posted.append(type(message).__name__)
                return post(message)

            screen.post_message = spy
            turn = screen.start_generation(PROMPT)
            await settle(pilot, lambda: turn.state != "generating", "the generation ended")
            await pilot.pause()
            token_messages = [name for name in posted if name not in ("PromptScored", "GenerationFinished")]
            assert token_messages and set(token_messages) == {"TokensReady"}
            assert len(token_messages) <= 3, posted  # not one per token: the first, one waiting, and the last
            assert [s.token_id for s in turn.steps] == [s.token_id for s in expected]
            assert screen.transcript.views[turn.id].body.plain == PROMPT + "".join(s.text for s in expected)
            drawn = screen_text(app)  # the panel as the terminal shows it, not only its `render()`
            assert f"chose {show_token(expected[-1].token_text)} rank 1" in drawn
            assert show_token(expected[-1].top[1].text) in drawn
            assert screen.shown_at is None  # redraw times are the bench's, recorded only when it asks

    asyncio.run(scenario())


def test_a_streaming_turn_lays_the_screen_out_only_when_its_text_outgrows_its_room(tiny_checkpoint, monkeypatch):
    """A layout repaints every widget on the screen: a redraw per token must not cost one, only a text that grew
    past the lines kept for it does; the finished turn is exactly as tall as its wrapped text."""
    from gpt2term.tui.widgets.transcript import STREAM_ROOM

    layouts: list[int] = []
    refresh_layout = PromptScreen._refresh_layout  # Textual's: one call lays out and repaints the whole screen

    def counting(self, *args, **kwargs):
        if self.generating is not None:
            layouts.append(len(self.generating.steps))
        return refresh_layout(self, *args, **kwargs)

    monkeypatch.setattr(PromptScreen, "_refresh_layout", counting)

    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(80, 30)) as pilot:
            screen = await loaded(pilot)
            screen.settings = DecodingSettings(max_new_tokens=60, top_n=30, stop_at_eos=False)
            screen.stream_fps = 0  # a redraw for every token batch
            screen.shown_at = {}
            turn = screen.start_generation(PROMPT)
            await settle(pilot, lambda: turn.state != "generating", "the generation ended")
            await pilot.pause()
            body = screen.transcript.views[turn.id].body
            lines = body.get_content_height(body.size, screen.size, body.content_size.width)
            assert lines >= 2 * STREAM_ROOM, "the test needs a text that wraps over several rooms"
            assert body.content_size.height == lines  # the room kept while streaming is given back
            redraws = len(screen.shown_at[turn.id])
            rooms = -(-lines // STREAM_ROOM)
            assert redraws > 3 * len(layouts) and len(layouts) <= rooms + 5, (redraws, layouts, lines)
            # Past the turn's first lines (its mount, its first room), one layout per growth and no second one on the
            # next frame: Textual's own would follow each with another, since the new size is a change too
            # (`LaidOutOnce`). The scrollbar appearing once the text overflows asks for one of its own.
            growths = [n for n in layouts if n >= 8]
            followed = sum(b - a <= 1 for a, b in zip(growths, growths[1:], strict=False))
            assert len(growths) <= rooms + 1 and followed <= 1, layouts

    asyncio.run(scenario())


def test_the_last_token_is_on_screen_before_the_prompt_is_scored(tiny_checkpoint, monkeypatch):
    """The prompt's perplexity costs one more forward pass after the last token: the stream's end must not wait for
    it (nor for the next frame), or the app's tokens/s would count that pass as streaming time."""
    from gpt2term.tui.screens import prompt as prompt_module

    scoring, release = threading.Event(), threading.Event()
    real_score = prompt_module.score

    def gated_score(model, ids):
        scoring.set()
        assert release.wait(60), "the test never let the prompt be scored"
        return real_score(model, ids)

    monkeypatch.setattr(prompt_module, "score", gated_score)

    async def scenario() -> None:
        app = make_app(tiny_checkpoint, keymap={})
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await loaded(pilot)
            screen.settings = DecodingSettings(max_new_tokens=12, top_n=30, stop_at_eos=False)
            screen.stream_fps = 0.001  # the first tokens are drawn at once; the next frame would be in 1000 s
            turn = screen.start_generation(PROMPT)
            try:
                await settle(pilot, scoring.is_set, "the decoder finished and began scoring", workers=False)
                await settle(pilot, lambda: len(turn.steps) == 12, "all 12 tokens on screen", 10.0, workers=False)
                assert turn.state == "generating" and turn.prompt_perplexity is None  # the score is still held
                assert screen.transcript.views[turn.id].body.plain.endswith("".join(s.text for s in turn.steps))
            finally:
                release.set()
            await settle(pilot, lambda: turn.state == "done", "the turn ended")
            assert turn.prompt_perplexity is not None

    asyncio.run(scenario())
