"""The prompt screen: type a prompt, watch the model continue it one token at a time, and see why.

Generation runs in a thread worker that hands its steps to an `EventRelay`, which posts one `TokensReady` message
only when none is waiting; Esc sets a `threading.Event` that `generate()` checks between two tokens, so it stops at
once without killing a thread. The screen takes the waiting steps and redraws its widgets at most `STREAM_FPS`
times a second, and less often when its redraws cost the decoder more than `UI_CPU_SHARE` of its time (see
`FramePacer`): every redraw is Python on the UI thread, holding the GIL the decoder needs between two of PyTorch's
kernels. A redraw repaints only what changed: the screen is laid out again only when a widget's height changed.
For the same reason Python's garbage collector is held off from a turn's start to its end (`CollectorPause`).
"""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import getters, on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Static
from textual.worker import Worker

from gpt2term import locations
from gpt2term.core.accel import prepare_for_inference
from gpt2term.core.errors import Gpt2termError
from gpt2term.core.generation import DecodingSettings, generate, score
from gpt2term.core.model import GPTModel
from gpt2term.core.tokenizer import Tokenizer
from gpt2term.tui.dialogs import SavePathScreen, SettingsScreen
from gpt2term.tui.keymap import bind, key_display
from gpt2term.tui.messages import GenerationFinished, PromptScored, TokensReady
from gpt2term.tui.model_source import UNTRAINED_HINT, AppModel
from gpt2term.tui.pacing import CollectorPause, FramePacer
from gpt2term.tui.run_state import EventRelay
from gpt2term.tui.screens.inspect import AttentionScreen, CompareScreen, LensScreen, sequence_for
from gpt2term.tui.screens.versus import VersusScreen
from gpt2term.tui.turns import Turn, save_transcript
from gpt2term.tui.widgets import update_in_place
from gpt2term.tui.widgets.colors import LEGEND_PROBS, prob_color
from gpt2term.tui.widgets.footer import FittedFooter
from gpt2term.tui.widgets.header import ModelHeader
from gpt2term.tui.widgets.perplexity import PerplexityPanel
from gpt2term.tui.widgets.probabilities import ProbabilityPanel
from gpt2term.tui.widgets.prompt_input import PromptInput
from gpt2term.tui.widgets.transcript import TokenDisplay, Transcript
from gpt2term.tui.workers import WorkerErrors

if TYPE_CHECKING:
    from gpt2term.tui.app import Gpt2termApp


STREAM_FPS = 10  # redraws per second at most while tokens stream in (0: one per token)
UI_CPU_SHARE = 0.03  # redraws are spaced so that the UI thread uses at most this share of the time while streaming
FIRST_TOKEN_NOTE = "reading the prompt for the first token (the first run also warms the model up)…"


def welcome(app) -> str:
    """The first thing a new user reads, with the keys as they are bound now."""

    def key(binding_id: str) -> str:
        return key_display(app, binding_id)

    return (
        f"Type a prompt below and press {key('prompt.generate')}: the model continues it one token at a time. Each "
        "token comes with its probability and the alternatives the model weighed (right). "
        f"{key('prompt.inspect')} moves a cursor over the tokens; {key('prompt.toggle-colours')} colours them by "
        f"probability, {key('prompt.toggle-boundaries')} shows where one token ends and the next begins; "
        f"{key('prompt.settings')} changes how tokens are picked (greedy, temperature, top-k, top-p); "
        f"{key('app.command-palette')} lists every command."
    )


