"""The loss surface around a checkpoint (`core.surface`), from the checkpoints screen: a slice, a heat map, a path.

Tens of forward passes: computed in a thread worker with a progress bar and the estimate said up front; Esc stops
it between two points (the weights are restored, nothing is cached). The result is cached beside the weights, so
opening it again is instant.
"""

from __future__ import annotations

import threading
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.color import Color
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import ProgressBar, Static
from textual_plotext import PlotextPlot

from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.surface import SurfaceCancelled, SurfaceOptions, SurfaceProgress, SurfaceResult, loss_surface
from gpt2term.tui.keymap import key_display
from gpt2term.tui.screens.inspect import INSPECT_CSS, ComputedView

_LOW = Color.parse("#1d3b5a")  # the lowest loss of the grid
_HIGH = Color.parse("#e8872b")  # the highest

SURFACE_CSS = (
    INSPECT_CSS
    + """
#surface-plots { height: 1fr; }
#surface-line, #surface-path { width: 1fr; }
#surface-heat-box { width: 46; padding: 0 1; }
#surface-progress { height: 1; }
"""
)


def heat_cells(result: SurfaceResult) -> Text:
    """The grid as coloured cells holding their losses (top row beta +1; ◆ the checkpoint itself)."""
    values = [v for row in result.grid for v in row]
    lo, hi = min(values), max(values)
    text = Text()
    grid_alphas = result.grid_alphas
    for j in range(len(grid_alphas) - 1, -1, -1):
        text.append(f"β {grid_alphas[j]:+5.2f} ", style="dim")
        for i, value in enumerate(result.grid[j]):
            t = (value - lo) / ((hi - lo) or 1.0)
            colour = _LOW.blend(_HIGH, t)
            centre = grid_alphas[i] == 0 and grid_alphas[j] == 0
            label = f"◆{value:6.3f} " if centre else f" {value:6.3f} "
            ink = "#101010" if t > 0.6 else "#f0f0f0"
            text.append(label, style=f"{ink} on {colour.hex}" + (" bold" if centre else ""))
        text.append("\n")
    text.append(f"{'':8}α {grid_alphas[0]:g} … {grid_alphas[-1]:g}\n", style="dim")
    text.append(f"low {lo:.3f} ", style=f"#f0f0f0 on {_LOW.hex}")
    text.append(f" high {hi:.3f}", style=f"#101010 on {_HIGH.hex}")
    return text


