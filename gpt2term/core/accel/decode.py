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

from gpt2term.core.accel import int8, probes, threads
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
SPLIT_MAX_ROWS = 4  # one-token steps (and beams): bigger products are compute-bound and MKL threads them itself


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

    - "addmm" (float32): weight stored `[in, out]` in column blocks, so `addmm(bias, x, W)` streams it row by row
      (MKL reads that faster than the `[out, in]` nn.Linear layout for one token), each block on its own thread;
    - "onednn" (bf16): oneDNN's packed layout, which threads itself; `gelu` fused into the matmul;
    - "linear" (bf16 without oneDNN): plain `F.linear` on a bf16 copy;
    - "int8": per-output-channel int8 (`int8.Int8Matrix`) on float32 activations.
    """

    __slots__ = ("kind", "weight", "bias", "gelu", "parts", "bias_parts", "columns", "out_features")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        *,
        gelu: bool = False,
        ways: int = 1,
        onednn: bool | None = None,
    ) -> None:
        self.gelu = gelu
        self.out_features = weight.shape[0]
        self.parts: tuple[torch.Tensor, ...] = ()
        self.bias_parts: tuple[torch.Tensor, ...] = ()
        self.columns: list[slice] = []
        if dtype == torch.int8:
            self.kind = "int8"
            self.columns = threads.column_blocks(self.out_features, ways)
            self.weight = [int8.Int8Matrix(weight[cols], None if bias is None else bias[cols]) for cols in self.columns]
        elif dtype == torch.bfloat16 and (probes.onednn_bf16() if onednn is None else onednn):
            self.kind = "onednn"
            self.weight = probes.onednn_pack_bf16(weight)
        elif dtype in (torch.bfloat16, torch.float16):
            self.kind = "linear"
            self.weight = weight.to(dtype).contiguous()
        else:
            self.kind = "addmm"
            w = weight.to(dtype)
            self.columns = threads.column_blocks(self.out_features, ways)
            self.parts = tuple(w[cols].t().contiguous() for cols in self.columns)
            self.weight = None
            if bias is not None:
                b = bias.to(dtype)
                self.bias_parts = tuple(b[cols].contiguous() for cols in self.columns)
        self.bias = bias.to(dtype).contiguous() if bias is not None and self.kind not in ("addmm", "int8") else None

    def tensors(self) -> list[torch.Tensor]:
        if self.kind == "int8":
            return [t for block in self.weight for t in block.tensors()]
        return [t for t in (self.weight, self.bias, *self.parts, *self.bias_parts) if t is not None]

    def nbytes(self) -> int:
        if self.kind == "int8":
            return sum(block.nbytes() for block in self.weight)
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _addmm(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        out = torch.empty(rows, self.out_features, dtype=x.dtype, device=x.device)

        def block(i: int) -> None:
            if self.bias_parts:
                torch.addmm(self.bias_parts[i], x, self.parts[i], out=out[:, self.columns[i]])
            else:
                torch.mm(x, self.parts[i], out=out[:, self.columns[i]])

        if rows <= SPLIT_MAX_ROWS and len(self.parts) > 1:
            gov = threads.governor()
            key = ("addmm", rows, x.shape[1], self.out_features)
            use = gov.choose(key, len(self.parts))
            started = gov.clock()
            try:
                threads.pool().run(block, len(self.parts), threads=use)
            finally:
                gov.record(key, use, gov.clock() - started)
        else:
            for i in range(len(self.parts)):
                block(i)
        return out

    def _int8(self, x: torch.Tensor) -> torch.Tensor:
        a = int8.Activations(x)
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32, device=x.device)

        def block(i: int) -> None:
            self.weight[i](a, out[:, self.columns[i]])

        if len(self.weight) > 1 and x.shape[0] <= SPLIT_MAX_ROWS:  # every block runs on one thread (see `int8`)
            gov = threads.governor()
            key = ("int8", x.shape[0], x.shape[1], self.out_features)
            use = gov.choose(key, len(self.weight))
            started = gov.clock()
            try:
                threads.pool().run(block, len(self.weight), threads=use)
            finally:
                gov.record(key, use, gov.clock() - started)
        elif len(self.weight) > 1:
            threads.pool().run(block, len(self.weight))
        else:
            block(0)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x`: [rows, in] in the layer's dtype (float32 for int8)."""
        if self.kind == "onednn":
            if x.shape[0] > SPLIT_MAX_ROWS:  # a prompt: compute-bound, every thread pays
                return probes.onednn_linear(x, self.weight, self.bias, gelu=self.gelu)
            # One token: oneDNN's OpenMP threads spin-wait for each other, so on a busy machine fewer are faster.
            key = (self.kind, x.shape[0], x.shape[1], self.out_features, self.gelu)
            return threads.governed(key, lambda: probes.onednn_linear(x, self.weight, self.bias, gelu=self.gelu))
        if self.kind == "int8":
            y = self._int8(x)
        elif self.kind == "addmm":
            y = self._addmm(x)
        elif x.shape[0] > SPLIT_MAX_ROWS:
            y = F.linear(x, self.weight, self.bias)
        else:
            key = (self.kind, x.shape[0], x.shape[1], self.out_features)
            y = threads.governed(key, lambda: F.linear(x, self.weight, self.bias))
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
        self, model: GPTModel, dtype: torch.dtype, params: list[torch.Tensor], stamp: list[tuple[int, int]], ways: int
    ) -> None:
        cfg = model.cfg
        self.dtype = dtype  # the matrices' dtype
        self.act_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16, torch.int8) else dtype  # residual
        self.in_dtype = self.act_dtype if dtype == torch.int8 else dtype  # what the matrices are given
        self.ways = ways
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
                        PackedLinear(qkv, qkv_bias, dtype, ways=ways),
                        PackedLinear(att.out_proj.weight, att.out_proj.bias, dtype, ways=ways),
                        (block.norm2.scale.to(act), block.norm2.shift.to(act), block.norm2.eps),
                        PackedLinear(ff.layers[0].weight, ff.layers[0].bias, dtype, gelu=True, ways=ways),
                        PackedLinear(ff.layers[2].weight, ff.layers[2].bias, dtype, ways=ways),
                    )
                )
            norm = model.final_norm
            self.final_norm = (norm.scale.to(act), norm.shift.to(act), norm.eps)
            self.head_fp = model.out_head.weight  # the original [vocab, emb] matrix, for refining candidates
            self.refine = dtype != self.act_dtype
            self.head = PackedLinear(self.head_fp, None, dtype, ways=ways)

    def matches(self, params: list[torch.Tensor], dtype: torch.dtype, ways: int) -> bool:
        if dtype != self.dtype or ways != self.ways or len(params) != len(self._params):
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
        if self.head.kind == "addmm":
            return self.head(x)
        logits = self.head(x.to(self.in_dtype)).to(self.act_dtype)
        if self.refine:
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
        d, heads, hd, act, dtype = self.emb_dim, self.n_heads, self.head_dim, self.act_dtype, self.in_dtype
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


def wanted(model: GPTModel, cache: KVCache | None, last_only: bool) -> bool:
    """Decoding steps (a KV cache, or only the last position wanted) take the packed path; training, anything
    that needs gradients, and full-sequence forwards (evaluation, scoring) take the plain modules."""
    return (
        (cache is not None or last_only)
        and not model.training
        and not torch.is_grad_enabled()
        and model.out_head.weight.device.type == "cpu"
    )


def current(model: GPTModel, dtype: torch.dtype | None) -> InferenceWeights | None:
    """The model's packed copy in `dtype` (None: the parameters' own), rebuilt when any parameter was replaced,
    moved or changed in place, or the thread count changed; None when changes could not be seen."""
    packed: InferenceWeights | None = model._inference_weights
    params = list(model.parameters())
    dtype = dtype or model.out_head.weight.dtype
    ways = threads.ways()
    if packed is not None and packed.matches(params, dtype, ways):
        return packed
    model._inference_weights = None  # free the stale copy before building the new one
    stamp = probes.stamp(params)
    if stamp is None:
        return None
    model._inference_weights = InferenceWeights(model, dtype, params, stamp, ways)
    return model._inference_weights
