"""The fast paths compute what the plain model computes: packed decoding weights (fp32 and bf16), oneDNN linears,
the sliced loss and the thread splitting. Acceleration is turned on and off only through its public switches.

Speed is the benchmark's business (`gpt2term bench`); here only numbers and tokens are checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2term.core import accel
from gpt2term.core.accel import accelerate, packed_weights, plain, probes
from gpt2term.core.accel import head_loss as head_loss_module
from gpt2term.core.accel.decode import PackedLinear
from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import InputError
from gpt2term.core.generation import DecodingSettings, beam_search, generate
from gpt2term.core.model import GPTModel, KVCache
from gpt2term.core.tokenizer import default_tokenizer

# Tests of what only the fast paths do; the rest also run (on the plain model) with GPT2TERM_ACCEL=0.
needs_accel = pytest.mark.skipif(not accel.enabled(), reason="GPT2TERM_ACCEL=0: the fast paths are switched off")


def _model(seed: int = 0, *, vocab: int = 1000, context: int = 16, emb: int = 64, spread: float = 30.0) -> GPTModel:
    """A small accelerated model whose logits are spread out (random GPT-2 weights give near-ties everywhere)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, context_length=context, emb_dim=emb, n_heads=4, n_layers=2)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.out_head.weight.mul_(spread)
        for name, p in model.named_parameters():
            if name.endswith(("bias", "shift")):
                p.add_(torch.randn_like(p) * 0.1)
    return accelerate(model)


def _plain_logits(model: GPTModel, ids: torch.Tensor) -> torch.Tensor:
    x, _, _ = model.hidden_states(ids)
    return F.linear(model.final_norm(x), model.out_head.weight)


def _greedy(model: GPTModel, prompt: list[int], tokens: int) -> list[int]:
    settings = DecodingSettings(max_new_tokens=tokens, stop_at_eos=False)
    return [s.token_id for s in generate(model, default_tokenizer(), prompt, settings)]


@needs_accel
def test_packed_fp32_decoding_gives_the_plain_models_logits():
    model = _model()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = _plain_logits(model, ids)
        cache = KVCache(model.cfg, batch_size=2)
        chunks = [model(ids[:, :5], cache)] + [model(ids[:, i : i + 1], cache) for i in range(5, 12)]
        last = model(ids, last_only=True)
    assert packed_weights(model) is not None  # the packed path really ran
    assert cache.length == 12
    assert (torch.cat(chunks, dim=1) - expected).abs().max().item() < 1e-4
    assert (last[:, 0] - expected[:, -1]).abs().max().item() < 1e-4


@needs_accel
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_greedy_tokens_equal_the_plain_path_past_the_context(seed):
    model = _model(seed)
    prompt = [3, 14, 15, 92, 65]
    fast = _greedy(model, prompt, 40)  # context 16: most of these steps crop and recompute
    assert packed_weights(model) is not None
    plain(model)
    assert type(model) is GPTModel and all(type(m) is not accel.linear.OneDnnLinear for m in model.modules())
    plain_tokens = _greedy(model, prompt, 40)
    assert packed_weights(model) is None
    assert fast == plain_tokens


def test_beam_search_on_the_packed_path_equals_the_plain_path():
    model = _model(2)
    tok = default_tokenizer()
    fast = beam_search(model, tok, [1, 2, 3], beams=3, max_new_tokens=20, stop_at_eos=False)
    plain(model)
    slow = beam_search(model, tok, [1, 2, 3], beams=3, max_new_tokens=20, stop_at_eos=False)
    assert [b.token_ids for b in fast] == [b.token_ids for b in slow]
    assert [b.logprob for b in fast] == pytest.approx([b.logprob for b in slow], abs=1e-3)


