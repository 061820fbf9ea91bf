"""Dialogs: decoding settings and saving the transcript. Typed modals: they return the new value, or None."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Static

from gpt2term.core.errors import Gpt2termError
from gpt2term.core.generation import DecodingSettings
from gpt2term.tui.keymap import bind, key_display


def _optional(text: str, kind: type) -> int | float | None:
    text = text.strip()
    return kind(text) if text else None


class SettingsScreen(ModalScreen[DecodingSettings | None]):
    """Greedy by default (temperature 0), as the course's generate(); sampling knobs apply when temperature > 0."""

    BINDINGS = [bind("dialog.cancel", "cancel"), bind("dialog.apply", "apply")]

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
            yield Checkbox("Stop at <|endoftext|>", s.stop_at_eos, id="stop_at_eos", compact=True)
            yield Static(
                f"{key_display(self.app, 'dialog.apply')} or Enter in a field applies · "
                f"{key_display(self.app, 'dialog.cancel')} cancels",
                classes="dialog-hint",
                markup=False,
            )
            yield Static("", id="settings-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Apply", variant="primary", id="apply", compact=True)
                yield Button("Greedy defaults", id="defaults", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def _read(self) -> DecodingSettings:
        def value(name: str) -> str:
            return self.query_one(f"#{name}", Input).value

        try:
            return replace(
                self.settings,
                temperature=float(value("temperature") or 0),
                top_k=_optional(value("top_k"), int),
                top_p=_optional(value("top_p"), float),
                seed=_optional(value("seed"), int),
                max_new_tokens=int(value("max_new_tokens") or 0),
                top_n=int(value("top_n") or 10),
                stop_at_eos=self.query_one("#stop_at_eos", Checkbox).value,
            )
        except ValueError as exc:
            raise Gpt2termError(f"not a number ({exc}); fix the field or clear it") from exc

    def action_apply(self) -> None:
        try:
            settings = self._read()  # DecodingSettings checks the ranges and names the fix
        except Gpt2termError as exc:
            self.query_one("#settings-error", Static).update(f"⚠ {exc}")
            return
        self.dismiss(settings)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self) -> None:
        self.action_apply()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self.action_apply()
        elif event.button.id == "cancel":
            self.action_cancel()
        elif event.button.id == "defaults":
            self.dismiss(DecodingSettings(top_n=self.settings.top_n))


class SavePathScreen(ModalScreen[Path | None]):
    """Where to save the transcript: Markdown to read, or JSON (every token, its probability and alternatives)."""

    BINDINGS = [bind("dialog.cancel", "cancel"), bind("dialog.apply", "apply")]

    def __init__(self, default: Path) -> None:
        super().__init__()
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="save-dialog") as dialog:
            dialog.border_title = "Save transcript"
            yield Label("File (.md to read; .json keeps every token's alternatives)")
            yield Input(str(self.default), id="path")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", variant="primary", id="apply", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def action_apply(self) -> None:
        text = self.query_one("#path", Input).value.strip()
        self.dismiss(Path(text).expanduser() if text else None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self) -> None:
        self.action_apply()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self.action_apply()
        else:
            self.action_cancel()
