"""Every modal that asks something. Each is a typed `ModalScreen[T]`: it returns the answer, or None (cancelled).

They only ask; the screens then call the store, the trainer or the generator. `Dialog` holds what they all do
(Cancel and Esc, buttons); `FormDialog` adds what every form does (apply with a key, Enter in a field or the
primary button; a field it cannot use is explained inside the dialog, which stays open).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, OptionList, Select, Static
from textual.widgets.option_list import Option

from gpt2term.core.errors import Gpt2termError
from gpt2term.core.generation import DecodingSettings
from gpt2term.core.interop import EXPORT_FORMATS, HFCachedModel
from gpt2term.core.store.layout import validate_name
from gpt2term.formatting import format_duration
from gpt2term.tui.keymap import bind, key_display

AnswerT = TypeVar("AnswerT")

DIALOG_CSS = """
{name} {{ align: center middle; }}
{name} #dialog {{ width: 72; }}
{name} .dialog-question {{ margin: 1 0; height: auto; }}
{name} .dialog-error {{ color: $error; height: auto; }}
{name} Input {{ margin-bottom: 1; }}
"""


def _hint(app, *pairs: tuple[str, str]) -> str:
    return " · ".join(f"{key_display(app, binding_id)} {what}" for binding_id, what in pairs)


class Dialog(ModalScreen[AnswerT]):
    """A modal that answers with one of its buttons or keys; Cancel and Esc answer None."""

    BINDINGS = [bind("dialog.cancel", "cancel")]

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_answer(self, answer: AnswerT) -> None:
        self.dismiss(answer)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.pressed(str(event.button.id))

    def pressed(self, button: str) -> None:
        """What a button answers; here every button cancels (dialogs with other buttons say theirs)."""
        self.action_cancel()


class FormDialog(Dialog[AnswerT]):
    """A form: `read()` turns its fields into the answer, or raises a `Gpt2termError` that the dialog shows in its
    `.dialog-error` line (when it has one) while it stays open for the fix."""

    BINDINGS = [bind("dialog.apply", "apply")]

    def read(self) -> AnswerT:
        raise NotImplementedError

    def action_apply(self) -> None:
        try:
            answer = self.read()
        except Gpt2termError as exc:
            for line in self.query(".dialog-error").results(Static):
                line.update(f"⚠ {exc}")
            return
        self.dismiss(answer)

    def on_input_submitted(self) -> None:
        self.action_apply()

    def pressed(self, button: str) -> None:
        self.action_apply() if button == "apply" else self.action_cancel()


def _buttons(apply: str) -> ComposeResult:
    with Horizontal(classes="dialog-buttons"):
        yield Button(apply, variant="primary", id="apply", compact=True)
        yield Button("Cancel", id="cancel", compact=True)


# ------------------------------------------------------------------ the prompt screen's dialogs


def _optional(text: str, kind: type) -> int | float | None:
    text = text.strip()
    return kind(text) if text else None


DECODING_DTYPES = ("fp32", "bf16", "int8")  # the weights while decoding; bf16 and int8 rescore the top in fp32


class SettingsScreen(FormDialog[DecodingSettings | None]):
    """Greedy by default (temperature 0), as the course's generate(); sampling knobs apply when temperature > 0."""

    def __init__(self, settings: DecodingSettings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(id="dialog", classes="settings-dialog") as dialog:
            dialog.border_title = "Decoding settings"
            with Grid(id="settings-grid"):
                yield Label("Temperature (0 = greedy)")
                yield Input(f"{s.temperature:g}", id="temperature", type="number", compact=True)
                yield Label("Top-k (empty = off)")
                yield Input("" if s.top_k is None else str(s.top_k), id="top_k", type="integer", compact=True)
                yield Label("Top-p (empty = off)")
                yield Input("" if s.top_p is None else f"{s.top_p:g}", id="top_p", type="number", compact=True)
                yield Label("Seed (empty = random)")
                yield Input("" if s.seed is None else str(s.seed), id="seed", type="integer", compact=True)
                yield Label("Max new tokens")
                yield Input(str(s.max_new_tokens), id="max_new_tokens", type="integer", compact=True)
                yield Label("Alternatives kept per token")
                yield Input(str(s.top_n), id="top_n", type="integer", compact=True)
                yield Label("Weights (bf16: 1/2 the bytes, int8: 1/4)")
                yield Select(
                    [(dt, dt) for dt in DECODING_DTYPES],
                    value=s.dtype if s.dtype in DECODING_DTYPES else "fp32",
                    allow_blank=False,
                    compact=True,
                    id="dtype",
                )
            yield Checkbox("Stop at <|endoftext|>", s.stop_at_eos, id="stop_at_eos", compact=True)
            yield Static(
                f"{key_display(self.app, 'dialog.apply')} or Enter in a field applies · "
                f"{key_display(self.app, 'dialog.cancel')} cancels",
                classes="dialog-hint",
                markup=False,
            )
            yield Static("", id="settings-error", classes="dialog-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Apply", variant="primary", id="apply", compact=True)
                yield Button("Greedy defaults", id="defaults", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def read(self) -> DecodingSettings:
        def value(name: str) -> str:
            return self.query_one(f"#{name}", Input).value

        try:
            return replace(  # DecodingSettings checks the ranges and names the fix
                self.settings,
                temperature=float(value("temperature") or 0),
                top_k=_optional(value("top_k"), int),
                top_p=_optional(value("top_p"), float),
                seed=_optional(value("seed"), int),
                max_new_tokens=int(value("max_new_tokens") or 0),
                top_n=int(value("top_n") or 10),
                stop_at_eos=self.query_one("#stop_at_eos", Checkbox).value,
                dtype=str(self.query_one("#dtype", Select).value),
            )
        except ValueError as exc:
            raise Gpt2termError(f"not a number ({exc}); fix the field or clear it") from exc

    def pressed(self, button: str) -> None:
        if button == "defaults":
            self.dismiss(DecodingSettings(top_n=self.settings.top_n, dtype=self.settings.dtype))
        else:
            super().pressed(button)


class SavePathScreen(FormDialog[Path | None]):
    """Where to save the transcript: Markdown to read, or JSON (every token, its probability and alternatives)."""

    def __init__(self, default: Path) -> None:
        super().__init__()
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="save-dialog") as dialog:
            dialog.border_title = "Save transcript"
            yield Label("File (.md to read; .json keeps every token's alternatives)")
            yield Input(str(self.default), id="path")
            yield Static(
                f"It goes exactly where this says: by default in {self.default.parent} (the data folder's "
                "exports); type another folder or name to put it elsewhere.",
                classes="dialog-hint",
                markup=False,
            )
            yield from _buttons("Save")

    def read(self) -> Path | None:
        text = self.query_one("#path", Input).value.strip()
        return Path(text).expanduser() if text else None


# ------------------------------------------------------------------ questions


class ConfirmScreen(Dialog[bool]):
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

    def pressed(self, button: str) -> None:
        self.dismiss(button == "yes")


class LeaveRunScreen(Dialog[bool | None]):
    """Leaving the train screen while it trains: stop the run (it saves first), keep it going, or stay."""

    DEFAULT_CSS = DIALOG_CSS.format(name="LeaveRunScreen")
    BINDINGS = [bind("dialog.yes", "answer(True)"), bind("dialog.no", "answer(False)")]

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

    def pressed(self, button: str) -> None:
        self.dismiss({"stop": True, "keep": False}.get(button))


# ------------------------------------------------------------------ the checkpoints screen's dialogs


class NameScreen(FormDialog[str | None]):
    """A checkpoint name (rename, copy): checked here, so a bad one is explained without closing the dialog."""

    DEFAULT_CSS = DIALOG_CSS.format(name="NameScreen")

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
            yield from _buttons("OK")

    def read(self) -> str:
        name = validate_name(self.query_one("#name", Input).value.strip())
        if name in self.taken:
            raise Gpt2termError(f"a checkpoint named {name!r} already exists; pick another")
        return name


@dataclass(frozen=True)
class ExportRequest:
    fmt: str  # a key of EXPORT_FORMATS
    path: Path
    overwrite: bool


class ExportScreen(FormDialog[ExportRequest | None]):
    DEFAULT_CSS = DIALOG_CSS.format(name="ExportScreen")

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
            yield Select(
                [(label, fmt) for fmt, label in EXPORT_FORMATS.items()], value="hf", allow_blank=False, id="fmt"
            )
            yield Label("To (a folder for Hugging Face, a file or folder for .pth)")
            self._suggested = self._default_path("hf")
            yield Input(self._suggested, id="path")
            yield Checkbox("Overwrite what is there", False, id="overwrite", compact=True)
            yield from _buttons("Export")

    def on_mount(self) -> None:
        self.query_one("#path", Input).focus()

    @on(Select.Changed, "#fmt")
    def _format_changed(self, event: Select.Changed) -> None:
        path = self.query_one("#path", Input)
        if path.value == self._suggested:  # not edited: follow the format
            self._suggested = path.value = self._default_path(str(event.value))

    def read(self) -> ExportRequest:
        text = self.query_one("#path", Input).value.strip()
        if not text:
            raise Gpt2termError("give a folder or file to export to")  # no error line: the dialog just stays
        fmt = str(self.query_one("#fmt", Select).value)
        return ExportRequest(fmt, Path(text).expanduser(), self.query_one("#overwrite", Checkbox).value)


@dataclass(frozen=True)
class ImportRequest:
    spec: str  # a path, or a name in the Hugging Face cache
    name: str | None
    n_heads: int | None = None  # a .pth carries no head count (`ckpt import --n-heads`)


class ImportScreen(FormDialog[ImportRequest | None]):
    """A weights file or folder to import, or one of the GPT-2s found in the local Hugging Face cache. Opened again
    with the `typed` request and its `error` when an import failed, so nothing has to be typed twice."""

    DEFAULT_CSS = DIALOG_CSS.format(name="ImportScreen") + "ImportScreen #hf-cache { height: auto; max-height: 6; }"

    def __init__(
        self, cached: list[HFCachedModel], typed: ImportRequest | None = None, error: str | None = None
    ) -> None:
        super().__init__()
        self.cached = cached
        self.typed = typed or ImportRequest("", None)
        self.error = error

    def compose(self) -> ComposeResult:
        typed = self.typed
        with Vertical(id="dialog") as dialog:
            dialog.border_title = "Import weights"
            yield Static(
                "A file or folder: a Hugging Face model.safetensors (+ config.json), the book's .pth "
                "(+ model.json), or a checkpoint folder",
                classes="dialog-question",
                id="import-label",
            )
            yield Input(typed.spec, id="spec", placeholder="~/Downloads/gpt2/ or model.pth", compact=True)
            if self.cached:
                yield Label("or GPT-2 from your Hugging Face cache (no download):")
                yield OptionList(
                    *[Option(f"{m.name}  ({m.repo_id})", id=m.name) for m in self.cached], id="hf-cache", compact=True
                )
            yield Label("Name in the store (empty: from the file's name)")
            yield Input(typed.name or "", id="name", placeholder="e.g. gpt2-small", compact=True)
            yield Label("Heads of a .pth without model.json (empty: 64-dim heads)")
            heads = "" if typed.n_heads is None else str(typed.n_heads)
            yield Input(heads, id="n-heads", placeholder="e.g. 12", type="integer", compact=True)
            error = f"⚠ {self.error}" if self.error else ""
            yield Static(error, classes="dialog-error", id="import-error", markup=False)
            yield from _buttons("Import")

    def on_mount(self) -> None:
        self.query_one("#spec", Input).focus()

    @on(OptionList.OptionSelected, "#hf-cache")
    def _cached_chosen(self, event: OptionList.OptionSelected) -> None:
        self.query_one("#spec", Input).value = str(event.option.id)
        self.query_one("#name", Input).focus()

    def read(self) -> ImportRequest:
        spec = self.query_one("#spec", Input).value.strip()
        name = self.query_one("#name", Input).value.strip() or None
        heads = self.query_one("#n-heads", Input).value.strip()
        if not spec:
            raise Gpt2termError("give a path, or pick a model from the cache")
        cached = {m.name for m in self.cached} | {m.repo_id for m in self.cached}
        if spec not in cached and not Path(spec).expanduser().exists():
            raise Gpt2termError(f"{Path(spec).expanduser()}: no such file or folder; check the path")
        if heads and (not heads.isdigit() or int(heads) < 1):
            raise Gpt2termError(f"attention heads must be a whole number of at least 1, got {heads!r}")
        return ImportRequest(spec, validate_name(name) if name is not None else None, int(heads) if heads else None)


# ------------------------------------------------------------------ the train screen's dialog


@dataclass(frozen=True)
class FollowCandidate:
    name: str
    writer: str | None  # who writes it now ("process 123 on host (training) since ..."), None when nobody
    last_event_age_s: float | None


def describe_age(seconds: float | None) -> str:
    return "no events yet" if seconds is None else f"last event {format_duration(seconds)} ago"


class FollowScreen(Dialog[str | None]):
    """Which run to follow: the checkpoints with a metrics.jsonl, those being written right now first."""

    DEFAULT_CSS = DIALOG_CSS.format(name="FollowScreen") + "FollowScreen OptionList { height: auto; max-height: 16; }"

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
