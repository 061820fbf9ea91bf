"""Each step reports the model's own numbers; sampling is reproducible; cancelling stops between two tokens."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from gpt2term.core.accel import accelerate
from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import InputError
from gpt2term.core.generation import DecodingSettings, Summary, generate, score
from gpt2term.core.model import GPTModel
from gpt2term.core.tokenizer import ENDOFTEXT_ID, default_tokenizer

PROMPT = [15496, 11, 314, 716]


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(0)
    m = accelerate(GPTModel(GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2)).eval())
    with torch.no_grad():
        m.out_head.weight.mul_(40)  # spread the logits so the distribution is far from uniform
    return m


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def test_steps_report_the_models_own_distribution(model, tok):
    steps = list(generate(model, tok, PROMPT, DecodingSettings(max_new_tokens=6, stop_at_eos=False, top_n=5)))
    ids = list(PROMPT)
    nll = 0.0
    for step in steps:
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([ids]))[0, -1], dim=-1)
        expected_top = torch.topk(probs, 5)
        assert step.token_id == int(torch.argmax(probs)) and step.rank == 1
        assert step.prob == pytest.approx(float(probs[step.token_id]), rel=1e-4)
        assert step.logprob == pytest.approx(math.log(step.prob), rel=1e-5)
        assert [c.token_id for c in step.top] == expected_top.indices.tolist()
        assert [c.prob for c in step.top] == pytest.approx(expected_top.values.tolist(), rel=1e-4)
        assert step.top[0].token_id == step.token_id
        nll -= step.logprob
        assert step.perplexity == pytest.approx(math.exp(nll / (step.index + 1)), rel=1e-6)
        ids.append(step.token_id)
    assert tok.decode(ids[len(PROMPT) :]) == "".join(s.text for s in steps)


def test_sampling_is_reproducible_with_a_seed_and_reports_rank(model, tok):
    settings = DecodingSettings(max_new_tokens=12, temperature=1.5, seed=7, stop_at_eos=False)
    a = [s.token_id for s in generate(model, tok, PROMPT, settings)]
    b = [s.token_id for s in generate(model, tok, PROMPT, settings)]
    c = [s.token_id for s in generate(model, tok, PROMPT, DecodingSettings(**{**settings.__dict__, "seed": 8}))]
    assert a == b and a != c
    steps = list(generate(model, tok, PROMPT, settings))
    assert any(s.rank > 1 for s in steps), "hot sampling should sometimes pick a token that is not the argmax"


def test_top_k_one_and_tiny_top_p_are_greedy(model, tok):
    greedy = [s.token_id for s in generate(model, tok, PROMPT, DecodingSettings(max_new_tokens=8, stop_at_eos=False))]
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        settings = DecodingSettings(max_new_tokens=8, temperature=2.0, seed=1, stop_at_eos=False, **extra)
        assert [s.token_id for s in generate(model, tok, PROMPT, settings)] == greedy


def test_stops_at_endoftext_unless_told_otherwise(tok):
    torch.manual_seed(0)
    m = GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1)).eval()
    with torch.no_grad():
        m.out_head.weight.zero_()
        m.out_head.weight[ENDOFTEXT_ID].fill_(1.0)
        m.final_norm.shift.fill_(1.0)  # every position now predicts <|endoftext|>
    stopped = list(generate(m, tok, PROMPT, DecodingSettings(max_new_tokens=5)))
    assert [s.token_id for s in stopped] == [ENDOFTEXT_ID]
    kept = list(generate(m, tok, PROMPT, DecodingSettings(max_new_tokens=5, stop_at_eos=False)))
    assert len(kept) == 5


def test_cancel_stops_between_two_steps(model, tok):
    cancel = threading.Event()
    got = []
    for step in generate(model, tok, PROMPT, DecodingSettings(max_new_tokens=20, stop_at_eos=False), cancel):
        got.append(step)
        if step.index == 2:
            cancel.set()
    assert len(got) == 3


def test_a_dtype_setting_neither_repacks_the_model_nor_leaves_its_mode_changed(tok):
    """Packing for a dtype is the model owner's job (the CLI on load, the app when the setting changes): generate()
    decodes with the model as prepared and gives it back in the mode it found it."""
    from gpt2term.core import accel
    from gpt2term.core.accel import packed_weights

    if not accel.enabled():
        pytest.skip("GPT2TERM_ACCEL=0: int8 exists only on the fast path")
    torch.manual_seed(0)
    m = accelerate(GPTModel(GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2)))
    m.train()
    steps = list(generate(m, tok, PROMPT, DecodingSettings(max_new_tokens=3, stop_at_eos=False, dtype="int8")))
    assert len(steps) == 3
    assert m.training  # back in train mode, as it came
    packed = packed_weights(m)
    assert packed is None or packed.dtype != torch.int8  # not repacked in int8 behind its owner's back


def test_bad_settings_and_empty_prompt_are_user_errors(model, tok):
    with pytest.raises(InputError, match="temperature"):
        DecodingSettings(temperature=-1)
    with pytest.raises(InputError, match="top-p"):
        DecodingSettings(top_p=1.5)
    with pytest.raises(InputError, match="empty"):
        list(generate(model, tok, [], DecodingSettings()))


def test_summary(model, tok):
    steps = list(generate(model, tok, PROMPT, DecodingSettings(max_new_tokens=5, stop_at_eos=False)))
    summary = Summary.of(steps)
    assert summary.tokens == 5
    assert summary.perplexity == steps[-1].perplexity
    assert summary.time_to_first_token_s == steps[0].elapsed_s
    assert summary.mean_prob == pytest.approx(sum(s.prob for s in steps) / 5)
    assert Summary.of([]).tokens == 0


def test_score_is_teacher_forced_cross_entropy(model):
    torch.manual_seed(2)
    ids = torch.randint(0, 50257, (30,)).tolist()
    result = score(model, ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert len(result.logprobs) == 29
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_score_of_a_text_longer_than_the_context_keeps_half_a_context_of_history(model):
    torch.manual_seed(3)
    ids = torch.randint(0, 50257, (80,)).tolist()  # context is 32
    result = score(model, ids)
    assert len(result.logprobs) == 79
    # Token 40 is scored from a window that ends right before it and holds at least 16 tokens of history.
    with torch.no_grad():
        for start in range(40 - 32, 40 - 16 + 1):
            lp = torch.log_softmax(model(torch.tensor([ids[start:40]]))[0, -1], dim=-1)[ids[40]].item()
            if lp == pytest.approx(result.logprobs[39], abs=1e-5):
                break
        else:
            pytest.fail("token 40 was not scored from a window of 16-32 tokens of history")
