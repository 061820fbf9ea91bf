"""`gpt2term ckpt ...` and `gpt2term locate` as a user runs them, checked against the files on disk."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from click.testing import CliRunner

from gpt2term import locations
from gpt2term.cli import cli
from gpt2term.core.config import GPTConfig
from gpt2term.core.interop import export_book_pth, export_hf, load_book_pth, load_hf
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.tokenizer import default_tokenizer
from gpt2term.formatting import format_bytes
from tests.test_interop_export import make_hf_cache

TINY = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def tiny_model(seed: int = 0, cfg: GPTConfig = TINY) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def store():
    """The store the CLI uses: under this test's own GPT2TERM_HOME."""
    return CheckpointStore()


def test_list_shows_columns_and_json_has_name_and_damaged(store):
    assert "no checkpoints yet" in run("ckpt", "list").output
    store.save("alpha", tiny_model(), meta={"step": 120, "tokens_seen": 245_760, "val_loss": 5.4321, "source": "t"})
    (store.root / "broken").mkdir()

    text = run("ckpt", "list").output.splitlines()
    assert text[0].split() == ["NAME", "PARAMS", "STEP", "TOKENS", "VAL", "LOSS", "SIZE", "UPDATED", "SOURCE"]
    alpha = text[1].split()
    assert alpha[:5] == ["alpha", "30.1K", "120", "245.8K", "5.432"] and alpha[-1] == "t"
    on_disk = sum(p.stat().st_size for p in store.path("alpha").iterdir())
    assert " ".join(alpha[5:7]) == format_bytes(on_disk)
    assert text[2].startswith("broken") and "DAMAGED: meta.json is missing" in text[2]

    rows = json.loads(run("ckpt", "list", "--json").output)
    assert [(r["name"], r["damaged"]) for r in rows] == [
        ("alpha", None),
        ("broken", "meta.json is missing; re-import the weights or rm this checkpoint"),
    ]
    assert rows[0]["parameters"] == tiny_model().num_parameters() and rows[0]["step"] == 120
    assert rows[0]["size_bytes"] == on_disk


def test_show(store):
    store.save("alpha", tiny_model(), meta={"step": 3})
    store.append_metrics("alpha", {"step": 3, "loss": 4.0})
    text = run("ckpt", "show", "alpha").output
    assert "status: ok" in text and "step: 3" in text and "metrics records: 1" in text
    data = json.loads(run("ckpt", "show", "alpha", "--json").output)
    assert data["name"] == "alpha" and data["meta"]["config"] == TINY.to_dict()
    assert data["files"] == ["meta.json", "metrics.jsonl", "model.safetensors"]
    result = run("ckpt", "show", "nope")
    assert result.exit_code == 2 and "no checkpoint named 'nope'" in result.output


def test_import_hf_file_and_folder(store, tmp_path):
    model = tiny_model(1)
    export_hf(model.state_dict(), TINY, tmp_path / "my-gpt")
    result = run("ckpt", "import", str(tmp_path / "my-gpt"))
    assert result.exit_code == 0, result.output
    assert "imported my-gpt" in result.output  # named after the folder
    result = run("ckpt", "import", str(tmp_path / "my-gpt" / "model.safetensors"), "--name", "from-file")
    assert result.exit_code == 0, result.output
    for name in ("my-gpt", "from-file"):
        assert_same_weights(store.load(name).state_dict, model.state_dict())
    assert store.info("from-file").get("source") == f"huggingface:{tmp_path / 'my-gpt' / 'model.safetensors'}"
    result = run("ckpt", "import", str(tmp_path / "my-gpt"))
    assert result.exit_code == 2 and "already exists" in result.output


