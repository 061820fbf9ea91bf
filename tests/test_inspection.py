"""Attention weights match transformers', the logit lens ends at the real output, beam search finds the best text."""

from __future__ import annotations

import itertools

import pytest
import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.generation import DecodingSettings, beam_search, generate, sequence_logprob
from gpt2term.core.inspection import attention_weights, first_layer_with_final_answer, logit_lens
from gpt2term.core.model import GPTModel
from gpt2term.core.tokenizer import default_tokenizer
from tests.hf_reference import ours_from_hf, random_hf_gpt2


def test_attention_weights_match_transformers():
    hf = random_hf_gpt2(vocab=1000, positions=32, emb=64, layers=3, heads=4, seed=2)
    hf.config._attn_implementation = "eager"  # the implementation that can return attention weights
    ours = ours_from_hf(hf)
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.stack(hf(ids, output_attentions=True).attentions)[:, 0]
    got = attention_weights(ours, ids[0].tolist())
    assert got.shape == (3, 4, 20, 20)
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.allclose(got.sum(-1), torch.ones(3, 4, 20), atol=1e-6)
    assert torch.count_nonzero(torch.triu(got, diagonal=1)) == 0


def test_explicit_attention_path_gives_the_fast_paths_output():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=4, n_layers=2)).eval()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        fast, _, _ = model.hidden_states(ids)
        slow, _, _ = model.hidden_states(ids, need_weights=True)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_logit_lens_last_layer_is_the_real_next_token_distribution():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=4, n_layers=3)).eval()
    tok = default_tokenizer()
    ids = tok.encode("Hello, I am a model")
    layers = logit_lens(model, tok, ids, position=-1, top_k=7)
    assert [lens.layer for lens in layers] == [0, 1, 2, 3]  # embeddings, then after each block
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids]))[0, -1], dim=-1)
    top = torch.topk(probs, 7)
    assert [c.token_id for c in layers[-1].top] == top.indices.tolist()
    assert [c.prob for c in layers[-1].top] == pytest.approx(top.values.tolist(), rel=1e-5)
    # An earlier position sees only its own prefix.
    early = logit_lens(model, tok, ids, position=1, top_k=3)
    with torch.no_grad():
        probs1 = torch.softmax(model(torch.tensor([ids[:2]]))[0, -1], dim=-1)
    assert early[-1].top[0].token_id == int(torch.argmax(probs1))
    assert 0 <= first_layer_with_final_answer(layers) <= 3


def _small_model(vocab: int, seed: int) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=vocab, context_length=8, emb_dim=16, n_heads=2, n_layers=2)).eval()
    with torch.no_grad():
        model.out_head.weight.mul_(60)
    return model


def test_beam_width_one_is_greedy():
    model = _small_model(1000, 1)
    tok = default_tokenizer()
    prompt = [5, 6, 7]
    steps = list(generate(model, tok, prompt, DecodingSettings(12, stop_at_eos=False)))  # runs past the context of 8
    greedy = [s.token_id for s in steps]
    assert sequence_logprob(model, prompt, greedy) == pytest.approx(sum(s.logprob for s in steps), abs=1e-4)
    beams = beam_search(model, tok, prompt, beams=1, max_new_tokens=12, stop_at_eos=False)
    assert list(beams[0].token_ids) == greedy
    assert beams[0].logprob == pytest.approx(sequence_logprob(model, prompt, greedy), abs=1e-4)


@pytest.mark.parametrize("seed", [3, 4])
def test_wide_beam_finds_the_most_probable_sequence_by_enumeration(seed):
    vocab, length = 6, 3
    model = _small_model(vocab, seed)
    tok = default_tokenizer()
    prompt = [1, 2]
    scores = {seq: sequence_logprob(model, prompt, seq) for seq in itertools.product(range(vocab), repeat=length)}
    best = max(scores, key=scores.get)
    found = beam_search(model, tok, prompt, beams=vocab ** (length - 1), max_new_tokens=length, stop_at_eos=False)
    assert found[0].token_ids == best
    assert found[0].logprob == pytest.approx(scores[best], abs=1e-4)
    assert [f.logprob for f in found] == sorted((f.logprob for f in found), reverse=True)


def test_beams_past_the_context_still_run():
    model = _small_model(1000, 5)
    found = beam_search(model, default_tokenizer(), [1, 2, 3, 4, 5, 6], beams=3, max_new_tokens=6, stop_at_eos=False)
    assert len(found) == 3 and all(len(f.token_ids) == 6 for f in found)
