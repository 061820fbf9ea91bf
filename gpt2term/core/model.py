"""GPT-2 in one readable file, with the course's module and state_dict names.

The structure mirrors *Build a Large Language Model (From Scratch)*, chapter 4: `GPTModel` holds `tok_emb`,
`pos_emb`, `trf_blocks` (each with `att`, `ff`, `norm1`, `norm2`), `final_norm` and `out_head`, so a learner can
read this file beside the book, and a `model.pth` saved by the book's code loads here unchanged.
Attention goes through `scaled_dot_product_attention` (fast kernels); a `KVCache` makes decoding incremental.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth and by how well each
matrix-vector kernel streams its matrix. The modules above are laid out for learning and training; for decoding,
`GPTModel` keeps a second, private copy of the weights laid out for those kernels (`InferenceWeights`: fused
query/key/value, `[in, out]` matrices, or oneDNN-packed bfloat16), built on first use and rebuilt whenever a
parameter changes. `prepare_for_inference(model, "bf16")` picks the number format decoding uses.
"""

from __future__ import annotations

import atexit
import math
import os
import queue
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gpt2term.core.config import GPTConfig


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


_ONEDNN_FP32: bool | None = None


def _onednn_fp32_linear_available() -> bool:
    """oneDNN's float32 matmul (the kernel behind `torch.ops.mkldnn._linear_pointwise`), checked once."""
    global _ONEDNN_FP32
    if _ONEDNN_FP32 is None:
        try:
            ok = torch.backends.mkldnn.is_available()
            if ok:
                g = torch.Generator().manual_seed(0)  # never the global RNG: a resumed run must draw what it would have
                w, x = torch.randn(8, 16, generator=g), torch.randn(3, 16, generator=g)
                y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                ok = bool(torch.allclose(y, x @ w.t(), atol=1e-5, rtol=1e-5))
        except (AttributeError, RuntimeError):
            ok = False
        _ONEDNN_FP32 = ok
    return _ONEDNN_FP32


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# Above this many output features the weight gradient stays with the default BLAS: oneDNN would first need the
# output gradient transposed, a copy as large as the logits for GPT-2's head, which eats its advantage.
_ONEDNN_WEIGHT_GRAD_MAX_OUT = 16384


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b with all three matrix multiplies (forward, input and weight gradients) run by oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad2d, weight.t().contiguous(), None).view(x.shape)
        if ctx.needs_input_grad[1]:
            x2d = x.reshape(-1, x.shape[-1])
            if weight.shape[0] <= _ONEDNN_WEIGHT_GRAD_MAX_OUT:
                grad_w = _onednn_linear(grad2d.t().contiguous(), x2d.t().contiguous(), None)
            else:
                grad_w = grad2d.t() @ x2d
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2d.sum(0)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state_dict) whose CPU float32 matrix multiplies run on oneDNN.

    PyTorch sends float32 matmuls to MKL, which on this project's AMD CPUs reaches about 45% of what oneDNN does on
    the same shapes (measured: ~110 vs ~245 GFLOP/s per core), and matmuls are most of a training step. bfloat16
    (autocast) already goes to oneDNN, and torch.compile, GPUs and float64 keep the standard path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            and _onednn_fp32_linear_available()
        ):
            return _OneDnnLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


