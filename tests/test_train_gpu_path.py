"""Training's GPU code path, run on the CPU: the padded output head, the FLOPs and MFU figures, and `bench train`
with the GPU's flags. No GPU here: what is checked is that the same code computes the same numbers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

import gpt2term.core.accel as accel
import gpt2term.core.bench as bench
from gpt2term.cli import cli
from gpt2term.core.accel import vocab_pad
from gpt2term.core.config import GPTConfig, preset
from gpt2term.core.generation import DecodingSettings, generate
from gpt2term.core.model import GPTModel
from gpt2term.core.tokenizer import default_tokenizer

CFG = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def _pair() -> tuple[GPTModel, GPTModel]:
    """The course's plain model and an accelerated copy with its head padded to a multiple of 64."""
    torch.manual_seed(0)
    plain = GPTModel(CFG)
    padded = GPTModel(CFG)
    padded.load_state_dict(plain.state_dict())
    accel.accelerate(padded)
    accel.pad_vocabulary(padded, 64)
    return plain, padded


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CFG.vocab_size, (3, CFG.context_length + 1), generator=g)
    ids[0, 5] = CFG.vocab_size - 1  # the last real row, next to the padding
    return ids[:, :-1], ids[:, 1:]


def test_padded_size():
    assert vocab_pad.padded_size(50257, 64) == 50304
    assert vocab_pad.padded_size(50304, 64) == 50304
    assert vocab_pad.padded_size(50257, 0) == 50257


def test_padded_head_gives_the_unpadded_loss_and_gradients(monkeypatch):
    if not accel.enabled():
        pytest.skip("GPT2TERM_ACCEL=0: nothing is padded, there is nothing to compare")
    calls = []
    original = vocab_pad.padded_head_loss

    def spy(x, weight, targets, multiple):
        calls.append(multiple)
        return original(x, weight, targets, multiple)

    monkeypatch.setattr(vocab_pad, "padded_head_loss", spy)
    plain, padded = _pair()
    inputs, targets = _batch()
    loss_plain = plain(inputs, targets=targets)
    loss_padded = padded(inputs, targets=targets)
    assert calls == [64]  # the padded head did run
    # Zero rows' logits are 0: had they reached the softmax, the loss would be ~1e-3 higher.
    torch.testing.assert_close(loss_padded, loss_plain, rtol=0, atol=2e-6)
    loss_plain.backward()
    loss_padded.backward()
    grads = dict(padded.named_parameters())
    for name, p in plain.named_parameters():
        assert grads[name].grad.shape == p.shape, name  # the real rows only: the padding's gradient is dropped
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_padding_never_reaches_the_probabilities():
    plain, padded = _pair()
    inputs, _ = _batch()
    plain.eval(), padded.eval()
    with torch.no_grad():
        logits = padded(inputs)
        assert logits.shape[-1] == CFG.vocab_size
        torch.testing.assert_close(logits, plain(inputs), rtol=1e-4, atol=1e-5)
    settings = DecodingSettings(max_new_tokens=4, temperature=0.0, stop_at_eos=False)
    prompt = default_tokenizer().encode("Every effort")
    ours = [(s.token_id, s.prob) for s in generate(padded, default_tokenizer(), prompt, settings)]
    theirs = [(s.token_id, s.prob) for s in generate(plain, default_tokenizer(), prompt, settings)]
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    # A probability over 47 more (zero-logit) columns would be ~0.1% lower.
    assert [p for _, p in ours] == pytest.approx([p for _, p in theirs], rel=1e-4)


def test_padding_defaults_to_off_on_the_cpu_and_plain_models():
    torch.manual_seed(0)
    model = accel.accelerate(GPTModel(CFG))
    assert accel.vocab_multiple(model) == 0  # the CPU keeps the sliced loss
    accel.pad_vocabulary(model, 64)
    assert accel.vocab_multiple(model) == (64 if accel.enabled() else 0)
    accel.plain(model)
    assert accel.vocab_multiple(model) == 0


