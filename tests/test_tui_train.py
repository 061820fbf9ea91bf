"""Pilot tests of the train screen: a real (very small) run started from the form, driven by its keys.

Waits are on the trainer's own events (a listener with a condition variable) and then on the UI handling the
message that carried them; following a file written elsewhere waits on the screen's poll timer (bounded).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import shutil
import threading
from collections.abc import Callable

import pytest
import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.training import (
    FIXED_ON_RESUME,
    CheckpointEvent,
    EvalEvent,
    FinishedEvent,
    PauseEvent,
    StartEvent,
    StepEvent,
    Trainer,
    TrainingEvent,
    TrainingSettings,
    WarningEvent,
)
from gpt2term.tui.app import make_app
from gpt2term.tui.dialogs import ConfirmScreen, FollowScreen, LeaveRunScreen
from gpt2term.tui.messages import TrainingEventsReady
from gpt2term.tui.run_state import EventRelay, RunState, Series
from gpt2term.tui.screens import train as train_screen
from gpt2term.tui.screens.checkpoints import CheckpointsScreen
from gpt2term.tui.screens.train import TrainScreen
from gpt2term.tui.widgets import train_form
from gpt2term.tui.widgets.train_form import DEFAULT_STEPS
from gpt2term.tui.widgets.training_charts import MetricSparkline
from tests.pilot_helpers import screen_text

SMALL = {"n_layers": "1", "emb_dim": "32", "n_heads": "2", "context_length": "16", "batch_size": "4"}


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = ["The quick brown fox jumps over the lazy dog.", "Every effort moves you forward, one step at a time."]
    path.write_text("\n".join(lines * 30))
    return path


def small_app():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(emb_dim=32, n_heads=2, n_layers=1, context_length=16))
    return make_app(model=model, model_name="small", keymap={})


class Recorder:
    """A trainer listener: the test thread waits on it for the events the trainer emits, in order."""

    def __init__(self) -> None:
        self.events: list[TrainingEvent] = []
        self.cond = threading.Condition()

    def __call__(self, event: TrainingEvent) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    async def until(self, predicate: Callable[[list[TrainingEvent]], bool], what: str) -> None:
        def wait() -> bool:
            with self.cond:
                return self.cond.wait_for(lambda: predicate(self.events), timeout=120)

        assert await asyncio.to_thread(wait), f"the trainer never emitted: {what}"

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


async def settle(pilot, condition: Callable[[], bool], what: str, delay: float = 0) -> None:
    """Let the UI handle what is already posted (or, with `delay`, what its timers will do) until `condition`."""
    for _ in range(200):
        if condition():
            return
        await pilot.pause(delay)
    raise AssertionError(f"the screen never showed: {what}")


async def open_train(pilot) -> TrainScreen:
    await pilot.press("f3")
    screen = pilot.app.screen
    assert isinstance(screen, TrainScreen)
    return screen


def fill(screen: TrainScreen, **values: str) -> None:
    """Type into the form's fields (by id), as a user would."""
    for field_id, value in values.items():
        screen.form.query_one(f"#{field_id}").value = value


async def start(pilot, screen: TrainScreen) -> Recorder:
    """Press the start key; the returned recorder gets every event of the run it started."""
    recorder = Recorder()
    screen.listeners = [recorder]
    await pilot.press("f5")
    assert screen.trainer is not None, [n.message for n in pilot.app._notifications]
    return recorder


def test_the_relay_posts_one_message_however_many_events_wait_and_loses_none():
    posted = []
    relay = EventRelay(lambda: posted.append(1))
    for n in range(1, 1001):  # a fast loop while the UI is busy elsewhere
        relay(step_event(n))
    assert len(posted) == 1
    assert [e.step for e in relay.drain()] == list(range(1, 1001))
    relay(step_event(1001))
    assert len(posted) == 2 and [e.step for e in relay.drain()] == [1001]
    assert TrainingEventsReady(1).can_replace(TrainingEventsReady(1))
    assert not TrainingEventsReady(2).can_replace(TrainingEventsReady(1))


