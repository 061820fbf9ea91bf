"""Side panel "Next-token probabilities": the alternatives the model weighed for one token, as bars.

It draws as many candidates as fit its height, so it stays readable from 80x24 to large terminals. It is redrawn
at every frame while tokens stream in, so it hands Textual finished lines (`render_line`, rendered once per token
by Rich) rather than a `Text` for Textual's slower general text pipeline, which would take the decoder's CPU.
"""

from __future__ import annotations

import math

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.text import Text
from textual.strip import Strip
from textual.widget import Widget

from gpt2term.core.generation import Step
from gpt2term.formatting import format_prob

_EIGHTHS = " ▏▎▍▌▋▊▉"
LOG_FLOOR = 1e-6  # bars are drawn on a log scale from 0.0001% (empty) to 100% (full); the panel says so


_ESCAPES = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})


def show_token(text: str) -> str:
    """A token as a learner should read it: quoted, so a leading space shows, with newlines and tabs escaped (a
    token holding part of a character already reads `\\xe2\\x80`)."""
    return f"'{text.translate(_ESCAPES)}'"


def tail_cells(text: str, cells: int) -> str:
    """The end of `text` that fits in `cells` terminal cells."""
    text = text[-cells:]
    while cell_len(text) > cells:
        text = text[1:]
    return text


def log_fraction(prob: float) -> float:
    """How much of a bar `prob` fills on the log scale: an untrained model's 0.002% tokens (1 in 50,257) still get
    a fifth of the bar, and the bars of two tokens differ where their probabilities differ by a factor."""
    if prob <= 0:
        return 0.0
    return max(0.0, min(1.0, 1 - math.log10(max(prob, LOG_FLOOR)) / math.log10(LOG_FLOOR)))


def bar(fraction: float, width: int) -> str:
    """A horizontal bar `width` cells wide at most, with eighth-cell precision."""
    cells = max(0.0, min(1.0, fraction)) * width
    full = int(cells)
    rest = int((cells - full) * 8)
    if full == 0 and rest == 0 and fraction > 0:
        rest = 1  # a thin sliver: small, but not nothing
    return "█" * full + (_EIGHTHS[rest] if rest and full < width else "")


class ProbabilityPanel(Widget):
    DEFAULT_CSS = "ProbabilityPanel { height: 1fr; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.border_title = "Next-token probabilities"
        self.step: Step | None = None
        self.context = ""
        self.total_tokens = 0
        self._lines: tuple[tuple[int, int], list[Strip]] | None = None  # ((width, height), lines) of the shown step

    def show(self, step: Step | None, context: str = "", total_tokens: int = 0) -> None:
        self.step, self.context, self.total_tokens = step, context, total_tokens
        of = f"/{total_tokens}" if total_tokens else ""
        self.border_subtitle = f"token {step.index + 1}{of} · log bars" if step is not None else ""
        self._lines = None
        self.refresh()

    def render_line(self, y: int) -> Strip:
        width, height = self.content_size
        if self._lines is None or self._lines[0] != (width, height):
            console, base = self.app.console, self.rich_style
            lines = []
            for line in self.render().split("\n"):  # each line already fits: no wrapping to compute
                segments = Segment.apply_style(line.render(console), base)
                lines.append(Strip(segments).crop_extend(0, width, base))
            self._lines = ((width, height), lines)
        lines = self._lines[1]
        return lines[y] if y < len(lines) else Strip.blank(width, self.rich_style)

    def render(self) -> Text:
        width = max(10, self.content_size.width)
        height = max(1, self.content_size.height)
        step = self.step
        if step is None:
            return Text("No tokens yet: generate, and the alternatives the model weighed appear here.", style="dim")
        text = Text(no_wrap=True, overflow="ellipsis")
        tail = tail_cells(self.context.replace("\n", "↵"), width - 8)
        text.append("after ", style="dim")
        text.append(("…" if len(self.context) > len(tail) else "") + tail, style="italic")
        text.append("\n")
        line = Text("chose ", style="dim")
        line.append(show_token(step.token_text), style="bold")
        line.append(f" rank {step.rank}")
        extra = f" p {format_prob(step.prob)}"
        if line.cell_len + len(extra) <= width:
            line.append(extra)
        line.truncate(width, overflow="ellipsis")
        text.append_text(line)
        text.append("\n")
        rows = max(1, height - 2)
        chosen_listed = any(c.token_id == step.token_id for c in step.top[:rows])
        candidates = list(step.top[: rows if chosen_listed else rows - 1])
        label_width = min(16, max(6, width - 18))  # the token matters more than the bar's length
        bar_width = max(1, width - label_width - 10)
        for candidate in candidates:
            self._row(text, candidate.text, candidate.prob, candidate.token_id == step.token_id, label_width, bar_width)
        if not chosen_listed:  # sampling picked a token outside the top rows: show it last, with its rank
            self._row(text, step.token_text, step.prob, True, label_width, bar_width, rank=step.rank)
        text.rstrip()
        return text

    @staticmethod
    def _row(
        text: Text, token: str, prob: float, chosen: bool, label_width: int, bar_width: int, rank: int | None = None
    ) -> None:
        """`▶ ' the'         ██████▍    45.3%`: marker, token, bar (log scale: `log_fraction`), percent."""
        label = show_token(token)
        if rank is not None:
            label = f"#{rank} {label}"
        if cell_len(label) > label_width:  # cells, not characters: CJK tokens are two cells wide
            label = set_cell_size(label, label_width - 1) + "…"
        label = set_cell_size(label, label_width)
        text.append("▶ " if chosen else "  ", style="bold")
        text.append(label, style="bold" if chosen else "")
        text.append(" ")
        text.append(bar(log_fraction(prob), bar_width).ljust(bar_width), style="green" if chosen else "blue")
        text.append(format_prob(prob).rjust(7) + "\n", style="bold" if chosen else "")