@pytest.mark.once  # arithmetic and formatting: the same without the speed-ups
def test_flops_per_token_is_the_hand_count_for_tiny():
    # tiny: vocabulary 50257, 256 dims, 4 layers of 4 heads of 64, qkv biases; trained on 128 tokens.
    per_layer = 3 * (256 * 256 + 256) + (256 * 256 + 256) + (256 * 1024 + 1024) + (1024 * 256 + 256) + 4 * 256
    n = 4 * per_layer + 2 * 256 + 256 * 50257  # + final norm + head; the two embedding tables are lookups
    assert per_layer == 789_760 and n == 16_025_344
    assert bench.flops_parameters(preset("tiny")) == n
    assert bench.flops_per_token(preset("tiny"), 128) == 6 * n + 12 * 4 * 4 * 64 * 128 == 97_724_928
    # GPT-2 124M: nanoGPT's N (its tied token table counted once, as the head; position table left out)
    assert bench.flops_parameters(preset("gpt2-124M")) == 123_653_376
    assert bench.mfu(1000.0, 10**9, 2.0) == pytest.approx(0.5)
    assert bench.mfu(None, 10**9, 2.0) is None and bench.mfu(1000.0, 10**9, None) is None


@pytest.mark.once
@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA A10", 125),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA L4", 121),
        ("NVIDIA GeForce RTX 4090", 165),
        ("NVIDIA GeForce RTX 3090", 71),
        ("Tesla T4", None),
        ("NVIDIA A10G", None),
    ],
)
def test_gpu_peak_table(name, tflops):
    known = bench.gpu_peak_tflops(name)
    assert (known[1] if known else None) == tflops


def test_bench_train_on_the_cpu_with_the_gpu_flags(monkeypatch):
    calls = []
    original = vocab_pad.padded_head_loss
    monkeypatch.setattr(vocab_pad, "padded_head_loss", lambda *a: calls.append(a[3]) or original(*a))
    result = CliRunner().invoke(
        cli,
        ["bench", "train", "--device", "cpu", "--preset", "tiny", "-b", "1", "--context-length", "8",
         "--steps", "1", "--warmup", "0", "--dtype", "bf16", "--pad-vocab", "64", "--peak-tflops", "0.5",
         "--profile", "--no-compare", "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    s, ours = data["settings"], data["ours"]["bf16"]
    accelerated = data["machine"]["accel"]["enabled"]
    assert s["device"] == "cpu" and s["dtypes"] == ["bf16"] and data["transformers"] is None
    assert s["vocab_padded_to"] == (50304 if accelerated else 50257)
    assert (len(calls) > 0) == accelerated and set(calls) <= {64}
    assert s["flops_per_token"] == bench.flops_per_token(preset("tiny"), 8)
    assert s["peak_tflops"] == 0.5 and s["peak_source"] == "--peak-tflops"
    assert ours["mfu"] == pytest.approx(ours["tokens_per_second"] * s["flops_per_token"] / 0.5e12)
    rows = data["profile"]["ours"]["bf16"]
    assert 0 < len(rows) <= bench.PROFILE_TOP and all(0 <= r["share"] <= 1 for r in rows)
    assert rows == sorted(rows, key=lambda r: -r["share"])
    assert "unmeasured on a GPU" in data["note"]
    assert len(ours["runs_step_s"]) == 1  # the profiled steps are not timed


@pytest.mark.once  # arithmetic and formatting: the same without the speed-ups
def test_bench_train_text_report_shows_mfu_and_profile():
    result = CliRunner().invoke(
        cli,
        ["bench", "train", "--preset", "tiny", "-b", "1", "--context-length", "8", "--steps", "1", "--warmup", "0",
         "--dtype", "fp32", "--profile"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "MFU" in result.output and "MFLOPs/token" in result.output
    assert "profile, gpt2term fp32 (top ops):" in result.output
    assert "profile, transformers loop fp32 (top ops):" in result.output  # from its own process
    assert "pass --peak-tflops" in result.output  # no MFU on a CPU without its peak, and it says why


@pytest.mark.once
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_bench_train_on_cuda_without_a_gpu_is_one_line_naming_the_fix():
    result = CliRunner().invoke(cli, ["bench", "train", "--device", "cuda", "--preset", "gpt2-124M"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--device" in lines[0]


@pytest.mark.skipif(
    os.environ.get("GPT2TERM_TEST_COMPILE") != "1",
    reason="torch.compile of even the tiny training step took over 5 minutes on the project's 2-core machine "
    "(inductor builds C++ kernels); run with GPT2TERM_TEST_COMPILE=1",
)
def test_bench_train_compiled_on_the_cpu():
    result = CliRunner().invoke(
        cli,
        ["bench", "train", "--preset", "tiny", "-b", "1", "--context-length", "8", "--steps", "1", "--warmup", "1",
         "--dtype", "fp32", "--compile", "--pad-vocab", "64", "--no-compare", "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["settings"]["compile"] is True and data["ours"]["fp32"]["tokens_per_second"] > 0
    assert "unmeasured on a GPU" in data["note"]