def test_a_resumed_run_replaces_the_steps_it_redoes_and_a_new_run_under_the_same_name_starts_over():
    series = Series()
    for step, value in ((1, 5.0), (2, 4.0), (3, 3.0), (2, 3.5), (3, 3.2)):  # resumed from its save at step 1
        series.add(step, value)
    assert (series.steps, series.values) == ([1, 2, 3], [5.0, 3.5, 3.2])
    state = RunState()
    for event in (start_event("a"), step_event(1), step_event(2), start_event("a"), step_event(1)):
        state.apply(event)
    assert state.train_loss.steps == [1] and state.step == 1 and state.name == "a"


def test_one_key_starts_the_tiny_preset_on_pydoc_and_the_form_explains_bad_values():
    async def scenario() -> None:
        app = small_app()
        async with app.run_test(size=(100, 32)) as pilot:
            screen = await open_train(pilot)
            settings = screen.form.read()  # what F5 starts without touching the form
            assert (settings.preset, settings.corpus, settings.max_steps, settings.model) == (
                "tiny", ["pydoc"], DEFAULT_STEPS, {})  # fmt: skip
            assert (settings.context_length, settings.eval_interval, settings.name) == (128, 25, "tiny-pydoc")
            hint = str(screen.query_one("#run-help").render())
            assert "f5 starts a new tiny model (28.9M parameters) on pydoc, 300 steps" in hint
            fill(screen, max_steps="", epochs="2", n_layers="2")
            await pilot.pause()
            hint = str(screen.query_one("#run-help").render())
            assert "f5 starts a new tiny model (27.3M parameters) on pydoc, 2 epoch(s)" in hint
            fill(screen, max_steps="300", epochs="", n_layers="4")
            fill(screen, batch_size="eight")
            await pilot.press("f5")
            assert not screen.run_active
            assert any("Batch size 'eight' is not a whole number" in n.message for n in app._notifications)
            fill(screen, batch_size="8", emb_dim="30")
            await pilot.press("f5")
            assert not screen.run_active
            assert any("emb_dim 30 is not divisible by n_heads 4" in n.message for n in app._notifications)

    asyncio.run(scenario())


