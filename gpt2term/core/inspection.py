"""Looking inside a model: attention weights and the logit lens. Off the fast path; computed on demand.

Attention here goes through the explicit softmax the course draws (scores, causal mask, softmax), because fused
attention kernels never materialise the weights. The logit lens sends each layer's residual stream straight
through the final LayerNorm and output head, to show what the model "thinks" the next token is at that depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2term.core.errors import InputError
from gpt2term.core.generation import Candidate
from gpt2term.core.model import GPTModel
from gpt2term.core.tokenizer import Tokenizer


def _checked_ids(model: GPTModel, token_ids: Sequence[int]) -> torch.Tensor:
    if not token_ids:
        raise InputError("the text is empty; give at least one token to inspect")
    ctx = model.cfg.context_length
    if len(token_ids) > ctx:
        raise InputError(f"{len(token_ids)} tokens is more than the model's context of {ctx}; shorten the text")
    return torch.tensor([list(token_ids)], device=next(model.parameters()).device)


def attention_weights(model: GPTModel, token_ids: Sequence[int]) -> torch.Tensor:
    """Every layer's and head's attention matrix, shape [layers, heads, query, key]; rows sum to 1."""
    ids = _checked_ids(model, token_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            _, _, weights = model.hidden_states(ids, need_weights=True)
    finally:
        model.train(was_training)
    return torch.stack([w[0] for w in weights]).float().cpu()


@dataclass(frozen=True)
class LensLayer:
    """What the residual stream after `layer` blocks predicts (layer 0: the embeddings; the last: the real output)."""

    layer: int
    top: tuple[Candidate, ...]

    @property
    def best(self) -> int:
        return self.top[0].token_id


def logit_lens(
    model: GPTModel, tokenizer: Tokenizer, token_ids: Sequence[int], position: int = -1, top_k: int = 5
) -> list[LensLayer]:
    """Top-k next-token predictions at `position` read off every layer's residual stream, first layer first."""
    ids = _checked_ids(model, token_ids)
    n = ids.shape[1]
    if not -n <= position < n:
        raise InputError(f"position {position} is outside the text's {n} tokens; use 0..{n - 1} or -1 for the last")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            final, streams, _ = model.hidden_states(ids, need_weights=True)
            rows = torch.stack([s[0, position] for s in streams] + [final[0, position]])
            probs = torch.softmax(model.out_head(model.final_norm(rows)).float(), dim=-1).cpu()
    finally:
        model.train(was_training)
    values, indices = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
    return [
        LensLayer(
            layer,
            tuple(
                Candidate(int(i), tokenizer.token_text(int(i)), float(p))
                for p, i in zip(values[layer].tolist(), indices[layer].tolist(), strict=True)
            ),
        )
        for layer in range(rows.shape[0])
    ]


def first_layer_with_final_answer(layers: Sequence[LensLayer]) -> int:
    """The shallowest layer from which on the top prediction is already the model's final answer."""
    final = layers[-1].best
    first = len(layers) - 1
    for lens in reversed(layers):
        if lens.best != final:
            break
        first = lens.layer
    return first
