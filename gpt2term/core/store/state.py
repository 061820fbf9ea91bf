"""The store's own state: which checkpoint was used last, so the app and `generate` open it again next time.

Kept beside the checkpoints it names (the data folder's state file for the default store), and written on a best
effort basis: it is a convenience, so a full or read-only data folder must not stop anyone from using a model.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from gpt2term.core.store.atomic import temp_beside

KEY = "most_recent_checkpoint"


class LastUsed:
    """The name remembered in one `.state.json`, whether or not that checkpoint still exists or loads."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict:
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}

    def write(self, state: dict) -> None:
        tmp = temp_beside(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def get(self) -> str | None:
        name = self.read().get(KEY)
        return name if isinstance(name, str) else None

    def set(self, name: str) -> None:
        state = self.read()
        state[KEY] = name
        self.write(state)

    def renamed(self, old: str, new: str) -> None:
        state = self.read()
        if state.get(KEY) == old:
            state[KEY] = new
            self.write(state)

    def forget(self, name: str) -> None:
        state = self.read()
        if state.get(KEY) == name:
            state.pop(KEY)
            self.write(state)
