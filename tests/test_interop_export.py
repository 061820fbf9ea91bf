"""Ways out (and back in): Hugging Face and the book's .pth files, checked by the tools that read them.

transformers must load the HF export and compute the same logits; the book's own lines of code must load the .pth
files; round trips are exact; a .pth carrying a pickled payload is refused and the payload never runs.
"""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import CheckpointError, InputError
from gpt2term.core.interop import (
    MissingExtra,
    download_hf,
    export_book_pth,
    export_hf,
    find_hf_cached_models,
    load_book_pth,
    load_hf,
    load_hf_cached,
    load_weights_file,
)
from gpt2term.core.model import GPTModel
from gpt2term.core.store.resolve import resolve_weights
from gpt2term.core.store.store import CheckpointStore

TINY = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
IDS = torch.tensor([[1, 5, 9, 2, 63, 7, 0, 33]])


def tiny_model(seed: int = 0, cfg: GPTConfig = TINY, tied: bool = False) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # biases and norms start at 0 and 1: give them values a wrong mapping would show
        for name, p in model.named_parameters():
            if name.endswith(("bias", "scale", "shift")):
                p.add_(torch.randn_like(p) * 0.1)
        if tied:
            model.out_head.weight.copy_(model.tok_emb.weight)
    return model


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tied", [True, False])
def test_ours_to_hf_to_ours_is_exact(tmp_path, tied):
    model = tiny_model(1, tied=tied)
    result = export_hf(model.state_dict(), TINY, tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert result.paths == [tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "config.json"]
    back = load_hf(tmp_path / "hf")
    assert back.config == TINY and back.notices == []
    assert_same_weights(back.state_dict, model.state_dict())


@pytest.mark.parametrize(("tied", "qkv_bias"), [(True, False), (False, True)])
def test_transformers_loads_the_hf_export_with_the_same_logits(tmp_path, tied, qkv_bias):
    cfg = TINY.with_(qkv_bias=qkv_bias)
    model = tiny_model(2, cfg, tied=tied)
    export_hf(model.state_dict(), cfg, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is tied

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(IDS).logits
        ours = model(IDS)
    assert (theirs - ours).abs().max().item() < 1e-4
    head_is_embedding = hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert head_is_embedding is tied


def test_ours_to_book_to_ours_is_exact(tmp_path):
    model = tiny_model(3)
    export_book_pth(model.state_dict(), TINY, tmp_path / "model.pth")
    back = load_book_pth(tmp_path / "model.pth", TINY)
    assert_same_weights(back.state_dict, model.state_dict())
    assert back.optimizer_state is None


def test_the_course_code_loads_model_pth(tmp_path, monkeypatch):
    original = tiny_model(4)
    export_book_pth(original.state_dict(), TINY, tmp_path)  # a folder: the book's file name inside it
    monkeypatch.chdir(tmp_path)
    saved = torch.load("model.pth", weights_only=True)
    masks = {k: v for k, v in saved.items() if k.endswith(".att.mask")}  # the book's persistent buffers
    assert sorted(masks) == ["trf_blocks.0.att.mask", "trf_blocks.1.att.mask"]
    assert all(torch.equal(m, torch.triu(torch.ones(16, 16), diagonal=1)) for m in masks.values())
    assert saved.keys() - masks.keys() == original.state_dict().keys()

    # The course, chapter 5, verbatim:
    device = torch.device("cpu")
    model = GPTModel(TINY)
    model.load_state_dict(torch.load("model.pth", map_location=device))
    model.eval()

    with torch.no_grad():
        assert torch.equal(model(IDS), original(IDS))


def test_the_course_code_resumes_from_model_and_optimizer_pth(tmp_path, monkeypatch):
    original = tiny_model(5).train()
    original_opt = torch.optim.AdamW(original.parameters(), lr=0.0004, weight_decay=0.1)
    for _ in range(2):
        original_opt.zero_grad()
        original(IDS).square().mean().backward()
        original_opt.step()
    export_book_pth(
        original.state_dict(),
        TINY,
        tmp_path,
        optimizer_state=original_opt.state_dict(),
        with_optimizer=True,
    )
    monkeypatch.chdir(tmp_path)

    # The course, chapter 5, verbatim:
    checkpoint = torch.load("model_and_optimizer.pth", weights_only=True)
    model = GPTModel(TINY)
    model.load_state_dict(checkpoint["model_state_dict"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0005, weight_decay=0.1)
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    model.train()

    for m, o in ((original, original_opt), (model, optimizer)):  # one more step each: the same weights after
        o.zero_grad()
        m(IDS).square().mean().backward()
        o.step()
    assert_same_weights(model.state_dict(), original.state_dict())

    back = load_book_pth(tmp_path / "model_and_optimizer.pth", TINY)  # and it imports back, optimizer included
    assert back.optimizer_state["param_groups"][0]["lr"] == 0.0004


def test_pth_optimizer_without_optimizer_state_gets_a_fresh_one_the_course_code_loads(tmp_path):
    model = tiny_model(6)
    result = export_book_pth(model.state_dict(), TINY, tmp_path / "mo.pth", with_optimizer=True)
    assert "fresh AdamW" in result.notices[0]
    checkpoint = torch.load(tmp_path / "mo.pth", weights_only=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0005, weight_decay=0.1)
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    assert optimizer.param_groups[0]["lr"] == 0.0004


def test_exports_do_not_overwrite_unless_asked(tmp_path):
    model = tiny_model()
    export_book_pth(model.state_dict(), TINY, tmp_path / "model.pth")
    with pytest.raises(InputError, match="already exists; pass --force"):
        export_book_pth(model.state_dict(), TINY, tmp_path / "model.pth")
    export_book_pth(tiny_model(1).state_dict(), TINY, tmp_path / "model.pth", overwrite=True)
    assert_same_weights(load_book_pth(tmp_path / "model.pth", TINY).state_dict, tiny_model(1).state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pth"]  # no temporary file left


class Payload:
    """Pickles as a call that writes a marker file: what a malicious model.pth would do on load."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('the payload ran')",))


def test_a_pth_with_a_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "model.pth"
    torch.save({"model_state_dict": Payload(str(marker)), "tok_emb.weight": torch.zeros(2)}, evil)
    store = CheckpointStore(tmp_path / "store")

    for attempt in (
        lambda: load_weights_file(evil),
        lambda: resolve_weights(str(evil), store),
        lambda: store.import_weights(str(evil), "evil"),
    ):
        with pytest.raises(CheckpointError, match="refused, the file contains pickled Python objects"):
            attempt()
        assert not marker.exists()
    assert not store.exists("evil")

    # Inside a checkpoint folder (the optimizer state of a resumable run) it is refused the same way.
    store.save("run", tiny_model(), optimizer_state={"state": {}, "param_groups": []})
    torch.save({"state": Payload(str(marker))}, store.path("run") / "optimizer.pt")
    with pytest.raises(CheckpointError, match="refused"):
        store.load("run", with_state=True)
    assert not marker.exists()

    torch.load(evil, weights_only=False)  # control: unsafe loading really runs the payload
    assert marker.read_text() == "the payload ran"


def make_hf_cache(root, repo_dir: str, model: GPTModel, cfg: GPTConfig, model_type: str = "gpt2"):
    """A Hugging Face hub cache as huggingface_hub lays it out: blobs, a snapshot of symlinks, refs/main."""
    export = root / "export"
    export_hf(model.state_dict(), cfg, export, overwrite=True)
    config = json.loads((export / "config.json").read_text())
    config["model_type"] = model_type
    (export / "config.json").write_text(json.dumps(config))
    repo = root / "hub" / repo_dir
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        blob = repo / "blobs" / f"{name}-blob"
        (export / name).rename(blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    return root / "hub"


def test_gpt2_models_in_the_hugging_face_cache_are_offered_by_name(tmp_path, monkeypatch):
    model = tiny_model(7)
    cache = make_hf_cache(tmp_path, "models--openai-community--gpt2", model, TINY)
    make_hf_cache(tmp_path / "b", "models--someone--gpt2-poems", tiny_model(8), TINY)
    (cache / "models--someone--gpt2-poems").symlink_to(tmp_path / "b" / "hub" / "models--someone--gpt2-poems")
    make_hf_cache(tmp_path / "c", "models--bert-base", tiny_model(), TINY, model_type="bert")
    (cache / "models--bert-base").symlink_to(tmp_path / "c" / "hub" / "models--bert-base")

    found = find_hf_cached_models(cache)
    assert [(m.name, m.repo_id) for m in found] == [
        ("gpt2", "openai-community/gpt2"),
        ("someone/gpt2-poems", "someone/gpt2-poems"),
    ]
    loaded = load_hf_cached(found[0])
    assert loaded.source == "huggingface-cache:openai-community/gpt2"
    assert_same_weights(loaded.state_dict, model.state_dict())

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    store = CheckpointStore(tmp_path / "store")
    for spec in ("gpt2", "openai-community/gpt2"):
        assert_same_weights(resolve_weights(spec, store).state_dict, model.state_dict())
    result = store.import_weights("gpt2")
    assert result.info.name == "gpt2" and result.info.get("source") == "huggingface-cache:openai-community/gpt2"


def test_download_without_the_hub_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(MissingExtra, match=r"pip install 'gpt2term\[hub\]'"):
        download_hf("gpt2")


def test_download_fetches_config_and_safetensors_through_huggingface_hub(tmp_path, monkeypatch):
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        export_hf(tiny_model().state_dict(), TINY, tmp_path / "snap")
        return str(tmp_path / "snap")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    cached = download_hf("gpt2-medium")
    assert calls == [("openai-community/gpt2-medium", ["config.json", "model.safetensors"])]
    assert cached.weights == tmp_path / "snap" / "model.safetensors"


@pytest.mark.parametrize(("fmt", "written"), [("hf", "model.safetensors"), ("pth", "model.pth"),
                                              ("pth-optimizer", "model_and_optimizer.pth")])  # fmt: skip
def test_the_store_exports_a_checkpoint_in_each_format_with_one_call(tmp_path, fmt, written):
    from gpt2term.core.errors import InputError
    from gpt2term.core.store.store import CheckpointStore

    store = CheckpointStore()
    store.save("tiny", tiny_model(3), meta={"step": 1})
    (tmp_path / "out").mkdir()
    result = store.export("tiny", fmt, tmp_path / "out")
    assert result.paths[0] == tmp_path / "out" / written and result.paths[0].stat().st_size > 0
    with pytest.raises(InputError, match="unknown export format 'onnx'; use one of: hf, pth, pth-optimizer"):
        store.export("tiny", "onnx", tmp_path / "x")
