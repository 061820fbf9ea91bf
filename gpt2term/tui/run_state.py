"""What the train screen shows about a run, built from the trainer's events (live) or from metrics.jsonl (followed).

`RunState.apply(event)` is the only place that turns events into numbers on screen, so a run trained here and a
run followed from its file look the same. `EventRelay` carries events from the trainer's thread to the UI without
flooding it: however fast the loop, at most one message is waiting in the UI's queue; it fetches every event
that arrived meanwhile in one go (none is dropped, so the curves are complete).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from gpt2term.core.training import (
    CheckpointEvent,
    EvalEvent,
    FailedEvent,
    FinishedEvent,
    PauseEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    TrainingEvent,
    WarningEvent,
)
from gpt2term.formatting import format_count

MAX_VALUE = 1e300  # beyond it (1e308) the sums of downsampling and plotting overflow


@dataclass
class Series:
    """Values against steps. A step seen again (a run resumed from an earlier save) replaces what followed it."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        """Values that cannot be drawn (non-finite, huge, not numbers, at an impossible step) are left out."""
        try:
            if not (math.isfinite(value) and abs(value) <= MAX_VALUE and 0 <= step < 2**63):
                return
            step, value = int(step), float(value)
        except (TypeError, ValueError, OverflowError):
            return
        if self.steps and step <= self.steps[-1]:
            keep = next((i for i, s in enumerate(self.steps) if s >= step), len(self.steps))
            del self.steps[keep:], self.values[keep:]
        self.steps.append(step)
        self.values.append(value)

    @property
    def last(self) -> float | None:
        return self.values[-1] if self.values else None

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class RunState:
    """Everything the live panels show; `apply` returns the lines the event log should get for that event."""

    name: str = ""
    status: str = "idle"  # idle, starting, running, pausing, paused, stopping, completed, stopped, interrupted, failed
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    tokens_seen: int = 0
    tokens_per_second: float | None = None
    eta_s: float | None = None
    elapsed_s: float = 0.0
    parameters: int | None = None
    device: str = ""
    dtype: str = ""
    corpus: str = ""
    source: str = ""
    train_loss: Series = field(default_factory=Series)  # every step's loss
    eval_train_loss: Series = field(default_factory=Series)
    val_loss: Series = field(default_factory=Series)
    val_perplexity: Series = field(default_factory=Series)
    lr: Series = field(default_factory=Series)
    tokens_per_s: Series = field(default_factory=Series)
    best_val: tuple[float, int] | None = None  # (loss, step)
    sample: SampleEvent | None = None
    warning: str | None = None
    saved_step: int | None = None
    checkpoint: str | None = None  # the name the run saves to
    message: str = ""  # the finished / failed message
    events: int = 0

    @property
    def active(self) -> bool:
        return self.status in ("starting", "running", "pausing", "paused", "stopping")

    @property
    def progress(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    def apply(self, event: TrainingEvent) -> list[str]:
        self.events += 1
        if isinstance(event, StepEvent):
            if self.status in ("starting", "idle"):
                self.status = "running"
            self.step, self.total_steps, self.epoch = event.step, event.total_steps, event.epoch
            self.tokens_seen, self.eta_s, self.elapsed_s = event.tokens_seen, event.eta_s, event.elapsed_s
            self.tokens_per_second = event.tokens_per_second
            self.train_loss.add(event.step, event.loss)
            self.lr.add(event.step, event.lr)
            self.tokens_per_s.add(event.step, event.tokens_per_second)
            return []
        if isinstance(event, StartEvent):
            if not event.resumed:  # a new history (a run started over under the same name)
                fresh = RunState(status=self.status)
                self.__dict__.update(fresh.__dict__)
            self.name = self.checkpoint = event.name
            self.status = "running"
            self.step, self.total_steps, self.epoch = event.step, event.total_steps, event.epoch
            self.parameters, self.device, self.dtype = event.parameters, event.device, event.dtype
            self.corpus, self.source = event.corpus, event.source
            how = "resumed at step " + str(event.step) if event.resumed else event.source
            return [
                f"start {event.name!r}: {format_count(event.parameters)} parameters, {how}; {event.corpus} "
                f"({format_count(event.train_tokens)} training tokens, {format_count(event.val_tokens)} validation); "
                f"{event.total_steps} steps of {event.tokens_per_step:,} tokens on {event.device} {event.dtype}"
                + (f" x{event.world_size} processes" if event.world_size > 1 else "")
            ]
        if isinstance(event, EvalEvent):
            self.eval_train_loss.add(event.step, event.train_loss)
            self.val_loss.add(event.step, event.val_loss)
            self.val_perplexity.add(event.step, event.val_perplexity)
            if self.best_val is None or event.val_loss < self.best_val[0]:
                self.best_val = (event.val_loss, event.step)
            return [
                f"eval at step {event.step}: train loss {event.train_loss:.3f}, val loss {event.val_loss:.3f} "
                f"(perplexity {event.val_perplexity:,.1f})"
            ]
        if isinstance(event, SampleEvent):
            self.sample = event
            return [f"sample at step {event.step}: {(event.prompt + event.text)!r}"]
        if isinstance(event, CheckpointEvent):
            self.saved_step, self.checkpoint = event.step, event.name
            return [f"saved {event.name!r} at step {event.step} ({event.reason})"]
        if isinstance(event, WarningEvent):
            if event.kind == "overfitting":
                self.warning = event.message
            return [f"warning ({event.kind}): {event.message}"]
        if isinstance(event, PauseEvent):
            if event.paused:
                self.status = "paused"
            elif self.status in ("paused", "pausing"):
                self.status = "running"
            return [f"{'paused' if event.paused else 'resumed'} at step {event.step}"]
        if isinstance(event, FinishedEvent):
            self.status = event.status
            self.step, self.total_steps, self.tokens_seen = event.step, event.total_steps, event.tokens_seen
            self.eta_s = None
            self.message = event.message
            if event.checkpoint:
                self.checkpoint = event.checkpoint
            return [event.message]
        if isinstance(event, FailedEvent):
            self.status = "failed"
            self.eta_s = None
            self.message = event.message
            return [f"failed ({event.kind}): {event.message}"]
        return []

    def summary(self) -> str:
        """One line: where the run is. Shown above the progress bar."""
        if self.status == "idle":
            return "no run yet: fill in the form (or keep its defaults) and start"
        parts = [f"step {self.step:,}/{self.total_steps:,}" if self.total_steps else f"step {self.step:,}"]
        if self.epoch:
            parts.append(f"epoch {self.epoch}")
        parts.append(f"{format_count(self.tokens_seen)} tokens")
        if self.best_val is not None:
            parts.append(f"best val {self.best_val[0]:.3f} @{self.best_val[1]}")
        if self.tokens_per_second:
            parts.append(f"{format_count(self.tokens_per_second)} tok/s")
        return " · ".join(parts)


class EventRelay:
    """A trainer listener (called on the training thread) that hands events to the UI thread in batches.

    It posts a message only when none is waiting: `notify()` is the screen's `post_message` wrapped, `drain()` is
    called by the message's handler and returns every event since the last drain, in order.
    """

    def __init__(self, notify: Callable[[], object]) -> None:
        self._notify = notify
        self._lock = threading.Lock()
        self._pending: list[TrainingEvent] = []
        self._posted = False
        self.posts = 0  # messages posted so far (fewer than events when the loop is fast)

    def __call__(self, event: TrainingEvent) -> None:
        with self._lock:
            self._pending.append(event)
            if self._posted:
                return
            self._posted = True
            self.posts += 1
        self._notify()

    def drain(self) -> list[TrainingEvent]:
        with self._lock:
            events, self._pending = self._pending, []
            self._posted = False
        return events