@needs_accel
def test_packed_weights_follow_every_change_of_the_parameters():
    model = _model(3)
    ids = torch.tensor([[5, 6, 7, 8]])

    def check() -> None:
        with torch.inference_mode():
            got = model(ids, last_only=True)[0, -1]
            expected = _plain_logits(model, ids)[0, -1]
        assert (got - expected).abs().max().item() < 1e-4

    check()
    first = packed_weights(model)
    check()
    assert packed_weights(model) is first  # unchanged weights: the packed copy is reused
    with torch.no_grad():  # an in-place update (what an optimizer step does)
        model.trf_blocks[1].ff.layers[0].weight.add_(0.05)
    check()
    assert packed_weights(model) is not first
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in _model(4).state_dict().items()}
    model.load_state_dict(state)  # copies into the same tensors
    check()
    model.out_head.weight = nn.Parameter(model.out_head.weight.detach() * 0.5)  # a replaced parameter
    check()


@needs_accel
def test_training_gradients_and_attention_weights_never_use_the_packed_copy():
    model = _model(5)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        model(ids, last_only=True)
    assert packed_weights(model) is not None
    model.train()  # training changes every weight: the copy is dropped
    assert packed_weights(model) is None
    with torch.no_grad():
        model(ids, KVCache(model.cfg), last_only=True)
    assert packed_weights(model) is None  # train mode: plain path (dropout applies)
    model.eval()
    logits = model(ids, last_only=True)  # gradients enabled: the plain path, so they flow
    assert logits.requires_grad and packed_weights(model) is None
    logits.sum().backward()
    assert model.out_head.weight.grad is not None
    with torch.inference_mode():
        _, _, weights = model.hidden_states(ids, need_weights=True)
    assert len(weights) == 2 and packed_weights(model) is None


def _assert_same_tokens_up_to_a_near_tie(model, prompt, expected, got, label):
    """bf16 weights perturb the residual stream, so two candidates whose float32 logits differ by less than that
    perturbation may swap: the only place greedy tokens may part is such a near-tie (which kernel the CPU has
    decides which side of it bf16 lands on). Anywhere else the tokens must agree."""
    part = next((i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b), None)
    if part is None:
        return
    with torch.inference_mode():
        logits = _plain_logits(model, torch.tensor([prompt + expected[:part]]))[0, -1]
    first, second = logits.topk(2).values.tolist()
    assert got[part] in logits.topk(2).indices.tolist(), f"{label}: token {part} is not even float32's second choice"
    assert first - second < 1e-3 * abs(first), f"{label}: tokens part at {part} although float32's margin is clear"


@needs_accel
def test_bf16_decoding_matches_fp32_greedy_tokens_and_keeps_float32_logits():
    for seed in (0, 6):
        model = _model(seed, vocab=50257, context=64, emb=64)
        prompt = default_tokenizer().encode("Every effort moves you")
        fp32 = _greedy(model, prompt, 50)
        accelerate(model, "bf16")
        assert packed_weights(model) is not None and packed_weights(model).dtype == torch.bfloat16
        bf16 = _greedy(model, prompt, 50)
        _assert_same_tokens_up_to_a_near_tie(model, prompt, fp32, bf16, f"seed {seed}")
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            got = model(ids, last_only=True)[0, -1]
            expected = _plain_logits(model, ids)[0, -1]
        assert got.dtype == torch.float32
        top = expected.topk(10).indices  # refined in float32: close; the rest: bf16-close
        assert (got[top] - expected[top]).abs().max().item() < 0.05 * expected.abs().max().item()
        assert (got - expected).abs().max().item() < 0.1 * expected.abs().max().item()
        accelerate(model, "fp32")
        assert packed_weights(model).dtype == torch.float32
        assert _greedy(model, prompt, 50) == fp32


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn-packed", "linear-fallback"])
def test_bf16_packed_linear_kernels_give_the_float32_product(onednn):
    if onednn and not probes.onednn_bf16():
        pytest.skip("this CPU or PyTorch build has no oneDNN bf16 matmul")
    g = torch.Generator().manual_seed(13)
    weight, bias, x = torch.randn(96, 64, generator=g), torch.randn(96, generator=g), torch.randn(2, 64, generator=g)
    for gelu in (False, True):
        layer = PackedLinear(weight, bias, torch.bfloat16, gelu=gelu, onednn=onednn, use_native=False)
        assert layer.kind == ("onednn" if onednn else "linear")
        expected = F.linear(x, weight, bias)
        expected = F.gelu(expected, approximate="tanh") if gelu else expected
        got = layer(x.bfloat16()).float()
        assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "linear-fallback"])
