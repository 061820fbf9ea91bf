"""The learning rate of each step: appendix D's warmup and cosine decay, a linear decay, or the book's chapter 5
constant rate."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from gpt2term.core.recipes import SCHEDULES

__all__ = ["SCHEDULES", "Schedule", "default_warmup", "learning_rate"]


def learning_rate(
    step: int, peak: float, warmup_steps: int, total_steps: int, min_ratio: float, kind: str = "cosine"
) -> float:
    """Linear warmup to `peak`, then (`kind`) cosine or linear decay to `peak * min_ratio` at `total_steps`, or
    `peak` held (constant, as chapter 5 trains). No warmup when `warmup_steps` is 0.

    A pure function of the step: resuming needs no scheduler object, only the step and the settings.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if kind == "constant":
        return peak
    min_lr = peak * min_ratio
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "linear":
        return peak - (peak - min_lr) * progress
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def default_warmup(total_steps: int) -> int:
    """`--warmup-steps` when not given: a tenth of the run, at most 100 steps."""
    return min(100, total_steps // 10)


@dataclass(frozen=True)
class Schedule:
    """One run's schedule, fixed at its start; `to_dict()` is what each checkpoint records of it."""

    lr: float
    min_lr_ratio: float
    warmup_steps: int
    total_steps: int
    kind: str = "cosine"

    def at(self, step: int) -> float:
        return learning_rate(step, self.lr, self.warmup_steps, self.total_steps, self.min_lr_ratio, self.kind)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