LOSS_CHUNK_BYTES = 24 << 20  # float32 logits per slice: under glibc's 32 MB mmap ceiling, so slices reuse memory
LOSS_GRAD_BLOCK_ROWS = 1024  # bf16: rows of output gradient kept per weight-gradient matmul


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `x @ weight.T` against `targets`, with its gradients, one slice of rows at a time.

    Forward computes the gradients too (softmax minus one-hot is at hand while the slice's logits are), so the
    full logits are never stored. Matmuls run in `dtype` (bf16 under autocast, as the plain path would), the
    softmax in float32, weight gradients accumulate in float32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):  # noqa: ANN001, ANN205
        n, vocab = x.shape[0], weight.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fp32 = dtype == torch.float32
        w = weight.to(dtype)
        w_t = w.t().contiguous() if need_x else None
        rows = max(1, LOSS_CHUNK_BYTES // (4 * vocab))
        grad_x = torch.empty(x.shape, dtype=torch.float32) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32) if need_w else None
        # bf16: slices' output gradients are kept for a block of rows (half the size of float32 logits), then one
        # weight-gradient matmul per block, accumulated in float32; float32 accumulates slice by slice.
        block = max(rows, min(n, LOSS_GRAD_BLOCK_ROWS))
        kept = torch.empty(block, vocab, dtype=dtype) if need_w and not fp32 else None
        kept_from = 0
        total = torch.zeros((), dtype=torch.float64)
        x_c = x.to(dtype)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            xs, ts = x_c[start:stop], targets[start:stop, None]
            logits = _onednn_linear(xs, w, None) if fp32 else F.linear(xs, w)
            logp = torch.log_softmax(logits.float(), dim=-1)
            total -= logp.gather(1, ts).sum(dtype=torch.float64)
            if need_x or need_w:
                probs = logp.exp_()  # softmax; minus one at each target = d(sum of losses)/d(logits)
                probs.scatter_add_(1, ts, torch.full(ts.shape, -1.0))
                g = probs if fp32 else probs.to(dtype)
                if need_x:
                    grad_x[start:stop] = _onednn_linear(g, w_t, None) if fp32 else (g @ w)
                if need_w and fp32:
                    grad_w.addmm_(g.t(), xs)
                elif need_w:
                    if stop - kept_from > block:
                        grad_w += (kept[: start - kept_from].t() @ x_c[kept_from:start]).float()
                        kept_from = start
                    kept[start - kept_from : stop - kept_from] = g
        if kept is not None and n > kept_from:
            grad_w += (kept[: n - kept_from].t() @ x_c[kept_from:n]).float()
        ctx.save_for_backward(
            grad_x.div_(n) if grad_x is not None else None, grad_w.div_(n) if grad_w is not None else None
        )
        ctx.input_dtype = x.dtype
        return (total / n).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # noqa: ANN001, ANN205
        grad_x, grad_w = ctx.saved_tensors
        return (
            (grad_x * grad_loss).to(ctx.input_dtype) if grad_x is not None else None,
            grad_w * grad_loss if grad_w is not None else None,
            None,
            None,
        )


def head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the output head's logits `x @ weight.T` against `targets` (GPTModel(targets=))."""
    flat_x, flat_t = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    autocast_on = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast_on else weight.dtype
    if (
        x.device.type != "cpu"
        or weight.dtype != torch.float32
        or dtype not in (torch.float32, torch.bfloat16)
        or torch.compiler.is_compiling()
        or (dtype == torch.float32 and not _onednn_fp32_linear_available())
        or flat_t.numel() == 0
        or int(flat_t.min()) < 0
    ):
        logits = F.linear(x, weight)
        return F.cross_entropy(logits.flatten(0, -2).float(), flat_t)
    with torch.autocast("cpu", enabled=False):
        return _ChunkedHeadLoss.apply(flat_x.float().contiguous(), weight, flat_t.contiguous(), dtype)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(),
            Linear(4 * cfg.emb_dim, cfg.emb_dim),
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
        # Uninitialised: only the first `length` positions are ever read, and zeroing 75 MB (GPT-2 124M) would
        # cost the first token ~20 ms.
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
        self.W_query = Linear(d, d, bias=cfg.qkv_bias)
        self.W_key = Linear(d, d, bias=cfg.qkv_bias)
        self.W_value = Linear(d, d, bias=cfg.qkv_bias)
        self.out_proj = Linear(d, d)
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


