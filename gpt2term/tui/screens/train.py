"""The train screen: start a run from a form and watch it learn, or follow a run another process is writing.

A run is the engine's `Trainer` in a thread worker. The trainer calls its listeners on that thread; the screen's
listener is an `EventRelay`, which keeps the events and posts one `TrainingEventsReady` message when none is
waiting, so a fast loop cannot flood the UI and no event is lost. Pause, resume, save and stop go through the
engine's `TrainingControl`, which the trainer obeys between steps; stopping saves first.

Following reads the run's metrics.jsonl (every event, one JSON line each) with `MetricsFollower` on a timer: the
same events, so the same panels.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.text import Text
from textual import getters, on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Button, Input, ProgressBar, Select, Static
from textual.worker import Worker

from gpt2term.core.errors import Gpt2termError
from gpt2term.core.follow import MetricsFollower
from gpt2term.core.store.locks import LockHolder
from gpt2term.core.store.store import CheckpointInfo, CheckpointStore
from gpt2term.core.training import (
    CheckpointEvent,
    FailedEvent,
    Listener,
    StartEvent,
    StepEvent,
    Trainer,
    TrainingControl,
    TrainingEvent,
    TrainingSettings,
    WarningEvent,
    event_from_dict,
)
from gpt2term.formatting import format_count, format_duration
from gpt2term.tui.dialogs import FollowCandidate, FollowScreen
from gpt2term.tui.keymap import bind, key_display
from gpt2term.tui.messages import StoreListed, TrainingEnded, TrainingEventsReady
from gpt2term.tui.run_state import EventRelay, RunState
from gpt2term.tui.widgets.event_log import EventLog
from gpt2term.tui.widgets.footer import FittedFooter
from gpt2term.tui.widgets.header import ModelHeader
from gpt2term.tui.widgets.train_form import ModelChoice, TrainForm
from gpt2term.tui.widgets.training_charts import (
    LossPlot,
    MetricSparkline,
    format_loss,
    format_lr,
    format_perplexity,
    format_rate,
)
from gpt2term.tui.workers import WorkerErrors

if TYPE_CHECKING:
    from gpt2term.tui.app import Gpt2termApp

NARROW = 110  # below this width, the form and the loss plot do not both fit: the plot shows during runs only
FOLLOW_INTERVAL_S = 0.5
FOLLOW_BUDGET_S = 0.05  # a poll reads at most this long before letting the UI draw (a long file: a few polls)
ACTIONS = ("start", "pause", "resume", "save_now", "stop", "follow", "unfollow", "prompt")
BUTTONS = ("pause", "resume", "save_now", "stop", "follow")
ESTIMATE_AFTER_STEPS = 5  # steps measured before the screen says how long the whole run should take


def describe_writer(holder: LockHolder | None) -> str | None:
    """Who writes a checkpoint, e.g. "process 123 (training)"; the host too when it is another machine."""
    if holder is None:
        return None
    where = f" on {holder.host}" if holder.host and holder.host != socket.gethostname() else ""
    return f"process {holder.pid}{where}" + (f" ({holder.purpose})" if holder.purpose else "")


def show_sample(prompt: str, text: str) -> Text:
    """The prompt in bold, then the model's words; a run of newlines is one line break after as many `↵` (an
    early model writes little else, and the panel would be empty lines)."""
    shown = Text(prompt, style="bold")
    if not text.strip() and "\n" not in text:
        shown.append(repr(text), style="dim")  # only spaces (or nothing): show them quoted
        return shown
    for match in re.finditer(r"(\n+)|([^\n]+)", text):
        if match.group(1):
            shown.append("↵" * len(match.group(1)) + "\n", style="dim")
        else:
            shown.append(match.group(2))
    return shown


class TrainScreen(WorkerErrors, Screen):
    BINDINGS = [
        bind("train.start", "start"),
        bind("train.pause", "pause"),
        bind("train.resume", "resume"),  # the same key as Pause; check_action shows the one that applies
        bind("train.save", "save_now"),
        bind("train.stop", "stop"),
        bind("train.follow", "follow"),
        bind("train.unfollow", "unfollow"),
        bind("train.prompt", "prompt"),
        bind("train.data", "data"),
    ]

    if TYPE_CHECKING:
        app = getters.app(Gpt2termApp)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.store = CheckpointStore()
        self.state = RunState()
        self.mode = "setup"  # setup, training, following
        self.run_id = 0
        self.trainer: Trainer | None = None
        self.control: TrainingControl | None = None
        self.relay: EventRelay | None = None
        self.following: str | None = None
        self.follower: MetricsFollower | None = None
        self._follow_timer: Timer | None = None
        self._writer: str | None = None
        self._after_run: list[Callable[[], object]] = []
        self._enabled: tuple[bool, ...] = ()
        self._steps_since_start = 0
        self.estimate: str | None = None  # the run's duration from its first steps' speed, once they have run
        self.listeners: list[Listener] = []  # more listeners for every run started here (a test's recorder)

    @property
    def run_active(self) -> bool:
        """A run trains in this app (its thread has not returned)."""
        return self.mode == "training"

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield ModelHeader("train")
        with Horizontal(id="train-body"):
            yield TrainForm(self.store, id="train-form")
            with Vertical(id="run-view"):
                yield Static(id="run-help")
                yield Static(id="run-summary")
                with Horizontal(id="run-progress-row"):
                    yield ProgressBar(id="run-progress", show_eta=False, show_percentage=True)
                    yield Static(id="run-eta")
                with Horizontal(id="run-middle"):
                    with Vertical(id="run-left"):
                        yield MetricSparkline("train loss", format_loss, id="spark-train-loss")
                        yield MetricSparkline("val loss", format_loss, id="spark-val-loss")
                        yield MetricSparkline("val ppl", format_perplexity, id="spark-val-ppl")
                        yield MetricSparkline("lr", format_lr, id="spark-lr")
                        yield MetricSparkline("tokens/s", format_rate, id="spark-tokens")
                        yield Static(id="run-warning", markup=False)
                        yield Static(id="run-sample", markup=False)
                        yield EventLog(id="run-log")
                    yield LossPlot(id="run-plot")
                with Horizontal(id="run-buttons"):
                    yield Button("Pause", id="pause", compact=True)
                    yield Button("Resume", id="resume", compact=True)
                    yield Button("Save now", id="save_now", compact=True)
                    yield Button("Stop", id="stop", variant="error", compact=True)
                    yield Button("Follow a run…", id="follow", compact=True)
        yield FittedFooter()

    @property
    def form(self) -> TrainForm:
        return self.query_one(TrainForm)

    @property
    def log_view(self) -> EventLog:
        return self.query_one(EventLog)

    def on_mount(self) -> None:
        self.app.train_screen = self  # the app asks it before quitting
        self.query_one("#run-sample", Static).border_title = "sample"
        self.query_one("#run-view").border_title = "training run"
        self.query_one("#run-log").border_title = "events"
        self.query_one("#start").focus()
        self.refresh_view()

    def on_screen_resume(self) -> None:
        """Coming back (or sent here by the checkpoints screen): pick up its request, refresh the choices."""
        request = self.app.take_train_request()
        if self.mode == "setup":
            self.form.refresh_models()
        if request is None:
            return
        kind, name = request
        if kind == "follow":
            self.follow(name)
        elif self.mode != "setup":
            self.notify("Stop the current run (or stop following) first.", severity="warning")
        else:
            self.form.choose(ModelChoice(kind, name))
            self.query_one("#start").focus()
            self.notify(f"{'Resume' if kind == 'resume' else 'Fine-tune'} {name}: check the form, then start.")

    def on_unmount(self) -> None:
        """The app is closing under a run (a quit that did not ask): stop it, so it saves and its thread ends."""
        if self.control is not None and self.run_active:
            self.control.stop()
        self.stop_following()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        status = self.state.status
        if action == "start":
            return self.mode == "setup"
        if action == "pause":
            return self.run_active and status in ("starting", "running")
        if action == "resume":
            return self.run_active and status in ("paused", "pausing")
        if action in ("save_now", "stop"):
            return self.run_active and status != "stopping"
        if action == "follow":
            return self.mode == "setup"
        if action == "unfollow":
            return self.mode == "following"
        if action == "prompt":
            return self.mode != "training" and self.state.saved_step is not None
        return True

    # ------------------------------------------------------------------ drawing

    def help_text(self) -> Text:
        """What the screen shows before the first run: what one key starts, and what else it can do."""

        def key(binding_id: str) -> str:
            return key_display(self.app, binding_id)

        text = Text()
        text.append(f"{key('train.start')} starts {self.form.describe()}.\n\n", style="bold")
        text.append(
            "Change the form first if you like: a corpus (files or folders of .txt/.md, or the built-in pydoc), "
            "a new model from a preset or a stored checkpoint to resume or fine-tune, how long and how fast.\n\n"
            f"While it trains: {key('train.pause')} pauses and resumes, {key('train.save')} saves now, "
            f"{key('train.stop')} stops (it saves first). The loss, validation loss, learning rate and speed are "
            "drawn as they come, with a sample of the model's writing at each evaluation.\n\n"
            f"{key('train.follow')} follows a run that another terminal (gpt2term train) or a torchrun job is "
            "training, read-only."
        )
        return text

    def _set_mode(self, mode: str) -> None:
        self.mode = mode
        self.set_class(mode != "setup", "busy")
        self.form.disabled = mode != "setup"
        if mode == "setup":
            self.query_one("#start").focus()
        else:
            self.log_view.focus()  # arrows scroll the log; the run's keys work from anywhere
        self.refresh_view()

    @on(Input.Changed)
    @on(Select.Changed)
    def _form_changed(self) -> None:
        """Before the first run, the help says what the start key starts now."""
        if self.state.status == "idle" and self.is_mounted:
            self.query_one("#run-help", Static).update(self.help_text())

    def on_resize(self) -> None:
        self.set_class(self.size.width < NARROW, "narrow")

    def refresh_view(self) -> None:
        s = self.state
        idle = s.status == "idle"
        self.set_class(idle, "idle")
        if idle:
            self.query_one("#run-help", Static).update(self.help_text())
        view = self.query_one("#run-view")
        if self.following:
            who = f"written by {self._writer}" if self._writer else "nobody writes it now"
            view.border_title = f"following {self.following} (read-only, {who})"
        elif s.name:
            view.border_title = f"{s.name} · {s.status}"
        view.border_subtitle = self._describe_model()
        self.query_one("#run-summary", Static).update(Text(s.summary(), style="bold"))
        bar = self.query_one("#run-progress", ProgressBar)
        bar.update(total=max(1, s.total_steps or 1), progress=s.step if s.total_steps else 0)
        eta = f"ETA {format_duration(s.eta_s)}" if s.eta_s is not None and s.active else ""
        if s.elapsed_s:
            eta = f"{eta} · {format_duration(s.elapsed_s)} so far" if eta else f"took {format_duration(s.elapsed_s)}"
        if self.estimate is not None and s.eta_s is not None and s.active:
            eta += f" · about {format_duration(s.elapsed_s + s.eta_s)} in all"
        self.query_one("#run-eta", Static).update(eta)
        self.query_one("#spark-train-loss", MetricSparkline).show(s.train_loss)
        self.query_one("#spark-val-loss", MetricSparkline).show(s.val_loss)
        self.query_one("#spark-val-ppl", MetricSparkline).show(s.val_perplexity)
        self.query_one("#spark-lr", MetricSparkline).show(s.lr)
        self.query_one("#spark-tokens", MetricSparkline).show(s.tokens_per_s)
        warning = self.query_one("#run-warning", Static)
        warning.display = bool(s.warning)
        warning.update(f"⚠ overfitting: {s.warning}" if s.warning else "")
        sample = self.query_one("#run-sample", Static)
        if s.sample is not None:
            sample.border_title = f"sample at step {s.sample.step}"
            sample.update(show_sample(s.sample.prompt, s.sample.text))
        else:
            sample.border_title = "sample"
            sample.update(Text("A greedy sample from the model appears at each evaluation.", style="dim"))
        self.query_one(LossPlot).show(s.train_loss, s.val_loss)
        enabled = tuple(bool(self.check_action(a, ())) for a in ACTIONS)
        for action, shown in zip(ACTIONS, enabled, strict=True):
            if action in BUTTONS:
                self.query_one(f"#{action}", Button).display = shown
        if enabled != self._enabled:  # the footer rebuilds itself on each refresh: only when something changed
            self._enabled = enabled
            self.refresh_bindings()

    def _describe_model(self) -> str:
        s = self.state
        parts = []
        if s.parameters:
            parts.append(f"{format_count(s.parameters)} params")
        if s.corpus:
            parts.append(s.corpus)
        if s.device:
            parts.append(f"{s.device} {s.dtype}")
        return " · ".join(parts)

    def _apply(self, events: list[TrainingEvent]) -> None:
        for event in events:
            for line in self.state.apply(event):
                self.log_view.add(line, event.time)
            if isinstance(event, StartEvent):
                self._steps_since_start, self.estimate = 0, None
            elif isinstance(event, StepEvent):
                self._estimate(event)
            if isinstance(event, WarningEvent) and event.kind == "overfitting":
                self.notify(event.message, title="Overfitting", severity="warning", timeout=15)
            elif isinstance(event, CheckpointEvent) and event.reason == "requested" and self.mode == "training":
                self.notify(f"Saved {event.name!r} at step {event.step}.")
            elif isinstance(event, FailedEvent) and self.mode == "training":
                self.notify(event.message, title="Training failed", severity="error", timeout=20)

    def _estimate(self, event: StepEvent) -> None:
        """Once the first steps have run, say how long the whole run should take at the speed measured on this
        machine now (a busy machine trains slower than the README's figures)."""
        self._steps_since_start += 1
        if self.estimate is not None or event.eta_s is None or self._steps_since_start < ESTIMATE_AFTER_STEPS:
            return
        total = event.elapsed_s + event.eta_s
        self.estimate = (
            f"measured {format_count(event.tokens_per_second)} tokens/s over the first {self._steps_since_start} "
            f"steps: this run should take about {format_duration(total)} in all"
        )
        self.log_view.add(self.estimate, event.time)
        if self.mode == "training":
            self.notify(self.estimate[0].upper() + self.estimate[1:] + ".", title="Estimate", timeout=8)

    # ------------------------------------------------------------------ a run of our own

    @on(Button.Pressed)
    def _button(self, event: Button.Pressed) -> None:
        if event.button.id in ("start", "pause", "resume", "save_now", "stop", "follow"):
            event.stop()
            getattr(self, f"action_{event.button.id}")()

    def action_start(self) -> None:
        if self.mode != "setup":
            self.notify("A run is going: stop it (or stop following) before starting another.", severity="warning")
            return
        try:
            settings = self.form.read()
        except Gpt2termError as exc:
            self.notify(str(exc), title="Cannot start", severity="error", timeout=10)
            return
        self.start_run(settings)

    def start_run(self, settings: TrainingSettings) -> None:
        """Train `settings` in a thread; the panels follow its events."""
        self.run_id += 1
        run_id = self.run_id
        self.control = TrainingControl()
        self.relay = EventRelay(lambda: self.post_message(TrainingEventsReady(run_id)))
        listeners = [self.relay, *self.listeners]
        self.trainer = Trainer(settings, store=self.store, control=self.control, listeners=listeners)
        self.state = RunState(name=settings.name, status="starting", checkpoint=settings.name)
        self.log_view.reset()
        self.log_view.add(f"preparing {settings.name!r}: reading the corpus and building the model…")
        self._set_mode("training")
        self._train(self.trainer, run_id)

    @work(thread=True, exit_on_error=False, group="train")
    def _train(self, trainer: Trainer, run_id: int) -> None:
        trainer.run()
        self.post_message(TrainingEnded(run_id))

    def on_training_events_ready(self, message: TrainingEventsReady) -> None:
        if message.run_id != self.run_id or self.relay is None:
            return
        self._apply(self.relay.drain())
        self.refresh_view()

    def on_training_ended(self, message: TrainingEnded) -> None:
        if message.run_id != self.run_id:
            return
        if self.relay is not None:
            self._apply(self.relay.drain())
        if message.error:
            if self.state.status != "failed":  # not already told by its FailedEvent
                self.notify(message.error, title="Training did not start", severity="error", timeout=20)
            self.log_view.add(f"error: {message.error}")
            if self.state.status in ("starting", "running", "pausing", "paused", "stopping"):
                self.state.status = "failed"
        self._set_mode("setup")
        self.form.refresh_models()
        self.form.new_name()
        callbacks, self._after_run = self._after_run, []
        for callback in callbacks:
            callback()

    def worker_failed(self, worker: Worker, error: str) -> None:
        """The run could not start or failed: shown in the app, which keeps running."""
        if worker.group == "train":
            self.post_message(TrainingEnded(self.run_id, error))
        else:
            super().worker_failed(worker, error)

    def action_pause(self) -> None:
        if self.control is not None and self.run_active:
            self.control.pause()
            self.state.status = "pausing"
            self.log_view.add("pausing after the current step…")
            self.refresh_view()

    def action_resume(self) -> None:
        if self.control is not None and self.run_active:
            self.control.resume()
            self.state.status = "running"
            self.refresh_view()

    def action_save_now(self) -> None:
        if self.control is not None and self.run_active:
            self.control.save_now()
            self.log_view.add("saving after the current step…")

    def action_stop(self) -> None:
        self.stop_run()

    def stop_run(self, then: Callable[[], object] | None = None) -> None:
        """Stop after the current step; the trainer saves, then its thread ends and `then` runs."""
        if not self.run_active or self.control is None:
            if then is not None:
                then()
            return
        if then is not None:
            self._after_run.append(then)
        if self.state.status != "stopping":
            self.control.stop()
            self.state.status = "stopping"
            self.log_view.add("stopping after the current step (it saves first)…")
            self.refresh_view()

    def describe_run(self) -> str:
        s = self.state
        where = f"step {s.step:,}/{s.total_steps:,}" if s.total_steps else "starting"
        return f"{s.name!r} is at {where}" + (f", last saved at step {s.saved_step}" if s.saved_step else "")

    def action_prompt(self) -> None:
        """Open the run's checkpoint in the Prompt mode (the same loader as `gpt2term --checkpoint NAME`)."""
        name = self.state.checkpoint
        if not name or not self.store.exists(name):
            self.notify("This run has not saved a checkpoint yet.", severity="warning")
            return
        self.app.open_in_prompt(name)

    # ------------------------------------------------------------------ following a run written elsewhere

    def follow_candidates(self, rows: list[CheckpointInfo]) -> list[FollowCandidate]:
        now = time.time()
        candidates = []
        for row in rows:
            metrics = self.store.metrics_path(row.name)
            try:
                age = now - metrics.stat().st_mtime
            except OSError:
                continue
            holder = self.store.lock_holder(row.name)
            candidates.append(FollowCandidate(row.name, describe_writer(holder), max(0.0, age)))
        candidates.sort(key=lambda c: (c.writer is None, c.last_event_age_s or 0.0))
        return candidates

    def action_follow(self) -> None:
        """Ask which run to follow, once a worker has read the store (listing it may repair a crashed save)."""
        if self.mode == "setup":
            self._list_store()

    @work(thread=True, exclusive=True, exit_on_error=False, group="list")
    def _list_store(self) -> None:
        self.post_message(StoreListed(self.store.list()))

    def on_store_listed(self, message: StoreListed) -> None:
        if self.mode != "setup" or isinstance(self.app.screen, FollowScreen):
            return

        def chosen(name: str | None) -> None:
            if name:
                self.follow(name)

        self.app.push_screen(FollowScreen(self.follow_candidates(message.rows)), chosen)

    def follow(self, name: str) -> None:
        """Show the run of checkpoint `name` from its metrics.jsonl, and keep reading it as it grows."""
        if self.run_active:
            self.notify("A run is training here: stop it before following another.", severity="warning")
            return
        self.stop_following()
        self.following = name
        self.follower = MetricsFollower(self.store.metrics_path(name))
        self.state = RunState(name=name, status="following")
        self.log_view.reset()
        self.log_view.add(f"following {name!r}: {self.store.metrics_path(name)}")
        self._set_mode("following")
        self.poll_follow()
        self._follow_timer = self.set_interval(FOLLOW_INTERVAL_S, self.poll_follow)

    def poll_follow(self) -> None:
        """Read what the writer appended since the last poll (and notice whether it still holds the lock)."""
        if self.follower is None or self.following is None:
            return
        started = time.monotonic()
        events: list[TrainingEvent] = []
        while True:
            update = self.follower.poll()
            if update.reset:
                events.clear()
                self.state = RunState(name=self.following, status="following")
                self.log_view.add("the file was replaced by another run's: starting over")
            events += [e for e in map(event_from_dict, update.records) if e is not None]
            if not update.more or time.monotonic() - started > FOLLOW_BUDGET_S:
                break
        writer = describe_writer(self.store.lock_holder(self.following))
        if not events and writer == self._writer:
            return
        self._writer = writer
        self._apply(events)
        self.refresh_view()

    def stop_following(self) -> None:
        if self._follow_timer is not None:
            self._follow_timer.stop()
            self._follow_timer = None
        if self.follower is not None:
            self.follower.close()
            self.follower = None
        self.following = None
        self._writer = None

    def action_unfollow(self) -> None:
        if self.mode == "following":
            name = self.following
            self.stop_following()
            self.log_view.add(f"stopped following {name!r}")
            self._set_mode("setup")

    def action_data(self) -> None:
        """The form's corpus as the run would cut it (whatever the Name; the data does not depend on it)."""
        from gpt2term.tui.screens.data_view import DataView

        try:
            settings = self.form.read(check_name=False)
        except Gpt2termError as exc:
            self.notify(str(exc), title="Cannot show the data", severity="error", timeout=10)
            return
        self.app.push_screen(DataView(settings))
