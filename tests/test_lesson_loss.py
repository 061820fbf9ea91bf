"""The loss, step by step (`gpt2term inspect loss`): the course's six steps are the training loss, and eval() is
what makes it repeatable."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from gpt2term.cli import cli
from gpt2term.core.accel import accelerate
from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import InputError
from gpt2term.core.loss_steps import COURSE_TEXT, LOSS_TABLE, dropout_check, loss_steps, table_position
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.tokenizer import default_tokenizer

SMALL = GPTConfig(emb_dim=32, n_heads=4, n_layers=2, context_length=32, drop_rate=0.1)  # GPT-2's vocabulary
TEXT = "The quick brown fox jumps over the lazy dog because it can."


def trained_a_little(cfg: GPTConfig = SMALL, seed: int = 0) -> GPTModel:
    """A model whose loss is far from uniform, so a wrong step (a missing shift, a wrong sign) shows in the numbers."""
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    ids = torch.tensor([default_tokenizer().encode(TEXT)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(8):
        opt.zero_grad()
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model() -> GPTModel:
    return trained_a_little()


def reference_loss(model: GPTModel, ids: list[int]) -> float:
    """The training loss exactly as the course writes it, computed here independently of the engine."""
    inputs, targets = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    model.eval()
    with torch.no_grad():
        logits = model(inputs)
    return float(F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_the_six_steps_end_in_torchs_cross_entropy(model):
    tokenizer = default_tokenizer()
    ids = tokenizer.encode(TEXT)
    steps = loss_steps(model, ids, tokenizer)
    assert steps.shape == (1, len(ids) - 1, 50257)
    assert abs(steps.loss - reference_loss(model, ids)) < 1e-6
    assert steps.loss < 8.0  # the little training moved it well away from the uniform guess
    # each position: input i, target i + 1 (the input shifted by one), and its probability from the softmax
    assert [t.token_id for t in steps.tokens] == ids[:-1]
    assert [t.target_id for t in steps.tokens] == ids[1:]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
    for t in steps.tokens:
        assert t.prob == pytest.approx(float(probs[t.position, t.target_id]), rel=1e-5)
        assert math.exp(t.logprob) == pytest.approx(t.prob, rel=1e-3)
        assert t.token_text == tokenizer.token_text(t.token_id)
    assert steps.mean_logprob == pytest.approx(sum(t.logprob for t in steps.tokens) / len(steps.tokens), abs=1e-5)
    assert steps.loss == -steps.mean_logprob
    assert sum(t.contribution for t in steps.tokens) == pytest.approx(steps.loss, abs=1e-5)
    assert steps.perplexity == pytest.approx(math.exp(steps.loss))
    assert steps.softmax_max_error < 1e-3
    worst = steps.worst(3)
    assert worst[0].nll == max(t.nll for t in steps.tokens)
    assert worst[0].nll >= worst[1].nll >= worst[2].nll


def test_the_accelerated_model_gives_the_plain_models_numbers(model):
    ids = default_tokenizer().encode(TEXT)
    expected = reference_loss(model, ids)
    fast = GPTModel(SMALL)
    fast.load_state_dict(model.state_dict())
    fast = accelerate(fast, "fp32")
    assert abs(loss_steps(fast, ids).loss - expected) < 1e-6


def test_an_untrained_model_is_near_the_uniform_guess():
    torch.manual_seed(3)
    model = GPTModel(SMALL)
    steps = loss_steps(model, default_tokenizer().encode(TEXT))
    assert steps.vocab_size == 50257
    assert steps.baseline == pytest.approx(math.log(50257))
    assert abs(steps.loss - math.log(50257)) < 0.3
    assert steps.table_position.startswith("at or above 10.79") or "between 10.79" in steps.table_position


def test_the_course_table_and_where_a_loss_falls_on_it():
    assert [(r.loss, r.perplexity) for r in LOSS_TABLE] == [(10.79, 48_725), (5.0, 148), (2.0, 7.4), (0.5, 1.65)]
    assert LOSS_TABLE[0].meaning == "random guessing"
    for row in LOSS_TABLE:  # the course's perplexities are exp(loss); it rounds the loss (ln 48,725 = 10.794)
        assert math.exp(row.loss) == pytest.approx(row.perplexity, rel=5e-3)
    assert table_position(3.0).startswith("between 5 ")
    assert "and 2 " in table_position(3.0)
    assert table_position(0.1).startswith("below 0.5")
    assert table_position(11.0).startswith("at or above 10.79")


def test_the_model_mode_is_restored(model):
    ids = default_tokenizer().encode(COURSE_TEXT)
    model.train()
    loss_steps(model, ids)
    assert model.training
    model.eval()
    loss_steps(model, ids, train_mode=True)
    assert not model.training


@pytest.mark.parametrize(
    ("text", "message"),
    [("Hello", "nothing to predict"), ("", "nothing to predict"), ("word " * 40, "shorten it to at most 33 tokens")],
)
def test_a_text_with_nothing_to_predict_or_too_long_is_a_clear_error(model, text, message):
    ids = default_tokenizer().encode(text)
    with pytest.raises(InputError, match=message):
        loss_steps(model, ids)


def test_a_context_of_inputs_plus_one_target_fits(model):
    ids = default_tokenizer().encode("word " * 40)[:33]
    assert loss_steps(model, ids).shape == (1, 32, 50257)


def test_dropout_changes_the_loss_in_train_mode_only(model):
    ids = default_tokenizer().encode(TEXT)
    torch.manual_seed(1)
    check = dropout_check(model, ids)
    assert check.drop_rate == 0.1 and check.has_dropout
    assert check.train_losses[0] != check.train_losses[1]
    assert check.eval_losses[0] == check.eval_losses[1]
    assert abs(check.eval_losses[0] - reference_loss(model, ids)) < 1e-6
    assert not model.training


def test_without_dropout_train_mode_is_eval_mode():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(emb_dim=32, n_heads=4, n_layers=2, context_length=32, drop_rate=0.0))
    check = dropout_check(model, default_tokenizer().encode(TEXT))
    assert not check.has_dropout and "drop_rate is 0" in check.note
    assert check.train_losses[0] == check.train_losses[1] == pytest.approx(check.eval_losses[0], abs=1e-6)


# ------------------------------------------------------------------ the command


@pytest.fixture
def saved(model) -> str:
    CheckpointStore().save("small", model, meta={"step": 15})
    return "small"


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_json_matches_the_engine(saved, model):
    result = run("inspect", "loss", TEXT, "--checkpoint", saved, "--json", "--worst", "2")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    ids = default_tokenizer().encode(TEXT)
    expected = loss_steps(model, ids)
    assert data["loss"] == pytest.approx(expected.loss, abs=1e-6)
    assert data["loss"] == pytest.approx(reference_loss(model, ids), abs=1e-6)
    assert data["perplexity"] == pytest.approx(math.exp(expected.loss), rel=1e-6)
    assert data["shape"] == [1, len(ids) - 1, 50257]
    assert data["baseline"] == pytest.approx(math.log(50257))
    assert [t["token_id"] for t in data["tokens"]] == ids[:-1]
    assert [t["target_id"] for t in data["tokens"]] == ids[1:]
    for got, want in zip(data["tokens"], expected.tokens, strict=True):
        assert got["prob"] == pytest.approx(want.prob, abs=1e-7)
        assert got["logprob"] == pytest.approx(want.logprob, abs=1e-6)
    assert data["worst"] == [t.position for t in expected.worst(2)]
    assert "dropout" not in data


def test_cli_train_mode_shows_dropout_at_work(saved):
    result = run("inspect", "loss", TEXT, "--checkpoint", saved, "--json", "--train-mode")
    assert result.exit_code == 0, result.output
    dropout = json.loads(result.stdout)["dropout"]
    assert dropout["drop_rate"] == 0.1
    assert dropout["train_losses"][0] != dropout["train_losses"][1]
    assert dropout["eval_losses"][0] == dropout["eval_losses"][1] == json.loads(result.stdout)["loss"]


def test_cli_text_shows_the_six_steps_and_the_table(saved, model):
    result = run("inspect", "loss", TEXT, "--checkpoint", saved)
    assert result.exit_code == 0, result.output
    out = result.stdout
    expected = loss_steps(model, default_tokenizer().encode(TEXT))
    for step in ("1. logits", "2. probas = softmax", "3. target_probas", "4. log_probas", "5. avg_log", "6. neg_avg"):
        assert step in out
    assert f"(batch, seq_len, vocab_size) = (1, {expected.shape[1]}, 50257)" in out
    assert f"= {expected.loss:.4f}   <- the loss" in out
    assert f"exp(loss) = {expected.perplexity:,.2f}" in out
    assert "random guessing" in out and "this text" in out
    assert "\x1b[" not in out  # not a terminal: no colour codes
    assert len(out.splitlines()) < 60  # a few rows per step, not one per token


def test_cli_errors_are_one_line(saved):
    result = run("inspect", "loss", "Hi", "--checkpoint", saved)
    assert result.exit_code == 2 and "nothing to predict" in result.stderr
    result = run("inspect", "loss", "word " * 40, "--checkpoint", saved)
    assert result.exit_code == 2 and "shorten it to at most 33 tokens" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
