"""Two checkpoints answering one prompt side by side: what training changed, token by token.

The second checkpoint is picked from the store, then both models decode greedily in a thread worker, so the UI
never waits on a model.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from gpt2term.core.generation import DecodingSettings, Step, Summary, generate
from gpt2term.core.model import GPTModel
from gpt2term.core.store.resolve import open_model
from gpt2term.core.store.store import CheckpointInfo, CheckpointStore
from gpt2term.core.tokenizer import Tokenizer
from gpt2term.formatting import format_prob
from gpt2term.tui.keymap import key_display
from gpt2term.tui.messages import StoreListed
from gpt2term.tui.screens.inspect import COMPARE_MAX_TOKENS, ComputedView
from gpt2term.tui.widgets.colors import prob_color

VERSUS_CSS = """
VersusScreen #versus-pick { height: auto; max-height: 10; }
VersusScreen #versus-columns { height: 1fr; }
VersusScreen .versus-column { width: 1fr; height: 1fr; padding: 0 1; }
"""


def greedy_steps(
    model: GPTModel, tokenizer: Tokenizer, prompt_ids: Sequence[int], settings: DecodingSettings
) -> list[Step]:
    """The greedy continuation (capped, so two models stay quick), each token with the probability it was given."""
    greedy = DecodingSettings(
        max_new_tokens=min(settings.max_new_tokens, COMPARE_MAX_TOKENS), stop_at_eos=settings.stop_at_eos, top_n=1
    )
    return list(generate(model, tokenizer, list(prompt_ids), greedy))


def column_text(name: str, steps: Sequence[Step]) -> Text:
    """One model's answer: its tokens coloured by probability, the probabilities in order, then mean and perplexity."""
    text = Text(name + "\n\n", style="bold")
    for step in steps:
        shown = step.text.replace("\n", "↵\n")
        if not shown.strip():  # indentation as dots: a code model's answer is often mostly whitespace
            shown = shown.replace(" ", "·")
        text.append(shown, style=prob_color(step.prob))
    text.append("\n\nprobabilities: ", style="dim")
    text.append(" ".join(format_prob(step.prob) for step in steps))
    summary = Summary.of(steps)
    mean = format_prob(summary.mean_prob) if summary.mean_prob is not None else "-"
    perplexity = f"{summary.perplexity:.2f}" if summary.perplexity is not None else "-"
    text.append(f"\n\n{len(steps)} tokens · mean probability {mean} · perplexity {perplexity}", style="bold")
    return text


def comparable_checkpoints(rows: Sequence[CheckpointInfo], exclude: str | None) -> list[str]:
    """Store names that can be loaded (damaged ones left out), without the model already on screen."""
    return [info.name for info in rows if info.damaged is None and info.name != exclude]


class VersusScreen(ComputedView):
    """The current model and a second checkpoint answer the same prompt greedily, side by side."""

    DEFAULT_CSS = VERSUS_CSS
    TITLE_ID = "versus-title"
    FAILURE = "Could not compare"
    BUSY = "#versus-columns"

    def __init__(
        self,
        model: GPTModel,
        model_name: str,
        tokenizer: Tokenizer,
        prompt: str,
        prompt_ids: Sequence[int],
        settings: DecodingSettings,
    ) -> None:
        super().__init__()
        self.model = model
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.settings = settings
        self.names: list[str] | None = None  # read from the store by a worker
        self.other: str | None = None
        self.results: list[tuple[str, list[Step]]] | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="inspect-dialog"):
            yield Static("reading the store…", id="versus-title", classes="inspect-title", markup=False)
            yield OptionList(id="versus-pick")
            with Horizontal(id="versus-columns"):
                with VerticalScroll(classes="versus-column"):
                    yield Static(id="versus-left", markup=False)
                with VerticalScroll(classes="versus-column"):
                    yield Static(id="versus-right", markup=False)
            yield Static(id="versus-note", classes="inspect-note", markup=False)

    def on_mount(self, event: events.Mount) -> None:
        """Ask for the second checkpoint first (`_picked` starts the computation), once the store is read."""
        event.prevent_default()  # not ComputedView's on_mount, which would compute at once
        self._list_store()

    @work(thread=True, exclusive=True, exit_on_error=False, group="list")
    def _list_store(self) -> None:
        self.post_message(StoreListed(CheckpointStore().list()))  # listing may repair a crashed save: not here

    def on_store_listed(self, message: StoreListed) -> None:
        self.names = comparable_checkpoints(message.rows, self.model_name)
        title = f"Compare {self.model_name} with which checkpoint?" if self.names else "No other checkpoint to compare"
        self.query_one("#versus-title", Static).update(title)
        cancel = key_display(self.app, "dialog.cancel")
        note = (
            f"Enter picks the checkpoint; both decode the prompt greedily. {cancel} back."
            if self.names
            else f"Save or import another checkpoint first (the Checkpoints mode). {cancel} back."
        )
        self.query_one("#versus-note", Static).update(note)
        picker = self.query_one("#versus-pick", OptionList)
        picker.add_options(Option(name, id=name) for name in self.names)
        if self.names:
            picker.highlighted = 0
            picker.focus()
        else:
            picker.display = False

    @on(OptionList.OptionSelected, "#versus-pick")
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.other = str(event.option.id)
        event.option_list.display = False
        self.query_one("#versus-title", Static).update(f"decoding with {self.model_name} and {self.other}…")
        self.compute()

    def calculate(self) -> list[tuple[str, list[Step]]]:
        assert self.other is not None
        device = next(self.model.parameters()).device
        other_model = open_model(self.other, device=device, remember=False).model.eval()  # the CLI's and app's rule
        return [
            (self.model_name, greedy_steps(self.model, self.tokenizer, self.prompt_ids, self.settings)),
            (self.other, greedy_steps(other_model, self.tokenizer, self.prompt_ids, self.settings)),
        ]

    def show(self, results: list[tuple[str, list[Step]]]) -> None:
        self.results = results
        self.query_one("#versus-title", Static).update(Text(f"Two checkpoints, greedy, on: {self.prompt}"))
        for widget_id, (name, steps) in zip(("#versus-left", "#versus-right"), results, strict=True):
            self.query_one(widget_id, Static).update(column_text(name, steps))
        self.query_one("#versus-note", Static).update(
            "Green: the model was sure of the token; red: it was surprised (probabilities on a log scale). Lower "
            f"perplexity: the model found its own text less surprising. {key_display(self.app, 'dialog.cancel')} back."
        )
