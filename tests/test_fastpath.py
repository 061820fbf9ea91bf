"""The fast paths compute what the plain model computes: packed decoding weights (fp32 and bf16) and oneDNN linears.

Speed is the benchmark's business (`gpt2term bench`); here only numbers and tokens are checked.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpt2term.core.model as model_module
from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import InputError
from gpt2term.core.generation import DecodingSettings, beam_search, generate
from gpt2term.core.model import GPTModel, KVCache, prepare_for_inference
from gpt2term.core.tokenizer import default_tokenizer


def _model(seed: int = 0, *, vocab: int = 1000, context: int = 16, emb: int = 64, spread: float = 30.0) -> GPTModel:
    """A small model whose logits are spread out (random GPT-2 weights give near-ties everywhere)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, context_length=context, emb_dim=emb, n_heads=4, n_layers=2)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.out_head.weight.mul_(spread)
        for name, p in model.named_parameters():
            if name.endswith(("bias", "shift")):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _plain_logits(model: GPTModel, ids: torch.Tensor) -> torch.Tensor:
    x, _, _ = model.hidden_states(ids)
    return model.out_head(model.final_norm(x))


def _greedy(model: GPTModel, prompt: list[int], tokens: int) -> list[int]:
    settings = DecodingSettings(max_new_tokens=tokens, stop_at_eos=False)
    return [s.token_id for s in generate(model, default_tokenizer(), prompt, settings)]


