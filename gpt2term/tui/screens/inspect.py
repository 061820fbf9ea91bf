"""Looking inside the model at one generated token: what it attended to, and what each layer predicted.

Both views compute in a thread worker once (every layer and head at once for attention), then moving through
layers and heads only redraws: the UI never waits on the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from rich.cells import cell_len, set_cell_size
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.color import Color
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Static
from textual.worker import Worker

from gpt2term.core.generation import Continuation, DecodingSettings, beam_search, generate, sequence_logprob
from gpt2term.core.inspection import LensLayer, attention_weights, first_layer_with_final_answer, logit_lens
from gpt2term.core.model import GPTModel
from gpt2term.core.tokenizer import Tokenizer
from gpt2term.formatting import format_prob
from gpt2term.tui.dialogs import Dialog
from gpt2term.tui.keymap import bind, key_display
from gpt2term.tui.messages import ViewComputed
from gpt2term.tui.turns import Turn
from gpt2term.tui.widgets.probabilities import show_token
from gpt2term.tui.workers import WorkerErrors

TOP_WEIGHTS = 5  # how many of the strongest attention weights are listed as numbers
LENS_TOP_K = 5
LENS_CELL_WIDTH = 20  # at most; narrower when the view is (a longer token is cut with an ellipsis)
_COLD = Color.parse("#1b2230")  # no attention
_HOT = Color.parse("#e8872b")  # the strongest weight of the row

INSPECT_CSS = """
ComputedView { align: center middle; }
.inspect-dialog {
    width: 96%; height: 90%; border: round $primary; background: $surface; padding: 0 1;
}
.inspect-title { height: auto; text-style: bold; }
.inspect-note { height: auto; color: $text-muted; }
.inspect-body { height: 1fr; }
"""


def sequence_for(turn: Turn, index: int, context_length: int) -> list[int]:
    """The token ids up to and including generated token `index`, cut to the model's context from the left."""
    ids = list(turn.prompt_ids) + [step.token_id for step in turn.steps[: index + 1]]
    return ids[-context_length:]


def head_label(head: int) -> str:
    return "mean of heads" if head < 0 else f"head {head + 1}"


