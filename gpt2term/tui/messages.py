"""Messages that worker threads post to the UI: the only way a thread talks to widgets (Textual is not thread-safe,
`post_message` is)."""

from __future__ import annotations

from typing import Any

from textual.message import Message

from gpt2term.core.store.store import CheckpointInfo
from gpt2term.tui.model_source import AppModel


class ModelLoaded(Message):
    def __init__(self, app_model: AppModel) -> None:
        super().__init__()
        self.app_model = app_model


class ModelLoadFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class TokensReady(Message):
    """Tokens of turn `turn_id` wait in the screen's relay: the handler (or the next frame) takes them all.

    `last`: the decoder is done, so these are drawn now rather than at the next frame (the turn's end, scored
    prompt and final state come after a further forward pass)."""

    def __init__(self, turn_id: int, last: bool = False) -> None:
        super().__init__()
        self.turn_id = turn_id
        self.last = last

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TokensReady) and message.turn_id == self.turn_id


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


class TrainingEventsReady(Message):
    """Events of run `run_id` are waiting in its relay: the handler drains them all (one message, many events)."""

    def __init__(self, run_id: int) -> None:
        super().__init__()
        self.run_id = run_id

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TrainingEventsReady) and message.run_id == self.run_id


class TrainingEnded(Message):
    """The training thread returned: `error` when the run could not start or failed (the reason, in one line)."""

    def __init__(self, run_id: int, error: str | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.error = error


class StoreOperationDone(Message):
    """A checkpoint-store operation run in a thread (import, export, copy, ...) finished."""

    def __init__(self, message: str | None, error: str | None = None, select: str | None = None) -> None:
        super().__init__()
        self.message = message
        self.error = error
        self.select = select  # the checkpoint to show selected afterwards


class ViewComputed(Message):
    """A look-inside view's computation (attention, lens, decodings) finished in its worker."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result


class StoreListed(Message):
    """The checkpoint store, as read by a worker (listing it may repair a crashed save: never on the UI thread)."""

    def __init__(self, rows: list[CheckpointInfo], request: int = 0) -> None:
        super().__init__()
        self.rows = rows
        self.request = request  # which of a screen's listings this is, where it asks for several
