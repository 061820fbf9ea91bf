"""`gpt2term bench` on tiny shapes: the JSON it promises, the token check, and the report without transformers.

No timing is asserted (speed is what the benchmark measures, not what a test can promise on a shared machine).
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

import gpt2term.core.bench as bench
from gpt2term.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _machine_is_described(machine: dict) -> None:
    assert machine["device"] == "cpu"
    assert machine["threads"] >= 1 and machine["cores"] >= 1
    assert machine["torch"] and machine["cpu"]


def test_bench_generate_json_compares_with_transformers_and_checks_tokens():
    pytest.importorskip("transformers")
    result = run(
        "bench", "generate", "--preset", "tiny", "--tokens", "6", "--repeats", "2", "--dtype", "both", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["benchmark"] == "generate"
    _machine_is_described(data["machine"])
    assert data["machine"]["transformers"]
    assert data["settings"]["new_tokens"] == 6 and data["settings"]["repeats"] == 2
    assert data["settings"]["dtypes"] == ["fp32", "bf16"]
    accelerated = data["machine"]["accel"]["enabled"]  # GPT2TERM_ACCEL=0: the plain model, nothing packed
    for dt in ("fp32", "bf16"):
        ours = data["ours"][dt]
        assert ours["tokens_per_second"] > 0 and ours["time_to_first_token_s"] > 0
        assert len(ours["runs_tokens_per_second"]) == 2
        assert (ours["packed_weights_mb"] > 0) == accelerated
        assert data["ratio"][dt] > 0
    if accelerated:
        assert data["ours"]["bf16"]["packed_weights_mb"] < data["ours"]["fp32"]["packed_weights_mb"]
    theirs = data["transformers"]
    assert theirs["tokens_per_second"] > 0 and len(theirs["runs_tokens_per_second"]) == 2
    # Same weights, same greedy rule: transformers and our fp32 engine must produce the same 6 tokens.
    assert data["tokens_match"]["fp32"] is True and data["matching_prefix"]["fp32"] == 6
    assert isinstance(data["tokens_match"]["bf16"], bool)
    assert 0 <= data["bf16_matches_fp32_prefix"] <= 6


def test_bench_generate_token_check_can_fail(monkeypatch):
    """The match field is computed, not assumed: a model that decodes differently is reported as not matching."""
    pytest.importorskip("transformers")
    original = bench._run_ours

    def shifted(model, prompt_ids, tokens):
        run = original(model, prompt_ids, tokens)
        run.tokens = [(t + 1) % model.cfg.vocab_size for t in run.tokens]
        return run

    monkeypatch.setattr(bench, "_run_ours", shifted)
    data = bench.bench_generate(tokens=4, repeats=1, preset_name="tiny")
    assert data["tokens_match"]["fp32"] is False and data["matching_prefix"]["fp32"] == 0


def test_bench_generate_without_transformers_reports_ours_and_how_to_install(monkeypatch):
    monkeypatch.setattr(bench, "transformers_version", lambda: None)
    result = run("bench", "generate", "--preset", "tiny", "--tokens", "4", "--repeats", "1")
    assert result.exit_code == 0, result.output
    assert "machine:" in result.output and "threads" in result.output
    assert "gpt2term fp32" in result.output
    assert "transformers generate" not in result.output
    assert "pip install transformers" in result.output
    data = json.loads(run("bench", "generate", "--preset", "tiny", "--tokens", "4", "--repeats", "1", "--json").output)
    assert data["transformers"] is None and data["ratio"]["fp32"] is None
    assert "pip install transformers" in data["note"]
    assert data["ours"]["fp32"]["tokens_per_second"] > 0


@pytest.mark.once  # the bench's report: its own loop's numbers are tested elsewhere in both passes
def test_bench_train_json_has_both_loops_in_both_dtypes():
    pytest.importorskip("transformers")
    result = run(
        "bench", "train", "--preset", "tiny", "--batch-size", "2", "--context-length", "16",
        "--steps", "1", "--warmup", "0", "--dtype", "both", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["benchmark"] == "train"
    _machine_is_described(data["machine"])
    assert data["settings"]["tokens_per_step"] == 32 and data["settings"]["context_length"] == 16
    for dt in ("fp32", "bf16"):
        for who in ("ours", "transformers"):
            entry = data[who][dt]
            assert entry["tokens_per_second"] > 0 and entry["step_s"] > 0
            # Both start untrained with GPT-2's initialisation: the loss is near ln(vocabulary), ~10.8.
            assert abs(entry["first_loss"] - math.log(50257)) < 0.5, (who, dt, entry["first_loss"])
        assert data["ratio"][dt] > 0


@pytest.mark.once  # the bench's report: its own loop's numbers are tested elsewhere in both passes
def test_bench_train_text_report_and_bad_options():
    result = run("bench", "train", "--preset", "tiny", "-b", "1", "--context-length", "8", "--steps", "1",
                 "--warmup", "0", "--dtype", "fp32")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "machine:" in result.output and "gpt2term fp32" in result.output
    bad = run("bench", "train", "--preset", "enormous", "--steps", "1")
    assert bad.exit_code == 2 and "unknown preset" in bad.output


@pytest.mark.parametrize("command", ["generate", "app"])
def test_bench_preset_with_a_checkpoint_is_refused_in_one_line(command):
    """--preset shapes only the random model: beside --checkpoint it would be silently ignored, so it is an error."""
    import torch

    from gpt2term.core.config import GPTConfig
    from gpt2term.core.model import GPTModel
    from gpt2term.core.store.store import CheckpointStore

    torch.manual_seed(0)
    CheckpointStore().save("tiny", GPTModel(GPTConfig(emb_dim=32, n_heads=2, n_layers=1, context_length=16)).eval())
    result = run("bench", command, "--checkpoint", "tiny", "--preset", "gpt2-124M", "--tokens", "2", "--repeats", "1")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--preset" in lines[0] and "--checkpoint" in lines[0], result.output
