"""Speed for the course's model, switched on by one call: `accelerate(model)`; `GPT2TERM_ACCEL=0` turns it off.
Ready to decode in a number format (fp32, bf16, int8): `prepare_for_inference(model, dtype)`.

`gpt2term/core/model.py` is the course's model as the book writes it. This package makes the same model fast
on a CPU without changing what it computes, its parameters or its state_dict:

- `decode`: a packed copy of the weights for decoding one token at a time (float32, bf16 or int8), multiplied by
  gpt2term's own kernels (`native`, built on first use) or else PyTorch's (int8 from `int8`), on the threads
  `threads` gives it;
- `linear`: oneDNN float32 kernels for the linear layers in training;
- `head_loss`: the training loss without ever building the [tokens, vocabulary] logits;
- `vocab_pad`: on a GPU, training's output head padded to a multiple of 64 rows for the matmul kernels;
- `allocator`: on a CPU, training keeps the memory it frees for its next step (`training_memory`).

Every private PyTorch API these use lives in `probes`, checked once, with a plain PyTorch fallback.
"""

from __future__ import annotations

import os

import torch

from gpt2term.core.accel import allocator, decode, head_loss, linear, native, probes, vocab_pad
from gpt2term.core.errors import InputError
from gpt2term.core.model import GPTModel, KVCache

__all__ = [
    "AcceleratedGPTModel",
    "accelerate",
    "enabled",
    "keeps_training_memory",
    "pad_vocabulary",
    "packed_weights",
    "plain",
    "prepare_for_inference",
    "release_packed_weights",
    "training_memory",
    "vocab_multiple",
]

ENV_SWITCH = "GPT2TERM_ACCEL"