def test_fp32_packed_linear_gives_the_linear_product(onednn):
    if onednn and not probes.onednn_fp32():
        pytest.skip("this PyTorch build has no oneDNN float32 matmul")
    g = torch.Generator().manual_seed(17)
    weight, bias = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    for rows in (1, 7):
        x = torch.randn(rows, 64, generator=g)
        for gelu in (False, True):
            layer = PackedLinear(weight, bias, torch.float32, gelu=gelu, onednn=onednn, use_native=False)
            assert layer.kind == "fp32" and layer.weight.t().is_contiguous()  # stored [in, out]
            expected = F.linear(x, weight, bias)
            expected = F.gelu(expected, approximate="tanh") if gelu else expected
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@needs_accel
def test_packed_memory_is_reported_and_bf16_halves_it():
    model = _model(8)
    accelerate(model, "fp32")
    fp32 = packed_weights(model).nbytes()
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert fp32 >= 4 * linear_params
    accelerate(model, "bf16")
    assert packed_weights(model).nbytes() < 0.6 * fp32
    accel.release_packed_weights(model)
    assert packed_weights(model) is None


def test_unknown_inference_dtype_is_a_user_error():
    with pytest.raises(InputError, match="fp32, bf16 or int8"):
        accelerate(_model(), "fp16")


def test_models_made_under_inference_mode_decode_like_the_others():
    """Inference tensors have no version counter, so no packed copy can be kept for them: the plain path runs."""
    reference = _model(14)
    with torch.inference_mode():
        model = GPTModel(reference.cfg).eval()
        model.load_state_dict(reference.state_dict())
    accelerate(model)
    assert _greedy(model, [4, 5, 6], 20) == _greedy(reference, [4, 5, 6], 20)
    assert packed_weights(model) is None


