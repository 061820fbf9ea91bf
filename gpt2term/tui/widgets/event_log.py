"""The run's log: one timestamped line per event worth reading (start, evaluations, samples, saves, warnings, end).

Steps are not logged (the charts show them); the full record of every event is the run's metrics.jsonl.
"""

from __future__ import annotations

import time

from rich.text import Text
from textual.widgets import RichLog

STYLES = {"warning": "bold yellow", "failed": "bold red", "error": "bold red", "saved": "green", "sample": "italic"}


class EventLog(RichLog):
    DEFAULT_CSS = "EventLog { scrollbar-size-vertical: 1; }"

    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        super().__init__(wrap=True, markup=False, max_lines=2000, auto_scroll=True, **kwargs)
        self.lines_written: list[str] = []  # plain text of every line, for tests and copy-paste

    def add(self, line: str, when: float | None = None) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(when if when is not None else time.time()))
        style = next((s for word, s in STYLES.items() if line.startswith(word)), "")
        self.lines_written.append(line)
        self.write(Text.assemble((stamp + " ", "dim"), (line, style)))

    def reset(self) -> None:
        self.clear()
        self.lines_written.clear()
