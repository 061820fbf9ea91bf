"""GPTConfig with the course's field names, and the presets users pick from."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from numbers import Integral, Real
from typing import Any

from gpt2term.core.errors import ConfigError, InputError

# Ceilings: GPT-2's largest size (1558M: 48 layers, 1600 dims, 25 heads, context 1024, vocabulary 50257) times a
# generous factor. A damaged or hostile config.json / meta.json is refused here instead of allocating for minutes.
MAX_SIZES = {
    "vocab_size": 1_000_000,
    "context_length": 65_536,
    "emb_dim": 16_384,
    "n_heads": 1_024,
    "n_layers": 512,
}
MAX_PARAMETERS = 20_000_000_000  # about 13 times GPT-2 1558M; 80 GB of float32 weights


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
        self.validate()

    def validate(self) -> GPTConfig:
        """Types, ranges and sizes, checked in one place for every way a config arrives (meta.json, a Hugging Face
        config.json, shapes read off a weights file, command-line flags, the app's form). Raises ConfigError with a
        one-line reason naming the field; returns self so callers can chain it."""
        for name, ceiling in MAX_SIZES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
            if value > ceiling:
                raise ConfigError(f"{name} {value:,} is too large (at most {ceiling:,}); pick a smaller model")
        if self.emb_dim % self.n_heads:
            raise ConfigError(
                f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}; pick sizes where it is"
            )
        rate = self.drop_rate
        if isinstance(rate, bool) or not isinstance(rate, Real) or not math.isfinite(rate) or not 0.0 <= rate < 1.0:
            raise ConfigError(f"drop_rate must be a number in [0, 1), got {rate!r}")
        if not isinstance(self.qkv_bias, bool):
            raise ConfigError(f"qkv_bias must be true or false, got {self.qkv_bias!r}")
        if self.parameters() > MAX_PARAMETERS:
            raise ConfigError(
                f"this config has {self.parameters():,} parameters, more than the {MAX_PARAMETERS:,} allowed "
                f"({self.n_layers} layers of {self.emb_dim} dims, vocabulary {self.vocab_size:,}); pick a smaller model"
            )
        return self

    def parameters(self) -> int:
        """GPTModel's parameter count, by arithmetic (the config can be judged before anything is allocated)."""
        d = self.emb_dim
        per_layer = 12 * d * d + (13 if self.qkv_bias else 10) * d
        return 2 * self.vocab_size * d + self.context_length * d + self.n_layers * per_layer + 2 * d

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, complete: bool = False) -> GPTConfig:
        """Accepts the course's dict (and ignores unknown keys, so newer files still load). With `complete`
        (files we wrote ourselves), a missing field is an error rather than a default."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be an object of sizes, got {data!r}"[:200])
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in data]
        if complete and missing:
            raise ConfigError(f"config lacks {missing[0]}")
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
