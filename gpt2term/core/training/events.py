"""What a run reports: plain event objects handed to listeners and appended, one JSON line each, to the
checkpoint's metrics.jsonl, so the CLI, the TUI and a process following the file all see the same run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar


@dataclass(kw_only=True)
class TrainingEvent:
    """Base of every event: `to_dict()` is the JSON line written to metrics.jsonl (with its `type`)."""

    type: ClassVar[str] = "event"
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


@dataclass
class StartEvent(TrainingEvent):
    type: ClassVar[str] = "start"
    name: str
    step: int
    total_steps: int
    epoch: int
    resumed: bool
    source: str
    parameters: int
    config: dict[str, Any]
    device: str
    dtype: str
    world_size: int
    corpus: str
    train_tokens: int
    val_tokens: int
    tokens_per_step: int
    steps_per_epoch: float
    settings: dict[str, Any]


@dataclass
class StepEvent(TrainingEvent):
    type: ClassVar[str] = "step"
    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    tokens_seen: int
    tokens_per_second: float
    elapsed_s: float
    eta_s: float | None


@dataclass
class EvalEvent(TrainingEvent):
    type: ClassVar[str] = "eval"
    step: int
    epoch: int
    tokens_seen: int
    train_loss: float
    val_loss: float
    train_perplexity: float
    val_perplexity: float


@dataclass
class SampleEvent(TrainingEvent):
    type: ClassVar[str] = "sample"
    step: int
    prompt: str
    text: str


@dataclass
class CheckpointEvent(TrainingEvent):
    type: ClassVar[str] = "checkpoint"
    step: int
    name: str
    path: str
    reason: str  # periodic, requested, final, stopped, interrupted


@dataclass
class WarningEvent(TrainingEvent):
    type: ClassVar[str] = "warning"
    step: int
    kind: str  # overfitting, small-corpus, corpus-changed, ...
    message: str


@dataclass
class PauseEvent(TrainingEvent):
    type: ClassVar[str] = "pause"
    step: int
    paused: bool


@dataclass
class FinishedEvent(TrainingEvent):
    """The last event of a run that ended normally; also what `Trainer.run()` returns."""

    type: ClassVar[str] = "finished"
    step: int
    total_steps: int
    epoch: int
    tokens_seen: int
    status: str  # completed, stopped, interrupted
    train_loss: float | None
    val_loss: float | None
    elapsed_s: float
    checkpoint: str | None  # the name saved to, None when nothing needed saving
    message: str


@dataclass
class FailedEvent(TrainingEvent):
    type: ClassVar[str] = "failed"
    step: int
    kind: str  # diverged, error, interrupted
    message: str
    last_good_step: int | None  # the step of the checkpoint left on disk, if any


Listener = Callable[[TrainingEvent], None]

EVENT_TYPES: dict[str, type[TrainingEvent]] = {
    cls.type: cls
    for cls in (
        StartEvent,
        StepEvent,
        EvalEvent,
        SampleEvent,
        CheckpointEvent,
        WarningEvent,
        PauseEvent,
        FinishedEvent,
        FailedEvent,
    )
}


def event_from_dict(record: dict[str, Any]) -> TrainingEvent | None:
    """The event a metrics.jsonl line was written from, so a process following the file sees what a listener saw.

    None for a line this version cannot read (an unknown type, a missing field): a follower skips it.
    Unknown extra keys are ignored, so lines from newer writers still load.
    """
    cls = EVENT_TYPES.get(str(record.get("type")))
    if cls is None:
        return None
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in record.items() if k in names})
    except TypeError:
        return None
