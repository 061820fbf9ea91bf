"""The multi-line prompt: Enter generates, Shift+Enter or Ctrl+J starts a new line, Up/Down at the first/last line
recall earlier prompts (like a shell's history)."""

from __future__ import annotations

from textual.message import Message
from textual.widgets import TextArea

from gpt2term.tui.keymap import bind


class PromptInput(TextArea):
    # Priority bindings: TextArea itself would take Enter as a newline before any ordinary binding saw it.
    BINDINGS = [
        bind("prompt.generate", "submit", priority=True),
        bind("prompt.newline", "newline", show=False, priority=True),
        bind("prompt.history-previous", "history(-1)", show=False, priority=True),
        bind("prompt.history-next", "history(1)", show=False, priority=True),
    ]

    class Submitted(Message):
        def __init__(self, prompt_input: PromptInput, text: str) -> None:
            super().__init__()
            self.prompt_input = prompt_input
            self.text = text

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self.prompt_history: list[str] = []
        self._history_pos: int | None = None  # None: editing a new prompt
        self._draft = ""

    # Priority bindings run on arrival, but typed characters wait in this widget's queue: `call_later` queues each
    # action behind them, so "abc⏎" pasted or typed fast submits "abc", not "".
    def action_submit(self) -> None:
        self.call_later(lambda: self.post_message(self.Submitted(self, self.text)))

    def action_newline(self) -> None:
        self.call_later(self.insert, "\n")

    def remember(self, text: str) -> None:
        if text.strip() and (not self.prompt_history or self.prompt_history[-1] != text):
            self.prompt_history.append(text)
        self._history_pos = None

    def action_history(self, delta: int) -> None:
        self.call_later(self._history, delta)

    def _history(self, delta: int) -> None:
        row, _ = self.cursor_location
        at_edge = row == 0 if delta < 0 else row == self.document.line_count - 1
        if not at_edge or not self.prompt_history:
            if delta < 0:
                self.action_cursor_up()
            else:
                self.action_cursor_down()
            return
        if self._history_pos is None:
            if delta > 0:
                return
            self._draft = self.text
            position = len(self.prompt_history) - 1
        else:
            position = self._history_pos + delta
        if position < 0:
            self.app.bell()
            return
        if position >= len(self.prompt_history):
            self._history_pos = None
            self.load_text(self._draft)
        else:
            self._history_pos = position
            self.load_text(self.prompt_history[position])
        self.move_cursor(self.document.end)
