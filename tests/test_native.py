"""gpt2term's own decoding kernels (`gpt2term/core/accel/native.py`, `matvec.c`): their numbers, and their build in
real processes: cached for the next one, rebuilt when damaged, raced by two, and a clear fallback without a compiler.

Speed is the benchmark's business (`gpt2term bench generate`); here only numbers, files and processes.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2term.core import accel
from gpt2term.core.accel import decode, int8, native, packed_weights, prepare_for_inference, release_packed_weights
from gpt2term.core.config import GPTConfig
from gpt2term.core.model import GPTModel, KVCache
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.tokenizer import default_tokenizer
from tests.test_fastpath import _assert_same_tokens_up_to_a_near_tie, _greedy, _model, _plain_logits


@pytest.fixture
def kernels():
    """Skips where the kernels are not used; asked inside the test's own home, never the user's cache folder."""
    if not (accel.enabled() and native.available()):
        pytest.skip(f"gpt2term's kernels are not used here: {native.why_not()}")


needs_kernels = pytest.mark.usefixtures("kernels")

# What a fresh process reports about the kernels: whether they run (after one product), why not, the library's
# path, and the OpenMP runtimes mapped.
REPORT = (
    "import json, sys\n"
    "import torch\n"
    "from gpt2term.core.accel import native\n"
    "on = native.available()\n"
    "if on:\n"
    "    native.TiledMatrix(torch.randn(64, 64), None, torch.int8)(torch.randn(1, 64))\n"
    "omp = sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l or 'libomp' in l})\n"
    "print(json.dumps({'on': on, 'why': native.why_not(), 'path': str(native.library_path()), 'omp': omp}))\n"
)


def _report(env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", REPORT], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _reference(matrix: native.TiledMatrix, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), matrix.dense().double(), None if bias is None else bias.double()).float()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=["fp32", "bf16", "int8"])
def test_kernels_give_the_product_of_the_weights_they_hold(dtype):
    g = torch.Generator().manual_seed(5)
    for out_features, in_features in ((45, 37), (96, 64), (33, 768)):
        weight = torch.randn(out_features, in_features, generator=g) * 0.05
        for bias in (None, torch.randn(out_features, generator=g)):
            matrix = native.TiledMatrix(weight, bias, dtype)
            assert matrix.tiles.shape == (-(-out_features // native.TILE), in_features, native.TILE)
            for rows in (1, 2, 3, 4, 5, 17):
                x = torch.randn(rows, in_features, generator=g) * 3
                for threads in (1, 2):
                    before = torch.get_num_threads()
                    torch.set_num_threads(threads)
                    try:
                        got = matrix(x)
                    finally:
                        torch.set_num_threads(before)
                    assert got.shape == (rows, out_features) and got.dtype == torch.float32
                    torch.testing.assert_close(got, _reference(matrix, x, bias), atol=2e-5, rtol=1e-5)


@needs_kernels
def test_the_weights_they_hold_are_the_layers_own_rounded_to_the_dtype():
    weight = torch.randn(70, 50, generator=torch.Generator().manual_seed(6))
    assert torch.equal(native.TiledMatrix(weight, None, torch.float32).dense(), weight)
    assert torch.equal(native.TiledMatrix(weight, None, torch.bfloat16).dense(), weight.bfloat16().float())
    q, s = int8.quantize(weight)
    assert torch.equal(native.TiledMatrix(weight, None, torch.int8).dense(), int8.dequantize(q, s))


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_decoding_runs_on_the_kernels_and_keeps_float32s_greedy_tokens(dtype, monkeypatch):
    model = _model(0, vocab=50257, context=64, emb=64)  # logits spread apart: fewer near-ties to flip
    prompt = default_tokenizer().encode("Every effort moves you")
    with torch.inference_mode():
        expected_logits = _plain_logits(model, torch.tensor([prompt]))[0, -1]
    monkeypatch.setenv(native.SWITCH, "0")  # the reference: float32 decoding on PyTorch's kernels
    fp32 = _greedy(model, prompt, 30)
    assert packed_weights(model).head.kind == "fp32"
    monkeypatch.delenv(native.SWITCH)
    release_packed_weights(model)  # else fp32 would keep the copy packed for PyTorch's kernels
    prepare_for_inference(model, dtype)
    packed = packed_weights(model)
    assert packed is not None and packed.native and packed.head.kind == "native"
    assert all(layer.kind == "native" for block in packed.blocks for layer in block[1:3] + block[4:])
    got_tokens = _greedy(model, prompt, 30)
    if dtype == "fp32":
        assert got_tokens == fp32
    else:
        _assert_same_tokens_up_to_a_near_tie(model, prompt, fp32, got_tokens, dtype)
    with torch.inference_mode():
        got = model(torch.tensor([prompt]), last_only=True)[0, -1]
    if dtype == "fp32":
        torch.testing.assert_close(got, expected_logits, atol=1e-4, rtol=1e-5)


def _blocks_rounded_as_packed(model: GPTModel, packed) -> GPTModel:
    """The plain model with each block's matrices replaced by what the kernels hold (rounded to bf16 or int8); the
    head stays float32, which is what the refined top candidates are scored with."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for block, (_, qkv, out, _, fc, proj) in zip(reference.trf_blocks, packed.blocks, strict=True):
            att, ff = block.att, block.ff
            for linear, weight in zip((att.W_query, att.W_key, att.W_value), qkv.weight.dense().chunk(3), strict=True):
                linear.weight.copy_(weight)
            att.out_proj.weight.copy_(out.weight.dense())
            ff.layers[0].weight.copy_(fc.weight.dense())
            ff.layers[2].weight.copy_(proj.weight.dense())
    return reference