def _drop_book_mask(state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001 (torch hook signature)
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
    """The course's GPTModel. `forward(idx)` returns logits of shape [batch, tokens, vocab]."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        # Decoding speed: see InferenceWeights. Off, every forward takes the plain path through the modules.
        self.fast_inference = True
        self.inference_dtype: torch.dtype | None = None  # None: the parameters' own dtype
        self._inference_weights: InferenceWeights | None = None
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

    def train(self, mode: bool = True) -> GPTModel:
        if mode:
            self.release_inference_weights()  # training changes every weight: a packed copy would only cost memory
        return super().train(mode)

    def release_inference_weights(self) -> None:
        """Free the packed decoding copy of the weights (it is rebuilt on the next decoding step)."""
        self._inference_weights = None

    def inference_weights(self) -> InferenceWeights:
        """The packed decoding weights, rebuilt when any parameter was replaced, moved or changed in place."""
        packed = self._inference_weights
        dtype = self.inference_dtype or self.out_head.weight.dtype
        if packed is None or not packed.matches(self, dtype):
            self._inference_weights = None  # free the stale copy before building the new one
            packed = self._inference_weights = InferenceWeights(self, dtype)
        return packed

    def uses_fast_path(self, cache: KVCache | None, last_only: bool) -> bool:
        """Decoding steps (a KV cache, or only the last position wanted) take the packed path; training, anything
        that needs gradients, and full-sequence forwards (evaluation, scoring) take the plain modules."""
        return (
            self.fast_inference
            and (cache is not None or last_only)
            and not self.training
            and not torch.is_grad_enabled()
            and self.out_head.weight.device.type == "cpu"
        )

    def forward(
        self,
        in_idx: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for every position, or only the last one (`last_only`: decoding needs no more, and the output
        head is the largest matrix multiply of a GPT-2 step).

        With `targets` (same shape as `in_idx`), returns the mean cross-entropy instead, the number
        `F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())` gives, computed a slice of rows at a
        time so that the [tokens, vocabulary] logits (206 MB for 8 x 128 tokens of GPT-2, 1.6 GB at 8 x 1024)
        and their gradient never exist whole: training's largest tensors, and on a CPU its slowest passes.
        """
        if targets is None and self.uses_fast_path(cache, last_only):
            return self.inference_weights().forward(in_idx, cache, last_only)
        x, _, _ = self.hidden_states(in_idx, cache)
        if targets is not None:
            return head_loss(self.final_norm(x), self.out_head.weight, targets)
        if last_only:
            x = x[:, -1:, :]
        return self.out_head(self.final_norm(x))


# ------------------------------------------------------------------------------------------- fast decoding path

INFERENCE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
REFINED_CANDIDATES = 64  # bf16 logits: this many top candidates per row are recomputed in float32


def inference_dtype(spec: str | torch.dtype | None) -> torch.dtype | None:
    """`--dtype` for decoding as a torch dtype (None: the model's own)."""
    if spec is None or isinstance(spec, torch.dtype):
        return spec
    key = spec.lower()
    if key not in INFERENCE_DTYPES:
        from gpt2term.core.errors import InputError

        raise InputError(f"unknown inference dtype {spec!r}; choose fp32 or bf16")
    return INFERENCE_DTYPES[key]


def prepare_for_inference(model: GPTModel, dtype: str | torch.dtype | None = None) -> GPTModel:
    """Put `model` in eval mode, choose the number format decoding runs in, and pack its weights now (so the first
    token does not pay for it).

    bf16 halves the bytes each token reads (the speed limit on a CPU) while the parameters stay float32: the
    residual stream, layer norms, attention and the final choice among the top candidates stay float32, so greedy
    tokens almost always match float32's. The packed copy costs memory: about as much as the linear weights in
    float32 (~500 MB for GPT-2 124M), half that in bf16; `model.release_inference_weights()` frees it.
    """
    model.eval()
    model.inference_dtype = inference_dtype(dtype)
    if model.fast_inference and model.out_head.weight.device.type == "cpu":
        with torch.no_grad():
            model.inference_weights()
    return model


_MKLDNN_BF16: bool | None = None


def _mkldnn_bf16_linear_available() -> bool:
    """oneDNN's packed bf16 matmul (what torch.compile uses for frozen CPU linears): its M=1 kernel streams a
    packed bf16 matrix several times faster than the generic bf16 matmuls. Private API, so checked once."""
    global _MKLDNN_BF16
    if _MKLDNN_BF16 is None:
        try:
            ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            if ok:
                g = torch.Generator().manual_seed(0)  # never the global RNG (see _onednn_fp32_linear_available)
                w = torch.randn(8, 16, generator=g)
                x = torch.randn(1, 16, generator=g)
                packed = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 1)
                y = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), packed, None, "none", [], "")
                ok = bool(torch.allclose(y.float(), x @ w.t(), atol=0.1, rtol=0.05))
        except (AttributeError, RuntimeError):
            ok = False
        _MKLDNN_BF16 = ok
    return _MKLDNN_BF16


