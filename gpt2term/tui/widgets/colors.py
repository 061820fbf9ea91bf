"""Colours that encode a probability, shared by the token stream and its legend."""

from __future__ import annotations

import math

from textual.color import Color

_LOW = Color.parse("#e5534b")  # improbable: red
_MID = Color.parse("#d8b342")  # yellow
_HIGH = Color.parse("#57ab5a")  # confident: green
LEGEND_PROBS = (0.001, 0.01, 0.1, 1.0)


def prob_color(prob: float) -> str:
    """Red for 0.1% or less, yellow around 3%, green for near-certain (log scale: surprise is logarithmic)."""
    t = (math.log10(max(prob, 1e-9)) + 3) / 3
    t = min(1.0, max(0.0, t))
    color = _LOW.blend(_MID, t * 2) if t < 0.5 else _MID.blend(_HIGH, (t - 0.5) * 2)
    return color.hex
