"""Random Hugging Face GPT-2 models: the reference our implementation must match number for number."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2term.core.accel import accelerate
from gpt2term.core.interop import config_from_hf, from_hf_state_dict
from gpt2term.core.model import GPTModel


def random_hf_gpt2(
    *,
    vocab: int = 1000,
    positions: int = 32,
    emb: int = 64,
    layers: int = 2,
    heads: int = 4,
    tied: bool = True,
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A small GPT-2 with wide initial weights, so logits are well separated and greedy choices are not near-ties."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=positions,
        n_embd=emb,
        n_layer=layers,
        n_head=heads,
        initializer_range=0.2,
        tie_word_embeddings=tied,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and LayerNorm parameters start at 0 and 1: give them values worth checking
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ours_from_hf(hf: GPT2LMHeadModel) -> GPTModel:
    cfg = config_from_hf(hf.config.to_dict())
    model = GPTModel(cfg)
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    return accelerate(model.eval())  # the model the app runs (with GPT2TERM_ACCEL=0: the plain one)


def course_generate(model, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    """The course's generate_text_simple, verbatim in spirit: crop to the context, recompute, take the argmax."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            out = model(idx_cond)
        logits = getattr(out, "logits", out)[:, -1, :]
        idx_next = torch.argmax(torch.softmax(logits, dim=-1), dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
