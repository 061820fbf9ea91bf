"""`gpt2term inspect attention|lens` and `generate --beams`: the JSON shapes the issue promises, and the numbers."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from gpt2term.cli import cli
from gpt2term.core.generation import beam_search
from gpt2term.core.inspection import attention_weights, logit_lens
from gpt2term.core.tokenizer import default_tokenizer
from tests.hf_reference import ours_from_hf, random_hf_gpt2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    hf = random_hf_gpt2(vocab=50257, positions=32, emb=32, layers=2, heads=2, seed=21)
    folder = tmp_path_factory.mktemp("inspect-model")
    hf.save_pretrained(folder)
    return str(folder), ours_from_hf(hf)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_attention_json(saved):
    folder, model = saved
    result = run("inspect", "attention", "Hello, I am", "--checkpoint", folder, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tokens"] == [15496, 11, 314, 716]
    got = torch.tensor(data["attention"])
    assert got.shape == (2, 2, 4, 4)
    assert torch.allclose(got, attention_weights(model, data["tokens"]), atol=1e-6)


def test_lens_json(saved):
    folder, model = saved
    result = run("inspect", "lens", "Hello, I am", "--checkpoint", folder, "--json", "--position", "1")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["position"] == 1
    assert [layer["layer"] for layer in data["layers"]] == [0, 1, 2]
    expected = logit_lens(model, default_tokenizer(), [15496, 11, 314, 716], position=1)
    assert [c["token_id"] for c in data["layers"][-1]["top"]] == [c.token_id for c in expected[-1].top]
    assert set(data["layers"][0]["top"][0]) == {"token_id", "text", "prob"}


def test_lens_text_marks_the_layer_and_bad_position_is_an_error(saved):
    folder, _ = saved
    result = run("inspect", "lens", "Hello, I am", "--checkpoint", folder)
    assert result.exit_code == 0 and "first appears at layer" in result.stdout
    result = run("inspect", "lens", "Hello, I am", "--checkpoint", folder, "--position", "9")
    assert result.exit_code == 2 and "position 9 is outside" in result.stderr


def test_generate_with_beams(saved):
    folder, model = saved
    result = run("generate", "Hello, I am", "--checkpoint", folder, "--beams", "3", "-n", "5", "--no-stop", "--json")
    assert result.exit_code == 0, result.output
    beams = json.loads(result.stdout)["beams"]
    expected = beam_search(model, default_tokenizer(), [15496, 11, 314, 716], 3, 5, stop_at_eos=False)
    assert [b["token_ids"] for b in beams] == [list(b.token_ids) for b in expected]
    assert beams[0]["logprob"] >= beams[-1]["logprob"]
