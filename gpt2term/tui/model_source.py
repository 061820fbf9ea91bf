"""Which model the app shows, and how it is described in the header.

`load_app_model` picks the model the app opens; how a name or a path becomes a model is the core's `open_model`,
shared with the CLI, so both faces open the same model the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gpt2term.core.accel import accelerate
from gpt2term.core.model import GPTModel
from gpt2term.core.store.resolve import open_model
from gpt2term.formatting import format_count

if TYPE_CHECKING:
    from gpt2term.core.store.store import CheckpointStore

UNTRAINED_HINT = (
    "This model is untrained (random weights): expect gibberish. Train one (`gpt2term train`) or import GPT-2 "
    "weights (`gpt2term ckpt import PATH`), then open it with `gpt2term --checkpoint NAME`."
)


@dataclass
class AppModel:
    """A loaded model and what the header says about it."""

    model: GPTModel
    name: str
    trained_steps: int | None = None  # None: unknown (imported weights) or untrained
    untrained: bool = False
    source: str = ""
    notices: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        accelerate(self.model)  # every model the app shows, whichever way it was loaded

    @property
    def parameters(self) -> int:
        return self.model.num_parameters()

    @property
    def context_length(self) -> int:
        return self.model.cfg.context_length

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @property
    def training_label(self) -> str:
        if self.untrained:
            return "untrained"
        if self.trained_steps is None:
            return "imported" if self.source else "trained"
        return f"step {self.trained_steps:,}"

    def header_parts(self, compact: bool = False) -> list[str]:
        params = format_count(self.parameters)
        return [
            self.name,
            params if compact else f"{params} params",
            f"ctx {self.context_length}",
            self.training_label,
            f"{self.device} {self.dtype}",
        ]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def untrained_gpt2(device: str | None = None) -> AppModel:
    """GPT-2 124M with random weights (seed 123, like `gpt2term generate` without a checkpoint)."""
    opened = open_model(None, device=device or default_device())
    return AppModel(opened.model, opened.name, untrained=True, notices=[UNTRAINED_HINT])


def load_app_model(checkpoint: str | None, device: str | None = None, n_heads: int | None = None) -> AppModel:
    """The model the app opens: `checkpoint` (a store name or a path, as `generate --checkpoint` takes), else the
    most recently used checkpoint in the store, else an untrained GPT-2 124M.

    Without `checkpoint`, a damaged store never keeps the app from starting: a last-used checkpoint that no longer
    loads is passed over for the next good one (or the untrained model), and the notices say so."""
    from gpt2term.core.errors import Gpt2termError
    from gpt2term.core.store.store import CheckpointStore

    store = CheckpointStore()
    if checkpoint is not None:
        return _from_checkpoint(checkpoint, store, device, n_heads)
    notices: list[str] = []
    last = store.last_used()
    rows = store.list()
    damaged = {row.name: row.damaged for row in rows if row.damaged}
    if last in damaged:
        notices.append(f"the last checkpoint used, {last!r}, is damaged ({damaged[last]}); opening another")
    first = store.most_recent()
    good = sorted((row for row in rows if not row.damaged), key=lambda row: row.updated or "", reverse=True)
    candidates = [first] if first else []
    candidates += [row.name for row in good if row.name != first]
    for name in candidates:
        try:
            app_model = _from_checkpoint(name, store, device)
        except Gpt2termError as exc:
            notices.append(f"could not open {name!r}: {exc}")
            continue
        app_model.notices[:0] = notices
        return app_model
    untrained = untrained_gpt2(device)
    untrained.notices[:0] = notices
    return untrained


def _from_checkpoint(spec: str, store: CheckpointStore, device: str | None, n_heads: int | None = None) -> AppModel:
    opened = open_model(spec, store, device=device or default_device(), n_heads=n_heads)
    return AppModel(
        opened.model,
        opened.name,
        trained_steps=opened.step,
        untrained=opened.untrained,
        source=opened.source,
        notices=opened.notices,
    )
