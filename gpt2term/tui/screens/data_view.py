"""The data as the model sees it, from the Train screen: the form's corpus cut the way a run would cut it.

The corpus is read and tokenized once in a worker (the first time for a corpus that can take a while, so the view
says what it is doing); stepping through batches only draws another batch from the same ids, on the UI thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Static

from gpt2term.core.data import TokenizedCorpus
from gpt2term.core.data_view import DataPipeline, data_pipeline, id_matrix, pipeline_stages, run_corpus
from gpt2term.core.errors import Gpt2termError
from gpt2term.core.tokenizer import Tokenizer, default_tokenizer
from gpt2term.core.training import TrainingSettings
from gpt2term.tui.keymap import bind, key_display
from gpt2term.tui.screens.inspect import ComputedView, _token_label

COLUMNS = 8  # ids per row shown
# One colour per position: a target token wears the colour of the input token it is, one place to its right.
SHIFT_COLOURS = ("#e8872b", "#4fb3d9", "#9ccc65", "#d97bd9", "#f2d15c", "#7f9cf5", "#ef6f6c", "#5ad1b0", "#c0a080")


@dataclass
class Computed:
    corpus: TokenizedCorpus
    pipeline: DataPipeline


def shift_lines(tokenizer: Tokenizer, input_ids: list[int], target_ids: list[int], columns: int) -> Text:
    """Input and target of one window in shared columns, the same colour for the same token: the colours step
    one place to the left from the input row to the target row, which is the shift by one."""
    ins, outs = input_ids[:columns], target_ids[:columns]
    labels_in = [_token_label(tokenizer, i) for i in ins]
    labels_out = [_token_label(tokenizer, i) for i in outs]
    widths = [max(len(a), len(b), 5) for a, b in zip(labels_in, labels_out, strict=True)]
    text = Text()
    for label, labels, ids, shift in (("input ", labels_in, ins, 0), ("target", labels_out, outs, 1)):
        text.append(f"{label}  ", style="bold")
        for p, (name, width) in enumerate(zip(labels, widths, strict=True)):
            text.append(f"{name:>{width}}", style=f"bold {SHIFT_COLOURS[(p + shift) % len(SHIFT_COLOURS)]}")
            text.append("  ")
        text.append("…\n" if len(input_ids) > columns else "\n")
        text.append(" " * 8)
        for p, (token_id, width) in enumerate(zip(ids, widths, strict=True)):
            text.append(f"{token_id:>{width}}", style=SHIFT_COLOURS[(p + shift) % len(SHIFT_COLOURS)])
            text.append("  ")
        text.append("\n")
    return text


def matrix(label: str, rows: list[list[int]]) -> Text:
    """`label = [[...], ...]` with the later rows indented under the first. The indent is a span of its own: an
    SVG screenshot drops the spaces a span starts with, and a separate span keeps its place (it starts at its own
    column)."""
    indent = len(label) + 3
    text = Text()
    for n, line in enumerate(f"{label} = {id_matrix(rows, COLUMNS, indent=indent)}".split("\n")):
        if n:
            text.append("\n")
            text.append(line[:indent], style="dim")
            text.append(line[indent:])
        else:
            text.append(line)
    return text


class DataView(ComputedView):
    """The Train form's corpus, context, stride, batch size, seed and validation ratio, as the run would see them:
    each stage with its numbers, the first windows as tokens and ids, and the batch of one step."""

    TITLE_ID = "data-title"
    FAILURE = "The data could not be read"
    BUSY = ".inspect-body"  # the title and the line saying what is being computed stay visible
    BINDINGS = [
        bind("data.batch-previous", "batch(-1)"),
        bind("data.batch-next", "batch(1)"),
    ]

    class Progress(Message):
        """What the worker is computing now (tokenizing a large corpus takes a while)."""

        def __init__(self, what: str) -> None:
            super().__init__()
            self.what = what

    def __init__(self, settings: TrainingSettings) -> None:
        super().__init__()
        self.settings = settings
        self.tokenizer = default_tokenizer()
        self.corpus: TokenizedCorpus | None = None
        self.pipeline: DataPipeline | None = None
        self.computing = "preparing"

    def compose(self) -> ComposeResult:
        with Vertical(classes="inspect-dialog"):
            yield Static("reading the corpus…", id="data-title", classes="inspect-title", markup=False)
            yield Static(id="data-progress", classes="inspect-note", markup=False)
            with VerticalScroll(classes="inspect-body"):
                yield Static(id="data-stages", markup=False)
                yield Static(id="data-windows", markup=False)
                yield Static(id="data-batch", markup=False)
            yield Static(id="data-note", classes="inspect-note", markup=False)

    def calculate(self) -> Computed:
        def progress(what: str) -> None:
            self.post_message(self.Progress(what))

        corpus = run_corpus(self.settings, progress)
        pipeline = data_pipeline(self.settings, corpus=corpus, tokenizer=self.tokenizer, progress=progress)
        return Computed(corpus, pipeline)

    def on_data_view_progress(self, message: Progress) -> None:
        self.computing = message.what
        if self.pipeline is None:
            self.query_one("#data-progress", Static).update(f"⏳ {message.what}…")

    def show(self, result: Computed) -> None:
        self.corpus = result.corpus
        self.query_one("#data-progress", Static).update("")
        self.pipeline = result.pipeline
        self.redraw()

    def action_batch(self, delta: int) -> None:
        if self.pipeline is None or self.corpus is None:
            return
        step = max(1, self.pipeline.step + delta)
        try:
            self.pipeline = data_pipeline(self.settings, step=step, corpus=self.corpus, tokenizer=self.tokenizer)
        except Gpt2termError as exc:
            self.notify(str(exc), severity="error")
            return
        self.redraw()

    def redraw(self) -> None:
        view = self.pipeline
        if view is None:
            return
        self.query_one("#data-title", Static).update(
            Text(f"The data as the model sees it: {view.corpus}", style="bold")
        )
        stages = Text()
        for number, (name, line) in enumerate(pipeline_stages(view), start=1):
            stages.append(f"{number}. {name:<13}", style="bold")
            stages.append(line + "\n")
        stages.append("\ntext begins ", style="dim")
        stages.append(repr(view.text_head[:60]) + "\n")
        stages.append("as token ids ", style="dim")
        for token_id, _ in view.first_tokens:
            stages.append(_token_label(self.tokenizer, token_id), style="reverse")
            stages.append(f"={token_id}  ", style="dim")
        stages.append("…\n")
        self.query_one("#data-stages", Static).update(stages)

        windows = Text()
        first = view.first_windows
        windows.append(
            f"\nthe first {len(first)} windows, in corpus order (window i starts at token i×{view.stride}):\n",
            style="bold",
        )
        windows.append_text(matrix("inputs ", [w.input_ids for w in first]))
        windows.append("\n")
        windows.append_text(matrix("targets", [w.target_ids for w in first]))
        windows.append("\n\n")
        windows.append("window 0, the shift by one: each target is the input one place to its right\n", style="bold")
        windows.append_text(shift_lines(self.tokenizer, first[0].input_ids, first[0].target_ids, COLUMNS))
        self.query_one("#data-windows", Static).update(windows)

        batch = Text()
        numbers = ", ".join(str(w.window) for w in view.batch)
        batch.append(
            f"\nstep {view.step}: batch {view.position + 1} of {view.batches_per_epoch:,} in epoch {view.epoch} "
            f"(shuffled from seed {view.seed}) · windows [{numbers}] · shape {view.shape}\n",
            style="bold",
        )
        batch.append_text(matrix("inputs ", [w.input_ids for w in view.batch]))
        batch.append("\n")
        batch.append_text(matrix("targets", [w.target_ids for w in view.batch]))
        self.query_one("#data-batch", Static).update(batch)

        def key(binding_id: str) -> str:
            return key_display(self.app, binding_id)

        self.query_one("#data-note", Static).update(
            f"{key('data.batch-previous')}/{key('data.batch-next')} previous/next step · {key('dialog.cancel')} "
            "back · the rows `gpt2term train` reads at that step (also: gpt2term inspect data)"
        )
