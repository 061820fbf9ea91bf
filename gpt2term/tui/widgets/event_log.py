"""The run's log: one timestamped line per event worth reading (start, evaluations, samples, saves, warnings, end).

Steps are not logged (the charts show them); the full record of every event is the run's metrics.jsonl.
Lines wrap to the log's width and wrap again when it changes (the form appears and disappears beside it).
"""

from __future__ import annotations

import time

from rich.text import Text
from textual.events import Resize
from textual.widgets import RichLog

STYLES = {"warning": "bold yellow", "failed": "bold red", "error": "bold red", "saved": "green", "sample": "italic"}
MAX_LINES = 2000


class EventLog(RichLog):
    DEFAULT_CSS = "EventLog { scrollbar-size-vertical: 1; overflow-x: hidden; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(wrap=True, markup=False, max_lines=MAX_LINES, min_width=20, auto_scroll=True, **kwargs)
        self.lines_written: list[str] = []  # plain text of every line, for tests and copy-paste
        self._entries: list[Text] = []
        self._wrapped_at = 0

    @staticmethod
    def _entry(line: str, when: float | None) -> Text:
        stamp = time.strftime("%H:%M:%S", time.localtime(when if when is not None else time.time()))
        style = next((s for word, s in STYLES.items() if line.startswith(word)), "")
        return Text.assemble((stamp + " ", "dim"), (line, style))

    def add(self, line: str, when: float | None = None) -> None:
        entry = self._entry(line, when)
        self.lines_written.append(line)
        self._entries = [*self._entries[-(MAX_LINES - 1) :], entry]
        self.write(entry)

    def reset(self) -> None:
        self.clear()
        self.lines_written.clear()
        self._entries.clear()

    def on_resize(self, event: Resize) -> None:
        width = event.size.width
        if self._entries and self._wrapped_at and width != self._wrapped_at:
            self.clear()
            for entry in self._entries:
                self.write(entry)
        self._wrapped_at = width