class SurfaceView(ComputedView):
    """The validation loss around one checkpoint: along a random direction, over a plane, and from its start."""

    TITLE_ID = "surface-title"
    FAILURE = "The loss surface could not be computed"
    BUSY = "#surface-plots"
    DEFAULT_CSS = SURFACE_CSS

    class Progress(Message):
        def __init__(self, progress: SurfaceProgress) -> None:
            super().__init__()
            self.progress = progress

    def __init__(self, checkpoint: str, store: CheckpointStore | None = None, options: SurfaceOptions | None = None):
        super().__init__()
        self.checkpoint = checkpoint
        self.store = store or CheckpointStore()
        self.options = options or SurfaceOptions()
        self.cancel_event = threading.Event()
        self.result: SurfaceResult | None = None
        self.computing = False
        self.cancelled = False
        self.done = 0  # points evaluated so far

    def compose(self) -> ComposeResult:
        with Vertical(classes="inspect-dialog"):
            yield Static(
                f"Loss surface of {self.checkpoint}: reading the cache…",
                id="surface-title",
                classes="inspect-title",
                markup=False,
            )
            yield Static(id="surface-estimate", classes="inspect-note", markup=False)
            yield ProgressBar(id="surface-progress", show_eta=True)
            with Horizontal(id="surface-plots"):
                yield PlotextPlot(id="surface-line")
                with Vertical(id="surface-heat-box"):
                    yield Static("2D grid: blue low, orange high", classes="inspect-title", markup=False)
                    yield Static(id="surface-heat", markup=False)
                yield PlotextPlot(id="surface-path")
            yield Static(id="surface-summary", markup=False)
            yield Static(id="surface-note", classes="inspect-note", markup=False)

    def compute(self) -> None:
        """No spinner: the progress bar and the estimate say what is computed and for how long."""
        self.computing = True
        self.query_one("#surface-estimate", Static).update(
            f"{self.options.plan()} ({self.options.evaluations} evaluations); timing the first point…"
        )
        self.query_one("#surface-note", Static).update(f"{key_display(self.app, 'dialog.cancel')} stops.")
        self._compute()

    def calculate(self) -> SurfaceResult | None:
        def progress(p: SurfaceProgress) -> None:
            self.post_message(self.Progress(p))

        try:
            return loss_surface(self.checkpoint, self.options, self.store, progress=progress, cancel=self.cancel_event)
        except SurfaceCancelled:
            return None

    def on_surface_view_progress(self, message: Progress) -> None:
        p = message.progress
        self.done = p.done
        self.query_one("#surface-title", Static).update(
            f"Loss surface of {self.checkpoint}: computing the {p.stage} ({p.done}/{p.total} points)"
        )
        self.query_one(ProgressBar).update(total=p.total, progress=p.done)
        if p.estimate_s is not None:
            self.query_one("#surface-estimate", Static).update(
                f"about {p.estimate_s:.0f} s: {self.options.plan()} ({p.total} evaluations)"
            )

    def show(self, result: Any) -> None:
        self.computing = False
        if result is None:
            self.cancelled = True
            self.query_one("#surface-title", Static).update(
                f"Loss surface of {self.checkpoint}: stopped; the weights are as they were and nothing was cached"
            )
            self.query_one("#surface-note", Static).update(f"{key_display(self.app, 'dialog.cancel')} back.")
            return
        self.result = result
        how = "from the cache" if result.from_cache else f"{result.evaluations} evaluations, {result.seconds:.0f} s"
        self.query_one("#surface-title", Static).update(
            f"Loss surface of {self.checkpoint}: centre loss {result.center_loss:.4f} ({how})"
        )
        self.query_one("#surface-estimate", Static).update(
            f"validation loss on {result.tokens:,} tokens; directions filter-normalised per row (Li et al., 2018), "
            f"seed {result.options.get('seed')}; biases and LayerNorm not moved"
        )
        self._plot("#surface-line", result.line, "1D slice (α 0: the checkpoint)", "α")
        self._plot("#surface-path", result.path, "path: start (0) → checkpoint (1)", "α")
        self.query_one("#surface-heat", Static).update(heat_cells(result))
        self.query_one("#surface-heat-box").styles.width = 12 + 8 * len(result.grid_alphas)
        self.query_one(ProgressBar).display = False
        shape, why = result.path_shape()
        self.query_one("#surface-summary", Static).update(
            Text.assemble((f"{shape}: ", "bold"), f"from {result.path_from}, {why}")
        )
        notes = " ".join(f"note: {n}" for n in result.notices)
        self.query_one("#surface-note", Static).update(
            f"{notes} Middle: the grid over two directions (the slice is its β 0 direction). "
            f"{key_display(self.app, 'dialog.cancel')} back.".strip()
        )

    def _plot(self, selector: str, points: list[dict[str, float]], title: str, xlabel: str) -> None:
        plot = self.query_one(selector, PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(title)
        plt.plot([p["alpha"] for p in points], [p["loss"] for p in points], marker="braille", color="orange")
        plt.xlabel(xlabel)
        plot.refresh()

    def action_cancel(self) -> None:
        """Esc while computing stops between two points; otherwise it closes the view."""
        if self.computing:
            self.cancel_event.set()
            self.query_one("#surface-title", Static).update(f"Loss surface of {self.checkpoint}: stopping…")
            return
        super().action_cancel()

    def on_unmount(self) -> None:
        self.cancel_event.set()  # closed some other way (the app quits): the worker stops at the next point