def attention_row(weights: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """The last token's attention over the sequence for one layer and head (head -1: the mean over heads)."""
    rows = weights[layer, :, -1, :]
    return rows.mean(dim=0) if head < 0 else rows[head]


def _token_label(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as shaded text: newlines as ↵, and a token of spaces as dots so its shade has something to show."""
    text = tokenizer.token_text(token_id).replace("\n", "↵").replace("\t", "→") or "∅"
    return text.replace(" ", "·") if not text.strip() else text


class ComputedView(WorkerErrors, Dialog[None]):
    """A view whose numbers come from one computation on the model (attention, the lens, decodings, two models),
    run in a thread worker behind a loading indicator; a failure shows in the title instead of the numbers.
    Subclasses give `calculate` and `show`; one that asks something first calls `compute` itself."""

    DEFAULT_CSS = INSPECT_CSS
    TITLE_ID = ""
    FAILURE = "Could not compute"
    BUSY = ".inspect-dialog"  # what shows the loading indicator while it computes

    failure: str | None = None

    def calculate(self) -> Any:
        raise NotImplementedError

    def show(self, result: Any) -> None:
        raise NotImplementedError

    def on_mount(self) -> None:
        self.compute()

    def compute(self) -> None:
        self.query_one(self.BUSY).loading = True
        self._compute()

    @work(thread=True, exclusive=True, exit_on_error=False, group="compute")
    def _compute(self) -> None:
        self.post_message(ViewComputed(self.calculate()))

    def on_view_computed(self, message: ViewComputed) -> None:
        self.query_one(self.BUSY).loading = False
        self.show(message.result)

    def worker_failed(self, worker: Worker, error: str) -> None:
        self.failure = error
        self.query_one(self.BUSY).loading = False
        self.query_one(f"#{self.TITLE_ID}", Static).update(f"{self.FAILURE}: {error}")


class AttentionScreen(ComputedView):
    """The selected token's attention over the earlier tokens, one layer and head (or their mean) at a time."""

    TITLE_ID = "attention-title"
    FAILURE = "Attention could not be computed"
    BINDINGS = [
        bind("attention.layer-previous", "layer(-1)"),
        bind("attention.layer-next", "layer(1)"),
        bind("attention.head-previous", "head(-1)"),
        bind("attention.head-next", "head(1)"),
    ]

    def __init__(self, model: GPTModel, tokenizer: Tokenizer, token_ids: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.token_ids = list(token_ids)
        self.weights: torch.Tensor | None = None  # [layers, heads, query, key]
        self.current_layer = 0
        self.current_head = -1  # -1: the mean over heads

    def compose(self) -> ComposeResult:
        with Vertical(classes="inspect-dialog"):
            yield Static("computing attention…", id="attention-title", classes="inspect-title", markup=False)
            with VerticalScroll(classes="inspect-body"):
                yield Static(id="attention-tokens", markup=False)
            yield Static(id="attention-top", markup=False)
            yield Static(id="attention-note", classes="inspect-note", markup=False)

    def calculate(self) -> torch.Tensor:
        return attention_weights(self.model, self.token_ids)

    def show(self, weights: torch.Tensor) -> None:
        self.weights = weights
        self.redraw()

    @property
    def row(self) -> torch.Tensor | None:
        """The weights on screen now: the selected (last) token's attention for the current layer and head."""
        if self.weights is None:
            return None
        return attention_row(self.weights, self.current_layer, self.current_head)

    def redraw(self) -> None:
        row = self.row
        if row is None or self.weights is None:
            return
        layers, heads = self.weights.shape[0], self.weights.shape[1]
        selected = _token_label(self.tokenizer, self.token_ids[-1])
        self.query_one("#attention-title", Static).update(
            f"Attention of {show_token(selected)} · layer {self.current_layer + 1}/{layers} · "
            f"{head_label(self.current_head)} ({heads} heads)"
        )
        strongest = float(row.max()) or 1.0
        text = Text()
        for position, (token_id, weight) in enumerate(zip(self.token_ids, row.tolist(), strict=True)):
            shade = _COLD.blend(_HOT, weight / strongest)
            style = f"{'#101010' if weight / strongest > 0.6 else '#e6e6e6'} on {shade.hex}"
            if position == len(self.token_ids) - 1:
                style += " bold underline"
            label = _token_label(self.tokenizer, token_id)
            text.append(label.replace("↵", "↵\n"), style=style)  # a newline token also starts a new line
        self.query_one("#attention-tokens", Static).update(text)
        values, positions = torch.topk(row, min(TOP_WEIGHTS, row.shape[0]))
        top = Text("strongest: ", style="bold")
        for value, position in zip(values.tolist(), positions.tolist(), strict=True):
            label = show_token(_token_label(self.tokenizer, self.token_ids[position]))
            top.append(f"{label}@{position} {value:.4f}   ")
        self.query_one("#attention-top", Static).update(top)

        def key(binding_id: str) -> str:
            return key_display(self.app, binding_id)

        self.query_one("#attention-note", Static).update(
            f"{key('attention.layer-previous')}/{key('attention.layer-next')} layer · "
            f"{key('attention.head-previous')}/{key('attention.head-next')} head (before head 1: the mean) · "
            f"{key('dialog.cancel')} back. Brighter = more attention; each row of weights sums to 1."
        )

    def action_layer(self, delta: int) -> None:
        if self.weights is None:
            return
        self.current_layer = (self.current_layer + delta) % self.weights.shape[0]
        self.redraw()

    def action_head(self, delta: int) -> None:
        if self.weights is None:
            return
        heads = self.weights.shape[1]
        self.current_head = (self.current_head + 1 + delta) % (heads + 1) - 1  # -1 (mean), 0, ..., heads-1, round again
        self.redraw()


LENS_LABEL_WIDTH = 14  # "★ embeddings  "


def lens_cell(token: str, prob: float, width: int) -> str:
    """One prediction in `width` cells: the token (cut with an ellipsis when long), then its whole probability."""
    label, percent = show_token(token), format_prob(prob)
    room = max(2, width - len(percent) - 1)
    if cell_len(label) > room:
        label = set_cell_size(label, room - 1) + "…"
    return set_cell_size(f"{label} {percent}", max(width, cell_len(label) + 1 + len(percent)))


def lens_lines(layers: Sequence[LensLayer], chosen: str | None = None, width: int | None = None) -> Text:
    """The lens as a table: one line per layer (embeddings first, output last), its top predictions across.
    `width`: the cells the table may take; its columns narrow to fit, so no line wraps onto a second."""
    first = first_layer_with_final_answer(layers)
    last = len(layers) - 1
    columns = max(len(lens.top) for lens in layers)
    widest = max(cell_len(f"{show_token(c.text)} {format_prob(c.prob)}") for lens in layers for c in lens.top)
    cell_width = min(LENS_CELL_WIDTH, widest)
    if width is not None:
        cell_width = max(12, min(cell_width, (width - LENS_LABEL_WIDTH) // columns - 2))
    text = Text()
    for lens in layers:
        row = [lens_cell(c.text, c.prob, cell_width) for c in lens.top]
        name = (
            "embeddings" if lens.layer == 0 else f"output {lens.layer}" if lens.layer == last else f"layer {lens.layer}"
        )
        marker = "★" if lens.layer == first else "·"
        label = f"{marker} {name:<10}  "
        line = Text(label + "  ".join(row))
        if lens.layer == first:
            line.stylize("bold")
        if lens.layer >= first:  # the final answer, from the layer where it first comes out on top
            line.stylize("reverse", len(label), len(label) + len(row[0]))
        text.append_text(line)
        text.append("\n")
    text.append(f"★ first layer whose top prediction is already the final answer: {layers[first].layer}", style="dim")
    if chosen is not None:
        text.append(f" · the token generated here: {chosen}", style="dim")
    return text


class LensScreen(ComputedView):
    """The logit lens at the position that chose the selected token: what each layer would have predicted."""

    TITLE_ID = "lens-title"
    FAILURE = "The logit lens could not be computed"

    def __init__(self, model: GPTModel, tokenizer: Tokenizer, context_ids: Sequence[int], chosen_id: int) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.context_ids = list(context_ids)
        self.chosen_id = chosen_id
        self.lens_layers: list[LensLayer] | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="inspect-dialog"):
            yield Static("computing the logit lens…", id="lens-title", classes="inspect-title", markup=False)
            with VerticalScroll(classes="inspect-body"):
                yield Static(id="lens-table", markup=False)
            yield Static(id="lens-note", classes="inspect-note", markup=False)

    def calculate(self) -> list[LensLayer]:
        return logit_lens(self.model, self.tokenizer, self.context_ids, -1, LENS_TOP_K)

    def show(self, layers: list[LensLayer]) -> None:
        self.lens_layers = layers
        chosen = show_token(_token_label(self.tokenizer, self.chosen_id))
        last = _token_label(self.tokenizer, self.context_ids[-1])
        self.query_one("#lens-title", Static).update(
            f"Logit lens after {show_token(last)}: what each layer predicts next (top {LENS_TOP_K})"
        )
        table = self.query_one("#lens-table", Static)
        width = table.content_size.width or self.app.size.width - 8
        table.update(lens_lines(layers, chosen, width - 1))  # - 1: the scroll bar that a short terminal brings
        self.query_one("#lens-note", Static).update(
            "Each layer's residual stream sent straight through the final LayerNorm and output head; the last "
            f"line is the model's real output. {key_display(self.app, 'dialog.cancel')} back."
        )


COMPARE_BEAMS = 4
PENDING = ("greedy", "sampled", f"beam search ({COMPARE_BEAMS} beams)")  # named before their labels are known
COMPARE_MAX_TOKENS = 30  # long enough to tell the texts apart, short enough that three decodings stay quick


ProgressCallback = Callable[[int, str, str, "Continuation | None"], None]


def decode_three_ways(
    model: GPTModel,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    settings: DecodingSettings,
    progress: ProgressCallback | None = None,
) -> list[tuple[str, Continuation]]:
    """The same prompt decoded greedily, by sampling (with a seed) and by beam search, each with the model's own
    log-probability of its text, so they compare like with like. `progress(index, label, text so far, result)`
    hears each decoding start, each token as it comes (beam search: only its end), and each finish."""
    n = min(settings.max_new_tokens, COMPARE_MAX_TOKENS)
    temperature = settings.temperature or 1.0
    seed = settings.seed if settings.seed is not None else 1
    sampled = DecodingSettings(
        max_new_tokens=n,
        temperature=temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        seed=seed,
        stop_at_eos=settings.stop_at_eos,
        top_n=1,
    )
    runs = [
        ("greedy", DecodingSettings(max_new_tokens=n, stop_at_eos=settings.stop_at_eos, top_n=1)),
        (f"sampled (T={temperature:g}{_filters(settings)}, seed {seed})", sampled),
    ]
    beam_label = f"beam search ({COMPARE_BEAMS} beams)"
    report = progress or (lambda index, label, text, result: None)
    results = []
    for index, (label, decoding) in enumerate(runs):
        report(index, label, "", None)
        ids: list[int] = []
        for step in generate(model, tokenizer, list(prompt_ids), decoding):
            ids.append(step.token_id)
            report(index, label, tokenizer.decode(ids), None)
        found = Continuation(tuple(ids), tokenizer.decode(ids), sequence_logprob(model, prompt_ids, ids))
        results.append((label, found))
        report(index, label, found.text, found)
    report(len(runs), beam_label, "", None)
    best = beam_search(model, tokenizer, prompt_ids, COMPARE_BEAMS, n, settings.stop_at_eos)[0]
    results.append((beam_label, best))
    report(len(runs), beam_label, best.text, best)
    return results


def _filters(settings: DecodingSettings) -> str:
    return (f", top-k {settings.top_k}" if settings.top_k else "") + (
        f", top-p {settings.top_p:g}" if settings.top_p else ""
    )


def visible_whitespace(text: str) -> str:
    """Newlines as ↵ and indentation as dots: a code model's continuation is often mostly whitespace."""
    return re.sub(r"(?<=\n) +", lambda match: "·" * len(match.group()), text.replace("\n", "↵\n"))


class CompareScreen(ComputedView):
    """Greedy, sampling and beam search side by side for one prompt: is greedy the most probable text?"""

    TITLE_ID = "compare-title"
    FAILURE = "Could not decode"

    def __init__(
        self, model: GPTModel, tokenizer: Tokenizer, prompt: str, prompt_ids: Sequence[int], settings: DecodingSettings
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.settings = settings
        self.results: list[tuple[str, Continuation]] | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="inspect-dialog"):
            yield Static(
                "decoding three ways (greedy, sampling, beam search)…",
                id="compare-title",
                classes="inspect-title",
                markup=False,
            )
            with VerticalScroll(classes="inspect-body"):
                yield Static(id="compare-table", markup=False)
            yield Static(id="compare-note", classes="inspect-note", markup=False)

    class Progress(Message):
        """One decoding started, got a token, or finished (posted from the worker)."""

        def __init__(self, index: int, label: str, text: str, result: Continuation | None) -> None:
            super().__init__()
            self.index, self.label, self.text, self.result = index, label, text, result

    def compute(self) -> None:
        """No spinner over the view: each decoding fills in as it goes, with a line saying which one runs."""
        self.progress: dict[int, tuple[str, str, Continuation | None]] = {}
        self._compute()

    def calculate(self) -> list[tuple[str, Continuation]]:
        def progress(index: int, label: str, text: str, result: Continuation | None) -> None:
            self.post_message(self.Progress(index, label, text, result))

        return decode_three_ways(self.model, self.tokenizer, self.prompt_ids, self.settings, progress)

    def on_compare_screen_progress(self, message: Progress) -> None:
        if self.results is not None:
            return
        self.progress[message.index] = (message.label, message.text, message.result)
        table = Text()
        for index in range(3):
            if index not in self.progress:
                table.append(f"· {PENDING[index]}: waiting\n\n", style="dim")
                continue
            label, text, result = self.progress[index]
            if result is None:
                table.append(f"· {label}: decoding…\n", style="bold yellow")
                table.append(visible_whitespace(text) + "\n\n")
            else:
                table.append(self._head(label, result, best=False) + "\n")
                table.append(visible_whitespace(result.text) + "\n\n")
        self.query_one("#compare-table", Static).update(table)

    @staticmethod
    def _head(label: str, found: Continuation, best: bool) -> str:
        perplexity = f"{found.perplexity:.2f}" if found.perplexity is not None else "-"
        return (
            f"{'★' if best else '·'} {label}: {len(found.token_ids)} tokens, log-probability "
            f"{found.logprob:.3f} · perplexity {perplexity}"
        )

    def show(self, results: list[tuple[str, Continuation]]) -> None:
        self.results = results
        self.query_one("#compare-title", Static).update(Text(f"Three decodings of: {self.prompt}", style="bold"))
        best = max(range(len(results)), key=lambda i: results[i][1].logprob)
        table = Text()
        for i, (label, found) in enumerate(results):
            table.append(self._head(label, found, i == best) + "\n", style="bold" if i == best else "")
            table.append(visible_whitespace(found.text) + "\n\n")
        self.query_one("#compare-table", Static).update(table)
        self.query_one("#compare-note", Static).update(
            "★ the most probable text of the three (total log-probability, higher is more probable; perplexity per "
            "token, lower is less surprising). Greedy picks the best next token, not the best text; the most probable "
            f"text is often dull and repetitive. {key_display(self.app, 'dialog.cancel')} back."
        )
