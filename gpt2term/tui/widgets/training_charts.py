"""Charts of a training run: one-line sparklines with their latest value, and a loss plot with axes (plotext).

Both take a `Series` (values against steps). Long runs are averaged down to what the widget can show before
drawing, so a 100,000-step run costs the same to draw as a 500-step one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Sparkline, Static
from textual_plotext import PlotextPlot

from gpt2term.tui.run_state import Series

PLOT_INTERVAL_S = 0.5  # the loss plot redraws at most twice a second, however fast the steps come


def downsample(xs: Sequence[float], ys: Sequence[float], points: int) -> tuple[list[float], list[float]]:
    """At most `points` points: the mean of each of `points` equal runs of the data (the shape, not the noise)."""
    n = len(ys)
    if n <= points:
        return list(xs), list(ys)
    out_x, out_y = [], []
    for i in range(points):
        lo, hi = i * n // points, (i + 1) * n // points
        if hi > lo:
            out_x.append(sum(xs[lo:hi]) / (hi - lo))
            out_y.append(sum(ys[lo:hi]) / (hi - lo))
    return out_x, out_y


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class MetricSparkline(Horizontal):
    """`label  value  ▇▆▅▄▃▂▂▁`: a metric's latest value and its whole history in one line."""

    DEFAULT_CSS = """
    MetricSparkline { height: 1; }
    MetricSparkline > .metric-label { width: 10; color: $text-muted; }
    MetricSparkline > .metric-value { width: 9; text-align: right; margin-right: 1; }
    MetricSparkline > Sparkline { width: 1fr; }
    """

    def __init__(self, label: str, fmt: Callable[[float], str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.label = label
        self.fmt = fmt
        self.values: list[float] = []  # what the sparkline shows (averaged down to its width)

    def compose(self) -> ComposeResult:
        yield Static(self.label, classes="metric-label", markup=False)
        yield Static("-", classes="metric-value", markup=False)
        yield Sparkline([], summary_function=_mean)

    def show(self, series: Series) -> None:
        width = max(8, self.query_one(Sparkline).size.width or 40)
        _, values = downsample(series.steps, series.values, width * 4)
        self.values = values
        self.query_one(Sparkline).data = values
        self.query_one(".metric-value", Static).update("-" if series.last is None else self.fmt(series.last))


def format_loss(value: float) -> str:
    return f"{value:.3f}"


def format_perplexity(value: float) -> str:
    return f"{value:,.1f}" if value < 1e5 else f"{value:.2g}"


def format_lr(value: float) -> str:
    return f"{value:.2e}"


def format_rate(value: float) -> str:
    return f"{value:,.0f}"


class LossPlot(PlotextPlot):
    """Training and validation loss against steps, with axes; redrawn at most every `PLOT_INTERVAL_S` seconds."""

    def __init__(self, title: str = "loss", **kwargs) -> None:
        super().__init__(**kwargs)
        self.title = title
        self.train = Series()
        self.val = Series()
        self._drawn_at = -math.inf
        self._timer = None
        self.draws = 0

    def on_mount(self) -> None:
        super().on_mount()
        self._draw()

    def show(self, train: Series, val: Series) -> None:
        """Plot these (latest) series; drawing waits if the last drawing was less than `PLOT_INTERVAL_S` ago."""
        self.train, self.val = train, val
        wait = self._drawn_at + PLOT_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self._draw()
        elif self._timer is None:
            self._timer = self.set_timer(wait, self._draw)

    def _draw(self) -> None:
        self._timer = None
        self._drawn_at = time.monotonic()
        self.draws += 1
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self.title)
        points = max(20, 2 * (self.size.width or 60))
        if self.train:
            xs, ys = downsample(self.train.steps, self.train.values, points)
            plt.plot(xs, ys, label="train", marker="braille", color="cyan")
        if self.val:
            xs, ys = downsample(self.val.steps, self.val.values, points)
            plt.plot(xs, ys, label="val", marker="braille" if len(xs) > 1 else "hd", color="orange")
        if not self.train and not self.val:
            plt.title(f"{self.title}: no data yet")
        plt.xlabel("step")
        self.refresh()
