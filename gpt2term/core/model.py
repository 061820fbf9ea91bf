"""GPT-2 in one readable file, with the course's module and state_dict names.

The structure mirrors *Build a Large Language Model (From Scratch)*, chapter 4: `GPTModel` holds `tok_emb`,
`pos_emb`, `trf_blocks` (each with `att`, `ff`, `norm1`, `norm2`), `final_norm` and `out_head`, so a learner can
read this file beside the book, and a `model.pth` saved by the book's code loads here unchanged.
Attention goes through `scaled_dot_product_attention` (fast kernels); a `KVCache` makes decoding incremental.

This is the plain model. `gpt2term.core.accel.accelerate(model)` makes the same model faster on a CPU (packed
decoding weights, oneDNN linears, a sliced loss) without changing its modules, parameters or numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt2term.core.config import GPTConfig
from gpt2term.core.recipes import INITS


class LayerNorm(nn.Module):
    """The course's LayerNorm (`scale`, `shift`, biased variance, eps 1e-5), computed by the fused kernel."""

    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GPT-2's GELU (tanh approximation), a module so that `ff.layers` keeps the course's indices 0 and 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KVCache:
    """Keys and values of every layer, preallocated for the whole context, so decoding one token costs one token.

    `length` is how many positions are filled. The cache never grows past `context_length`: beyond it the
    generator falls back to the course's crop-and-recompute, because absolute position embeddings change meaning
    when the window slides.
    """

    def __init__(
        self,
        cfg: GPTConfig,
        batch_size: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (cfg.n_layers, batch_size, cfg.n_heads, cfg.context_length, cfg.head_dim)
        # Uninitialised: only the first `length` positions are ever read, and zeroing a whole context's worth
        # would slow down the first token.
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reset(self) -> None:
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search picks which hypotheses survive)."""
        self.keys = self.keys.index_select(1, index)
        self.values = self.values.index_select(1, index)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with the course's `W_query`, `W_key`, `W_value`, `out_proj`."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.emb_dim
        self.num_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.W_query = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(cfg.drop_rate)
        # The book registers a persistent causal `mask` buffer; its model.pth files carry it. We build masks on the
        # fly (SDPA's is_causal), so drop it on load instead of failing with "unexpected key".
        self._register_load_state_dict_pre_hook(_drop_book_mask)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, d = x.shape
        q, k, v = self._split(self.W_query(x)), self._split(self.W_key(x)), self._split(self.W_value(x))
        start = 0
        if cache is not None:
            start = cache.length
            cache.keys[layer, :b, :, start : start + t] = k
            cache.values[layer, :b, :, start : start + t] = v
            k = cache.keys[layer, :b, :, : start + t]
            v = cache.values[layer, :b, :, : start + t]
        weights = None
        if need_weights:
            # The explicit path the course draws: scores, causal mask, softmax. Only for inspection.
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            ctx = self.dropout(weights) @ v
        else:
            p = self.dropout.p if self.training else 0.0
            if t == 1:
                ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            elif start == 0:
                ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        ctx = ctx.transpose(1, 2).reshape(b, t, d)
        return self.out_proj(ctx), weights


def _drop_book_mask(state_dict, prefix, *args, **kwargs) -> None:
    state_dict.pop(prefix + "mask", None)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.att = MultiHeadAttention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.att(self.norm1(x), cache, layer, need_weights)
        x = x + self.drop_shortcut(attended)
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x, weights


class GPTModel(nn.Module):
    """The course's GPTModel. `forward(idx)` returns logits of shape [batch, tokens, vocab].

    `init="gpt2"` draws the weights as GPT-2 does (`reset_parameters`); `init="book"` keeps PyTorch's default for
    each layer, as the book's GPTModel does, so `torch.manual_seed(123); GPTModel(cfg, init="book")` holds the very
    weights the book's `torch.manual_seed(123); GPTModel(GPT_CONFIG_124M)` starts chapter 5 from.
    """

    def __init__(self, cfg: GPTConfig, init: str = "gpt2") -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if init == "gpt2":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's initialisation (normal, std 0.02; residual projections scaled by 1/sqrt(2 * n_layers)).

        With it, an untrained model's logits are near zero, so its loss starts near ln(vocab_size) ≈ 10.8, the
        number the course tells learners to expect.
        """
        for name, p in self.named_parameters():
            if name.endswith(("scale",)):
                p.fill_(1.0)
            elif name.endswith(("shift", "bias")):
                p.zero_()
            else:
                std = 0.02
                if name.endswith(("out_proj.weight", "ff.layers.2.weight")):
                    std /= math.sqrt(2 * self.cfg.n_layers)
                p.normal_(0.0, std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(
        self, in_idx: torch.Tensor, cache: KVCache | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Final residual stream, plus every layer's input stream and attention weights when asked (inspection)."""
        _, t = in_idx.shape
        start = cache.length if cache is not None else 0
        if start + t > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds context_length {self.cfg.context_length}; crop it first"
            )
        pos = torch.arange(start, start + t, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos))
        streams: list[torch.Tensor] = []
        weights: list[torch.Tensor] = []
        for i, block in enumerate(self.trf_blocks):
            if need_weights:
                streams.append(x)
            x, w = block(x, cache, i, need_weights)
            if w is not None:
                weights.append(w)
        if cache is not None:
            cache.length += t
        return x, streams, weights

    def forward(
        self,
        in_idx: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for every position, or only the last one (`last_only`: decoding needs no more, and the output
        head is the largest matrix multiply of a GPT-2 step).

        With `targets` (same shape as `in_idx`), returns the course's training loss instead: the mean
        cross-entropy of the logits against them.
        """
        x, _, _ = self.hidden_states(in_idx, cache)
        if targets is not None:
            logits = self.out_head(self.final_norm(x))
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        if last_only:
            x = x[:, -1:, :]
        return self.out_head(self.final_norm(x))
