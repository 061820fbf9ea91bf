"""Dialogs of the train and checkpoints screens. Each is a typed modal: it returns the answer, or None (cancelled).

They only ask; the screens then call the store or the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, OptionList, Select, Static
from textual.widgets.option_list import Option

from gpt2term.core.checkpoints import validate_name
from gpt2term.core.errors import Gpt2termError
from gpt2term.core.interop import HFCachedModel
from gpt2term.tui.keymap import bind, key_display

DIALOG_CSS = """
{name} {{ align: center middle; }}
{name} #dialog {{ width: 72; }}
{name} .dialog-question {{ margin: 1 0; height: auto; }}
{name} .dialog-error {{ color: $error; height: auto; }}
{name} Input {{ margin-bottom: 1; }}
"""


def _hint(app, *pairs: tuple[str, str]) -> str:  # noqa: ANN001 (a textual App)
    return " · ".join(f"{key_display(app, binding_id)} {what}" for binding_id, what in pairs)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question. The safe answer (No) has the focus, so Enter never deletes anything by accident."""

    DEFAULT_CSS = DIALOG_CSS.format(name="ConfirmScreen")
    BINDINGS = [
        bind("dialog.yes", "answer(True)"),
        bind("dialog.no", "answer(False)"),
        bind("dialog.cancel", "answer(False)"),
    ]

    def __init__(self, title: str, question: str, yes: str = "Yes", no: str = "No", *, danger: bool = False) -> None:
        super().__init__()
        self.title_text = title
        self.question = question
        self.yes_label = yes
        self.no_label = no
        self.danger = danger

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog") as dialog:
            dialog.border_title = self.title_text
            yield Static(self.question, classes="dialog-question", markup=False)
            yield Static(
                _hint(self.app, ("dialog.yes", self.yes_label), ("dialog.no", self.no_label)),
                classes="dialog-hint",
                markup=False,
            )
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes_label, variant="error" if self.danger else "primary", id="yes", compact=True)
                yield Button(self.no_label, id="no", compact=True)

    def on_mount(self) -> None:
        self.query_one("#no" if self.danger else "#yes", Button).focus()

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class LeaveRunScreen(ModalScreen[bool | None]):
    """Leaving the train screen while it trains: stop the run (it saves first), keep it going, or stay."""

    DEFAULT_CSS = DIALOG_CSS.format(name="LeaveRunScreen")
    BINDINGS = [
        bind("dialog.yes", "answer(True)"),
        bind("dialog.no", "answer(False)"),
        bind("dialog.cancel", "answer(None)"),
    ]

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog") as dialog:
            dialog.border_title = "A run is training"
            yield Static(
                f"{self.description}\n\nStop it before leaving? Stopping saves it first. Otherwise it keeps "
                "training in the background and the Train mode shows it when you come back.",
                classes="dialog-question",
                markup=False,
            )
            yield Static(
                _hint(
                    self.app, ("dialog.yes", "stop and save"), ("dialog.no", "keep training"), ("dialog.cancel", "stay")
                ),
                classes="dialog-hint",
                markup=False,
            )
            with Horizontal(classes="dialog-buttons"):
                yield Button("Keep training", variant="primary", id="keep", compact=True)
                yield Button("Stop and save", variant="warning", id="stop", compact=True)
                yield Button("Stay", id="stay", compact=True)

    def on_mount(self) -> None:
        self.query_one("#keep", Button).focus()

    def action_answer(self, answer: bool | None) -> None:
        self.dismiss(answer)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss({"stop": True, "keep": False}.get(str(event.button.id)))


class NameScreen(ModalScreen[str | None]):
    """A checkpoint name (rename, copy): checked here, so a bad one is explained without closing the dialog."""

    DEFAULT_CSS = DIALOG_CSS.format(name="NameScreen")
    BINDINGS = [bind("dialog.cancel", "cancel"), bind("dialog.apply", "apply")]

    def __init__(self, title: str, label: str, default: str, taken: set[str]) -> None:
        super().__init__()
        self.title_text = title
        self.label = label
        self.default = default
        self.taken = taken

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog") as dialog:
            dialog.border_title = self.title_text
            yield Label(self.label)
            yield Input(self.default, id="name")
            yield Static("", classes="dialog-error", id="name-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", variant="primary", id="apply", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def action_apply(self) -> None:
        name = self.query_one("#name", Input).value.strip()
        try:
            validate_name(name)
        except Gpt2termError as exc:
            self.query_one("#name-error", Static).update(f"⚠ {exc}")
            return
        if name in self.taken:
            self.query_one("#name-error", Static).update(f"⚠ a checkpoint named {name!r} already exists; pick another")
            return
        self.dismiss(name)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self) -> None:
        self.action_apply()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_apply() if event.button.id == "apply" else self.action_cancel()


EXPORT_FORMATS = (
    ("hf", "Hugging Face folder (transformers' from_pretrained)"),
    ("pth", "the book's model.pth"),
    ("pth-optimizer", "the book's model_and_optimizer.pth"),
)


@dataclass(frozen=True)
class ExportRequest:
    fmt: str
    path: Path
    overwrite: bool