def enabled() -> bool:
    """False when GPT2TERM_ACCEL=0 (also "false", "off", "no"): every model stays plain PyTorch."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def keeps_training_memory(device: torch.device) -> bool:
    """Whether training on `device` keeps the memory it frees for its next step (a CPU, glibc's allocator)."""
    return enabled() and device.type == "cpu" and allocator.available()


def training_memory(device: torch.device):
    """A context for the training loop: on a CPU, freed blocks stay in the heap for the next step (`allocator`)."""
    return allocator.freed_memory_kept(on=keeps_training_memory(device))


class AcceleratedGPTModel(GPTModel):
    """A `GPTModel` that `accelerate` switched to the fast paths; the same modules, parameters and state_dict."""

    _inference_weights: decode.InferenceWeights | None
    _decode_dtype: torch.dtype | None
    _vocab_multiple: int | None  # None: pad on CUDA (see `vocab_multiple`)

    def forward(
        self,
        in_idx: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if targets is not None:
            multiple = vocab_multiple(self)
            if multiple > 1:
                x, _, _ = self.hidden_states(in_idx, cache)
                return vocab_pad.padded_head_loss(self.final_norm(x), self.out_head.weight, targets, multiple)
            if head_loss.applies(self.out_head.weight, targets):
                x, _, _ = self.hidden_states(in_idx, cache)
                return head_loss.head_loss(self.final_norm(x), self.out_head.weight, targets)
        elif decode.wanted(self, cache, last_only):
            packed = decode.current(self, self._decode_dtype, cache)
            if packed is not None:
                return packed.forward(in_idx, cache, last_only)
        return super().forward(in_idx, cache, last_only, targets)

    def __getstate__(self) -> dict:
        """A copy (`copy.deepcopy`, pickle) leaves the packed copy behind: it holds the kernels' C pointers, and the
        copy's first decoding step packs its own."""
        state = dict(super().__getstate__())
        state["_inference_weights"] = None
        return state

    def train(self, mode: bool = True) -> AcceleratedGPTModel:
        if mode:
            self._inference_weights = None  # training changes every weight: a packed copy would only cost memory
        return super().train(mode)


def accelerate(model: GPTModel, dtype: str | torch.dtype | None = None) -> GPTModel:
    """Switch `model` (in place) to the fast paths, unless GPT2TERM_ACCEL=0; returns it.

    Training and the app call this once on every model. To decode in a number format, call `prepare_for_inference`;
    a `dtype` given here is passed on to it (for callers whose format is optional).
    """
    if dtype is not None:
        return prepare_for_inference(model, dtype)
    if enabled():
        _switch_on(model)
    return model


def prepare_for_inference(model: GPTModel, dtype: str | torch.dtype = "fp32") -> GPTModel:
    """`model` (in place) ready to decode in `dtype` ("fp32", "bf16" or "int8"): on the fast paths, in eval mode,
    its decoding weights packed now so the first token does not pay for it; returns it.

    bf16 halves the bytes each token reads (the speed limit on a CPU) while the parameters stay float32: the
    residual stream, layer norms, attention and the final choice among the top candidates stay float32, so greedy
    tokens almost always match float32's. The packed copy costs memory, about as much as the linear weights (half
    that in bf16); `release_packed_weights(model)` frees it. int8 (per-output-channel weights, a quarter of
    float32's bytes, the top candidates rescored in float32 as for bf16) exists only on the fast path: with
    GPT2TERM_ACCEL=0 it is refused rather than silently run in float32.
    """
    wanted = decode.inference_dtype(dtype)  # a wrong name is the user's error even when acceleration is off
    if wanted == torch.int8 and not enabled():
        raise InputError(
            f"int8 decoding needs the fast paths, which {ENV_SWITCH}=0 switches off; unset {ENV_SWITCH} "
            "or decode in fp32 or bf16"
        )
    model.eval()
    if not enabled():
        return model
    _switch_on(model)
    model._decode_dtype = wanted
    if model.out_head.weight.device.type == "cpu":
        with torch.no_grad():
            decode.current(model, wanted)
    return model


def _switch_on(model: GPTModel) -> None:
    if not isinstance(model, AcceleratedGPTModel):
        if type(model) is not GPTModel:
            raise TypeError(f"accelerate() takes a GPTModel, not {type(model).__name__}")
        model.__class__ = AcceleratedGPTModel
        model._inference_weights = None
        model._decode_dtype = None
        model._vocab_multiple = None
        linear.swap_in(model)


def plain(model: GPTModel) -> GPTModel:
    """Undo `accelerate` (in place): the course's GPTModel with plain nn.Linear layers again; returns it."""
    if isinstance(model, AcceleratedGPTModel):
        linear.swap_out(model)
        del model._inference_weights, model._decode_dtype, model._vocab_multiple
        model.__class__ = GPTModel
    return model


def pad_vocabulary(model: GPTModel, multiple: int | None) -> None:
    """Pad training's output head to a multiple of `multiple` rows (0: never; None: on CUDA only, the default).

    The CPU keeps the sliced loss of `head_loss` by default (it never builds the whole logits); padding there is
    for running the GPU's code path on a CPU. A plain model (GPT2TERM_ACCEL=0) is never padded.
    """
    if multiple is not None and multiple < 0:
        raise ValueError(f"the vocabulary padding multiple must be 0 or more, got {multiple}")
    if isinstance(model, AcceleratedGPTModel):
        model._vocab_multiple = multiple


def vocab_multiple(model: GPTModel) -> int:
    """The multiple `model`'s training loss pads its head to now (0 or 1: not padded)."""
    if not isinstance(model, AcceleratedGPTModel):
        return 0
    if model._vocab_multiple is None:
        return vocab_pad.DEFAULT_MULTIPLE if model.out_head.weight.device.type == "cuda" else 0
    return model._vocab_multiple


def packed_weights(model: GPTModel) -> decode.InferenceWeights | None:
    """The packed decoding copy `model` holds now, if any (for memory reports)."""
    return getattr(model, "_inference_weights", None) if isinstance(model, AcceleratedGPTModel) else None


def release_packed_weights(model: GPTModel) -> None:
    """Free the packed decoding copy (the next decoding step builds it again)."""
    if isinstance(model, AcceleratedGPTModel):
        model._inference_weights = None


def describe() -> dict[str, bool | str | None]:
    """Whether acceleration is on, what each probe of a private PyTorch API found, and whether gpt2term's own
    decoding kernels run (else why not), for benchmarks."""
    if not enabled():
        return {"enabled": False}
    native_on = native.available()
    return {"enabled": True, **probes.results(), "native_kernels": native_on, "native_why_not": native.why_not()}