@pytest.mark.parametrize(
    ("capability", "vendor", "expected"),
    [
        ("AVX2", "AuthenticAMD", False),
        ("AVX512", "AuthenticAMD", True),
        ("DEFAULT", "AuthenticAMD", False),
        ("AVX512", "GenuineIntel", False),
    ],
)
def test_training_linears_go_to_onednn_only_on_a_cpu_with_avx512_but_not_intels(
    monkeypatch, capability, vendor, expected
):
    """The kernel is chosen by the CPU, never by timing: every process on one machine computes the same sums.
    On Intel, MKL (PyTorch's matmul) uses AVX-512 itself: the linears and the loss's head stay with it."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(accel.linear, "cpu_vendor", lambda: vendor)
    accel.linear._has_avx512.cache_clear()
    try:
        assert accel.linear.onednn_training() is (expected and probes.onednn_fp32())
        intel_mkl = vendor == "GenuineIntel" and torch.backends.mkl.is_available()
        assert accel.linear.onednn_head() is (probes.onednn_fp32() and not intel_mkl)
    finally:
        accel.linear._has_avx512.cache_clear()


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo here")
def test_the_cpu_vendor_is_read_from_the_machine():
    vendor = accel.linear.cpu_vendor()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        assert f"vendor_id\t: {vendor}\n" in f.read() or not vendor


@needs_accel
@pytest.mark.parametrize("on_onednn", [True, False], ids=["onednn", "pytorch-matmul"])
def test_onednn_linears_give_pytorchs_forward_and_gradients(monkeypatch, on_onednn):
    """Both kernels a CPU may get (oneDNN with AVX-512, PyTorch's matmul without) give PyTorch's numbers."""
    if on_onednn and not probes.onednn_fp32():
        pytest.skip("this PyTorch build has no oneDNN: the fast linear path is not used")
    monkeypatch.setattr(accel.linear, "_has_avx512", lambda: on_onednn)
    monkeypatch.setattr(accel.linear, "mkl_on_intel", lambda: False)
    torch.manual_seed(9)
    model = GPTModel(GPTConfig(vocab_size=3000, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0))
    ids = torch.randint(0, 3000, (3, 16))
    targets = torch.randint(0, 3000, (3, 16))

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = loss_and_grads()  # plain nn.Linear: PyTorch's reference
    accelerate(model)
    assert all(type(m) is accel.linear.OneDnnLinear for m in model.modules() if isinstance(m, nn.Linear))
    ran = type(model.trf_blocks[0].ff.layers[0](torch.randn(2, 32, requires_grad=True)).grad_fn).__name__
    assert ("OneDnnLinear" in ran) is on_onednn, ran
    fast_loss, fast = loss_and_grads()
    assert fast_loss == pytest.approx(ref_loss, abs=1e-5)
    for name, grad in ref.items():
        scale = max(grad.abs().max().item(), 1e-6)
        assert (fast[name] - grad).abs().max().item() <= 1e-4 * scale + 1e-8, name


@needs_accel
@pytest.mark.parametrize(
    ("amp", "emulated", "intel"),
    [(False, False, False), (False, False, True), (True, False, False), (True, True, False)],
    ids=["fp32-onednn", "fp32-mkl", "bf16-autocast", "bf16-emulated"],
)
def test_sliced_head_loss_gives_cross_entropys_loss_and_gradients(monkeypatch, amp, emulated, intel):
    """model(ids, targets=...) never builds the whole logits, yet equals the course's loss, gradients included."""
    monkeypatch.setattr(head_loss_module.linear, "mkl_on_intel", lambda: intel)
    if emulated:  # what a CPU without bf16 instructions runs: float32 oneDNN matmuls on bf16-rounded operands
        monkeypatch.setattr(head_loss_module.linear, "bf16_emulated", lambda: True)
    torch.manual_seed(10)
    model = GPTModel(GPTConfig(vocab_size=3000, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0))
    ids = torch.randint(0, 3000, (4, 16))
    targets = torch.randint(0, 3000, (4, 16))
    # Slices of 5 rows and weight-gradient blocks of 12: uneven slices, several blocks, a short last one.
    monkeypatch.setattr(head_loss_module, "LOSS_CHUNK_BYTES", 5 * 4 * 3000)
    monkeypatch.setattr(head_loss_module, "LOSS_GRAD_BLOCK_ROWS", 12)
    sliced_calls = []
    original = head_loss_module.head_loss
    monkeypatch.setattr(head_loss_module, "head_loss", lambda *a: sliced_calls.append(1) or original(*a))

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(ids, targets=targets)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = loss_and_grads()  # the plain model: the course's F.cross_entropy on the whole logits
    assert not sliced_calls
    accelerate(model)
    sliced_loss, sliced = loss_and_grads()
    assert sliced_calls
    assert sliced_loss == pytest.approx(ref_loss, abs=1e-5 if not amp else 1e-3)
    tolerance = 1e-4 if not amp else 2e-2  # bf16 rounds the slices' gradients in a different order
    # The key biases' true gradient is zero (softmax ignores a constant per query): what both compute is rounding.
    floor = 1e-8 if not amp else 1e-7
    for name, grad in ref.items():
        scale = max(grad.abs().max().item(), 1e-6)
        assert (sliced[name] - grad).abs().max().item() <= tolerance * scale + floor, name
    with torch.no_grad():
        assert float(model(ids, targets=targets)) == pytest.approx(sliced_loss, abs=1e-3 if amp else 1e-6)
    ignored = targets.clone()
    ignored[0, :5] = -100  # cross_entropy's ignore_index: the plain path handles it
    with torch.no_grad():
        expected = F.cross_entropy(model(ids).flatten(0, 1), ignored.flatten())
        assert float(model(ids, targets=ignored)) == pytest.approx(float(expected), abs=1e-5)


def test_one_two_and_four_threads_decode_the_same_tokens():
    model = _model(11, vocab=1000, emb=64)
    prompt = [7, 8, 9]
    before = torch.get_num_threads()
    tokens = {}
    packed = set()
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            tokens[n] = _greedy(model, prompt, 20)
            if accel.enabled():
                packed.add(id(packed_weights(model)))
    finally:
        torch.set_num_threads(before)
    assert tokens[1] == tokens[2] == tokens[4]
    if accel.enabled():
        assert len(packed) == 1  # the layout does not depend on the thread count: no repacking when it changes


def test_probes_leave_the_global_random_state_alone():
    """A resumed training run restores the RNG, then its first forward runs the probes: they must not draw from it."""
    code = (
        "import torch\n"
        "torch.manual_seed(1234)\n"
        "from gpt2term.core.accel import probes\n"
        "print(probes.results())\n"
        "print(torch.rand(1).item())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.splitlines()[-1]) == torch.rand(1, generator=torch.Generator().manual_seed(1234)).item()


def test_the_environment_switch_keeps_every_model_plain(monkeypatch):
    monkeypatch.setenv("GPT2TERM_ACCEL", "0")
    model = _model(15)
    assert type(model) is GPTModel and all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert accelerate(model, "bf16") is model and type(model) is GPTModel
    with pytest.raises(InputError, match="fp32, bf16 or int8"):
        accelerate(model, "fp8")  # still the user's error
    assert accel.describe() == {"enabled": False}


def test_state_dict_names_do_not_change_and_book_files_load_strictly():
    model = _model(16)
    names = list(GPTModel(model.cfg).state_dict())
    assert list(model.state_dict()) == names
    book = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(model.cfg.n_layers):
        book[f"trf_blocks.{i}.att.mask"] = torch.ones(16, 16).triu(1)  # what the book's model.pth also carries
    fresh = accelerate(GPTModel(model.cfg))
    fresh.load_state_dict(book, strict=True)
    plain(fresh)
    assert list(fresh.state_dict()) == names


def test_generate_command_dtype_option(tmp_path):
    from click.testing import CliRunner

    from gpt2term.cli import cli
    from gpt2term.core.store.store import CheckpointStore

    CheckpointStore().save("small", _model(12, vocab=50257, context=64, emb=64))
    outputs = {}
    for dtype in ("fp32", "bf16"):
        result = CliRunner().invoke(cli, ["generate", "Every effort moves you", "-c", "small", "-n", "12", "--no-stop",
                                          "--dtype", dtype, "--json"])  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs[dtype] = [json.loads(line)["token_id"] for line in result.output.splitlines() if '"token_id"' in line]
    assert len(outputs["fp32"]) == 12 and outputs["bf16"] == outputs["fp32"]
    bad = CliRunner().invoke(cli, ["generate", "Hi", "--dtype", "fp8"])
    assert bad.exit_code == 2 and "fp8" in bad.output


@needs_accel
def test_bf16_autocast_linears_where_bf16_is_emulated_give_autocasts_numbers():
    """Without bf16 instructions, autocast's bf16 linears run as oneDNN float32 on the bf16-rounded operands: the
    same products, the same bf16 results (but for the order of float32 sums), forward and backward."""
    if not accel.linear.bf16_emulated():
        pytest.skip("this CPU has bf16 matmul instructions (or no oneDNN): autocast's own bf16 linear is used")
    torch.manual_seed(17)
    layer = nn.Linear(48, 40)
    x = torch.randn(3, 7, 48)

    def run() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        (y.float() * torch.linspace(-1, 1, 40)).sum().backward()
        return y, xi.grad, [layer.weight.grad, layer.bias.grad]

    ref_y, ref_gx, ref_gp = run()  # plain nn.Linear: PyTorch's bf16 matmul
    accel.linear.swap_in(layer)
    y, gx, gp = run()
    assert "Bf16Linear" in type(y.grad_fn).__name__  # the emulated path ran
    assert y.dtype == ref_y.dtype == torch.bfloat16 and gx.dtype == torch.float32
    assert (y == ref_y).float().mean() > 0.99  # bf16-equal but for a rare last-bit rounding of a different sum
    assert torch.allclose(y.float(), ref_y.float(), rtol=1e-2, atol=1e-2)
    for fast, ref in [(gx, ref_gx), *zip(gp, ref_gp, strict=True)]:
        assert fast.dtype == ref.dtype and torch.allclose(fast, ref, rtol=1e-2, atol=1e-3)


@needs_accel
def test_sliced_loss_of_a_confidently_wrong_model_is_cross_entropys_not_infinity():
    """The sliced loss takes each target's log-probability from the softmax; where that probability underflows
    (a loss near 100 and beyond) it must still give cross-entropy's finite value and gradients."""
    torch.manual_seed(18)
    x = torch.randn(6, 16, dtype=torch.float32)
    weight = (torch.randn(50, 16) * 40).requires_grad_()
    targets = (x @ weight.detach().t()).argmin(1)  # the least likely token of each row: losses of hundreds
    targets[0] = (x[0] @ weight.detach().t()).argmax()  # and one ordinary row
    expected = F.cross_entropy(x @ weight.t(), targets)
    (ref_grad,) = torch.autograd.grad(expected, weight)
    loss = head_loss_module.head_loss(x, weight, targets)
    (grad,) = torch.autograd.grad(loss, weight)
    expected, loss = float(expected.detach()), float(loss.detach())
    assert expected > 100 and math.isfinite(loss)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-5)


@needs_accel
@pytest.mark.parametrize("emulated", [False, True], ids=["bf16-instructions", "bf16-emulated"])
def test_sliced_bf16_loss_of_a_confident_model_keeps_the_digits_of_one_minus_p(monkeypatch, emulated):
    """An overfitting model puts p(target) near 1, where bf16 keeps 3 digits: its loss (about 1 - p) and gradient
    (p - 1) must still be cross-entropy's, not 0 or bf16's step of 0.004."""
    monkeypatch.setattr(head_loss_module.linear, "bf16_emulated", lambda: emulated)
    torch.manual_seed(19)
    x, weight = torch.randn(200, 16), torch.randn(300, 16) * 8
    logits = x @ weight.t()
    targets = logits.argmax(1)
    sure = torch.softmax(logits, -1).gather(1, targets[:, None]).squeeze(1) > 0.99
    x, targets = x[sure], targets[sure]  # only the rows it is that sure of: losses of 0.001 and less
    assert len(targets) > 100
    weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(x, weight), targets)
        (ref_grad,) = torch.autograd.grad(expected, weight)
        loss = head_loss_module.head_loss(x, weight, targets)
        (grad,) = torch.autograd.grad(loss, weight)
    expected, loss = float(expected.detach()), float(loss.detach())
    assert loss == pytest.approx(expected, rel=1e-2)
    assert (grad - ref_grad).abs().max().item() <= 2e-2 * ref_grad.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_a_model_in_another_float_dtype_decodes_on_the_plain_kinds(dtype):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=2, n_layers=1)).to(dtype).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        expected = model(ids, last_only=True)
        accelerate(model)
        got = model(ids, last_only=True)
    assert torch.allclose(got.double(), expected.double(), atol=1e-3 if dtype == torch.float16 else 1e-12)
