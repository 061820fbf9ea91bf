"""The checkpoint store in one process: exact round trips, meta and metrics, names, damage, locks, app state."""

from __future__ import annotations

import json
import os
import random
import threading

import platformdirs
import pytest
import torch

from gpt2term import locations
from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import CheckpointError, InputError
from gpt2term.core.interop import export_book_pth, export_hf
from gpt2term.core.model import GPTModel
from gpt2term.core.store.locks import CheckpointLocked
from gpt2term.core.store.resolve import resolve_weights
from gpt2term.core.store.store import CheckpointStore

TINY = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
IDS = torch.tensor([[1, 5, 9, 2, 63, 7]])


def tiny_model(seed: int = 0, cfg: GPTConfig = TINY) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def store(tmp_path):
    return CheckpointStore(tmp_path / "store")


def hidden_entries(store: CheckpointStore) -> list[str]:
    """Temporary folders and lock files: none may be left behind once an operation is over."""
    if not store.root.exists():
        return []
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith(".") and p.name != ".state.json")


def test_paths_follow_gpt2term_home_else_platformdirs(isolated_home, monkeypatch):
    assert CheckpointStore().root == isolated_home / "checkpoints" == locations.checkpoints_dir()
    assert locations.state_path() == isolated_home / "state.json"
    assert locations.cache_dir() == isolated_home / "cache"
    assert locations.config_dir() == isolated_home / "config"
    monkeypatch.delenv("GPT2TERM_HOME")
    assert locations.home() == locations.checkpoints_dir().parent
    assert str(locations.home()) == platformdirs.user_data_dir("gpt2term")
    assert str(locations.cache_dir()) == platformdirs.user_cache_dir("gpt2term")
    monkeypatch.setenv("HF_HUB_CACHE", "/somewhere/hub")
    assert str(locations.hf_cache_dir()) == "/somewhere/hub"


def test_save_then_load_is_exact_and_meta_is_filled_in(store):
    model = tiny_model(1)
    info = store.save("run1", model, meta={"step": 7, "tokens_seen": 448, "train_loss": 2.0, "source": "test"})
    assert info.damaged is None and not info.has_optimizer
    assert sorted(p.name for p in info.path.iterdir()) == ["meta.json", "model.safetensors"]
    meta = json.loads((info.path / "meta.json").read_text())
    assert meta["config"] == TINY.to_dict()
    assert meta["parameters"] == model.num_parameters()
    assert meta["step"] == 7 and meta["tokens_seen"] == 448 and meta["source"] == "test"
    assert meta["train_perplexity"] == pytest.approx(7.389056, rel=1e-6)  # exp(2.0), filled in by the store
    assert meta["val_loss"] is None and meta["epoch"] is None
    assert meta["created"] == meta["updated"]
    assert hidden_entries(store) == []  # no temp folder, no lock file left behind

    loaded = store.load("run1")
    assert loaded.config == TINY and loaded.optimizer_state is None and loaded.trainer_state is None
    assert_same_weights(loaded.state_dict, model.state_dict())
    with torch.no_grad():
        assert torch.equal(store.load_model("run1")(IDS), model(IDS))


def test_optimizer_and_trainer_state_resume_exactly(store):
    model = tiny_model(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(IDS).square().mean().backward()
        opt.step()
    trainer_state = {"rng": torch.get_rng_state(), "python_rng": random.getstate(), "batch": 12, "lr": [1e-3]}
    info = store.save("resumable", model, optimizer_state=opt.state_dict(), trainer_state=trainer_state)
    assert info.has_optimizer

    assert store.load("resumable").optimizer_state is None  # state only when asked for
    ckpt = store.load("resumable", with_state=True)
    assert ckpt.trainer_state["batch"] == 12 and ckpt.trainer_state["python_rng"] == random.getstate()
    assert torch.equal(ckpt.trainer_state["rng"], trainer_state["rng"])
    resumed = ckpt.build_model().train()
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-3, weight_decay=0.1)
    resumed_opt.load_state_dict(ckpt.optimizer_state)
    for m, o in ((model, opt), (resumed, resumed_opt)):  # one more step on each: identical
        o.zero_grad()
        m(IDS).square().mean().backward()
        o.step()
    assert_same_weights(resumed.state_dict(), model.state_dict())


def test_state_that_would_need_unpickling_is_refused_at_save(store):
    with pytest.raises(TypeError, match="trainer_state"):
        store.save("x", tiny_model(), trainer_state={"sampler": object()})
    assert not store.exists("x")
    assert hidden_entries(store) == []


