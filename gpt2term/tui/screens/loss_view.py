"""The loss, step by step: the course's six steps of cross-entropy on a text, with the model's real numbers.

Opened from the prompt screen (on a turn's prompt and generated tokens) or from the checkpoints screen (a text
asked for first, the course's "every effort moves you" by default). The numbers come from `core.loss_steps`, in
the view's worker; a key runs the same text in train mode and in eval mode to show what `model.eval()` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.color import Color
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Input, Label, Static

from gpt2term.core.errors import InputError
from gpt2term.core.loss_steps import (
    COURSE_TEXT,
    LOSS_TABLE,
    DropoutCheck,
    LossSteps,
    dropout_check,
    loss_steps,
    table_index,
)
from gpt2term.core.model import GPTModel
from gpt2term.core.tokenizer import Tokenizer
from gpt2term.formatting import format_prob
from gpt2term.tui.dialogs import DIALOG_CSS, FormDialog
from gpt2term.tui.keymap import bind, key_display
from gpt2term.tui.screens.inspect import ComputedView
from gpt2term.tui.widgets.probabilities import show_token

ROWS = 6  # positions each step shows with numbers; the token line shows them all
WORST = 5
_LOW = Color.parse("#1f6f3a")  # a target the model expected (-log p near 0)
_MID = Color.parse("#b08a1e")
_HIGH = Color.parse("#b3261e")  # as surprising as a uniform guess over the vocabulary, or more


def loss_shade(nll: float, baseline: float) -> Color:
    """Green to yellow to red as a token's -log p goes from 0 to half the uniform guess's to all of it."""
    frac = max(0.0, min(1.0, nll / baseline)) if baseline > 0 else 1.0
    return _LOW.blend(_MID, frac * 2) if frac < 0.5 else _MID.blend(_HIGH, (frac - 0.5) * 2)


def _label(text: str) -> str:
    return text.replace("\n", "↵").replace("\t", "→") or "∅"


def steps_text(steps: LossSteps, rows: int = ROWS) -> Text:
    """The six steps; steps 1 to 4 as a table with the numbers of the first `rows` positions, one per line."""
    batch, seq_len, vocab = steps.shape
    shown = steps.tokens[:rows]
    text = Text()

    def head(line: str) -> None:
        text.append(line + "\n", style="bold")

    head(f"1. logits = model(inputs): shape (batch, seq_len, vocab_size) = ({batch}, {seq_len}, {vocab})")
    head(f"2. probas = torch.softmax(logits, dim=-1): each row sums to 1 (largest error {steps.softmax_max_error:.1e})")
    head("3. target_probas = probas[0, i, targets[i]] · 4. log_probas = torch.log(target_probas)")
    width = max(14, *(len(show_token(_label(t.token_text))) for t in shown))
    header = f"{'@i':<4} {'input':>{width}} → {'target':<{width}} {'1. logit':>9}  {'2. favourite':<22} "
    text.append(header + f"{'3. target_probas':>16} {'4. log_probas':>13}\n", style="underline")
    for t in shown:
        favourite = f"{show_token(_label(t.top_text))} {format_prob(t.top_prob)}"
        source, target = show_token(_label(t.token_text)), show_token(_label(t.target_text))
        text.append(
            f"@{t.position:<3} {source:>{width}} → {target:<{width}} {t.target_logit:9.3f}  {favourite[:22]:<22} "
            f"{t.prob:16.6g} {t.logprob:13.4f}\n"
        )
    if seq_len > len(shown):
        text.append(f"… the first {len(shown)} of {seq_len} positions; the tokens below show them all\n", style="dim")
    head(f"5. avg_log_probas = torch.mean(log_probas) = {steps.mean_logprob:.4f}")
    head(f"6. neg_avg_log_probas = -avg_log_probas = {steps.loss:.4f}  ← the loss (cross-entropy)")
    text.append(f"perplexity = exp(loss) = {steps.perplexity:,.2f}", style="bold")
    text.append(f" · uniform guess: ln({vocab}) = {steps.baseline:.2f}\n")
    return text


TOKENS_HEAD = "tokens by their loss (green: expected · red: as surprising as a uniform guess):"


def tokens_text(steps: LossSteps) -> Text:
    """The text as the model read it, each target token shaded by what it cost (the first token is only read).

    Shown folded at the last column, never word-wrapped: a word wrap drops the space a token starts with."""
    text = Text()
    text.append(_label(steps.tokens[0].token_text), style="dim")
    for t in steps.tokens:
        shade = loss_shade(t.nll, steps.baseline)
        text.append(t.target_text.replace("\n", "↵\n") or "∅", style=f"#f0f0f0 on {shade.hex}")
    return text


def worst_text(steps: LossSteps, n: int = WORST) -> Text:
    worst = steps.worst(n)
    text = Text(f"worst {len(worst)} tokens: p(target), -log p, its share of the loss\n", style="bold")
    pairs = [f"{show_token(_label(t.token_text))} → {show_token(_label(t.target_text))}" for t in worst]
    width = min(30, max(map(len, pairs)))
    for t, pair in zip(worst, pairs, strict=True):
        text.append(
            f"@{t.position:<3} {pair[:width]:<{width}} p {format_prob(t.prob):>8} -log p {t.nll:6.3f} "
            f"{t.contribution:.3f}\n"
        )
    return text


def table_text(steps: LossSteps) -> Text:
    """The course's table, with this text's loss placed on it."""
    text = Text("the course's table (loss → perplexity):\n", style="bold")
    at = table_index(steps.loss)
    here = f"▶ {steps.loss:5.2f} → {steps.perplexity:>9,.2f}  this text\n"
    for i, row in enumerate(LOSS_TABLE):
        if i == at:
            text.append(here, style="bold reverse")
        text.append(f"· {row.loss:5.2f} → {row.perplexity:>9,g}  {row.meaning}\n")
    if at == len(LOSS_TABLE):
        text.append(here, style="bold reverse")
    text.append(f"this text: {steps.table_position}\n", style="dim")
    return text


def dropout_text(check: DropoutCheck) -> Text:
    text = Text("dropout and model.eval(): ", style="bold")
    text.append(check.note + "\n")
    text.append(f"· train mode (model.train()): {'  '.join(f'{x:.4f}' for x in check.train_losses)}\n")
    text.append(f"· eval mode  (model.eval()):  {'  '.join(f'{x:.4f}' for x in check.eval_losses)}")
    return text


@dataclass(frozen=True)
class LossResult:
    steps: LossSteps
    dropout: DropoutCheck | None


class LossView(ComputedView):
    """The course's six loss steps on one text, its tokens shaded by their loss, the worst tokens, the course's
    table; a key adds the train-mode / eval-mode comparison."""

    DEFAULT_CSS = (
        ComputedView.DEFAULT_CSS
        + """
    #loss-bottom { height: auto; }
    #loss-worst { width: auto; height: auto; }
    #loss-table { width: 1fr; height: auto; margin-left: 3; }
    #loss-tokens, #loss-dropout { margin-bottom: 1; }
    #loss-tokens { text-wrap: nowrap; text-overflow: fold; }
    #loss-tokens-head { text-style: bold; }
    """
    )
    TITLE_ID = "loss-title"
    FAILURE = "The loss could not be computed"
    BINDINGS = [bind("loss.dropout", "dropout")]

    def __init__(
        self,
        tokenizer: Tokenizer,
        token_ids: Sequence[int],
        *,
        model: GPTModel | None = None,
        checkpoint: str | None = None,
        label: str = "",
    ) -> None:
        super().__init__()
        if model is None and checkpoint is None:
            raise ValueError("LossView needs a model or a checkpoint name")
        self.tokenizer = tokenizer
        self.token_ids = list(token_ids)
        self.model = model
        self.checkpoint = checkpoint
        self.label = label or (checkpoint or "")
        self.steps: LossSteps | None = None
        self.dropout: DropoutCheck | None = None
        self.want_dropout = False

    def compose(self) -> ComposeResult:
        loading = f"loading {self.checkpoint} and " if self.model is None else ""
        with Vertical(classes="inspect-dialog"):
            yield Static(
                f"{loading}computing the loss of {len(self.token_ids)} tokens…",
                id="loss-title",
                classes="inspect-title",
                markup=False,
            )
            with VerticalScroll(classes="inspect-body"):
                yield Static(id="loss-steps", markup=False)
                yield Static(TOKENS_HEAD, id="loss-tokens-head", markup=False)
                yield Static(id="loss-tokens", markup=False)
                yield Static(id="loss-dropout", markup=False)
                with Horizontal(id="loss-bottom"):
                    yield Static(id="loss-worst", markup=False)
                    yield Static(id="loss-table", markup=False)
            yield Static(id="loss-note", classes="inspect-note", markup=False)

    def calculate(self) -> LossResult:
        if self.model is None:
            from gpt2term.core.store.resolve import open_model

            assert self.checkpoint is not None
            self.model = open_model(self.checkpoint, remember=False).model
        steps = self.steps or loss_steps(self.model, self.token_ids, self.tokenizer)
        check = dropout_check(self.model, self.token_ids) if self.want_dropout else None
        return LossResult(steps, check)

    def show(self, result: LossResult) -> None:
        self.steps = result.steps
        if result.dropout is not None:
            self.dropout = result.dropout
        steps = result.steps
        name = f" under {self.label}" if self.label else ""
        self.query_one("#loss-title", Static).update(
            f"Loss of {len(self.token_ids)} tokens{name}: {steps.loss:.4f} · perplexity {steps.perplexity:,.2f}"
        )
        self.query_one("#loss-steps", Static).update(steps_text(steps))
        self.query_one("#loss-tokens", Static).update(tokens_text(steps))
        self.query_one("#loss-worst", Static).update(worst_text(steps))
        self.query_one("#loss-table", Static).update(table_text(steps))
        self.redraw_dropout()

    def redraw_dropout(self) -> None:
        box = self.query_one("#loss-dropout", Static)
        key = key_display(self.app, "loss.dropout")
        if self.want_dropout and self.dropout is not None:
            box.update(dropout_text(self.dropout))
        elif self.want_dropout:
            box.update(Text("running the text twice in train mode and twice in eval mode…", style="bold yellow"))
        else:
            box.update(Text(f"{key}: the same text in train mode (dropout on) and eval mode", style="dim"))
        self.query_one("#loss-note", Static).update(
            f"{key} dropout: train vs eval mode · {key_display(self.app, 'dialog.cancel')} back. The loss is the "
            "mean over the positions of -log p(target); training lowers it."
        )

    def action_dropout(self) -> None:
        if self.steps is None:
            return
        self.want_dropout = not self.want_dropout
        if self.want_dropout and self.dropout is None:
            self.redraw_dropout()
            self.compute()
        else:
            self.redraw_dropout()


class LossTextScreen(FormDialog[str | None]):
    """The text whose loss the checkpoints screen shows: the course's example unless the learner types another."""

    DEFAULT_CSS = DIALOG_CSS.format(name="LossTextScreen")

    def __init__(self, checkpoint: str, default: str = COURSE_TEXT) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog") as dialog:
            dialog.border_title = f"Loss of a text under {self.checkpoint}"
            yield Label("Text (the model predicts each token from the ones before it)")
            yield Input(self.default, id="loss-text")
            yield Static("", classes="dialog-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Compute", variant="primary", id="apply", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def read(self) -> str:
        text = self.query_one("#loss-text", Input).value
        if not text.strip():
            raise InputError("type a text of at least two tokens, e.g. the course's " + repr(COURSE_TEXT))
        return text
