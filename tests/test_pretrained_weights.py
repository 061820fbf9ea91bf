"""Pretrained GPT-2 weights as book readers have them: OpenAI's TensorFlow checkpoint folder (read without TensorFlow)
and the book's pretrained `.pth` / `.safetensors` files in the course's names.

The TensorFlow fixtures were written by real TensorFlow (tests/fixtures/make_tf_gpt2_checkpoint.py); the reference
forward below is GPT-2 written out with plain torch ops from the arrays those checkpoints were saved from.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file, save_model

from gpt2term.cli import cli
from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import CheckpointError
from gpt2term.core.interop import book_state_dict, config_from_hf, from_hf_state_dict, load_weights_file
from gpt2term.core.model import GPTModel
from gpt2term.core.store.resolve import open_model
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.tf_checkpoint import _crc_bytes, _varint, crc32c
from tests.hf_reference import random_hf_gpt2

FIXTURES = Path(__file__).parent / "fixtures"
TINY_TF = FIXTURES / "tf-gpt2-tiny"
IDS = torch.tensor([[5, 17, 90, 3, 3, 64, 21, 0, 95, 40, 11, 7]])


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def reference_logits(arrays: dict[str, np.ndarray], ids: torch.Tensor) -> torch.Tensor:
    """GPT-2's forward pass from OpenAI's variables, written out with plain torch ops (as OpenAI's model.py does)."""
    hp = json.loads((TINY_TF / "hparams.json").read_text())
    p = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    d, heads = hp["n_embd"], hp["n_head"]
    batch, length = ids.shape

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * p[name + "/g"] + p[name + "/b"]

    def conv1d(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ p[name + "/w"][0] + p[name + "/b"]

    def gelu(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x = p["model/wte"][ids] + p["model/wpe"][:length]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    for i in range(hp["n_layer"]):
        h = f"model/h{i}/"
        q, k, v = conv1d(norm(x, h + "ln_1"), h + "attn/c_attn").split(d, dim=-1)
        q, k, v = (t.view(batch, length, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // heads)
        att = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v
        x = x + conv1d(att.transpose(1, 2).reshape(batch, length, d), h + "attn/c_proj")
        x = x + conv1d(gelu(conv1d(norm(x, h + "ln_2"), h + "mlp/c_fc")), h + "mlp/c_proj")
    return norm(x, "model/ln_f") @ p["model/wte"].T


@pytest.fixture(scope="module")
def tf_arrays() -> dict[str, np.ndarray]:
    with np.load(TINY_TF / "arrays.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture
def tf_copy(tmp_path) -> Path:
    """A copy of the TensorFlow fixture named as the book's download script names it, to damage freely."""
    folder = tmp_path / "124M"
    shutil.copytree(TINY_TF, folder)
    (folder / "arrays.npz").unlink()
    return folder


# ---------------------------------------------------------------------------------- OpenAI's TensorFlow checkpoint


def test_a_tensorflow_checkpoint_gives_the_logits_of_gpt2_built_from_its_arrays(tf_arrays):
    expected = reference_logits(tf_arrays, IDS)
    loaded = load_weights_file(TINY_TF)
    assert loaded.config == GPTConfig(
        vocab_size=96, context_length=16, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.1, qkv_bias=True
    )
    with torch.no_grad():
        plain = loaded.build_model()(IDS)
        opened = open_model(str(TINY_TF), remember=False)  # what every --checkpoint PATH runs: accelerated
        fast = opened.model(IDS)
    assert opened.name == "tf-gpt2-tiny"
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.3  # random weights wide enough that a wrong mapping could not pass by accident


def test_ckpt_import_of_a_tensorflow_folder_stores_gpt2_with_tied_head(tf_copy, tf_arrays):
    result = run("ckpt", "import", str(tf_copy))
    assert result.exit_code == 0, result.output
    assert "imported openai-gpt2-124M" in result.output
    store = CheckpointStore()
    checkpoint = store.load("openai-gpt2-124M")
    assert checkpoint.config.qkv_bias and checkpoint.config.vocab_size == 96
    assert store.info("openai-gpt2-124M").get("source") == f"tensorflow:{tf_copy}"
    sd = checkpoint.state_dict
    assert torch.equal(sd["out_head.weight"], sd["tok_emb.weight"])
    assert torch.equal(
        sd["trf_blocks.1.att.W_key.weight"], torch.from_numpy(tf_arrays["model/h1/attn/c_attn/w"][0, :, 16:32]).T
    )
    model = GPTModel(checkpoint.config).eval()
    model.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference_logits(tf_arrays, IDS), atol=1e-5, rtol=0)
    # One of its files names the folder too; the name is given here.
    assert run("ckpt", "import", str(tf_copy / "model.ckpt.index"), "--name", "again").exit_code == 0
    assert store.exists("again")
    # Its 96-token vocabulary cannot read GPT-2's token ids: one line, not an IndexError from the embedding.
    refused = run("generate", "-c", "again", "Every effort moves you")
    assert refused.exit_code == 2 and "vocabulary has only 96 entries" in refused.output, refused.output


def _index_handle(index: bytes) -> tuple[int, int]:
    footer = index[-48:]
    _, pos = _varint(footer, 0)
    _, pos = _varint(footer, pos)
    offset, pos = _varint(footer, pos)
    return offset, _varint(footer, pos)[0]


def _truncate_data(folder: Path) -> None:
    data = folder / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _flip(file: Path, at: int) -> None:
    raw = bytearray(file.read_bytes())
    raw[at] ^= 0x40
    file.write_bytes(bytes(raw))


def _mark_compressed(folder: Path) -> None:
    index = folder / "model.ckpt.index"
    offset, size = _index_handle(index.read_bytes())
    raw = bytearray(index.read_bytes())
    raw[offset + size] = 1  # the block trailer's type byte: 1 is snappy
    index.write_bytes(bytes(raw))


def _hparams(folder: Path, **changes: int) -> None:
    file = folder / "hparams.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


DAMAGES = {
    "truncated data": (_truncate_data, "the file is truncated"),
    "flipped index byte": (lambda f: _flip(f / "model.ckpt.index", 40), "fails its checksum"),
    "flipped magic": (lambda f: _flip(f / "model.ckpt.index", -1), "table magic number"),
    "compressed index": (_mark_compressed, "snappy-compressed"),
    "flipped weight byte": (lambda f: _flip(f / "model.ckpt.data-00000-of-00001", 1000), "fails its checksum"),
    "missing hparams": (lambda f: (f / "hparams.json").unlink(), "no hparams.json"),
    "missing data": (lambda f: (f / "model.ckpt.data-00000-of-00001").unlink(), "no model.ckpt.data-00000-of-00001"),
    "other shape": (lambda f: _hparams(f, n_embd=32), "hparams.json implies [96, 32]"),
    "missing name": (lambda f: _hparams(f, n_layer=3), "no variable 'model/h2/ln_1/g'"),
    "float64 (saved by TensorFlow)": (None, "model/wte holds float64 numbers; gpt2term reads float32"),
    "two shards (saved by TensorFlow)": (None, "split into 2 shards"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_an_unreadable_tensorflow_checkpoint_is_one_line_exit_2_and_no_store_entry(damage, tf_copy):
    make, message = DAMAGES[damage]
    if make is None:
        shutil.rmtree(tf_copy)
        fixture = "tf-gpt2-float64" if "float64" in damage else "tf-gpt2-two-shards"
        shutil.copytree(FIXTURES / fixture, tf_copy)
    else:
        make(tf_copy)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[")):
        load_weights_file(tf_copy)
    result = run("ckpt", "import", str(tf_copy))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    store = CheckpointStore()
    assert store.list() == []
    assert not store.root.exists() or [p.name for p in store.root.iterdir() if not p.name.startswith(".")] == []


def test_crc32c_lanes_agree_with_the_byte_by_byte_definition():
    assert crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C
    rng = np.random.default_rng(1)
    for n, max_lanes in ((0, 1), (3, 1), (4095, 65536), (100_003, 65536), (1_000_003, 100), (2**20, 64)):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # from 4096 bytes on, in numpy lanes
        assert crc32c(data, max_lanes) == _crc_bytes(0xFFFFFFFF, data) ^ 0xFFFFFFFF, n


@pytest.mark.once  # the dialog and the import's plumbing; the logits are checked on a plain GPTModel
def test_the_tui_import_dialog_takes_a_tensorflow_folder(tf_copy, tf_arrays):
    from gpt2term.tui.dialogs import ImportScreen
    from tests.pilot_helpers import settle
    from tests.test_tui_checkpoints import open_checkpoints, small_app

    store = CheckpointStore()

    async def scenario() -> None:
        app = small_app()
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await open_checkpoints(pilot)
            await pilot.press("i")
            assert isinstance(app.screen, ImportScreen)
            app.screen.query_one("#spec").value = str(tf_copy)
            await pilot.press("ctrl+s")
            await settle(pilot, lambda: "openai-gpt2-124M" in screen.table.names, "the imported row")
            _flip(tf_copy / "model.ckpt.data-00000-of-00001", 1000)
            await pilot.press("i")
            app.screen.query_one("#spec").value = str(tf_copy)
            app.screen.query_one("#name").value = "damaged"
            await pilot.press("ctrl+s")
            await settle(pilot, lambda: isinstance(app.screen, ImportScreen) and app.screen.error, "the error shown")
            assert "fails its checksum" in str(app.screen.query_one("#import-error").render())
            assert app.screen.query_one("#name").value == "damaged"  # kept for a second try
            assert not store.exists("damaged")

    asyncio.run(scenario())
    model = GPTModel(store.load("openai-gpt2-124M").config).eval()
    model.load_state_dict(store.load("openai-gpt2-124M").state_dict)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference_logits(tf_arrays, IDS), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ the book's pretrained files, in the course's names


def book_pretrained(*, qkv_bias: bool = True) -> tuple[torch.nn.Module, GPTConfig, dict[str, torch.Tensor]]:
    """A small GPT-2 and the state_dict the book's GPTModel holds after `load_weights_into_gpt`: the course's names,
    each block's causal `att.mask` buffer, and `out_head` a copy of `tok_emb` (64-dimensional heads, as GPT-2's)."""
    hf = random_hf_gpt2(vocab=120, positions=24, emb=128, heads=2, layers=2, seed=3)
    cfg = config_from_hf(hf.config.to_dict()).with_(qkv_bias=qkv_bias)
    sd = from_hf_state_dict(hf.state_dict(), cfg)
    if not qkv_bias:  # then the reference is our own model without biases, its head trained apart (untied)
        sd["out_head.weight"] = torch.randn_like(sd["out_head.weight"]) * 0.2
        model = GPTModel(cfg).eval()
        model.load_state_dict(sd)
        return model, cfg, book_state_dict(sd, cfg)
    return hf, cfg, book_state_dict(sd, cfg)


def logits_of(reference: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = reference(IDS)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["pretrained-qkv-bias-tied", "no-qkv-bias-untied"])
def test_the_books_pretrained_files_import_with_their_layout(tmp_path, suffix, qkv_bias):
    reference, cfg, sd = book_pretrained(qkv_bias=qkv_bias)
    assert "trf_blocks.0.att.mask" in sd
    assert torch.equal(sd["out_head.weight"], sd["tok_emb.weight"]) == qkv_bias  # tied as GPT-2's, or trained apart
    file = tmp_path / f"gpt2-small-124M{suffix}"
    if suffix == ".pth":
        torch.save(sd, file)
    else:
        save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(file))
    result = run("ckpt", "import", str(file))
    assert result.exit_code == 0, result.output
    checkpoint = CheckpointStore().load("gpt2-small-124M")
    assert checkpoint.config == cfg.with_(drop_rate=checkpoint.config.drop_rate)  # heads and qkv_bias inferred
    model = GPTModel(checkpoint.config).eval()
    model.load_state_dict(checkpoint.state_dict)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), logits_of(reference), atol=1e-5, rtol=0)


def test_a_book_safetensors_saved_with_a_tied_head_imports(tmp_path):
    reference, cfg, _ = book_pretrained()
    model = GPTModel(cfg).eval()
    model.load_state_dict(from_hf_state_dict(reference.state_dict(), cfg))
    model.out_head.weight = model.tok_emb.weight  # tied, as GPT-2 is: save_model keeps only one of the two names
    save_model(model, str(tmp_path / "gpt2-tied.safetensors"))
    loaded = load_weights_file(tmp_path / "gpt2-tied.safetensors")
    assert any("tied" in n for n in loaded.notices)
    with torch.no_grad():
        torch.testing.assert_close(loaded.build_model()(IDS), logits_of(reference), atol=1e-5, rtol=0)