def test_overwrite_keeps_created_merges_meta_and_keeps_metrics(store):
    store.append_metrics("run", {"event": "start", "loss": torch.tensor(4.5)})  # before the first save
    [row] = store.list()
    assert row.name == "run" and "no weights yet" in row.damaged

    first = store.save("run", tiny_model(1), meta={"step": 1, "training": {"lr": 0.0004}})
    store.append_metrics("run", {"event": "step", "step": 2})
    second = store.save("run", tiny_model(2), meta={"step": 2})
    store.append_metrics("run", {"event": "step", "step": 3})

    assert second.meta["created"] == first.meta["created"]
    assert second.meta["step"] == 2 and second.meta["training"] == {"lr": 0.0004}  # merged, not replaced
    assert store.read_metrics("run") == [
        {"event": "start", "loss": 4.5},
        {"event": "step", "step": 2},
        {"event": "step", "step": 3},
    ]
    assert_same_weights(store.load("run").state_dict, tiny_model(2).state_dict())
    assert hidden_entries(store) == []


def test_read_metrics_skips_a_line_still_being_written(store):
    store.append_metrics("run", {"step": 1})
    with open(store.metrics_path("run"), "a") as f:
        f.write('{"step": 2, "lo')
    assert store.read_metrics("run") == [{"step": 1}]


@pytest.mark.parametrize(
    "name", ["../escape", "a/b", "a\\b", ".hidden", "", "x" * 101, "..", "-rf", "a..b", "with space", "/abs"]
)
def test_names_that_could_escape_or_hide_are_refused(store, tmp_path, name):
    model = tiny_model()
    for call in (
        lambda: store.save(name, model),
        lambda: store.append_metrics(name, {}),
        lambda: store.path(name),
        lambda: store.lock(name),
        lambda: store.rename("ok", name),
    ):
        with pytest.raises(InputError, match="checkpoint name"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["store"])
    assert not store.root.exists() or list(store.root.iterdir()) == []


