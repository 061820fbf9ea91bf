"""Decoding's own copy of the weights, laid out for the kernels that decode one token fastest, and its forward.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth and by how well each
matrix-vector kernel streams its matrix. The course's modules are laid out for learning and training; this copy
fuses query/key/value, stores matrices `[in, out]` in column blocks (one per thread), oneDNN-packed bfloat16, or
int8 with one scale per output channel (`int8`).
It is built on first use and rebuilt whenever a parameter changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2term.core.accel import int8, native, probes, threads
from gpt2term.core.errors import InputError
from gpt2term.core.model import GPTModel, KVCache

INFERENCE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,  # weights only: activations, layer norms, attention and the KV cache stay float32
}
REFINED_CANDIDATES = 64  # bf16 and int8 logits: this many top candidates per row are recomputed in float32
GOVERNED_MAX_ROWS = 4  # one-token steps (and beams) are governed; prompts are compute-bound and use every thread


def inference_dtype(spec: str | torch.dtype | None) -> torch.dtype | None:
    """`--dtype` for decoding as a torch dtype (None: the model's own)."""
    if spec is None or isinstance(spec, torch.dtype):
        return spec
    key = spec.lower()
    if key not in INFERENCE_DTYPES:
        raise InputError(f"unknown inference dtype {spec!r}; choose fp32, bf16 or int8")
    return INFERENCE_DTYPES[key]


class PackedLinear:
    """One linear layer in the layout its fastest decoding kernel wants.

    - "native": gpt2term's own kernels (`native.TiledMatrix`) for every dtype, on float32 activations, where they
      are built; the kinds below are PyTorch's kernels, for everywhere else:
    - "fp32": weight stored `[in, out]` (what one-token products stream fastest) and used through its transposed
      view, by oneDNN with bias and `gelu` fused into the call (`F.linear` where oneDNN is missing);
    - "onednn" (bf16): oneDNN's packed layout; `gelu` fused into the matmul;
    - "linear" (bf16 without oneDNN): plain `F.linear` on a bf16 copy;
    - "int8": per-output-channel int8 (`int8.Int8Matrix`) on float32 activations.

    Every kind's kernel threads itself with OpenMP; for one-token steps `threads.GovernedStep` picks how many
    threads they get (fewer on a busy machine, where OpenMP's threads wait at their barrier for a core they lack).
    """

    __slots__ = ("kind", "weight", "bias", "gelu", "out_features", "onednn")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        *,
        gelu: bool = False,
        onednn: bool | None = None,
        use_native: bool | None = None,
    ) -> None:
        self.gelu = gelu
        self.out_features = weight.shape[0]
        self.onednn = False
        if (native.available() if use_native is None else use_native) and native.supports(dtype):
            self.kind = "native"
            self.weight = native.TiledMatrix(weight, bias, dtype)
            bias = None  # the kernel adds it
        elif dtype == torch.int8:
            self.kind = "int8"
            self.weight = int8.Int8Matrix(weight, bias)
            bias = None  # the int8 matrix adds its own
        elif dtype == torch.bfloat16 and (probes.onednn_bf16() if onednn is None else onednn):
            self.kind = "onednn"
            self.onednn = True
            self.weight = probes.onednn_pack_bf16(weight)
        elif dtype in (torch.bfloat16, torch.float16):
            self.kind = "linear"
            self.weight = weight.to(dtype).contiguous()
        else:
            self.kind = "fp32"
            self.onednn = dtype == torch.float32 and (probes.onednn_fp32() if onednn is None else onednn)
            self.weight = weight.to(dtype).t().contiguous().t()  # [out, in] as a view of an [in, out] matrix
        self.bias = bias.to(dtype).contiguous() if bias is not None else None

    def tensors(self) -> list[torch.Tensor]:
        if self.kind in ("int8", "native"):
            return self.weight.tensors()
        return [t for t in (self.weight, self.bias) if t is not None]

    def nbytes(self) -> int:
        if self.kind in ("int8", "native"):
            return self.weight.nbytes()
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x`: [rows, in] in the layer's dtype (float32 for native and int8), on PyTorch's current thread count."""
        if self.onednn:  # "onednn", and "fp32" where oneDNN's float32 matmul works
            return probes.onednn_linear(x, self.weight, self.bias, gelu=self.gelu)
        y = self.weight(x) if self.kind in ("int8", "native") else F.linear(x, self.weight, self.bias)
        return F.gelu(y, approximate="tanh") if self.gelu else y


class InferenceWeights:
    """A decoding-only copy of a GPTModel's weights, and the forward pass that uses it.

    Computes exactly what `GPTModel.forward` computes (same ops, fused query/key/value), for eval-mode, no-gradient
    calls only. In bf16 the matrices are bf16 but the residual stream, layer norms, attention and the KV cache stay
    float32, and each row's top `REFINED_CANDIDATES` logits are recomputed from the float32 head, so the token a
    greedy decoder picks and the probabilities it reports are float32-accurate where it matters. int8 is the same
    with int8 matrices (the layers take float32 activations).
    Valid while every parameter is the same tensor at the same address and version (`matches`).
    """

    def __init__(
        self, model: GPTModel, dtype: torch.dtype, params: list[torch.Tensor], stamp: list[tuple[int, int]]
    ) -> None:
        cfg = model.cfg
        self.dtype = dtype  # the matrices' dtype
        self.act_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16, torch.int8) else dtype  # residual
        self.native = native.supports(dtype) and native.available()  # one choice for every layer (same inputs)
        self.in_dtype = self.act_dtype if dtype == torch.int8 or self.native else dtype  # what the matrices take
        self.n_heads, self.head_dim, self.emb_dim = cfg.n_heads, cfg.head_dim, cfg.emb_dim
        self.context_length = cfg.context_length
        self._params = params
        self._stamp = stamp
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
                        PackedLinear(qkv, qkv_bias, dtype, use_native=self.native),
                        PackedLinear(att.out_proj.weight, att.out_proj.bias, dtype, use_native=self.native),
                        (block.norm2.scale.to(act), block.norm2.shift.to(act), block.norm2.eps),
                        PackedLinear(ff.layers[0].weight, ff.layers[0].bias, dtype, gelu=True, use_native=self.native),
                        PackedLinear(ff.layers[2].weight, ff.layers[2].bias, dtype, use_native=self.native),
                    )
                )
            # With the kernels, a one-token step runs each block in one call (`native.BlockStep`).
            self.block_steps = (
                [
                    native.BlockStep(norm1, (qkv.weight, out.weight, fc.weight, proj.weight), norm2, cfg.n_heads)
                    for norm1, qkv, out, norm2, fc, proj in self.blocks
                ]
                if self.native
                else []
            )
            norm = model.final_norm
            self.final_norm = (norm.scale.to(act), norm.shift.to(act), norm.eps)
            self.head_fp = model.out_head.weight  # the original [vocab, emb] matrix, for refining candidates
            self.refine = dtype != self.act_dtype
            self.head = PackedLinear(self.head_fp, None, dtype, use_native=self.native)

    def matches(self, params: list[torch.Tensor], dtype: torch.dtype) -> bool:
        if dtype != self.dtype or len(params) != len(self._params):
            return False
        for p, mine in zip(params, self._params, strict=True):
            if p is not mine:
                return False
        return probes.stamp(params) == self._stamp

    def nbytes(self) -> int:
        """Memory held by the packed copy (what decoding costs on top of the parameters)."""
        layers = [layer for block in self.blocks for layer in block if isinstance(layer, PackedLinear)]
        return sum(layer.nbytes() for layer in [*layers, self.head])

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if not self.refine:  # float32 matrices: the logits are float32's already
            return self.head(x)
        logits = self.head(x.to(self.in_dtype)).to(self.act_dtype)
        # bf16 (and int8) logits carry about 8 significant bits: not enough to pick the argmax among GPT-2's
        # close candidates.
        # Recompute the top candidates of each row in float32 (a small slice of the head).
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
        if b * t > GOVERNED_MAX_ROWS:
            return self._forward(in_idx, cache, last_only, None)
        with threads.GovernedStep((self.dtype, b * t)) as step:
            return self._forward(in_idx, cache, last_only, step)

    def _forward(
        self, in_idx: torch.Tensor, cache: KVCache | None, last_only: bool, step: threads.GovernedStep | None
    ) -> torch.Tensor:
        b, t = in_idx.shape
        start = cache.length if cache is not None else 0
        d, act = self.emb_dim, self.act_dtype
        x = (self.tok_emb[in_idx] + self.pos_emb[start : start + t]).to(act).view(b * t, d)
        if b * t == 1 and self._one_call_per_block(cache):
            x = self._block_steps(x, cache, start, step)
        else:
            x = self._blocks_forward(x, b, t, cache, start, step)
        if cache is not None:
            cache.length += t
        rows = x.view(b, t, d)
        if last_only:
            rows = rows[:, -1:]
        out_t = rows.shape[1]
        rows = F.layer_norm(rows.reshape(b * out_t, d), (d,), *self.final_norm[:2], self.final_norm[2])
        return self._head(rows).view(b, out_t, -1)

    def _one_call_per_block(self, cache: KVCache | None) -> bool:
        """One token whose blocks can each run as one `BlockStep`: a float32 cache laid out as the kernels read it."""
        return (
            bool(self.block_steps)
            and cache is not None
            and cache.keys.dtype == torch.float32
            and cache.keys.is_contiguous()
            and cache.values.is_contiguous()
        )

    def _block_steps(
        self, x: torch.Tensor, cache: KVCache, start: int, step: threads.GovernedStep | None
    ) -> torch.Tensor:
        x = x.contiguous().view(-1)
        # Scratch of its own for each call: two threads may decode with one model.
        work = torch.empty(self.block_steps[0].work_floats(cache.capacity))
        for i, block in enumerate(self.block_steps):
            block(x, cache.keys[i, 0], cache.values[i, 0], start, work)
            if step is not None:
                step.check()
        return x

    def _blocks_forward(
        self,
        x: torch.Tensor,
        b: int,
        t: int,
        cache: KVCache | None,
        start: int,
        step: threads.GovernedStep | None,
    ) -> torch.Tensor:
        d, heads, hd, act, dtype = self.emb_dim, self.n_heads, self.head_dim, self.act_dtype, self.in_dtype
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
            if step is not None:
                step.check()
        return x


def wanted(model: GPTModel, cache: KVCache | None, last_only: bool) -> bool:
    """Decoding steps (a KV cache, or only the last position wanted) take the packed path; training, anything
    that needs gradients, and full-sequence forwards (evaluation, scoring) take the plain modules."""
    return (
        (cache is not None or last_only)
        and not model.training
        and not torch.is_grad_enabled()
        and model.out_head.weight.device.type == "cpu"
    )


def current(model: GPTModel, dtype: torch.dtype | None, cache: KVCache | None = None) -> InferenceWeights | None:
    """The model's packed copy in `dtype` (None: the parameters' own), rebuilt when any parameter was replaced,
    moved or changed in place; None when changes could not be seen.

    A step that continues a KV cache reuses the copy unchecked: the cache holds keys and values of the weights
    it was filled with, so it belongs to them (and checking every parameter costs a noticeable part of a token).
    """
    packed: InferenceWeights | None = model._inference_weights
    dtype = dtype or model.out_head.weight.dtype
    if packed is not None and cache is not None and cache.length > 0 and packed.dtype == dtype:
        return packed
    params = list(model.parameters())
    if packed is not None and packed.matches(params, dtype):
        return packed
    model._inference_weights = None  # free the stale copy before building the new one
    stamp = probes.stamp(params)
    if stamp is None:
        return None
    model._inference_weights = InferenceWeights(model, dtype, params, stamp)
    return model._inference_weights