class ExportScreen(ModalScreen[ExportRequest | None]):
    DEFAULT_CSS = DIALOG_CSS.format(name="ExportScreen")
    BINDINGS = [bind("dialog.cancel", "cancel"), bind("dialog.apply", "apply")]

    def __init__(self, name: str, folder: Path) -> None:
        super().__init__()
        self.checkpoint = name
        self.folder = folder
        self._suggested = ""

    def _default_path(self, fmt: str) -> str:
        suffix = "-hf" if fmt == "hf" else ".pth"
        return str(self.folder / f"{self.checkpoint}{suffix}")

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog") as dialog:
            dialog.border_title = f"Export {self.checkpoint}"
            yield Label("Format")
            yield Select([(label, fmt) for fmt, label in EXPORT_FORMATS], value="hf", allow_blank=False, id="fmt")
            yield Label("To (a folder for Hugging Face, a file or folder for .pth)")
            self._suggested = self._default_path("hf")
            yield Input(self._suggested, id="path")
            yield Checkbox("Overwrite what is there", False, id="overwrite", compact=True)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Export", variant="primary", id="apply", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#path", Input).focus()

    @on(Select.Changed, "#fmt")
    def _format_changed(self, event: Select.Changed) -> None:
        path = self.query_one("#path", Input)
        if path.value == self._suggested:  # not edited: follow the format
            self._suggested = path.value = self._default_path(str(event.value))

    def action_apply(self) -> None:
        text = self.query_one("#path", Input).value.strip()
        if not text:
            return
        fmt = str(self.query_one("#fmt", Select).value)
        self.dismiss(ExportRequest(fmt, Path(text).expanduser(), self.query_one("#overwrite", Checkbox).value))

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self) -> None:
        self.action_apply()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_apply() if event.button.id == "apply" else self.action_cancel()


@dataclass(frozen=True)
class ImportRequest:
    spec: str  # a path, or a name in the Hugging Face cache
    name: str | None


class ImportScreen(ModalScreen[ImportRequest | None]):
    """A weights file or folder to import, or one of the GPT-2s found in the local Hugging Face cache."""

    DEFAULT_CSS = DIALOG_CSS.format(name="ImportScreen") + "ImportScreen #hf-cache { height: auto; max-height: 6; }"
    BINDINGS = [bind("dialog.cancel", "cancel"), bind("dialog.apply", "apply")]

    def __init__(self, cached: list[HFCachedModel]) -> None:
        super().__init__()
        self.cached = cached

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog") as dialog:
            dialog.border_title = "Import weights"
            yield Label("A file or folder: HF model.safetensors (+ config.json), the book's .pth, a checkpoint folder")
            yield Input("", id="spec", placeholder="~/Downloads/gpt2/ or model.pth")
            if self.cached:
                yield Label("or GPT-2 from your Hugging Face cache (no download):")
                yield OptionList(
                    *[Option(f"{m.name}  ({m.repo_id})", id=m.name) for m in self.cached], id="hf-cache", compact=True
                )
            yield Label("Name in the store (empty: from the file's name)")
            yield Input("", id="name", placeholder="e.g. gpt2-small")
            yield Static("", classes="dialog-error", id="import-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Import", variant="primary", id="apply", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#spec", Input).focus()

    @on(OptionList.OptionSelected, "#hf-cache")
    def _cached_chosen(self, event: OptionList.OptionSelected) -> None:
        self.query_one("#spec", Input).value = str(event.option.id)
        self.query_one("#name", Input).focus()

    def action_apply(self) -> None:
        spec = self.query_one("#spec", Input).value.strip()
        name = self.query_one("#name", Input).value.strip() or None
        if not spec:
            self.query_one("#import-error", Static).update("⚠ give a path, or pick a model from the cache")
            return
        if name is not None:
            try:
                validate_name(name)
            except Gpt2termError as exc:
                self.query_one("#import-error", Static).update(f"⚠ {exc}")
                return
        self.dismiss(ImportRequest(spec, name))

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self) -> None:
        self.action_apply()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_apply() if event.button.id == "apply" else self.action_cancel()


@dataclass(frozen=True)
class FollowCandidate:
    name: str
    writer: str | None  # who writes it now ("process 123 on host (training) since ..."), None when nobody
    last_event_age_s: float | None


def describe_age(seconds: float | None) -> str:
    if seconds is None:
        return "no events yet"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"last event {seconds / size:.0f} {unit} ago"
    return f"last event {seconds:.0f} s ago"


class FollowScreen(ModalScreen[str | None]):
    """Which run to follow: the checkpoints with a metrics.jsonl, those being written right now first."""

    DEFAULT_CSS = DIALOG_CSS.format(name="FollowScreen") + "FollowScreen OptionList { height: auto; max-height: 16; }"
    BINDINGS = [bind("dialog.cancel", "cancel")]

    def __init__(self, candidates: list[FollowCandidate]) -> None:
        super().__init__()
        self.candidates = candidates

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog") as dialog:
            dialog.border_title = "Follow a run"
            if not self.candidates:
                yield Static(
                    "No run has written metrics yet. Start one in another terminal (gpt2term train --name NAME), "
                    "then come back here.",
                    classes="dialog-question",
                    markup=False,
                )
            else:
                yield Static("Its metrics.jsonl is read live; the run itself is not touched.", classes="dialog-hint")
                options = []
                for c in self.candidates:
                    status = f"being written by {c.writer}" if c.writer else describe_age(c.last_event_age_s)
                    label = Text.assemble((c.name, "bold"), ("  " + status, "green" if c.writer else "dim"))
                    options.append(Option(label, id=c.name))
                yield OptionList(*options, id="follow-list")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        if self.candidates:
            self.query_one(OptionList).focus()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(str(event.option.id))

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_cancel()
