"""Proof that GPTModel is GPT-2: converted Hugging Face models give the same logits and the same greedy tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2term.core.config import GPTConfig, preset
from gpt2term.core.generation import DecodingSettings, generate
from gpt2term.core.model import GPTModel, KVCache
from gpt2term.core.tokenizer import default_tokenizer
from tests.hf_reference import course_generate, ours_from_hf, random_hf_gpt2

SHAPES = [
    dict(vocab=1000, positions=32, emb=64, layers=2, heads=4, tied=True),
    dict(vocab=1000, positions=48, emb=96, layers=3, heads=3, tied=False),
    dict(vocab=50257, positions=16, emb=32, layers=1, heads=2, tied=True),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s['layers']}L{s['emb']}d{'tied' if s['tied'] else 'untied'}")
def test_logits_match_transformers(shape):
    hf = random_hf_gpt2(**shape)
    ours = ours_from_hf(hf)
    torch.manual_seed(1)
    tokens = torch.randint(0, shape["vocab"], (3, shape["positions"]))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
def test_greedy_continuation_matches_hf_generate(tied, use_cache):
    hf = random_hf_gpt2(vocab=1000, positions=64, emb=64, layers=2, heads=4, tied=tied, seed=3)
    ours = ours_from_hf(hf)
    prompt = [15496, 11, 314, 716, 257, 3303, 286]  # "Hello, I am a ..." (ids below 1000 are valid GPT-2 tokens)
    prompt = [t % 1000 for t in prompt]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False)[0, len(prompt) :].tolist()
    settings = DecodingSettings(max_new_tokens=50, stop_at_eos=False)
    got = [s.token_id for s in generate(ours, default_tokenizer(), prompt, settings, use_cache=use_cache)]
    assert got == expected


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
def test_past_the_context_we_match_the_course_loop_on_hf(use_cache):
    hf = random_hf_gpt2(vocab=1000, positions=16, emb=64, layers=2, heads=4, seed=5)
    ours = ours_from_hf(hf)
    prompt = list(range(100, 110))
    expected = course_generate(hf, torch.tensor([prompt]), 40, context_size=16)[0, len(prompt) :].tolist()
    settings = DecodingSettings(max_new_tokens=40, stop_at_eos=False)
    got = [s.token_id for s in generate(ours, default_tokenizer(), prompt, settings, use_cache=use_cache)]
    assert got == expected


def test_prompt_longer_than_context_is_cropped_like_the_course():
    hf = random_hf_gpt2(vocab=1000, positions=16, emb=64, layers=2, heads=4, seed=6)
    ours = ours_from_hf(hf)
    prompt = [(7 * i) % 1000 for i in range(40)]
    expected = course_generate(hf, torch.tensor([prompt]), 10, context_size=16)[0, len(prompt) :].tolist()
    settings = DecodingSettings(max_new_tokens=10, stop_at_eos=False)
    assert [s.token_id for s in generate(ours, default_tokenizer(), prompt, settings)] == expected


def test_kv_cache_gives_the_same_logits_as_full_recompute():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=500, context_length=24, emb_dim=32, n_heads=4, n_layers=2)).eval()
    tokens = torch.randint(0, 500, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.cfg, batch_size=2)
        chunks = [model(tokens[:, :7], cache), model(tokens[:, 7:12], cache)]
        chunks += [model(tokens[:, i : i + 1], cache) for i in range(12, 20)]
    assert cache.length == 20
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def test_state_dict_has_the_course_names():
    model = GPTModel(GPTConfig(vocab_size=100, context_length=8, emb_dim=16, n_heads=2, n_layers=2, qkv_bias=False))
    keys = set(model.state_dict())
    expected_block = {
        "att.W_query.weight",
        "att.W_key.weight",
        "att.W_value.weight",
        "att.out_proj.weight",
        "att.out_proj.bias",
        "ff.layers.0.weight",
        "ff.layers.0.bias",
        "ff.layers.2.weight",
        "ff.layers.2.bias",
        "norm1.scale",
        "norm1.shift",
        "norm2.scale",
        "norm2.shift",
    }
    expected = {"tok_emb.weight", "pos_emb.weight", "final_norm.scale", "final_norm.shift", "out_head.weight"}
    expected |= {f"trf_blocks.{i}.{k}" for i in range(2) for k in expected_block}
    assert keys == expected


def test_book_model_pth_with_mask_buffers_loads_strictly(tmp_path):
    """The book's MultiHeadAttention registers a persistent `mask` buffer; its model.pth must load as is."""
    cfg = GPTConfig(vocab_size=100, context_length=8, emb_dim=16, n_heads=2, n_layers=2, qkv_bias=False)
    torch.manual_seed(0)
    book_sd = GPTModel(cfg).state_dict()
    for i in range(cfg.n_layers):
        book_sd[f"trf_blocks.{i}.att.mask"] = torch.triu(torch.ones(8, 8), diagonal=1)
    torch.save(book_sd, tmp_path / "model.pth")
    model = GPTModel(cfg)
    model.load_state_dict(torch.load(tmp_path / "model.pth", map_location="cpu"))  # the course's exact call
    assert torch.equal(model.out_head.weight, book_sd["out_head.weight"])


def test_untrained_model_matches_the_course_numbers():
    """Chapter 5: an untrained GPT-2 124M has a loss near ln(50257) ≈ 10.8 and a perplexity in the tens of thousands."""
    torch.manual_seed(123)
    model = GPTModel(preset("gpt2-124M")).eval()
    tokens = torch.randint(0, 50257, (2, 65))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert abs(loss - math.log(50257)) < 0.3
    assert 10_000 < math.exp(loss) < 100_000
    assert 124_000_000 < model.num_parameters() < 164_000_000  # 124M with a tied head; the course's untied is 163M