def test_a_run_from_the_screen_pauses_resumes_saves_stops_and_lands_in_the_checkpoints_table(corpus_file):
    store = CheckpointStore()

    async def scenario() -> None:
        app = small_app()
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await open_train(pilot)
            fill(screen, corpus=str(corpus_file), name="live", max_steps="100000", eval_interval="3", **SMALL)
            recorder = await start(pilot, screen)

            # Live: the sparklines get data, the step count rises.
            # The first evaluation is the untrained model's (step 0); the sparklines fill once steps follow.
            await recorder.until(lambda ev: any(isinstance(e, EvalEvent) and e.step > 0 for e in ev), "an evaluation")
            await settle(pilot, lambda: len(screen.state.val_loss) > 1, "the validation loss")
            assert screen.state.val_loss.steps[:2] == [0, 3]
            assert screen.query_one("#spark-train-loss", MetricSparkline).values
            assert screen.query_one("#spark-val-loss", MetricSparkline).values
            assert screen.query_one("#spark-lr", MetricSparkline).values
            before = screen.state.step
            await recorder.until(lambda ev: ev[-1].__dict__.get("step", 0) > before + 2, "more steps")
            await settle(pilot, lambda: screen.state.step > before + 2, "a higher step count")
            assert f"step {screen.state.step:,}/100,000" in str(screen.query_one("#run-summary").render())

            # Pause: after the PauseEvent, the trainer takes no step (a save asked meanwhile is answered).
            await pilot.press("f6")
            await recorder.until(lambda ev: any(isinstance(e, PauseEvent) and e.paused for e in ev), "a pause")
            paused_at = recorder.of(PauseEvent)[0].step
            await pilot.press("f7")
            await recorder.until(lambda ev: any(isinstance(e, CheckpointEvent) for e in ev), "a save while paused")
            await settle(pilot, lambda: screen.state.saved_step == paused_at, "the save")
            assert screen.state.status == "paused" and screen.state.step == paused_at
            assert "live · paused" in screen.query_one("#run-view").border_title
            assert store.info("live").get("step") == paused_at

            # Leaving asks; "keep training" leaves it running. Deleting it under the run is refused, nothing lost.
            await pilot.press("f4")
            assert isinstance(app.screen, LeaveRunScreen)
            await pilot.press("n")
            checkpoints = app.screen
            assert isinstance(checkpoints, CheckpointsScreen) and screen.run_active
            await settle(pilot, lambda: checkpoints.listed, "the store listed", 0.05)  # read in a worker
            await pilot.press("d", "y")
            refused = lambda: any("being written" in n.message for n in app._notifications)  # noqa: E731
            await settle(pilot, refused, "the store's refusal", 0.05)
            assert store.exists("live")
            await pilot.press("f3")
            assert app.screen is screen

            # Resume: steps again, none of them between the pause and the resume.
            await pilot.press("f6")
            await recorder.until(lambda ev: any(getattr(e, "step", 0) > paused_at for e in ev[-3:]), "a new step")
            kinds = [type(e).__name__ for e in recorder.events[recorder.events.index(recorder.of(PauseEvent)[0]) :]]
            assert kinds[:4] == ["PauseEvent", "CheckpointEvent", "PauseEvent", "StepEvent"]
            assert [e.step for e in recorder.of(StepEvent) if e.step > paused_at][0] == paused_at + 1

            # Stop: it saves, the thread ends, the form comes back.
            await pilot.press("f8")
            await app.workers.wait_for_complete()
            await settle(pilot, lambda: not screen.run_active, "the run ended")
            finished = recorder.of(FinishedEvent)[0]
            assert finished.status == "stopped" and screen.state.step == finished.step > paused_at
            assert store.info("live").get("step") == finished.step
            assert screen.state.train_loss.steps == list(range(1, finished.step + 1))  # no step lost on the way
            assert not screen.has_class("busy") and screen.form.query_one("#name").value == "tiny-corpus"

            await pilot.press("f4")
            table = app.screen.table
            await settle(pilot, lambda: "live" in table.names, "the checkpoint in the table")
            step_cell = table.get_row("live")[2]
            assert str(step_cell) == f"{finished.step:,}"

    asyncio.run(scenario())


def test_quitting_during_a_run_asks_then_stops_it_and_saves_before_the_app_closes(corpus_file):
    store = CheckpointStore()

    async def scenario() -> Recorder:
        app = small_app()
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await open_train(pilot)
            fill(screen, corpus=str(corpus_file), name="quit-me", max_steps="100000", eval_interval="1000", **SMALL)
            recorder = await start(pilot, screen)
            await recorder.until(lambda ev: len(ev) >= 3, "a few steps")
            await pilot.press("f6")  # paused (the keys below then answer at once); a paused run stops as well
            await recorder.until(lambda ev: isinstance(ev[-1], PauseEvent), "the pause")
            await pilot.press("ctrl+q")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("escape")  # "no": it goes on
            assert screen.run_active and not isinstance(app.screen, ConfirmScreen)
            await pilot.press("ctrl+q", "y")
            await app.workers.wait_for_complete()
        assert app.return_code == 0
        return recorder

    recorder = asyncio.run(scenario())
    finished = recorder.of(FinishedEvent)[0]
    assert finished.status == "stopped" and finished.step == recorder.of(PauseEvent)[0].step
    assert store.info("quit-me").get("step") == finished.step == recorder.of(StepEvent)[-1].step


