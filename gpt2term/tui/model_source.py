"""Which model the app shows, and how it is described in the header.

`load_app_model` is the one place that knows where models come from, so the app, the CLI and the tests agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gpt2term.core.accel import accelerate
from gpt2term.core.model import GPTModel
from gpt2term.formatting import format_count

if TYPE_CHECKING:
    from gpt2term.core.checkpoints import Checkpoint, CheckpointStore

UNTRAINED_NAME = "gpt2-124M"
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
    from gpt2term.core.config import preset

    torch.manual_seed(123)
    model = GPTModel(preset("gpt2-124M")).to(device or default_device()).eval()
    return AppModel(model, UNTRAINED_NAME, untrained=True, notices=[UNTRAINED_HINT])


def load_app_model(checkpoint: str | None, device: str | None = None) -> AppModel:
    """The model the app opens: `checkpoint` (a store name or a path, as `generate --checkpoint` takes), else the
    most recently used checkpoint in the store, else an untrained GPT-2 124M.

    Without `checkpoint`, a damaged store never keeps the app from starting: a last-used checkpoint that no longer
    loads is passed over for the next good one (or the untrained model), and the notices say so."""
    from gpt2term.core.checkpoints import CheckpointStore, resolve_weights
    from gpt2term.core.errors import Gpt2termError

    store = CheckpointStore()
    if checkpoint is not None:
        return _from_checkpoint(resolve_weights(checkpoint, store), store, device)
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
            app_model = _from_checkpoint(resolve_weights(name, store), store, device)
        except Gpt2termError as exc:
            notices.append(f"could not open {name!r}: {exc}")
            continue
        app_model.notices[:0] = notices
        return app_model
    untrained = untrained_gpt2(device)
    untrained.notices[:0] = notices
    return untrained


def _from_checkpoint(loaded: Checkpoint, store: CheckpointStore, device: str | None) -> AppModel:
    model = loaded.build_model(device or default_device())
    if loaded.store_name:
        store.mark_used(loaded.store_name)  # opened again next time
    step = loaded.meta.get("step")
    return AppModel(
        model,
        loaded.name,
        trained_steps=int(step) if isinstance(step, int | float) else None,
        untrained=step == 0,
        source=str(loaded.meta.get("source") or ""),
        notices=list(loaded.notices),
    )
