"""`--dtype int8` decoding: per-output-channel int8 weights, the top candidates rescored in float32.

The model is trained here (a small one, a few dozen steps on a repetitive text) because the promise is about a
trained checkpoint: random weights give near-ties everywhere, which no reduced precision can keep.
Speed is the benchmark's business (`gpt2term bench generate --dtype int8`); here only numbers and tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt2term.core import accel
from gpt2term.core.accel import accelerate, int8, native, packed_weights, prepare_for_inference
from gpt2term.core.accel.decode import REFINED_CANDIDATES, PackedLinear
from gpt2term.core.errors import InputError
from gpt2term.core.generation import DecodingSettings, generate
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.tokenizer import default_tokenizer

needs_accel = pytest.mark.skipif(not accel.enabled(), reason="GPT2TERM_ACCEL=0: int8 exists only on the fast path")

TEXT = [
    "The quick brown fox jumps over the lazy dog, and the dog sleeps on.",
    "A stitch in time saves nine; a penny saved is a penny earned.",
    "Every effort moves you forward, one small step after another.",
    "def add(a, b):\n    return a + b\n",
]
PROMPTS = ["The quick brown", "Every effort moves you", "def add(", "A stitch"]


@pytest.fixture(scope="module")
def trained_state(tmp_path_factory) -> tuple[dict, dict]:
    """A briefly trained small model (its config and state_dict), trained under its own throwaway home."""
    from gpt2term.core.training import Trainer, TrainingSettings

    home = tmp_path_factory.mktemp("int8-home")
    corpus = home / "corpus.txt"
    corpus.write_text("\n".join(TEXT * 30))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2TERM_HOME", str(home))
        settings = TrainingSettings(
            name="int8-trained",
            corpus=[str(corpus)],
            model={"emb_dim": 64, "n_layers": 2, "n_heads": 4, "drop_rate": 0.0},
            context_length=32,
            batch_size=8,
            max_steps=60,
            lr=5e-3,
            eval_interval=60,
            eval_iters=1,
            eval_at_start=False,
            save_interval=0,
            sample_tokens=0,
        )
        result = Trainer(settings).run()
        assert result.status == "completed"
        model = CheckpointStore().load_model("int8-trained")
        return model.cfg.to_dict(), {k: v.clone() for k, v in model.state_dict().items()}


def _model(trained_state) -> GPTModel:
    from gpt2term.core.config import GPTConfig

    cfg, state = trained_state
    model = GPTModel(GPTConfig(**cfg))
    model.load_state_dict(state)
    return model.eval()


def _greedy(model: GPTModel, prompt: str, tokens: int) -> list[int]:
    tok = default_tokenizer()
    settings = DecodingSettings(max_new_tokens=tokens, stop_at_eos=False)
    return [s.token_id for s in generate(model, tok, tok.encode(prompt), settings)]


def test_quantisation_error_is_within_half_a_step_of_each_rows_scale():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 96, generator=g) * torch.logspace(-3, 1, 200)[:, None]  # rows of very different sizes
    w[7] = 0.0  # an all-zero row must not divide by zero
    q, scale = int8.quantize(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (200,)
    assert int(q.abs().max()) == int8.QMAX  # the full range is used
    err = (int8.dequantize(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-6)).all())
    assert torch.equal(int8.dequantize(q, scale)[7], torch.zeros(96))
    # per channel: a small row's error is set by its own scale, not by the largest row's
    assert err[0].max() < 1e-3 * err[-1].max()


@pytest.mark.parametrize("fbgemm", [True, False], ids=["fbgemm", "dequantised-fallback"])
def test_int8_linear_gives_the_product_of_the_dequantised_weights(fbgemm):
    if fbgemm and not hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"):
        pytest.skip("this PyTorch build has no fbgemm int8 linear")  # (the kernel itself, not the probe's verdict)
    g = torch.Generator().manual_seed(11)
    weight, bias = torch.randn(300, 64, generator=g) * 0.05, torch.randn(300, generator=g)
    q, s = int8.quantize(weight)
    for rows in (1, 3, 9):
        x = torch.randn(rows, 64, generator=g) * 3
        x[0, 5] = 40.0  # an outlier, as GPT-2's activations have: it sets the 7-bit step
        expected = F.linear(x, int8.dequantize(q, s), bias)
        for gelu in (False, True):
            layer = PackedLinear(weight, bias, torch.int8, gelu=gelu, use_native=False)
            layer.weight = int8.Int8Matrix(weight, bias, use_fbgemm=fbgemm)
            got = layer(x)
            want = F.gelu(expected, approximate="tanh") if gelu else expected
            assert got.dtype == torch.float32 and got.shape == (rows, 300)
            if not fbgemm:
                assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
                continue
            # fbgemm gets each activation to within half of a 7-bit step / LO_GAIN (`int8.Activations`)
            step = x.abs().max().item() / (int8.ZERO_POINT - 1)
            bound = step / (2 * int8.LO_GAIN) * int8.dequantize(q, s).abs().sum(1) * 1.01 + 1e-5
            gap = (got - want).abs() if not gelu else (got - want).abs() / 1.2  # gelu's slope is at most ~1.13
            assert bool((gap <= bound).all()), (gap / bound).max()


@needs_accel
@pytest.mark.parametrize("kernels", ["native", "pytorch"])
def test_int8_greedy_tokens_equal_float32_for_100_tokens_on_a_trained_model(trained_state, kernels, monkeypatch):
    if kernels == "native" and not native.available():
        pytest.skip(f"gpt2term's kernels are not built here: {native.why_not()}")
    monkeypatch.setenv(native.SWITCH, "0")  # the reference: float32 decoding on PyTorch's kernels
    model = accelerate(_model(trained_state), "fp32")
    fp32 = {p: _greedy(model, p, 100) for p in PROMPTS}
    if kernels == "native":
        monkeypatch.delenv(native.SWITCH)
    prepare_for_inference(model, "int8")
    packed = packed_weights(model)
    want_kind = "native" if kernels == "native" else "int8"
    assert packed is not None and packed.dtype == torch.int8 and packed.head.kind == want_kind
    for p in PROMPTS:
        assert _greedy(model, p, 100) == fp32[p], p
    accelerate(model, "fp32")
    assert _greedy(model, PROMPTS[0], 20) == fp32[PROMPTS[0]][:20]


@needs_accel
def test_int8_rescored_candidates_have_float32_logits_and_close_probabilities(trained_state):
    model = _model(trained_state)
    ids = torch.tensor([default_tokenizer().encode("Every effort moves you forward, one")])
    with torch.inference_mode():
        x, _, _ = model.hidden_states(ids)
        hidden = model.final_norm(x)[0, -1:]
        expected = F.linear(hidden, model.out_head.weight)[0]
        accelerate(model, "int8")
        got = model(ids, last_only=True)[0, -1]
        head = packed_weights(model)._head(hidden)[0]  # the int8 head on float32's own hidden state
    assert got.dtype == torch.float32 and head.dtype == torch.float32
    top = expected.topk(REFINED_CANDIDATES // 4).indices  # well inside the candidates: rescored in float32
    assert (head[top] - expected[top]).abs().max().item() < 1e-5 * expected.abs().max().item()
    rest = expected.topk(4 * REFINED_CANDIDATES).indices[2 * REFINED_CANDIDATES :]
    assert (head[rest] - expected[rest]).abs().max().item() > 1e-4  # only the candidates are float32's
    # the whole int8 forward (its hidden state moved by the int8 layers): the same choice, close probabilities
    p_got, p_expected = got.softmax(-1), expected.softmax(-1)
    k = expected.topk(10).indices
    assert (p_got[k] - p_expected[k]).abs().max().item() < 5e-3
    assert int(got.argmax()) == int(expected.argmax())


@needs_accel
def test_int8_packed_weights_take_about_a_quarter_of_float32s_memory(trained_state):
    model = accelerate(_model(trained_state), "fp32")
    fp32 = packed_weights(model).nbytes()
    accelerate(model, "int8")
    assert packed_weights(model).nbytes() < 0.3 * fp32


def test_int8_is_for_decoding_only_and_unknown_names_list_it():
    from gpt2term.core.devices import resolve_dtype
    from gpt2term.core.training import TrainingSettings

    with pytest.raises(InputError, match="decoding only"):
        resolve_dtype("int8")
    with pytest.raises(InputError, match="decoding only"):
        TrainingSettings(name="x", corpus=["c.txt"], dtype="int8").validate()
    with pytest.raises(InputError, match="fp32, bf16 or int8"):
        DecodingSettings(dtype="int4")


@pytest.mark.once  # it sets GPT2TERM_ACCEL=0 itself: the second pass would run it again unchanged
def test_int8_with_the_fast_paths_off_is_a_one_line_error():
    env = {**os.environ, "GPT2TERM_ACCEL": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2term", "generate", "Hello", "-n", "2", "--dtype", "int8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and "GPT2TERM_ACCEL=0" in lines[0] and "int8" in lines[0], proc.stderr


@needs_accel
def test_generate_command_with_dtype_int8_end_to_end(trained_state):
    from click.testing import CliRunner

    from gpt2term.cli import cli

    CheckpointStore().save("trained", _model(trained_state))
    outputs = {}
    for dtype in ("fp32", "int8"):
        result = CliRunner().invoke(cli, ["generate", "Every effort moves you", "-c", "trained", "-n", "30",
                                          "--no-stop", "--dtype", dtype, "--json"])  # fmt: skip
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in result.output.splitlines() if '"token_id"' in line]
        outputs[dtype] = records
    assert len(outputs["int8"]) == 30
    assert [r["token_id"] for r in outputs["int8"]] == [r["token_id"] for r in outputs["fp32"]]
    for a, b in zip(outputs["int8"], outputs["fp32"], strict=True):
        assert abs(a["prob"] - b["prob"]) < 5e-3
    train = CliRunner().invoke(cli, ["train", "--dtype", "int8", "--name", "x", "c.txt"])
    assert train.exit_code == 2 and "int8" in train.output


@needs_accel
def test_bench_generate_reports_an_int8_row():
    from click.testing import CliRunner

    from gpt2term.cli import cli
    from gpt2term.core.bench import _generation_dtypes

    assert _generation_dtypes("all") == ["fp32", "bf16", "int8"]
    result = CliRunner().invoke(cli, ["bench", "generate", "--preset", "tiny", "--tokens", "4", "--repeats", "1",
                                      "--dtype", "int8", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{") :])
    assert data["settings"]["dtypes"] == ["int8"]
    assert data["ours"]["int8"]["tokens_per_second"] > 0
    assert data["ours"]["int8"]["packed_weights_mb"] > 0


@needs_accel
def test_the_apps_settings_dialog_switches_decoding_to_int8(trained_state):
    import asyncio

    from gpt2term.tui.app import make_app
    from gpt2term.tui.dialogs import SettingsScreen
    from gpt2term.tui.screens.prompt import PromptScreen
    from tests.pilot_helpers import settle

    CheckpointStore().save("trained", _model(trained_state))
    fp32 = _greedy(accelerate(_model(trained_state), "fp32"), PROMPTS[1], 20)

    async def scenario() -> None:
        app = make_app("trained", keymap={})
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, lambda: pilot.app.app_model is not None, "the model loaded")
            screen = app.screen
            assert isinstance(screen, PromptScreen)
            await pilot.press("ctrl+o")
            dialog = app.screen
            assert isinstance(dialog, SettingsScreen) and dialog.query_one("#dtype").value == "fp32"
            dialog.query_one("#max_new_tokens").value = "20"
            dialog.query_one("#dtype").value = "int8"
            await pilot.press("ctrl+s")
            assert app.screen is screen and screen.settings.dtype == "int8"
            assert "int8 weights" in screen.settings.describe()
            await pilot.press(*PROMPTS[1], "enter")
            await settle(pilot, lambda: screen.turns and screen.turns[-1].state != "generating", "generation ended")
            turn = screen.turns[-1]
            assert turn.state == "done", turn
            assert [s.token_id for s in turn.steps] == fp32
            assert packed_weights(app.app_model.model).dtype == torch.int8

    asyncio.run(scenario())
