"""The CLI's live progress bars (`rich.progress`, on stderr), used only when stderr is a terminal.

Lines printed while a bar is live go through `print`, above the bar, so the bar stays whole at the bottom.
Core never imports rich: the trainer and `evaluate_ids` report plain numbers, and this turns them into bars.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class LiveBar:
    """One rich progress bar on stderr: `update` moves it, `print` writes a line above it, `close` leaves it."""

    def __init__(self, label: str, total: int, *columns) -> None:
        self.progress = Progress(
            TextColumn(label),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            *columns,
            console=Console(stderr=True, highlight=False, emoji=False),
            refresh_per_second=4,
        )
        self.task = self.progress.add_task(label, total=total, info="")
        self.progress.start()

    def update(self, completed: int, total: int | None = None, **fields) -> None:
        self.progress.update(self.task, completed=completed, total=total, **fields)

    def print(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False, emoji=False)

    def close(self) -> None:
        self.progress.stop()


def training_bar(total_steps: int) -> LiveBar:
    """step/total, then the trainer's own figures (loss, val loss, lr, tokens/s, elapsed, ETA) as one text."""
    return LiveBar("step", total_steps, TextColumn("{task.fields[info]}"))


class EvaluationBar(LiveBar):
    """batches done/total, tokens/s and the time left, from `evaluate_ids`'s progress calls."""

    def __init__(self) -> None:
        super().__init__(
            "evaluating",
            0,
            TextColumn("batches  {task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("elapsed, ETA"),
            TimeRemainingColumn(),
        )
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int, tokens: int) -> None:
        seconds = time.perf_counter() - self.started
        speed = f"{tokens / seconds:,.0f} tokens/s" if seconds > 0 else ""
        self.update(done, total, info=f"{tokens:,} tokens  {speed}")


class SurfaceBar(LiveBar):
    """points done/total of a loss surface, the part being measured, and the time left."""

    def __init__(self, total: int) -> None:
        super().__init__(
            "loss surface",
            total,
            TextColumn("points  {task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("elapsed, ETA"),
            TimeRemainingColumn(),
        )

    def __call__(self, progress) -> None:  # a core.surface.SurfaceProgress
        self.update(progress.done, progress.total, info=progress.stage)