class _Task:
    """Half of a matmul offered to the helper thread; whoever claims it first (helper or caller) runs it."""

    __slots__ = ("fn", "claim", "done", "error")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.claim = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run_if_unclaimed(self) -> bool:
        if not self.claim.acquire(blocking=False):
            return False
        try:
            self.fn()
        except BaseException as exc:  # handed to the caller, which re-raises it
            self.error = exc
        finally:
            self.done.set()
        return True


class _SecondCore:
    """A helper thread that computes the second half of a one-token matmul while the caller computes the first.

    A matrix-vector product is memory-bound, and one core streams at most ~25 GB/s here, while MKL runs these
    products on a single thread whatever `torch.set_num_threads` says. Splitting each matrix by columns between two
    threads reads it with both cores (measured: GPT-2 124M step 23.5 -> 17 ms).

    On a busy machine the helper may not get a core: if it has not started its half by the time the caller
    finished its own, the caller does it too; if it started and then stalled (the caller waited longer than its
    own half took, and over a millisecond), splitting pauses for `PAUSE_S` and the caller works alone, trying the
    helper again after.
    """

    PAUSE_S = 0.5
    STALL_S = 0.001  # a wake-up takes microseconds; a thread waiting for a core waits milliseconds

    _instance: _SecondCore | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._pid = os.getpid()
        self._paused_until = 0.0
        self._thread = threading.Thread(target=self._work, name="gpt2term-second-core", daemon=True)
        self._thread.start()
        # A thread that has run MKL/OpenMP code must end before the interpreter does: left running, the C++
        # runtime's exit destroys its thread pool under it and aborts ("terminate called without an active
        # exception", exit status 134 after a successful run).
        atexit.register(self._shut_down)

    def _shut_down(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    @classmethod
    def get(cls) -> _SecondCore:
        with cls._lock:
            if cls._instance is None or cls._instance._pid != os.getpid():  # threads do not survive a fork
                cls._instance = cls()
            return cls._instance

    def _work(self) -> None:
        with torch.inference_mode():  # the caller's outputs are inference tensors
            while (task := self._queue.get()) is not None:
                task.run_if_unclaimed()

    def both(self, first: Callable[[], None], second: Callable[[], None]) -> None:
        started = time.perf_counter()
        if started < self._paused_until:
            first()
            second()
            return
        task = _Task(second)
        self._queue.put(task)
        first()
        if not task.run_if_unclaimed():
            mine = time.perf_counter() - started
            waited_from = time.perf_counter()
            task.done.wait()
            if time.perf_counter() - waited_from > max(mine, self.STALL_S):  # the helper has no core to itself
                self._paused_until = time.perf_counter() + self.PAUSE_S
        if task.error is not None:
            raise task.error


SPLIT_MAX_ROWS = 4  # one-token steps (and beams): bigger products are compute-bound and MKL threads them itself


class _PackedLinear:
    """One linear layer in the layout its fastest decoding kernel wants.

    - "addmm" (float32): weight stored `[in, out]` in two column halves, so `addmm(bias, x, W)` streams it row by
      row (MKL reads it ~1.7x faster than the `[out, in]` nn.Linear layout for one token), each half on its own
      core (`_SecondCore`);
    - "onednn" (bf16): oneDNN's packed layout, which threads itself; `gelu` fused into the matmul;
    - "linear" (bf16 without oneDNN): plain `F.linear` on a bf16 copy.
    """

    __slots__ = ("kind", "weight", "bias", "gelu", "halves", "bias_halves", "split")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, *, gelu: bool = False):
        self.gelu = gelu
        self.halves: tuple[torch.Tensor, ...] = ()
        self.bias_halves: tuple[torch.Tensor | None, ...] = ()
        self.split = 0
        if dtype == torch.bfloat16 and _mkldnn_bf16_linear_available():
            self.kind = "onednn"
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype).contiguous(), 1)
        elif dtype in (torch.bfloat16, torch.float16):
            self.kind = "linear"
            self.weight = weight.to(dtype).contiguous()
        else:
            self.kind = "addmm"
            w = weight.to(dtype)
            self.split = w.shape[0] // 2
            self.halves = (w[: self.split].t().contiguous(), w[self.split :].t().contiguous())
            self.weight = None
            if bias is not None:
                b = bias.to(dtype)
                self.bias_halves = (b[: self.split].contiguous(), b[self.split :].contiguous())
        self.bias = bias.to(dtype).contiguous() if bias is not None and self.kind != "addmm" else None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.bias, *self.halves, *self.bias_halves) if t is not None]

    def _addmm(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        out = torch.empty(rows, self.split + self.halves[1].shape[1], dtype=x.dtype, device=x.device)

        def half(i: int) -> None:
            cols = slice(0, self.split) if i == 0 else slice(self.split, None)
            if self.bias_halves:
                torch.addmm(self.bias_halves[i], x, self.halves[i], out=out[:, cols])
            else:
                torch.mm(x, self.halves[i], out=out[:, cols])

        if rows <= SPLIT_MAX_ROWS and torch.get_num_threads() > 1:
            _SecondCore.get().both(lambda: half(0), lambda: half(1))
        else:
            half(0)
            half(1)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x`: [rows, in] in the layer's dtype."""
        if self.kind == "onednn":
            if self.gelu:
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "tanh")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        y = self._addmm(x) if self.kind == "addmm" else F.linear(x, self.weight, self.bias)
        return F.gelu(y, approximate="tanh") if self.gelu else y


class InferenceWeights:
    """A decoding-only copy of a GPTModel's weights, and the forward pass that uses it.

    Computes exactly what `GPTModel.forward` computes (same ops, fused query/key/value), for eval-mode, no-gradient
    calls only. In bf16 the matrices are bf16 but the residual stream, layer norms, attention and the KV cache stay
    float32, and each row's top `REFINED_CANDIDATES` logits are recomputed from the float32 head, so the token a
    greedy decoder picks and the probabilities it reports are float32-accurate where it matters.
    Valid while every parameter is the same tensor at the same address and version (`matches`).
    """

    def __init__(self, model: GPTModel, dtype: torch.dtype) -> None:
        cfg = model.cfg
        self.dtype = dtype  # the matrices' dtype
        self.act_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # residual stream
        self.n_heads, self.head_dim, self.emb_dim = cfg.n_heads, cfg.head_dim, cfg.emb_dim
        self.context_length = cfg.context_length
        self._params = list(model.parameters())
        self._versions = [(p.data_ptr(), p._version) for p in self._params]
        act = self.act_dtype
        with torch.no_grad():
            self.tok_emb = model.tok_emb.weight
            self.pos_emb = model.pos_emb.weight
            self.blocks = []
            for block in model.trf_blocks:
                att, ff = block.att, block.ff
                qkv_bias = None
                if att.W_query.bias is not None:
                    qkv_bias = torch.cat([att.W_query.bias, att.W_key.bias, att.W_value.bias])
                qkv = torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight])
                self.blocks.append(
                    (
                        (block.norm1.scale.to(act), block.norm1.shift.to(act), block.norm1.eps),
                        _PackedLinear(qkv, qkv_bias, dtype),
                        _PackedLinear(att.out_proj.weight, att.out_proj.bias, dtype),
                        (block.norm2.scale.to(act), block.norm2.shift.to(act), block.norm2.eps),
                        _PackedLinear(ff.layers[0].weight, ff.layers[0].bias, dtype, gelu=True),
                        _PackedLinear(ff.layers[2].weight, ff.layers[2].bias, dtype),
                    )
                )
            norm = model.final_norm
            self.final_norm = (norm.scale.to(act), norm.shift.to(act), norm.eps)
            self.head_fp = model.out_head.weight  # the original [vocab, emb] matrix, for refining candidates
            self.refine = dtype != self.act_dtype
            self.head = _PackedLinear(self.head_fp, None, dtype)

    def matches(self, model: GPTModel, dtype: torch.dtype) -> bool:
        if dtype != self.dtype:
            return False
        params = list(model.parameters())
        if len(params) != len(self._params):
            return False
        for p, mine, (ptr, version) in zip(params, self._params, self._versions, strict=True):
            if p is not mine or p._version != version or p.data_ptr() != ptr:
                return False
        return True

    def nbytes(self) -> int:
        """Memory held by the packed copy (what decoding costs on top of the parameters)."""
        layers = [layer for block in self.blocks for layer in block if isinstance(layer, _PackedLinear)]
        return sum(t.numel() * t.element_size() for layer in [*layers, self.head] for t in layer.tensors())

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if self.head.kind == "addmm":
            return self.head(x)
        logits = self.head(x.to(self.dtype)).to(self.act_dtype)
        if self.refine:
            # bf16 logits carry 8 significant bits (steps of 0.5 near GPT-2's typical -100): not enough to pick
            # the argmax. Recompute the top candidates of each row in float32 (a few hundred KB of the head).
            k = min(REFINED_CANDIDATES, logits.shape[-1])
            candidates = logits.topk(k, dim=-1).indices  # [rows, k]
            rows = self.head_fp[candidates].to(self.act_dtype)  # [rows, k, emb]
            exact = torch.bmm(rows, x.unsqueeze(-1)).squeeze(-1)
            logits.scatter_(1, candidates, exact)
        return logits

    def forward(self, in_idx: torch.Tensor, cache: KVCache | None, last_only: bool) -> torch.Tensor:
        b, t = in_idx.shape
        start = cache.length if cache is not None else 0
        if start + t > self.context_length:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds context_length {self.context_length}; crop it first"
            )
        d, heads, hd, act, dtype = self.emb_dim, self.n_heads, self.head_dim, self.act_dtype, self.dtype
        x = (self.tok_emb[in_idx] + self.pos_emb[start : start + t]).to(act).view(b * t, d)
        for i, (norm1, qkv_proj, out_proj, norm2, fc, proj) in enumerate(self.blocks):
            h = F.layer_norm(x, (d,), *norm1[:2], norm1[2]).to(dtype)
            qkv = qkv_proj(h).view(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)  # [3, b, heads, t, hd]
            q, k, v = qkv.unbind(0)
            if cache is not None:
                cache.keys[i, :b, :, start : start + t] = k
                cache.values[i, :b, :, start : start + t] = v
                k = cache.keys[i, :b, :, : start + t]
                v = cache.values[i, :b, :, : start + t]
            att_dtype = cache.keys.dtype if cache is not None else act  # attention runs in float32 unless the
            q, k, v = q.to(att_dtype), k.to(att_dtype), v.to(att_dtype)  # caller's cache says otherwise
            if t == 1:
                ctx = F.scaled_dot_product_attention(q, k, v)
            elif start == 0:
                ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            ctx = ctx.transpose(1, 2).reshape(b * t, d).to(dtype)
            x = x + out_proj(ctx).to(act)
            h = F.layer_norm(x, (d,), *norm2[:2], norm2[2]).to(dtype)
            x = x + proj(fc(h)).to(act)
        if cache is not None:
            cache.length += t
        rows = x.view(b, t, d)
        if last_only:
            rows = rows[:, -1:]
        out_t = rows.shape[1]
        rows = F.layer_norm(rows.reshape(b * out_t, d), (d,), *self.final_norm[:2], self.final_norm[2])
        return self._head(rows).view(b, out_t, -1)