def test_resume_from_the_checkpoints_screen_continues_the_run(corpus_file):
    settings = TrainingSettings(
        name="first", corpus=[str(corpus_file)], model={"emb_dim": 32, "n_layers": 1, "n_heads": 2},
        context_length=16, batch_size=4, max_steps=4, eval_interval=2, eval_iters=1, save_interval=0,
        sample_tokens=2,
    )  # fmt: skip
    Trainer(settings).run()
    store = CheckpointStore()

    async def scenario() -> None:
        app = small_app()
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f4")
            await settle(pilot, lambda: app.screen.table.selected_name == "first", "the checkpoint selected")
            await pilot.press("t")
            screen = app.screen
            assert isinstance(screen, TrainScreen)
            form = screen.form
            await settle(pilot, lambda: form.choosing is None, "the store listed", 0.05)  # read in a worker
            assert str(form.query_one("#model").value) == "resume:first"
            assert form.query_one("#max_steps").value == "8"  # it did its 4 steps: as many again
            assert form.query_one("#corpus").disabled and form.query_one("#name").value == "first"
            disabled = {f for f, _, _ in train_form.FIELDS if form.query_one(f"#{f}").disabled}
            assert disabled == {*train_form.FIXED_ON_RESUME, "name"}  # what --resume keeps, and the name
            recorder = await start(pilot, screen)
            await app.workers.wait_for_complete()
            await settle(pilot, lambda: not screen.run_active, "the run ended")
            assert recorder.of(FinishedEvent)[0].status == "completed"
            assert [e.step for e in recorder.of(StepEvent)][0] == 5  # continued, not restarted
            assert screen.state.train_loss.steps[-1] == 8
            assert store.info("first").get("step") == 8

    asyncio.run(scenario())


def test_the_form_keeps_on_resume_exactly_what_the_core_keeps():
    settings = {f.name for f in dataclasses.fields(TrainingSettings)}
    for field_id, _, _ in train_form.FIELDS:
        setting = train_form.FIELD_SETTINGS.get(field_id, field_id)
        assert setting in settings, f"the field {field_id} edits no setting"
        assert (field_id in train_form.FIXED_ON_RESUME) == (setting in FIXED_ON_RESUME), field_id
    kept = {"corpus", *train_form.MODEL_FIELDS, "context_length", "batch_size", "seed"}
    assert set(train_form.FIXED_ON_RESUME) == kept


def start_event(name: str) -> StartEvent:
    return StartEvent(
        name=name, step=0, total_steps=20, epoch=1, resumed=False, source="trained from scratch", parameters=123456,
        config={}, device="cuda:0", dtype="bfloat16", world_size=4, corpus="big/", train_tokens=10**6,
        val_tokens=10**5, tokens_per_step=4096, steps_per_epoch=100.0, settings={},
    )  # fmt: skip


def step_event(n: int) -> StepEvent:
    return StepEvent(
        step=n, total_steps=20, epoch=1, loss=10.0 - 0.3 * n, lr=1e-3, grad_norm=1.0, tokens_seen=4096 * n,
        tokens_per_second=5000.0, elapsed_s=float(n), eta_s=float(20 - n),
    )  # fmt: skip


def eval_event(n: int, val_loss: float) -> EvalEvent:
    return EvalEvent(step=n, epoch=1, tokens_seen=4096 * n, train_loss=val_loss - 0.5, val_loss=val_loss,
                     train_perplexity=math.exp(val_loss - 0.5), val_perplexity=math.exp(val_loss))  # fmt: skip


def finished_event(n: int, name: str) -> FinishedEvent:
    return FinishedEvent(step=n, total_steps=20, epoch=1, tokens_seen=4096 * n, status="stopped", train_loss=None,
                         val_loss=None, elapsed_s=8.0, checkpoint=name, message=f"stopped at step {n}")  # fmt: skip


