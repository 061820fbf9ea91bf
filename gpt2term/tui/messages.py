"""Messages that worker threads post to the UI: the only way a thread talks to widgets (Textual is not thread-safe,
`post_message` is)."""

from __future__ import annotations

from textual.message import Message

from gpt2term.core.generation import Step
from gpt2term.tui.model_source import AppModel


class ModelLoaded(Message):
    def __init__(self, app_model: AppModel) -> None:
        super().__init__()
        self.app_model = app_model


class ModelLoadFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class TokenGenerated(Message):
    """One step of a generation: posted by the generation thread as soon as the model has chosen a token."""

    def __init__(self, turn_id: int, step: Step) -> None:
        super().__init__()
        self.turn_id = turn_id
        self.step = step


class PromptScored(Message):
    """The prompt's perplexity under the model (None for a one-token prompt: nothing to predict)."""

    def __init__(self, turn_id: int, perplexity: float | None) -> None:
        super().__init__()
        self.turn_id = turn_id
        self.perplexity = perplexity


class GenerationFinished(Message):
    def __init__(self, turn_id: int, stopped: bool, error: str | None = None) -> None:
        super().__init__()
        self.turn_id = turn_id
        self.stopped = stopped
        self.error = error