def test_packed_fp32_decoding_gives_the_plain_models_logits():
    model = _model()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = _plain_logits(model, ids)
        cache = KVCache(model.cfg, batch_size=2)
        chunks = [model(ids[:, :5], cache)] + [model(ids[:, i : i + 1], cache) for i in range(5, 12)]
        last = model(ids, last_only=True)
    assert model._inference_weights is not None  # the packed path really ran
    assert cache.length == 12
    assert (torch.cat(chunks, dim=1) - expected).abs().max().item() < 1e-4
    assert (last[:, 0] - expected[:, -1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("seed", [0, 1])
def test_packed_greedy_tokens_equal_the_plain_path_past_the_context(seed):
    model = _model(seed)
    prompt = [3, 14, 15, 92, 65]
    fast = _greedy(model, prompt, 40)  # context 16: most of these steps crop and recompute
    assert model._inference_weights is not None
    model.fast_inference = False
    model.release_inference_weights()
    plain = _greedy(model, prompt, 40)
    assert model._inference_weights is None
    assert fast == plain


def test_beam_search_on_the_packed_path_equals_the_plain_path():
    model = _model(2)
    tok = default_tokenizer()
    fast = beam_search(model, tok, [1, 2, 3], beams=3, max_new_tokens=20, stop_at_eos=False)
    model.fast_inference = False
    plain = beam_search(model, tok, [1, 2, 3], beams=3, max_new_tokens=20, stop_at_eos=False)
    assert [b.token_ids for b in fast] == [b.token_ids for b in plain]
    assert [b.logprob for b in fast] == pytest.approx([b.logprob for b in plain], abs=1e-3)


def test_packed_weights_follow_every_change_of_the_parameters():
    model = _model(3)
    ids = torch.tensor([[5, 6, 7, 8]])

    def check() -> None:
        with torch.inference_mode():
            got = model(ids, last_only=True)[0, -1]
            expected = _plain_logits(model, ids)[0, -1]
        assert (got - expected).abs().max().item() < 1e-4

    check()
    first = model._inference_weights
    check()
    assert model._inference_weights is first  # unchanged weights: the packed copy is reused
    with torch.no_grad():  # an in-place update (what an optimizer step does)
        model.trf_blocks[1].ff.layers[0].weight.add_(0.05)
    check()
    assert model._inference_weights is not first
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in _model(4).state_dict().items()}
    model.load_state_dict(state)  # copies into the same tensors
    check()
    model.out_head.weight = nn.Parameter(model.out_head.weight.detach() * 0.5)  # a replaced parameter
    check()


def test_training_gradients_and_attention_weights_never_use_the_packed_copy():
    model = _model(5)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        model(ids, last_only=True)
    assert model._inference_weights is not None
    model.train()  # training changes every weight: the copy is dropped
    assert model._inference_weights is None
    with torch.no_grad():
        model(ids, KVCache(model.cfg), last_only=True)
    assert model._inference_weights is None  # train mode: plain path (dropout applies)
    model.eval()
    logits = model(ids, last_only=True)  # gradients enabled: the plain path, so they flow
    assert logits.requires_grad and model._inference_weights is None
    logits.sum().backward()
    assert model.out_head.weight.grad is not None
    with torch.inference_mode():
        _, _, weights = model.hidden_states(ids, need_weights=True)
    assert len(weights) == 2 and model._inference_weights is None
    model.fast_inference = False
    with torch.inference_mode():
        model(ids, last_only=True)
    assert model._inference_weights is None


def test_bf16_decoding_matches_fp32_greedy_tokens_and_keeps_float32_logits():
    for seed in (0, 6):
        model = _model(seed, vocab=50257, context=64, emb=64)
        prompt = default_tokenizer().encode("Every effort moves you")
        fp32 = _greedy(model, prompt, 50)
        prepare_for_inference(model, "bf16")
        assert model._inference_weights is not None and model._inference_weights.dtype == torch.bfloat16
        bf16 = _greedy(model, prompt, 50)
        assert bf16 == fp32, f"seed {seed}"
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            got = model(ids, last_only=True)[0, -1]
            expected = _plain_logits(model, ids)[0, -1]
        assert got.dtype == torch.float32
        top = expected.topk(10).indices  # refined in float32: close; the rest: bf16-close
        assert (got[top] - expected[top]).abs().max().item() < 0.05 * expected.abs().max().item()
        assert (got - expected).abs().max().item() < 0.1 * expected.abs().max().item()
        prepare_for_inference(model, "fp32")
        assert model._inference_weights.dtype == torch.float32
        assert _greedy(model, prompt, 50) == fp32


def test_packed_memory_is_reported_and_bf16_halves_it():
    model = _model(8)
    prepare_for_inference(model, "fp32")
    fp32 = model._inference_weights.nbytes()
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert fp32 >= 4 * linear_params
    prepare_for_inference(model, "bf16")
    assert model._inference_weights.nbytes() < 0.6 * fp32
    model.release_inference_weights()
    assert model._inference_weights is None


def test_unknown_inference_dtype_is_a_user_error():
    with pytest.raises(InputError, match="fp32 or bf16"):
        prepare_for_inference(_model(), "fp16")


def test_onednn_linears_give_pytorchs_forward_and_gradients():
    if not model_module._onednn_fp32_linear_available():
        pytest.skip("this PyTorch build has no oneDNN: the fast linear path is not used")
    torch.manual_seed(9)
    model = GPTModel(GPTConfig(vocab_size=3000, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0))
    ids = torch.randint(0, 3000, (3, 16))
    targets = torch.randint(0, 3000, (3, 16))

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}

    fast_loss, fast = loss_and_grads()
    original = model_module._ONEDNN_FP32
    model_module._ONEDNN_FP32 = False  # F.linear everywhere: PyTorch's reference
    try:
        ref_loss, ref = loss_and_grads()
    finally:
        model_module._ONEDNN_FP32 = original
    assert fast_loss == pytest.approx(ref_loss, abs=1e-5)
    for name, grad in ref.items():
        scale = max(grad.abs().max().item(), 1e-6)
        assert (fast[name] - grad).abs().max().item() <= 1e-4 * scale + 1e-8, name


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_sliced_head_loss_gives_cross_entropys_loss_and_gradients(monkeypatch, amp):
    """model(ids, targets=...) never builds the whole logits, yet equals the course's loss, gradients included."""
    torch.manual_seed(10)
    model = GPTModel(GPTConfig(vocab_size=3000, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0))
    ids = torch.randint(0, 3000, (4, 16))
    targets = torch.randint(0, 3000, (4, 16))
    # Slices of 5 rows and weight-gradient blocks of 12: uneven slices, several blocks, a short last one.
    monkeypatch.setattr(model_module, "LOSS_CHUNK_BYTES", 5 * 4 * 3000)
    monkeypatch.setattr(model_module, "LOSS_GRAD_BLOCK_ROWS", 12)

    def loss_and_grads(sliced: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if sliced:
                loss = model(ids, targets=targets)
            else:
                loss = F.cross_entropy(model(ids).flatten(0, 1).float(), targets.flatten())
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}

    sliced_loss, sliced = loss_and_grads(True)
    ref_loss, ref = loss_and_grads(False)
    assert sliced_loss == pytest.approx(ref_loss, abs=1e-5 if not amp else 1e-3)
    tolerance = 1e-4 if not amp else 2e-2  # bf16 rounds the slices' gradients in a different order
    for name, grad in ref.items():
        scale = max(grad.abs().max().item(), 1e-6)
        assert (sliced[name] - grad).abs().max().item() <= tolerance * scale + 1e-8, name
    with torch.no_grad():
        assert float(model(ids, targets=targets)) == pytest.approx(sliced_loss, abs=1e-3 if amp else 1e-6)
    ignored = targets.clone()
    ignored[0, :5] = -100  # cross_entropy's ignore_index: the plain path handles it
    with torch.no_grad():
        expected = F.cross_entropy(model(ids).flatten(0, 1), ignored.flatten())
        assert float(model(ids, targets=ignored)) == pytest.approx(float(expected), abs=1e-5)


def test_second_core_runs_both_halves_and_hands_back_errors():
    helper = model_module._SecondCore.get()
    seen: list[int] = []
    helper.both(lambda: seen.append(1), lambda: seen.append(2))
    assert sorted(seen) == [1, 2]

    def broken() -> None:
        raise RuntimeError("half failed")

    with pytest.raises(RuntimeError, match="half failed"):
        helper.both(lambda: None, broken)
    helper.both(lambda: seen.append(3), lambda: seen.append(4))  # still serving after an error
    assert sorted(seen) == [1, 2, 3, 4]


def test_one_thread_decodes_the_same_tokens_as_two():
    model = _model(11)
    prompt = [7, 8, 9]
    threads = torch.get_num_threads()
    two = _greedy(model, prompt, 20)
    torch.set_num_threads(1)  # no helper thread: both halves on the caller
    try:
        one = _greedy(model, prompt, 20)
    finally:
        torch.set_num_threads(threads)
    assert one == two


def test_generate_command_dtype_option(tmp_path):
    from click.testing import CliRunner

    from gpt2term.cli import cli
    from gpt2term.core.checkpoints import CheckpointStore

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