def test_following_a_run_that_another_writer_appends_to_metrics_jsonl():
    store = CheckpointStore()
    name = "remote"
    lock = store.lock(name).acquire()  # the writer holds the checkpoint, as a training run does
    try:
        store.append_metrics(name, start_event(name).to_dict())
        for n in range(1, 6):
            store.append_metrics(name, step_event(n).to_dict())

        async def scenario() -> None:
            app = small_app()
            async with app.run_test(size=(120, 40)) as pilot:
                screen = await open_train(pilot)
                await pilot.press("f9")
                await settle(pilot, lambda: isinstance(app.screen, FollowScreen), "the store listed", 0.05)
                picker = app.screen
                assert isinstance(picker, FollowScreen)
                assert [(c.name, f"process {os.getpid()}" in (c.writer or "")) for c in picker.candidates] == [
                    (name, True)
                ]
                await pilot.press("enter")
                assert screen.mode == "following" and screen.has_class("busy")  # the form is hidden
                assert screen.state.step == 5 and screen.state.train_loss.steps == [1, 2, 3, 4, 5]
                assert "following remote (read-only, written by process" in screen.query_one("#run-view").border_title
                assert "x4 processes" in screen.log_view.lines_written[1]
                assert screen.log_view.has_focus

                # New lines arrive: the poll timer reads only them.
                store.append_metrics(name, step_event(6).to_dict())
                store.append_metrics(name, eval_event(6, 8.5).to_dict())
                store.append_metrics(name, WarningEvent(step=6, kind="overfitting", message="val loss rose").to_dict())
                await settle(pilot, lambda: screen.state.step == 6 and screen.state.warning, "step 6", 0.05)
                assert screen.query_one("#spark-val-loss", MetricSparkline).values == [8.5]
                assert "⚠ overfitting: val loss rose" in str(screen.query_one("#run-warning").render())
                overfitting = lambda: any(n.title == "Overfitting" for n in app._notifications)  # noqa: E731
                await settle(pilot, overfitting, "the notification (the app adds it from a message)", 0.05)
                assert overfitting()

                # A save that copies the file (no hard links): a new file with the same start. Reopened, no repeats.
                path = store.metrics_path(name)
                shutil.copy2(path, path.with_name("copy"))
                with open(path.with_name("copy"), "a") as f:
                    f.write(json.dumps(step_event(7).to_dict()) + "\n")
                os.replace(path.with_name("copy"), path)
                await settle(pilot, lambda: screen.state.step == 7, "step 7 from the new file", 0.05)
                assert screen.follower is not None and screen.follower.reopened == 1
                # A real save by the store (the file carried over as a hard link), then the writer finishes.
                torch.manual_seed(0)
                store.save(name, GPTModel(GPTConfig(vocab_size=64, emb_dim=16, n_heads=2, n_layers=1)))
                store.append_metrics(name, step_event(8).to_dict())
                lock.release()
                store.append_metrics(name, finished_event(8, name).to_dict())
                await settle(pilot, lambda: screen.state.status == "stopped", "the end of the run", 0.05)
                assert screen.state.train_loss.steps == list(range(1, 9))
                assert "nobody writes it now" in screen.query_one("#run-view").border_title
                await pilot.press("escape")
                assert screen.mode == "setup" and not screen.has_class("busy") and screen.follower is None

        asyncio.run(scenario())
    finally:
        lock.release()


def test_the_screen_estimates_the_runs_whole_duration_from_its_first_steps():
    store = CheckpointStore()
    name = "timed"
    store.append_metrics(name, start_event(name).to_dict())
    for n in range(1, train_screen.ESTIMATE_AFTER_STEPS):  # one step short of an estimate
        store.append_metrics(name, step_event(n).to_dict())

    async def scenario() -> None:
        app = small_app()
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await open_train(pilot)
            app.open_train("follow", name)
            await settle(pilot, lambda: screen.state.step == train_screen.ESTIMATE_AFTER_STEPS - 1, "the steps", 0.05)
            assert screen.estimate is None and "in all" not in str(screen.query_one("#run-eta").render())
            # step n of 20 took n seconds: 5.0K tokens/s, 20 s in all
            store.append_metrics(name, step_event(train_screen.ESTIMATE_AFTER_STEPS).to_dict())
            await settle(pilot, lambda: screen.estimate is not None, "the estimate", 0.05)
            said = f"over the first {train_screen.ESTIMATE_AFTER_STEPS} steps: this run should take about 20s in all"
            assert "measured 5.0K tokens/s " + said in screen.log_view.lines_written[-1]
            assert "about 20s in all" in str(screen.query_one("#run-eta").render())
            assert "about 20s in all" in screen_text(app)  # on screen, not only in the widget

    asyncio.run(scenario())
