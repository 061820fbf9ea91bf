"""Side panel "Perplexity": how surprised the model is by what it wrote and by the prompt, and how fast it ran.

Perplexity is exp(mean negative log-probability): a model that always gave its chosen token probability 1/k has
perplexity k, "as unsure as picking among k tokens".
"""

from __future__ import annotations

from rich.text import Text
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Static

from gpt2term.formatting import format_prob
from gpt2term.tui.turns import Turn
from gpt2term.tui.widgets import update_in_place
from gpt2term.tui.widgets.colors import prob_color

_LEVELS = "▁▂▃▄▅▆▇█"


def spark(probs: list[float], width: int) -> Text:
    """One cell per token (the latest `width`), height on a fixed 0..1 scale, coloured like the tokens."""
    text = Text()
    for prob in probs[-width:]:
        level = min(len(_LEVELS) - 1, int(prob * len(_LEVELS)))
        text.append(_LEVELS[level], style=prob_color(prob))
    return text


class ProbSparkline(Widget):
    """Per-token probability of the chosen tokens: a learner sees where the model was sure and where it guessed."""

    DEFAULT_CSS = "ProbSparkline { height: 1; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.probs: list[float] = []

    def render(self) -> Text:
        return spark(self.probs, max(1, self.content_size.width))


def perplexity_lines(turn: Turn | None) -> list[tuple[str, str]]:
    """(label, value) rows, shared by the panel and its tests."""
    dash = "—"
    if turn is None:
        return [
            ("perplexity", dash),
            ("prompt perplexity", dash),
            ("mean p(chosen)", dash),
            ("tokens/s", dash),
            ("first token", dash),
        ]
    steps = turn.steps
    summary = turn.summary
    if turn.prompt_perplexity is not None:
        prompt = f"{turn.prompt_perplexity:.2f}"
    else:
        prompt = "needs 2+ tokens" if len(turn.prompt_ids) < 2 else "…"
    speed = dash
    if len(steps) > 1 or (steps and turn.state != "generating"):
        speed = f"{summary.tokens_per_second:.1f}"
    return [
        ("perplexity", f"{steps[-1].perplexity:.2f}" if steps else dash),
        ("prompt perplexity", prompt),
        ("mean p(chosen)", format_prob(summary.mean_prob) if steps else dash),
        ("tokens/s", speed),
        ("first token", f"{summary.time_to_first_token_s:.2f}s" if steps else dash),
    ]


class PerplexityPanel(Vertical):
    DEFAULT_CSS = """
    PerplexityPanel { height: auto; }
    PerplexityPanel #ppl-numbers { height: auto; }
    PerplexityPanel #ppl-spark-label { color: $text-muted; height: 1; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.border_title = "Perplexity"
        self.turn: Turn | None = None
        self.numbers = Static(id="ppl-numbers")
        self.sparkline = ProbSparkline(id="ppl-sparkline")

    def compose(self):
        yield self.numbers
        yield Static("p(chosen) per token", id="ppl-spark-label")
        yield self.sparkline

    def on_mount(self) -> None:
        self.show(None)

    def show(self, turn: Turn | None) -> None:
        self.turn = turn
        rows = perplexity_lines(turn)
        text = Text()
        label_width = max(len(label) for label, _ in rows) + 1
        for n, (label, value) in enumerate(rows):
            text.append(label.ljust(label_width), style="dim")
            text.append(value, style="bold" if n == 0 else "")
            if n < len(rows) - 1:
                text.append("\n")
        update_in_place(self.numbers, text)
        self.sparkline.probs = [step.prob for step in turn.steps] if turn else []
        self.sparkline.refresh()
