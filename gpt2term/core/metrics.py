"""Numbers derived from a loss, one rule each, so training, the store, generation and the app never disagree."""

from __future__ import annotations

import math

MAX_LOG_PERPLEXITY = 700.0  # exp(700) still fits in a float; a larger loss (a diverged model) would overflow


def perplexity(loss: float) -> float:
    """exp(mean loss per token): "as unsure as picking among this many tokens", capped so it stays a finite number
    (an untrained model's perplexity is about the vocabulary size)."""
    return math.exp(min(float(loss), MAX_LOG_PERPLEXITY))