def test_damaged_checkpoints_are_listed_with_their_reason(store):
    for name in ("good", "truncated", "no-meta", "wrong-shapes", "bad-json", "no-weights"):
        store.save(name, tiny_model())
    weights = store.path("truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (store.path("no-meta") / "meta.json").unlink()
    meta_file = store.path("wrong-shapes") / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["emb_dim"] = 64
    meta_file.write_text(json.dumps(meta))
    (store.path("bad-json") / "meta.json").write_text("{not json")
    (store.path("no-weights") / "model.safetensors").unlink()

    rows = {row.name: row for row in store.list()}
    assert list(rows) == sorted(rows, key=str.lower) and len(rows) == 6
    assert rows["good"].damaged is None
    assert "truncated" in rows["truncated"].damaged
    assert "meta.json is missing" in rows["no-meta"].damaged
    assert rows["wrong-shapes"].damaged == "tok_emb.weight has shape [64, 32] but meta.json's config expects [64, 64]"
    assert "meta.json is unreadable" in rows["bad-json"].damaged
    assert "model.safetensors is missing" in rows["no-weights"].damaged
    for name in ("truncated", "no-meta", "wrong-shapes", "bad-json", "no-weights"):
        with pytest.raises(CheckpointError, match="damaged"):
            store.load(name)
    store.mark_used("truncated")
    assert store.most_recent() == "good"


def test_rename_copy_delete(store):
    original = tiny_model(1)
    store.save("a", original, meta={"step": 3})
    store.append_metrics("a", {"step": 3})
    store.mark_used("a")

    store.rename("a", "b")
    assert not store.exists("a") and store.most_recent() == "b"
    assert_same_weights(store.load("b").state_dict, original.state_dict())

    store.copy("b", "c")
    store.save("c", tiny_model(2))  # the copy is independent of its source
    assert_same_weights(store.load("b").state_dict, original.state_dict())
    assert store.read_metrics("c") == [{"step": 3}] and store.info("c").meta["copied_from"] == "b"

    with pytest.raises(CheckpointError, match="already exists"):
        store.rename("b", "c")
    with pytest.raises(CheckpointError, match="already exists"):
        store.copy("b", "c")
    store.delete("b")
    assert [row.name for row in store.list()] == ["c"]
    assert store.most_recent() == "c"
    with pytest.raises(CheckpointError, match="no checkpoint named 'b'"):
        store.delete("b")
    assert hidden_entries(store) == []


def test_mark_used_keeps_other_app_state(isolated_home):
    store = CheckpointStore()
    assert store.most_recent() is None
    locations.state_path().parent.mkdir(parents=True, exist_ok=True)
    locations.state_path().write_text(json.dumps({"theme": "dark"}))
    store.save("old", tiny_model())
    store.save("new", tiny_model())
    store.mark_used("old")
    assert store.most_recent() == "old"
    assert json.loads(locations.state_path().read_text()) == {"theme": "dark", "most_recent_checkpoint": "old"}


def test_lock_holder_may_save_but_other_writers_are_refused(store):
    store.save("run", tiny_model(1))
    with store.lock("run"):
        assert store.lock_holder("run").pid == os.getpid()
        store.save("run", tiny_model(2), meta={"step": 2})  # the run holding the lock saves
        with pytest.raises(CheckpointLocked, match="another run in this program"):
            store.lock("run").acquire()

        refusals = []

        def another_part_of_the_app() -> None:  # e.g. the checkpoints screen while a run trains in a worker
            for attempt in (lambda: store.delete("run"), lambda: store.rename("run", "other")):
                with pytest.raises(CheckpointLocked) as caught:
                    attempt()
                refusals.append(caught.value)

        thread = threading.Thread(target=another_part_of_the_app)
        thread.start()
        thread.join()
        assert len(refusals) == 2 and store.exists("run")

        store.delete("run")  # the run itself may replace its checkpoint (train --overwrite)
        store.save("run", tiny_model(3), meta={"step": 3})
    assert store.lock_holder("run") is None and hidden_entries(store) == []
    assert store.info("run").meta["step"] == 3


def test_a_lock_from_another_machine_is_respected_and_a_half_written_one_taken_over(store):
    store.root.mkdir(parents=True)
    lock_file = store.lock_path("run")
    lock_file.write_text(json.dumps({"pid": 1, "host": "some-other-machine", "token": "x"}))
    with pytest.raises(CheckpointLocked, match="some-other-machine.*delete"):
        store.save("run", tiny_model())
    lock_file.write_text("")  # a process killed between creating and writing its lock file, a while ago
    os.utime(lock_file, (lock_file.stat().st_mtime - 60,) * 2)
    store.save("run", tiny_model())
    assert store.exists("run") and not lock_file.exists()


def test_resolve_weights_takes_a_name_or_a_path(store, tmp_path):
    model = tiny_model(3)
    store.save("mine", model)
    assert resolve_weights("mine", store).store_name == "mine"
    folder_outside = tmp_path / "exported-folder"
    export_hf(model.state_dict(), TINY, folder_outside)
    book = tmp_path / "model.pth"
    export_book_pth(model.state_dict(), TINY, book)
    for spec in (str(store.path("mine")), str(folder_outside), str(folder_outside / "model.safetensors"), str(book)):
        loaded = resolve_weights(spec, store)
        assert loaded.store_name is None
        assert_same_weights(loaded.state_dict, model.state_dict())
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_weights("nothing-called-this", store)
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_weights(str(tmp_path / "missing.pth"), store)


def test_training_a_loaded_model_never_writes_to_its_checkpoint_file(store):
    import hashlib

    saved = tiny_model(4)
    info = store.save("run", saved, meta={"step": 1})
    weights = info.path / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    loaded = store.load("run")
    model = loaded.build_model().train()
    # The parameters are the loaded tensors themselves (nothing allocated and copied), and they are trainable.
    assert model.tok_emb.weight.data_ptr() == loaded.state_dict["tok_emb.weight"].data_ptr()
    assert all(p.requires_grad and not p.is_meta and p.dtype == torch.float32 for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):  # in-place updates of every parameter, as a training run makes them
        logits = model(IDS[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), IDS[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.trf_blocks[0].att.W_query.weight.fill_(7.0)
    assert not torch.equal(model.tok_emb.weight, saved.tok_emb.weight)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
    assert_same_weights(store.load("run").state_dict, saved.state_dict())


def test_building_a_loaded_model_runs_no_reference_kernels(store):
    """`to_empty` goes through torch's Python reference `empty_like`, whose first call imports sympy: a cold start
    pays for it in a fresh process, so this is checked in one."""
    import subprocess
    import sys

    store.save("run", tiny_model(5), meta={"step": 1})
    code = (
        "import sys, torch\n"
        "from gpt2term.core.store.store import CheckpointStore\n"
        f"model = CheckpointStore({str(store.root)!r}).load_model('run')\n"
        "print(sorted(m for m in ('sympy', 'torch.fx.experimental.symbolic_shapes') if m in sys.modules))\n"
        f"print(torch.equal(model(torch.tensor({IDS.tolist()})), model(torch.tensor({IDS.tolist()}))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "True"]
