"""Train and Checkpoints modes: placeholders until their screens land (issue 6); they say what to use meanwhile."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer, Static

from gpt2term.tui.widgets.header import ModelHeader


class PlaceholderScreen(Screen):
    MODE = ""
    MESSAGE = ""

    def compose(self) -> ComposeResult:
        yield ModelHeader(self.MODE)
        yield Static(self.MESSAGE, classes="placeholder", markup=False)
        yield Footer(compact=True)


class TrainScreen(PlaceholderScreen):
    MODE = "train"
    MESSAGE = (
        "Train mode: watching a training run live comes in a later version.\n\n"
        "Meanwhile, train from the command line:  gpt2term train --help"
    )


class CheckpointsScreen(PlaceholderScreen):
    MODE = "checkpoints"
    MESSAGE = (
        "Checkpoints mode: browsing and managing checkpoints here comes in a later version.\n\n"
        "Meanwhile:  gpt2term ckpt list   ·   open one in the app:  gpt2term --checkpoint NAME"
    )
