"""How good the model is: mean losses on fixed batches during a run, the overfitting warning, and the loss of a
whole corpus (`gpt2term eval`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gpt2term.core.data import GPTDataset
from gpt2term.core.devices import autocast
from gpt2term.core.errors import InputError
from gpt2term.core.memory import require_inference_memory
from gpt2term.core.metrics import perplexity
from gpt2term.core.model import GPTModel

OVERFIT_EVALS = 3  # validation loss rising this many evaluations in a row (while training loss falls) warns


class OverfittingWatch:
    """Warns once when validation loss has risen for `evals` evaluations in a row while training loss fell.

    That pattern (and not a single noisy uptick) is the course's picture of overfitting: the model keeps getting
    better at its training text and worse at text it has not seen.
    """

    def __init__(self, evals: int = OVERFIT_EVALS) -> None:
        self.evals = evals
        self.history: list[list[float]] = []  # recent [train_loss, val_loss]
        self.warned = False

    def update(self, train_loss: float, val_loss: float) -> str | None:
        self.history = [*self.history, [train_loss, val_loss]][-(self.evals + 1) :]
        if len(self.history) <= self.evals:
            return None
        trains = [h[0] for h in self.history]
        vals = [h[1] for h in self.history]
        rising = all(b > a for a, b in zip(vals, vals[1:], strict=False))
        falling = all(b < a for a, b in zip(trains, trains[1:], strict=False))
        if not rising:
            self.warned = False
            return None
        if not falling or self.warned:
            return None
        self.warned = True
        return (
            f"validation loss rose for {self.evals} evaluations in a row ({vals[0]:.3f} -> {vals[-1]:.3f}) while "
            f"training loss fell ({trains[0]:.3f} -> {trains[-1]:.3f}): the model is memorising its training text; "
            "stop here, add text, or raise the dropout"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history], "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [list(h) for h in state.get("history", [])]
        self.warned = bool(state.get("warned", False))


@dataclass
class CorpusEvaluation:
    """Mean loss over every token of a corpus (each predicted once, from up to a full context of history)."""

    loss: float
    perplexity: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


@torch.no_grad()
def evaluate_ids(
    model: GPTModel,
    ids: torch.Tensor,
    *,
    context_length: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    max_tokens: int | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> CorpusEvaluation:
    """Loss and perplexity of `model` on a stream of ids, cut into consecutive windows (the last may be shorter).

    `max_tokens` keeps only the first that many predictions (the windows at the start of the stream), so a quick
    estimate is quick. `progress(batches_done, batches_total, tokens_done)` is called once the input is known to
    be usable (with 0 batches done), then after every batch.
    """
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    n = int(ids.numel())
    if n < 2:
        raise InputError("the text has fewer than 2 tokens, so there is nothing to predict; give a longer corpus")
    context = min(context_length or model.cfg.context_length, model.cfg.context_length)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    full = (n - 1) // context  # windows of exactly `context` targets
    require_inference_memory(model.cfg, max(1, min(batch_size, full)), context, device)
    total_nll, total_tokens = 0.0, 0
    rest = (n - 1) - full * context
    batches = -(-full // batch_size) + (1 if rest else 0)
    done = 0
    try:
        if progress is not None:
            progress(0, batches, 0)
        dataset = GPTDataset(ids, context)
        for start in range(0, full, batch_size):
            index = torch.arange(start, min(full, start + batch_size))
            inputs, targets = dataset.batch(index)
            with autocast(device, amp_dtype):
                logits = model(inputs.to(device))
            total_nll += float(
                F.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten(), reduction="sum")
            )
            total_tokens += targets.numel()
            done += 1
            if progress is not None:
                progress(done, batches, total_tokens)
        if rest:
            chunk = ids[full * context :].to(torch.int64)
            with autocast(device, amp_dtype):
                logits = model(chunk[None, :-1].to(device))
            total_nll += float(F.cross_entropy(logits[0].float(), chunk[1:].to(device), reduction="sum"))
            total_tokens += rest
            if progress is not None:
                progress(done + 1, batches, total_tokens)
    finally:
        model.train(was_training)
    loss = total_nll / total_tokens
    return CorpusEvaluation(loss=loss, perplexity=perplexity(loss), tokens=total_tokens)


@torch.no_grad()
def mean_loss(
    model: GPTModel,
    dataset: GPTDataset,
    batches: list[torch.Tensor],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    stopped: Callable[[], bool] | None = None,
) -> float | None:
    """The mean loss over fixed batches of windows (`evaluation_batches`), as the trainer reports it; the model's
    mode is the caller's. None when `stopped()` became true between two batches."""
    total, count = 0.0, 0
    for index in batches:
        if stopped is not None and stopped():
            return None
        inputs, targets = dataset.batch(index)
        with autocast(device, amp_dtype):
            loss = model(inputs.to(device), targets=targets.to(device))
        total += float(loss) * len(index)
        count += len(index)
    return total / max(1, count)