class PromptScreen(WorkerErrors, Screen):
    BINDINGS = [
        bind("prompt.stop", "stop", priority=True),
        bind("prompt.back", "back", priority=True),  # the same key as Stop; check_action picks the one that applies
        bind("prompt.inspect", "inspect"),
        bind("tokens.attention", "attention"),  # only with the token cursor on a token (check_action)
        bind("tokens.lens", "lens"),
        bind("prompt.settings", "settings"),
        bind("prompt.toggle-colours", "toggle_colours"),
        bind("prompt.toggle-boundaries", "toggle_boundaries"),
        bind("prompt.copy", "copy_last"),  # the footer shows what fits (FOOTER_FIRST); the palette has them all
        bind("prompt.save", "save"),
        bind("prompt.compare", "compare"),
        bind("prompt.versus", "versus"),
        bind("prompt.loss", "loss"),
    ]

    if TYPE_CHECKING:
        app = getters.app(Gpt2termApp)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # 30 alternatives: enough to fill the probability panel of a tall terminal (it shows what fits).
        self.settings = DecodingSettings(top_n=30)
        self.display_mode = TokenDisplay()
        self.turns: list[Turn] = []
        self._turns_by_id: dict[int, Turn] = {}
        self._next_turn_id = 1
        self._cancel: threading.Event | None = None
        self.generating: Turn | None = None
        self._pending_prompt: str | None = None  # typed while the model was loading
        self._pacer = FramePacer(STREAM_FPS, UI_CPU_SHARE)
        self._collector = CollectorPause()  # from a turn's start to its end
        self._relay: EventRelay | None = None  # the generating turn's steps, from its thread to this screen
        self._flush_timer: Timer | None = None
        # The model (weakly: a model the app has closed must be freed) and the dtype its decoding weights are packed in.
        self._prepared: tuple[weakref.ref[GPTModel], str] | None = None
        # Set it to {} to record, per turn, (perf_counter, tokens on screen, the UI thread's CPU seconds) at each
        # redraw (`gpt2term bench app`).
        self.shown_at: dict[int, list[tuple[float, int, float]]] | None = None

    @property
    def stream_fps(self) -> float:
        return self._pacer.fps

    @stream_fps.setter
    def stream_fps(self, fps: float) -> None:
        self._pacer.fps = fps

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield ModelHeader("prompt")
        with Horizontal(id="body"):
            yield Transcript(id="transcript")
            with Vertical(id="side"):
                yield ProbabilityPanel(id="probs")
                yield PerplexityPanel(id="perplexity")
        yield Static(id="status")
        yield PromptInput(id="prompt")
        yield FittedFooter()

    @property
    def transcript(self) -> Transcript:
        return self.query_one(Transcript)

    @property
    def prompt_input(self) -> PromptInput:
        return self.query_one(PromptInput)

    def on_mount(self) -> None:
        self.watch(self.app, "app_model", self._model_changed, init=True)
        self.watch(self.app, "load_error", self._load_failed, init=False)
        keys = {name: key_display(self.app, f"prompt.{name}") for name in ("generate", "newline", "history-previous")}
        self.prompt_input.placeholder = (
            f"Type a prompt · {keys['generate']} generates · {keys['newline']} new line · {keys['history-previous']} "
            "earlier prompts"
        )
        self.prompt_input.focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Show Stop only while it does something, and Inspect once there are tokens: the footer stays short."""
        if action == "stop":
            return self.generating is not None
        if action == "back":
            return self.generating is None and not self.prompt_input.has_focus
        if action == "inspect":
            return bool(self.turns)
        if action in ("attention", "lens"):
            return self.transcript.has_focus and self.transcript.cursor is not None and self.app.app_model is not None
        return True

    def on_descendant_focus(self) -> None:
        self.update_status()
        self.refresh_bindings()

    def on_descendant_blur(self) -> None:
        self.update_status()
        self.refresh_bindings()

    def _model_changed(self, app_model: AppModel | None) -> None:
        self.query_one("#body").loading = app_model is None
        hint = welcome(self.app)
        if app_model is not None and app_model.untrained:
            hint += "\n\n" + UNTRAINED_HINT
        self.transcript.set_hint(hint)
        self.update_status()
        if app_model is not None and self._pending_prompt is not None:
            prompt, self._pending_prompt = self._pending_prompt, None
            self.start_generation(prompt)

    def _load_failed(self, error: str | None) -> None:
        if error is None:
            return
        self.query_one("#body").loading = False
        self.transcript.set_hint(
            f"Could not load the model: {error}\n\nQuit ({key_display(self.app, 'app.quit')}) and open another with "
            "gpt2term --checkpoint NAME; `gpt2term ckpt list` shows what you have."
        )
        self.update_status()

    def update_status(self, note: str = "") -> None:
        """The line above the prompt: the current decoding settings, the toggles, and what is happening."""
        text = Text()
        if self.generating is not None:
            done = len(self.generating.steps)
            stop = key_display(self.app, "prompt.stop")
            if done == 0:  # the first token waits on a pass over the whole prompt (and, the first time, warm-up)
                text.append(f"{FIRST_TOKEN_NOTE} ({stop} stops) · ", style="bold")
            else:
                total = self.generating.settings.max_new_tokens
                text.append(f"generating {done}/{total} ({stop} stops) · ", style="bold")
        elif note:
            text.append(note + " · ", style="bold")
        elif self.app.load_error:
            text.append("no model loaded · ", style="bold")
        elif self.app.app_model is None:
            text.append("loading the model… · ", style="bold")
        text.append(self.settings.describe(), style="")
        if self.display_mode.colours:
            text.append("  p:", style="dim")
            for prob in LEGEND_PROBS:
                text.append(" ■", style=prob_color(prob))
                text.append(f"{prob * 100:g}%", style="dim")
        if self.display_mode.boundaries:
            text.append("  tokens shown", style="dim")
        if self.transcript.has_focus:
            text = Text("cursor ←/→ · ", style="bold") + text
        update_in_place(self.query_one("#status", Static), text)

    # ------------------------------------------------------------------ generating

    @on(PromptInput.Submitted)
    def _submitted(self, event: PromptInput.Submitted) -> None:
        self.start_generation(event.text)

    def start_generation(self, prompt: str) -> Turn | None:
        """Start a generation for `prompt`; returns its turn, or None (with a notification saying why)."""
        app_model: AppModel | None = self.app.app_model
        if app_model is None and self.app.load_error:
            self.notify("No model is loaded (see above); quit and open another checkpoint.", severity="error")
            return None
        if app_model is None:
            self._pending_prompt = prompt
            self.notify("The model is still loading: your prompt runs as soon as it is ready.")
            return None
        if self.generating is not None:
            self.notify("Already generating: press Esc to stop first.", severity="warning")
            return None
        if not prompt.strip():
            self.notify("Type a prompt first (Shift+Enter or Ctrl+J for a new line).", severity="warning")
            return None
        tokenizer = self.app.tokenizer
        ids = tokenizer.encode(prompt)
        ctx = app_model.context_length
        if len(ids) > ctx:
            self.notify(f"The prompt has {len(ids)} tokens; the model reads its last {ctx} (its context).")
            ids = ids[-ctx:]
        turn = Turn(self._next_turn_id, prompt, ids, self.settings, model_name=app_model.name)
        self._next_turn_id += 1
        self.turns.append(turn)
        self._turns_by_id[turn.id] = turn
        self.transcript.add_turn(turn)
        self.prompt_input.remember(prompt)
        self.prompt_input.clear()
        self.generating = turn
        self._cancel = threading.Event()
        self._relay = EventRelay(lambda: self.post_message(TokensReady(turn.id)))
        self._pacer.restart()
        self._collector.begin()
        self.prompt_input.cursor_blink = False  # each blink is a screen update of its own, twice a second
        self._show_turn(turn)
        self.update_status()
        self.refresh_bindings()  # Stop and Inspect appear in the footer
        dtype, prepared = self.settings.dtype, self._prepared
        done = prepared is not None and prepared[0]() is app_model.model and prepared[1] == dtype
        prepare = dtype if dtype is not None and not done else None
        self._generate(turn.id, app_model.model, tokenizer, ids, self.settings, self._cancel, self._relay, prepare)
        return turn

    @work(thread=True, exclusive=True, exit_on_error=False, group="generate")
    def _generate(
        self,
        turn_id: int,
        model: GPTModel,
        tokenizer: Tokenizer,
        ids: list[int],
        settings: DecodingSettings,
        cancel: threading.Event,
        relay: EventRelay,
        prepare: str | None,
    ) -> None:
        if prepare is not None:  # the dtype setting changed (or a new model): pack its weights before the first token
            prepare_for_inference(model, prepare)
            self._prepared = (weakref.ref(model), prepare)
        for step in generate(model, tokenizer, ids, settings, cancel=cancel):
            relay(step)
        self.post_message(TokensReady(turn_id, last=True))
        # The prompt's own perplexity: one more forward pass, after the tokens so it never delays the first one.
        self.post_message(PromptScored(turn_id, score(model, ids).perplexity))
        self.post_message(GenerationFinished(turn_id, stopped=cancel.is_set()))

    def on_tokens_ready(self, message: TokensReady) -> None:
        if self._flush_timer is not None and not message.last:
            return  # a redraw is already due; it takes these tokens too
        wait = self._pacer.wait()
        if wait <= 0 or message.last:
            self._show_new_tokens()
        else:
            self._flush_timer = self.set_timer(wait, self._show_new_tokens)

    def _show_new_tokens(self) -> None:
        """Take the steps waiting in the relay and draw them: transcript, stats, both panels, the status line."""
        if self._flush_timer is not None:
            self._flush_timer.stop()
            self._flush_timer = None
        turn = self.generating
        if turn is None or self._relay is None:
            return
        steps = self._relay.drain()
        if not steps:
            return
        turn.steps.extend(steps)
        self.transcript.tokens_added(turn)
        self.transcript.update_stats(turn)
        if self.transcript.cursor is None:
            self._show_turn(turn)
        elif self.query_one(PerplexityPanel).turn is turn:
            self.query_one(PerplexityPanel).show(turn)
        self.update_status()
        self._pacer.drew()
        if self.shown_at is not None:
            self.shown_at.setdefault(turn.id, []).append((time.perf_counter(), len(turn.steps), time.thread_time()))

    def on_prompt_scored(self, message: PromptScored) -> None:
        turn = self._turns_by_id[message.turn_id]
        turn.prompt_perplexity = message.perplexity
        if self.query_one(PerplexityPanel).turn is turn:
            self.query_one(PerplexityPanel).show(turn)

    def on_generation_finished(self, message: GenerationFinished) -> None:
        self._show_new_tokens()  # the last tokens, before the turn's final state
        turn = self._turns_by_id[message.turn_id]
        turn.state = "error" if message.error else "stopped" if message.stopped else "done"
        turn.error = message.error
        if message.error:
            self.notify(message.error, title="Generation failed", severity="error")
        if self.generating is turn:
            self.generating = None
        self.transcript.update_stats(turn)
        if self.transcript.cursor is None:
            self._show_turn(turn)  # "token 7/7" now that the length is final
        elif self.query_one(PerplexityPanel).turn is turn:
            self.query_one(PerplexityPanel).show(turn)
        self.update_status("stopped" if message.stopped else "")
        self.refresh_bindings()
        if self.generating is None:
            self._collector.end()
            self.prompt_input.cursor_blink = True

    def on_unmount(self) -> None:
        self._collector.end()  # the app quit mid-stream: the collector must not stay off for whoever runs next

    def worker_failed(self, worker: Worker, error: str) -> None:
        """Generating raised (the model or the settings refused): the turn ends with the error; the app goes on."""
        if worker.group == "generate" and self.generating is not None:
            self.post_message(GenerationFinished(self.generating.id, stopped=False, error=error))
        else:
            super().worker_failed(worker, error)

    def action_stop(self) -> None:
        """Stop generating between two tokens: `generate()` checks the event before computing the next one."""
        if self.generating is not None and self._cancel is not None:
            self._cancel.set()
            self.update_status("stopping…")

    def action_back(self) -> None:
        self.transcript.follow_latest()
        self.prompt_input.focus()

    # ------------------------------------------------------------------ panels and the token cursor

    def _show_turn(self, turn: Turn | None, index: int | None = None) -> None:
        """Point both panels at a turn: its token `index`, or its latest token."""
        probs = self.query_one(ProbabilityPanel)
        self.query_one(PerplexityPanel).show(turn)
        if turn is None or not turn.steps:
            probs.show(None)
            return
        if index is None:
            index = len(turn.steps) - 1
        total = turn.settings.max_new_tokens if turn.state == "generating" else len(turn.steps)
        probs.show(turn.steps[index], turn.context_before(index), total)

    @on(Transcript.Selected)
    def _selected(self, event: Transcript.Selected) -> None:
        if event.turn is None:
            self._show_turn(self.turns[-1] if self.turns else None)
        else:
            self._show_turn(event.turn, event.index)

    def action_inspect(self) -> None:
        if self.prompt_input.has_focus:
            self.transcript.focus()
            if self.transcript.cursor is None:
                self.transcript.action_move_cursor(-1)
        else:
            self.transcript.follow_latest()
            self.prompt_input.focus()

    def action_attention(self) -> None:
        """The selected token's attention over the tokens before it (computed in the view's own worker)."""
        turn, index = self.transcript.selected_turn_and_index
        app_model: AppModel | None = self.app.app_model
        if turn is None or index is None or app_model is None:
            return
        ids = sequence_for(turn, index, app_model.context_length)
        self.app.push_screen(AttentionScreen(app_model.model, self.app.tokenizer, ids))

    def action_lens(self) -> None:
        """What each layer predicted where the model chose the selected token."""
        turn, index = self.transcript.selected_turn_and_index
        app_model: AppModel | None = self.app.app_model
        if turn is None or index is None or app_model is None:
            return
        context = sequence_for(turn, index, app_model.context_length + 1)[:-1][-app_model.context_length :]
        self.app.push_screen(LensScreen(app_model.model, self.app.tokenizer, context, turn.steps[index].token_id))

    def action_compare(self) -> None:
        """The last prompt decoded three ways, each with its log-probability (computed in the view's worker)."""
        app_model: AppModel | None = self.app.app_model
        if not self.turns or app_model is None:
            self.notify("Generate something first: the comparison decodes the last prompt.", severity="warning")
            return
        turn = self.turns[-1]
        self.app.push_screen(
            CompareScreen(app_model.model, self.app.tokenizer, turn.prompt, turn.prompt_ids, self.settings)
        )

    def action_versus(self) -> None:
        """The last prompt answered greedily by this model and a checkpoint picked in the view."""
        app_model: AppModel | None = self.app.app_model
        if not self.turns or app_model is None:
            self.notify("Generate something first: the comparison answers the last prompt.", severity="warning")
            return
        turn = self.turns[-1]
        self.app.push_screen(
            VersusScreen(
                app_model.model, app_model.name, self.app.tokenizer, turn.prompt, turn.prompt_ids, self.settings
            )
        )

    # ------------------------------------------------------------------ toggles, settings, copy, save

    def action_toggle_colours(self) -> None:
        self.display_mode = TokenDisplay(not self.display_mode.colours, self.display_mode.boundaries)
        self.transcript.set_display(self.display_mode)
        self.update_status()

    def action_toggle_boundaries(self) -> None:
        self.display_mode = TokenDisplay(self.display_mode.colours, not self.display_mode.boundaries)
        self.transcript.set_display(self.display_mode)
        self.update_status()

    def action_settings(self) -> None:
        def apply(settings: DecodingSettings | None) -> None:
            if settings is not None:
                self.settings = settings
                self.update_status()

        self.app.push_screen(SettingsScreen(self.settings), apply)

    def action_copy_last(self) -> None:
        done = [turn for turn in self.turns if turn.steps]
        if not done:
            self.notify("Nothing to copy yet: generate something first.", severity="warning")
            return
        text = done[-1].completion
        self.app.copy_to_clipboard(text)
        self.notify(f"Copied the last completion ({len(text)} characters).")

    def action_save(self) -> None:
        if not self.turns:
            self.notify("Nothing to save yet: generate something first.", severity="warning")
            return
        default = locations.exports_dir() / time.strftime("gpt2term-transcript-%Y%m%d-%H%M%S.md")

        def save(path: Path | None) -> None:
            if path is None:
                return
            try:
                written = save_transcript(self.turns, path)
            except Gpt2termError as exc:
                self.notify(str(exc), title="Not saved", severity="error")
                return
            self.notify(f"Saved the transcript to {written}")

        self.app.push_screen(SavePathScreen(default), save)

    def action_loss(self) -> None:
        """The course's loss steps on the selected turn's text (else the last turn's): its prompt and generated
        tokens, as much as a context of inputs plus one target holds."""
        app_model: AppModel | None = self.app.app_model
        if not self.turns or app_model is None:
            self.notify("Generate something first: the loss is computed on a turn's text.", severity="warning")
            return
        if self.generating is not None:  # the view may switch the model to train mode (dropout) while it decodes
            self.notify("Still generating: stop it (Esc) or let it finish, then look at the loss.", severity="warning")
            return
        from gpt2term.tui.screens.loss_view import LossView

        turn = self.transcript.selected_turn_and_index[0] or self.turns[-1]
        ids = (list(turn.prompt_ids) + [step.token_id for step in turn.steps])[-(app_model.context_length + 1) :]
        self.app.push_screen(LossView(self.app.tokenizer, ids, model=app_model.model, label=app_model.name))