def test_import_book_pth_with_and_without_optimizer(store, tmp_path):
    model = tiny_model(2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    export_book_pth(model.state_dict(), TINY, tmp_path / "model.pth")
    export_book_pth(model.state_dict(), TINY, tmp_path, optimizer_state=opt.state_dict(), with_optimizer=True)
    (tmp_path / "model.json").unlink()  # our exports' config; the book's own files come without one

    result = run("ckpt", "import", str(tmp_path / "model.pth"), "--name", "book", "--n-heads", "4")
    assert result.exit_code == 0, result.output
    assert "4 heads of 8 dims, as given by --n-heads" in result.output
    result = run("ckpt", "import", str(tmp_path / "model_and_optimizer.pth"), "--n-heads", "4")
    assert result.exit_code == 0, result.output
    assert "imported model_and_optimizer" in result.output and "with optimizer state" in result.output

    book = store.load("book")
    assert book.config == TINY.with_(drop_rate=0.1)  # drop_rate is not in a .pth: the course's default
    assert_same_weights(book.state_dict, model.state_dict())
    resumable = store.load("model_and_optimizer", with_state=True)
    assert resumable.optimizer_state["param_groups"][0]["lr"] == 0.0004


def test_import_a_checkpoint_folder_keeps_its_metrics(store, tmp_path):
    other = CheckpointStore(tmp_path / "elsewhere")
    other.save("run", tiny_model(3), meta={"step": 9})
    other.append_metrics("run", {"step": 9})
    result = run("ckpt", "import", str(other.path("run")), "--name", "copied-run")
    assert result.exit_code == 0, result.output
    assert store.read_metrics("copied-run") == [{"step": 9}] and store.info("copied-run").get("step") == 9


def test_export_hf_pth_and_pth_optimizer(store, tmp_path):
    model = tiny_model(4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    store.save("alpha", model, optimizer_state=opt.state_dict())

    result = run("ckpt", "export", "alpha", "--format", "hf", "-o", str(tmp_path / "hf"))
    assert result.exit_code == 0, result.output
    assert "GPT2LMHeadModel.from_pretrained" in result.output
    assert_same_weights(load_hf(tmp_path / "hf").state_dict, model.state_dict())

    result = run("ckpt", "export", "alpha", "--format", "pth", "-o", str(tmp_path / "model.pth"))
    assert result.exit_code == 0, result.output
    assert_same_weights(load_book_pth(tmp_path / "model.pth", TINY).state_dict, model.state_dict())

    result = run("ckpt", "export", "alpha", "--format", "pth-optimizer", "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    checkpoint = torch.load(tmp_path / "model_and_optimizer.pth", weights_only=True)
    assert checkpoint["optimizer_state_dict"] == opt.state_dict()

    result = run("ckpt", "export", "alpha", "--format", "pth", "-o", str(tmp_path / "model.pth"))
    assert result.exit_code == 2 and "--force" in result.output
    assert (
        run("ckpt", "export", "alpha", "--format", "pth", "-o", str(tmp_path / "model.pth"), "--force").exit_code == 0
    )


def test_mv_cp_rm(store):
    model = tiny_model(5)
    store.save("alpha", model)

    assert run("ckpt", "mv", "alpha", "beta").exit_code == 0
    assert [r.name for r in store.list()] == ["beta"]
    assert run("ckpt", "cp", "beta", "gamma").exit_code == 0
    assert_same_weights(store.load("gamma").state_dict, model.state_dict())

    result = run("ckpt", "rm", "beta", input="n\n")
    assert result.exit_code == 1 and "delete checkpoint beta" in result.output
    assert store.exists("beta")
    result = run("ckpt", "rm", "beta", input="y\n")
    assert result.exit_code == 0 and not store.exists("beta")
    assert run("ckpt", "rm", "gamma", "--yes").exit_code == 0
    assert store.list() == [] and sorted(p.name for p in store.root.iterdir()) == []

    result = run("ckpt", "mv", "nothing", "../outside")
    assert result.exit_code == 2 and "invalid checkpoint name '../outside'" in result.output


def test_download_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    result = run("ckpt", "download", "gpt2")
    assert result.exit_code == 2
    assert "pip install 'gpt2term[hub]'" in result.output


def test_download_with_the_extra_imports_into_the_store(store, tmp_path, monkeypatch):
    model = tiny_model(7)

    def snapshot_download(repo_id, allow_patterns):  # huggingface_hub's API, without the network
        export_hf(model.state_dict(), TINY, tmp_path / repo_id)
        return str(tmp_path / repo_id)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    result = run("ckpt", "download", "gpt2-large")
    assert result.exit_code == 0, result.output
    assert "imported it as gpt2-large" in result.output
    assert_same_weights(store.load("gpt2-large").state_dict, model.state_dict())


def test_list_offers_gpt2_models_from_the_hugging_face_cache(store, tmp_path, monkeypatch):
    model = tiny_model(8)
    monkeypatch.setenv("HF_HUB_CACHE", str(make_hf_cache(tmp_path, "models--openai-community--gpt2", model, TINY)))
    assert "in the Hugging Face cache (use by name, or `gpt2term ckpt import NAME`): gpt2" in run("ckpt", "list").output
    assert run("ckpt", "import", "gpt2").exit_code == 0
    assert_same_weights(store.load("gpt2").state_dict, model.state_dict())


def test_locate_prints_the_paths_in_use(isolated_home):
    text = run("locate").output
    assert f"checkpoints        {isolated_home / 'checkpoints'}" in text
    paths = json.loads(run("locate", "--json").output)
    assert paths["home"] == str(isolated_home) and paths["state"] == str(isolated_home / "state.json")
    assert paths["huggingface_cache"] == str(locations.hf_cache_dir())


def test_generate_takes_a_store_name(store):
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2)
    model = tiny_model(6, cfg)
    store.save("talker", model)
    result = run("generate", "Hello, I am", "--checkpoint", "talker", "-n", "4", "--no-stop", "--json")
    assert result.exit_code == 0, result.output
    got = [json.loads(line)["token_id"] for line in result.stdout.splitlines()[:-1]]

    ids = torch.tensor([default_tokenizer().encode("Hello, I am")])
    with torch.no_grad():
        for _ in range(4):  # greedy, recomputing the whole sequence: the course's generate_text_simple
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got == ids[0, -4:].tolist()
    assert store.most_recent() == "talker"

    result = run("generate", "Hello", "--checkpoint", "no-such-model")
    assert result.exit_code == 2 and "no checkpoint of that name" in result.output
