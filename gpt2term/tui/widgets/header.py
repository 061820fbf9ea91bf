"""The one header line: which model is loaded (name, parameters, context, training, device and dtype), and the
modes with their keys. It picks a compact form when the terminal is narrow, so nothing that matters is cut."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual import getters
from textual.widget import Widget

from gpt2term.tui.keymap import key_display

if TYPE_CHECKING:
    from gpt2term.tui.app import Gpt2termApp

MODES = (("prompt", "Prompt"), ("train", "Train"), ("checkpoints", "Checkpoints"))
MIN_INFO = 24  # below this many cells for the model's name and facts, the other modes show their keys only


class ModelHeader(Widget):
    DEFAULT_CSS = """
    ModelHeader { dock: top; height: 1; background: $panel; color: $foreground; }
    """

    if TYPE_CHECKING:
        app = getters.app(Gpt2termApp)

    def __init__(self, mode: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mode = mode

    def on_mount(self) -> None:
        self.watch(self.app, "app_model", lambda _: self.refresh(), init=False)
        self.watch(self.app, "loading_label", lambda _: self.refresh(), init=False)

    def _modes(self, short: bool) -> Text:
        """Each mode's key and its whole name (never a cut word); `short`: only the current mode is named."""
        text = Text()
        for mode, title in MODES:
            key = key_display(self.app, "mode." + mode)
            label = f" {key} {title} " if mode == self.mode or not short else f" {key} "
            text.append(label, style="reverse bold" if mode == self.mode else "dim")
        return text

    def render(self) -> Text:
        width = self.content_size.width
        app_model = self.app.app_model
        loading = self.app.loading_label
        for compact, short_modes in ((False, False), (True, False), (True, True)):
            modes = self._modes(short_modes)
            if short_modes and width - self._modes(False).cell_len >= MIN_INFO:
                modes = self._modes(False)  # the model's name is cut (it has its own panel) before a mode's
            if loading:
                parts = [loading]
            elif app_model is None:
                parts = ["no model"]
            else:
                parts = app_model.header_parts(compact=compact)
            separator = " · " if not compact else "·"
            info = Text(" ")
            for n, part in enumerate(parts):
                if n:
                    info.append(separator, style="dim")
                style = "bold" if n == 0 else ""
                if app_model is not None and app_model.untrained and part == "untrained":
                    style = "bold yellow"
                info.append(part, style=style)
            if info.cell_len + modes.cell_len + 1 <= width or short_modes:
                break
        gap = max(1, width - info.cell_len - modes.cell_len)
        if info.cell_len + modes.cell_len + 1 > width:
            info.truncate(max(1, width - modes.cell_len - 1), overflow="ellipsis")
            gap = max(1, width - info.cell_len - modes.cell_len)
        return info + Text(" " * gap) + modes