@needs_kernels
@pytest.mark.parametrize("qkv_bias", [False, True], ids=["no-qkv-bias", "qkv-bias"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_a_token_runs_each_block_in_one_call_and_gets_the_models_logits_to_the_end_of_the_context(
    dtype, qkv_bias, monkeypatch
):
    # Heads of 10 (a vector of 8 and a tail), a hidden layer of 10 whole tiles, 40 positions: the scores cross
    # several vectors of 8 and the cache fills to its end.
    torch.manual_seed(3)
    cfg = GPTConfig(vocab_size=500, context_length=40, emb_dim=80, n_heads=8, n_layers=3, qkv_bias=qkv_bias)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "shift")):
                p.add_(torch.randn_like(p) * 0.1)
    calls = []
    step = native.BlockStep.__call__
    monkeypatch.setattr(native.BlockStep, "__call__", lambda self, *a: calls.append(a[3]) or step(self, *a))
    prepare_for_inference(model, dtype)
    ids = [7, 300, 42]
    with torch.inference_mode():
        cache = KVCache(cfg)
        logits = model(torch.tensor([ids]), cache, last_only=True)[0, -1]
        packed = packed_weights(model)
        reference = _blocks_rounded_as_packed(model, packed)
        while True:
            expected = _plain_logits(reference, torch.tensor([ids]))[0, -1]
            if dtype == "fp32":
                torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)
            else:  # the top candidates are rescored in float32 (the last of the 64 may be one that was not)
                top = logits.topk(decode.REFINED_CANDIDATES // 4).indices
                torch.testing.assert_close(logits[top], expected[top], atol=1e-4, rtol=1e-5)
                assert int(logits.argmax()) == int(expected.argmax())
            if len(ids) == cfg.context_length:
                break
            ids.append(int(logits.argmax()))
            logits = model(torch.tensor([ids[-1:]]), cache, last_only=True)[0, -1]
    assert calls == [pos for pos in range(3, cfg.context_length) for _ in range(cfg.n_layers)]  # every layer's step


@needs_kernels
def test_a_later_process_loads_the_built_library_without_compiling_again_and_a_damaged_one_is_rebuilt(tmp_path):
    first = _report()
    path = Path(first["path"])
    assert first["on"] and path.is_file() and path.parent.parent == Path(os.environ["GPT2TERM_HOME"]) / "cache"
    built = path.stat().st_mtime_ns
    second = _report({"CC": str(tmp_path / "no-such-compiler")})  # it would fail if it had to build
    assert second["on"] and second["why"] is None
    assert path.stat().st_mtime_ns == built
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial files left behind
    path.write_bytes(b"not a shared library")  # damaged on disk: the next process builds it again
    again = _report()
    assert again["on"] and again["why"] is None
    assert path.read_bytes()[:4] == b"\x7fELF"


@needs_kernels
def test_two_processes_building_at_once_both_get_working_kernels():
    procs = [
        subprocess.Popen([sys.executable, "-c", REPORT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["on"] for r in reports), reports
    # One OpenMP runtime, PyTorch's: a second would bring its own pool of spinning threads beside PyTorch's (the
    # slowdown the bench found when CTranslate2's libgomp shared a process with PyTorch's).
    torch_lib = Path(torch.__file__).parent / "lib"
    assert all(len(r["omp"]) == 1 and Path(r["omp"][0]).parent == torch_lib for r in reports), reports
    path = Path(reports[0]["path"])
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_without_a_compiler_decoding_falls_back_to_pytorchs_kernels_and_says_why(tmp_path):
    report = _report({"CC": str(tmp_path / "no-such-compiler")})
    assert not report["on"]
    if accel.enabled() and native.platform_reason() is None:
        assert report["why"] == f"no C compiler ({tmp_path / 'no-such-compiler'} not found; install gcc or set CC)"
    assert not Path(report["path"]).exists()
    torch.manual_seed(0)
    small = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=1)
    CheckpointStore(Path(os.environ["GPT2TERM_HOME"]) / "checkpoints").save("small", GPTModel(small), meta={"step": 0})
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler")}
    args = [sys.executable, "-m", "gpt2term", "generate", "Hello", "-c", "small", "-n", "3", "--dtype", "int8"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@needs_kernels
def test_a_cache_folder_that_cannot_be_created_falls_back_with_the_reason():
    cache = Path(os.environ["GPT2TERM_HOME"]) / "cache"
    cache.write_text("a file where the cache folder should be")
    report = _report()
    assert not report["on"]
    assert report["why"].startswith(f"cannot create {cache / 'kernels'} for the built kernels (")
    assert cache.read_text() == "a file where the cache folder should be"


@needs_kernels
def test_a_compiler_that_fails_is_reported_in_one_line(tmp_path):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'matvec.c:1:1: error: this compiler is broken' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    report = _report({"CC": str(compiler)})
    assert not report["on"]
    assert report["why"] == "the C compiler failed: matvec.c:1:1: error: this compiler is broken"
    assert not Path(report["path"]).parent.exists() or not any(Path(report["path"]).parent.iterdir())


def test_the_switch_turns_the_kernels_off():
    report = _report({native.SWITCH: "0"})
    assert not report["on"] and report["why"] == f"{native.SWITCH}=0"


@needs_kernels
def test_the_kernels_run_beside_ctranslate2s_own_openmp_runtime():
    # `bench generate --peers` converts models with ctranslate2 in its own process, which loads CTranslate2's renamed
    # libgomp; the kernels bind to PyTorch's libgomp.so.1 by name and must still be used there.
    pytest.importorskip("ctranslate2")
    code = "import ctranslate2, torch\n" + REPORT
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["on"] and report["why"] is None, report
