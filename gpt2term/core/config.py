"""GPTConfig with the course's field names, and the presets users pick from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from gpt2term.core.errors import InputError


@dataclass(frozen=True)
class GPTConfig:
    """The course's GPT_CONFIG_124M dictionary as a typed, immutable object."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.emb_dim % self.n_heads:
            raise InputError(
                f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}; pick sizes where it is"
            )
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise InputError(f"drop_rate must be in [0, 1), got {self.drop_rate}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Accepts the course's dict (and ignores unknown keys, so newer files still load)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def with_(self, **changes: Any) -> GPTConfig:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# GPT-2's released sizes use biases on the query/key/value projections (the course sets qkv_bias=True to load them).
# `tiny` and `mini` were sized by measuring training speed on a 2-core CPU (see README): a few minutes gives
# readable text on the built-in corpus.
PRESETS: dict[str, GPTConfig] = {
    "gpt2-124M": GPTConfig(context_length=1024, emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-medium": GPTConfig(context_length=1024, emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": GPTConfig(context_length=1024, emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": GPTConfig(context_length=1024, emb_dim=1600, n_heads=25, n_layers=48),
    "tiny": GPTConfig(context_length=128, emb_dim=256, n_heads=4, n_layers=4),
    "mini": GPTConfig(context_length=256, emb_dim=384, n_heads=6, n_layers=6),
}
PRESET_ALIASES = {"gpt2": "gpt2-124M", "gpt2-small": "gpt2-124M", "124M": "gpt2-124M"}


def preset(name: str) -> GPTConfig:
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[key]
