"""A damaged file or a symbolic link in the store never takes the store down (issue 11, items 3 and 8).

Each damaged checkpoint sits next to a good one: the listing shows both (the damaged one with a reason naming the
field), loading the damaged one is a one-line error, the CLI and the app keep working. Symbolic links are read
through but never written through, and removing one leaves no leftovers.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gpt2term.core.config import MAX_PARAMETERS, GPTConfig
from gpt2term.core.errors import CheckpointError, ConfigError, Gpt2termError
from gpt2term.core.follow import MetricsFollower
from gpt2term.core.interop import load_weights_file
from gpt2term.core.model import GPTModel
from gpt2term.core.store.resolve import resolve_weights
from gpt2term.core.store.store import CheckpointStore
from gpt2term.tui.app import make_app
from gpt2term.tui.screens.checkpoints import CheckpointsScreen, loss_history
from gpt2term.tui.screens.train import TrainScreen
from gpt2term.tui.widgets.checkpoint_table import CheckpointDetails
from gpt2term.tui.widgets.training_charts import LossPlot
from tests.pilot_helpers import settle

TINY = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def tiny_model(seed: int = 0, cfg: GPTConfig = TINY) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def good_store() -> CheckpointStore:
    store = CheckpointStore()
    store.save("good", tiny_model(), meta={"step": 7, "val_loss": 3.5, "source": "test"})
    return store


def copy_good(store: CheckpointStore, name: str) -> Path:
    path = store.root / name
    shutil.copytree(store.path("good"), path)
    return path


# ------------------------------------------------------------------------------------------ damaged meta.json


def set_meta(**changes: object) -> Callable[[dict], None]:
    return lambda meta: meta.update(changes)


def set_config(**changes: object) -> Callable[[dict], None]:
    return lambda meta: meta["config"].update(changes)


def drop(key: str, config: bool = False) -> Callable[[dict], None]:
    return lambda meta: (meta["config"] if config else meta).pop(key)


META_CASES = [
    ("config-null", set_meta(config=None), "config"),
    ("config-list", set_meta(config=[1, 2]), "config"),
    ("config-missing", drop("config"), "config"),
    ("config-lacks-n_layers", drop("n_layers", config=True), "n_layers"),
    ("n_heads-0", set_config(n_heads=0), "n_heads"),
    ("n_heads-negative", set_config(n_heads=-4), "n_heads"),
    ("emb_dim-float", set_config(emb_dim=32.0), "emb_dim"),
    ("emb_dim-string", set_config(emb_dim="32"), "emb_dim"),
    ("emb_dim-not-divisible", set_config(emb_dim=30), "emb_dim 30 is not divisible by n_heads 4"),
    ("n_layers-huge", set_config(n_layers=1_000_000), "n_layers"),
    ("vocab_size-huge", set_config(vocab_size=10**12), "vocab_size"),
    ("context_length-bool", set_config(context_length=True), "context_length"),
    ("context_length-zero", set_config(context_length=0), "context_length"),
    ("too-many-parameters", set_config(emb_dim=16384, n_heads=128, n_layers=512), "parameters"),
    ("drop_rate-nan", set_config(drop_rate=math.nan), "drop_rate"),
    ("drop_rate-one", set_config(drop_rate=1.0), "drop_rate"),
    ("drop_rate-string", set_config(drop_rate="0.1"), "drop_rate"),
    ("qkv_bias-string", set_config(qkv_bias="yes"), "qkv_bias"),
    ("step-abc", set_meta(step="abc"), "step"),
    ("step-negative", set_meta(step=-1), "step"),
    ("step-bool", set_meta(step=True), "step"),
    ("step-float", set_meta(step=1.5), "step"),
    ("step-nan", set_meta(step=math.nan), "step"),
    ("step-inf", set_meta(step=math.inf), "step"),
    ("step-400-digits", set_meta(step=10**400), "step"),
    ("tokens_seen-string", set_meta(tokens_seen="many"), "tokens_seen"),
    ("parameters-list", set_meta(parameters=[1]), "parameters"),
    ("val_loss-string", set_meta(val_loss="low"), "val_loss"),
    ("train_loss-bool", set_meta(train_loss=False), "train_loss"),
    ("updated-number", set_meta(updated=5), "updated"),
    ("created-not-a-date", set_meta(created="yesterday"), "created"),
    ("source-number", set_meta(source=5), "source"),
    ("training-list", set_meta(training=[1]), "training"),
]


def damage_meta(store: CheckpointStore, name: str, change: Callable[[dict], None]) -> None:
    path = copy_good(store, name)
    meta = json.loads((path / "meta.json").read_text())
    change(meta)
    (path / "meta.json").write_text(json.dumps(meta))  # NaN and Infinity as Python's json writes them


def write_raw_meta(store: CheckpointStore, name: str, text: str) -> None:
    path = copy_good(store, name)
    (path / "meta.json").write_text(text)


RAW_META_CASES = [
    ("meta-not-json", "{not json", "meta.json is unreadable"),
    ("meta-a-list", "[]", "meta.json is unreadable"),
    ("meta-step-1e309", None, "step"),  # filled in below: the good meta with "step": 1e309 (inf once parsed)
    ("meta-deeply-nested", "[" * 100_000 + "]" * 100_000, "meta.json is unreadable"),
]


def make_raw_meta(store: CheckpointStore, name: str, text: str | None) -> None:
    if text is None:
        meta = json.loads((store.path("good") / "meta.json").read_text())
        text = json.dumps(meta).replace('"step": 7', '"step": 1e309')
        assert "1e309" in text
    write_raw_meta(store, name, text)


def assert_listed_damaged(store: CheckpointStore, name: str, reason: str) -> None:
    rows = {row.name: row for row in store.list()}
    assert rows["good"].damaged is None
    assert rows[name].damaged is not None and reason in rows[name].damaged, rows[name].damaged
    assert "\n" not in rows[name].damaged
    rows[name].to_dict()  # what `ckpt list --json` prints: never raises
    with pytest.raises(CheckpointError) as err:
        store.load(name)
    assert reason in str(err.value) and "\n" not in str(err.value)
    assert store.most_recent() == "good"
    assert store.load("good").meta["step"] == 7


@pytest.mark.parametrize(("name", "change", "reason"), META_CASES, ids=[c[0] for c in META_CASES])
def test_a_damaged_meta_json_is_listed_with_the_field_and_the_good_one_still_loads(name, change, reason):
    store = good_store()
    damage_meta(store, name, change)
    assert_listed_damaged(store, name, reason)


@pytest.mark.parametrize(("name", "text", "reason"), RAW_META_CASES, ids=[c[0] for c in RAW_META_CASES])
def test_a_meta_json_that_is_not_an_object_is_listed_damaged(name, text, reason):
    store = good_store()
    make_raw_meta(store, name, text)
    assert_listed_damaged(store, name, reason)


def test_a_huge_config_is_refused_before_anything_is_allocated():
    with pytest.raises(ConfigError, match="n_layers 1,000,000 is too large"):
        GPTConfig(n_layers=1_000_000)
    with pytest.raises(ConfigError, match="parameters"):
        GPTConfig(emb_dim=16384, n_heads=128, n_layers=200)
    xl = GPTConfig(emb_dim=1600, n_heads=25, n_layers=48)  # GPT-2's largest loads
    with torch.device("meta"):
        assert xl.parameters() == GPTModel(xl).num_parameters() < MAX_PARAMETERS
    assert GPTConfig(qkv_bias=False).parameters() == GPTModel(GPTConfig(qkv_bias=False)).num_parameters()
    assert isinstance(ConfigError("x"), Gpt2termError)


# ----------------------------------------------------------------------------------- damaged model.safetensors


def write_safetensors_raw(path: Path, header: object, data: bytes = b"") -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def good_header(store: CheckpointStore) -> tuple[dict, bytes]:
    raw = (store.path("good") / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_header_list(store: CheckpointStore, path: Path) -> None:
    write_safetensors_raw(path, [])


def st_not_json(store: CheckpointStore, path: Path) -> None:
    write_safetensors_raw(path, b"{this is not json")


def st_int8(store: CheckpointStore, path: Path) -> None:
    sd = tiny_model().state_dict()
    save_file({k: v.to(torch.int8) for k, v in sd.items()}, str(path))


def st_wrong_shapes(store: CheckpointStore, path: Path) -> None:
    other = GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_heads=4, n_layers=2, drop_rate=0.0)
    save_file(tiny_model(cfg=other).state_dict(), str(path))


def st_truncated(store: CheckpointStore, path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def st_empty(store: CheckpointStore, path: Path) -> None:
    path.write_bytes(b"")


def st_entry_not_object(store: CheckpointStore, path: Path) -> None:
    header, data = good_header(store)
    header["tok_emb.weight"] = 5
    write_safetensors_raw(path, header, data)


def st_bad_offsets(store: CheckpointStore, path: Path) -> None:
    header, data = good_header(store)
    header["tok_emb.weight"]["data_offsets"] = ["a", 3]
    write_safetensors_raw(path, header, data)


def st_size_mismatch(store: CheckpointStore, path: Path) -> None:
    header, data = good_header(store)
    begin, end = header["pos_emb.weight"]["data_offsets"]
    header["pos_emb.weight"]["data_offsets"] = [begin, end - 4]
    write_safetensors_raw(path, header, data)


def st_metadata_not_strings(store: CheckpointStore, path: Path) -> None:
    header, data = good_header(store)
    header["__metadata__"] = {"format": 5}
    write_safetensors_raw(path, header, data)


def st_extra_tensor(store: CheckpointStore, path: Path) -> None:
    sd = tiny_model().state_dict()
    save_file({**sd, "stowaway": torch.zeros(3)}, str(path))


def st_missing_tensor(store: CheckpointStore, path: Path) -> None:
    sd = tiny_model().state_dict()
    del sd["final_norm.scale"]
    save_file(sd, str(path))


def st_missing_file(store: CheckpointStore, path: Path) -> None:
    path.unlink()


SAFETENSORS_CASES = [
    ("st-header-a-list", st_header_list, "malformed header"),
    ("st-header-not-json", st_not_json, "model.safetensors is unreadable"),
    ("st-int8", st_int8, "dtype I8"),
    ("st-wrong-shapes", st_wrong_shapes, "has shape"),
    ("st-truncated", st_truncated, "truncated"),
    ("st-empty", st_empty, "truncated"),
    ("st-entry-not-object", st_entry_not_object, "tok_emb.weight: not an object"),
    ("st-bad-offsets", st_bad_offsets, "bad data_offsets"),
    ("st-size-mismatch", st_size_mismatch, "pos_emb.weight"),
    ("st-metadata-not-strings", st_metadata_not_strings, "__metadata__"),
    ("st-extra-tensor", st_extra_tensor, "stowaway"),
    ("st-missing-tensor", st_missing_tensor, "final_norm.scale"),
    ("st-missing-file", st_missing_file, "model.safetensors is missing"),
]


def damage_weights(store: CheckpointStore, name: str, damage: Callable[[CheckpointStore, Path], None]) -> None:
    damage(store, copy_good(store, name) / "model.safetensors")


@pytest.mark.parametrize(("name", "damage", "reason"), SAFETENSORS_CASES, ids=[c[0] for c in SAFETENSORS_CASES])
def test_a_damaged_weights_file_is_listed_with_its_reason_and_the_good_one_still_loads(name, damage, reason):
    store = good_store()
    damage_weights(store, name, damage)
    assert_listed_damaged(store, name, reason)


def build_damaged_store() -> CheckpointStore:
    store = good_store()
    for name, change, _ in META_CASES:
        damage_meta(store, name, change)
    for name, text, _ in RAW_META_CASES:
        make_raw_meta(store, name, text)
    for name, damage, _ in SAFETENSORS_CASES:
        damage_weights(store, name, damage)
    return store


ALL_DAMAGED = [c[0] for c in META_CASES + RAW_META_CASES + SAFETENSORS_CASES]


def gpt2term(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpt2term", *args], capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )


def test_ckpt_list_in_a_real_process_shows_every_damaged_checkpoint_and_the_good_one():
    build_damaged_store()
    done = gpt2term("ckpt", "list")
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert "DAMAGED" not in lines["good"] and lines["good"].split()[2] == "7"
    for name in ALL_DAMAGED:
        assert "DAMAGED: " in lines[name], name
    done = gpt2term("ckpt", "list", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["good"]["damaged"] is None and all(rows[name]["damaged"] for name in ALL_DAMAGED)
    # Loading a damaged one: one line naming the field, exit 2, no traceback.
    done = gpt2term("generate", "-c", "step-abc", "--max-new-tokens", "2", "hello")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "step must be a whole number" in done.stderr and len(done.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------ our own model.safetensors, by its path


def test_our_own_model_safetensors_loads_by_its_path_with_or_without_meta_json(tmp_path):
    store = good_store()
    weights = store.path("good") / "model.safetensors"
    loaded = resolve_weights(str(weights), store)
    assert loaded.config == TINY and loaded.meta["step"] == 7
    expected = tiny_model().state_dict()
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in expected.items())
    # Copied out alone: the config is read off the shapes (64-dim heads assumed: one head of 32 here).
    alone = tmp_path / "alone" / "model.safetensors"
    alone.parent.mkdir()
    shutil.copy(weights, alone)
    loaded = load_weights_file(alone)
    assert loaded.config == TINY.with_(n_heads=1, drop_rate=0.1) and any("meta.json" in n for n in loaded.notices)
    assert loaded.build_model().num_parameters() == tiny_model().num_parameters()
    # With its meta.json beside it: that config.
    shutil.copy(store.path("good") / "meta.json", alone.parent / "meta.json")
    assert load_weights_file(alone).config == TINY
    # An int8 file is refused in one line, not a torch error.
    save_file({k: v.to(torch.int8) for k, v in expected.items()}, str(alone))
    with pytest.raises(CheckpointError, match="weights must be floats"):
        load_weights_file(alone).build_model()


def test_ckpt_import_and_generate_take_our_model_safetensors_path_in_a_real_process():
    store = CheckpointStore()
    talker = GPTConfig(context_length=16, emb_dim=32, n_heads=2, n_layers=1)  # GPT-2's vocabulary: it can talk
    store.save("talker", tiny_model(cfg=talker), meta={"step": 3})
    weights = store.path("talker") / "model.safetensors"
    done = gpt2term("ckpt", "import", str(weights), "--name", "again")
    assert done.returncode == 0, done.stderr
    again = store.load("again")
    assert again.config == talker
    assert all(torch.equal(again.state_dict[k], v) for k, v in store.load("talker").state_dict.items())
    done = gpt2term("generate", "-c", str(weights), "--max-new-tokens", "3", "--json", "hello")
    assert done.returncode == 0, done.stderr
    assert len([line for line in done.stdout.splitlines() if line.startswith("{")]) >= 3


# ---------------------------------------------------------------------------------- huge values in metrics.jsonl

HUGE_METRICS = [
    '{"type": "step", "step": 1, "total_steps": 9, "epoch": 1, "loss": 5.0, "lr": 0.001, "grad_norm": 1.0, '
    '"tokens_seen": 10, "tokens_per_second": 5.0, "elapsed_s": 1.0, "eta_s": 1.0}',
    '{"type": "step", "step": 1e309, "total_steps": 9, "epoch": 1, "loss": 4.0, "lr": 0.001, "grad_norm": 1.0, '
    '"tokens_seen": 20, "tokens_per_second": 5.0, "elapsed_s": 1.0, "eta_s": 1.0}',
    '{"type": "step", "step": 3, "total_steps": 9, "epoch": 1, "loss": 1e308, "lr": 0.001, "grad_norm": 1.0, '
    '"tokens_seen": 30, "tokens_per_second": 5.0, "elapsed_s": 1.0, "eta_s": 1.0}',
    '{"type": "step", "step": 1e308, "total_steps": 9, "epoch": 1, "loss": 3.0, "lr": 0.001, "grad_norm": 1.0, '
    '"tokens_seen": 30, "tokens_per_second": 5.0, "elapsed_s": 1.0, "eta_s": 1.0}',
    '{"type": "step", "step": "abc", "total_steps": 9, "epoch": 1, "loss": 3.0, "lr": 0.001, "grad_norm": 1.0, '
    '"tokens_seen": 30, "tokens_per_second": 5.0, "elapsed_s": 1.0, "eta_s": 1.0}',
    '{"type": "eval", "step": 4, "epoch": 1, "tokens_seen": 40, "train_loss": 1e308, "val_loss": 1e308, '
    '"train_perplexity": Infinity, "val_perplexity": NaN}',
    '{"type": "eval", "step": 5, "epoch": 1, "tokens_seen": 50, "train_loss": 3.5, "val_loss": "low", '
    '"train_perplexity": 33.0, "val_perplexity": 40.0}',
    '{"type": "step", "step": 6, "total_steps": 9, "epoch": 1, "loss": 2.5, "lr": 0.001, "grad_norm": 1.0, '
    '"tokens_seen": 60, "tokens_per_second": 5.0, "elapsed_s": 1.0, "eta_s": 1.0}',
    '{"type": "eval", "step": 6, "epoch": 1, "tokens_seen": 60, "train_loss": 2.4, "val_loss": 2.6, '
    '"train_perplexity": 11.0, "val_perplexity": 13.5}',
]


def write_huge_metrics(store: CheckpointStore, name: str) -> None:
    store.metrics_path(name).write_text("\n".join(HUGE_METRICS) + "\n")


def test_huge_and_non_finite_metrics_are_skipped_by_the_store_and_the_follower():
    store = good_store()
    write_huge_metrics(store, "good")
    records = store.read_metrics("good")
    assert [(r["type"], r["step"]) for r in records] == [("step", 1), ("step", 6), ("eval", 6)]
    with MetricsFollower(store.metrics_path("good")) as follower:
        assert follower.poll().records == records
    train, val = loss_history([{"type": "step", "step": math.inf, "loss": 1.0}, {"type": "step", "step": 2,
                                                                                   "loss": 1e308}])  # fmt: skip
    assert len(train) == 0 and len(val) == 0


def test_the_app_starts_on_the_good_checkpoint_and_shows_every_damaged_row_with_its_reason():
    store = build_damaged_store()
    store.mark_used("step-abc")  # the last one used is now damaged

    async def scenario() -> None:
        app = make_app(keymap={})
        async with app.run_test(size=(140, 45)) as pilot:
            await settle(pilot, lambda: app.app_model is not None or app.load_error is not None, "the model loaded")
            assert app.load_error is None and app.app_model is not None and app.app_model.name == "good"
            # The notice arrives as a message after the model; wait for it, then read it (under load it lags).
            await settle(
                pilot, lambda: any("'step-abc', is damaged" in n.message for n in app._notifications), "the notice"
            )
            await pilot.press("f4")
            screen = app.screen
            assert isinstance(screen, CheckpointsScreen)
            table = screen.table
            assert set(table.names) == {"good", *ALL_DAMAGED}
            for name in ALL_DAMAGED:
                assert str(table.get_row(name)[7]).startswith("damaged: "), name
            # Every row's details (and its loss plot) render; a damaged one's say why.
            for index, name in enumerate(table.names):
                table.move_cursor(row=index)
                await pilot.pause()
                details = str(screen.query_one(CheckpointDetails).render())
                assert name in details and (name == "good" or "damaged: " in details), name
            assert app.is_running

    asyncio.run(scenario())


def test_the_checkpoints_and_train_screens_draw_a_metrics_jsonl_holding_1e309_and_1e308():
    store = good_store()
    write_huge_metrics(store, "good")

    async def scenario() -> None:
        app = make_app(keymap={})
        async with app.run_test(size=(140, 45)) as pilot:
            await settle(pilot, lambda: app.app_model is not None or app.load_error is not None, "the model loaded")
            await pilot.press("f4")
            screen = app.screen
            assert isinstance(screen, CheckpointsScreen) and screen.table.selected_name == "good"
            plot = screen.query_one(LossPlot)
            await settle(pilot, lambda: plot.train.steps == [1, 6] and plot.val.steps == [6], "the loss plot")
            drawn = plot.draws
            plot._draw()  # what its timer does: plotext draws these values
            assert plot.draws == drawn + 1
            # Following the run with those lines in the train screen.
            await pilot.press("f3")
            train = app.screen
            assert isinstance(train, TrainScreen)
            train.follow("good")
            await settle(pilot, lambda: train.state.step == 6, "the followed run at step 6")
            assert train.state.train_loss.steps == [1, 6] and train.state.val_loss.values == [2.6]
            train.refresh_view()
            await pilot.pause()
            assert app.is_running

    asyncio.run(scenario())


def test_the_app_falls_back_to_the_untrained_model_when_every_checkpoint_is_damaged():
    store = good_store()
    store.mark_used("good")
    write_safetensors_raw(store.path("good") / "model.safetensors", [])

    async def scenario() -> None:
        app = make_app(keymap={})
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, lambda: app.app_model is not None or app.load_error is not None, "the model loaded")
            assert app.load_error is None and app.app_model is not None and app.app_model.untrained
            assert any("'good', is damaged" in n.message for n in app._notifications)

    asyncio.run(scenario())


# ----------------------------------------------------------------------------------------------------- symlinks


def test_a_symlinked_metrics_jsonl_is_never_written_through(tmp_path):
    store = good_store()
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"type": "note"}\n')
    before = outside.read_bytes()
    store.metrics_path("good").symlink_to(outside)
    with pytest.raises(CheckpointError, match="symbolic link") as err:
        store.append_metrics("good", {"type": "step", "step": 8, "loss": 1.0})
    assert "\n" not in str(err.value)
    store.save("good", tiny_model(1), meta={"step": 8})  # a save carries the link, not the file behind it
    with pytest.raises(CheckpointError, match="symbolic link"):
        store.append_metrics("good", {"type": "step", "step": 9, "loss": 1.0})
    assert outside.read_bytes() == before
    assert store.read_metrics("good") == [{"type": "note"}]  # reading through a link is fine
    # A linked checkpoint folder: appends refused too, nothing lands in the folder it points to.
    target = tmp_path / "elsewhere"
    shutil.copytree(store.path("good"), target)
    (target / "metrics.jsonl").unlink()
    (store.root / "linked").symlink_to(target)
    with pytest.raises(CheckpointError, match="symbolic link"):
        store.append_metrics("linked", {"type": "step", "step": 1, "loss": 1.0})
    assert not (target / "metrics.jsonl").exists()


def test_a_training_run_on_a_checkpoint_with_a_symlinked_metrics_jsonl_leaves_the_outside_file_alone(tmp_path):
    from gpt2term.core.training import Trainer, TrainingSettings

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    store = CheckpointStore()
    model = {"emb_dim": 32, "n_layers": 1, "n_heads": 2, "drop_rate": 0.0}
    settings = TrainingSettings(name="run", corpus=[str(corpus)], model=model, context_length=16, batch_size=2,
                                max_steps=2, eval_interval=2, save_interval=2, device="cpu")  # fmt: skip
    Trainer(settings, store=store).run()
    outside = tmp_path / "outside.jsonl"
    shutil.move(store.metrics_path("run"), outside)
    store.metrics_path("run").symlink_to(outside)
    before = outside.read_bytes()
    resumed = TrainingSettings(**{**settings.__dict__, "resume": True, "max_steps": 4})
    with pytest.raises(CheckpointError, match="symbolic link"):
        Trainer(resumed, store=store).run()
    assert outside.read_bytes() == before


def test_rm_and_save_of_a_symlinked_checkpoint_remove_the_link_only_and_leave_nothing_behind(tmp_path):
    store = good_store()
    target = tmp_path / "elsewhere"
    shutil.copytree(store.path("good"), target)
    files = sorted(p.name for p in target.iterdir())

    def leftovers() -> list[str]:
        return sorted(p.name for p in store.root.iterdir() if p.name.startswith(".link."))

    (store.root / "link").symlink_to(target)
    assert store.info("link").damaged is None and store.load("link").config == TINY
    store.delete("link")
    assert not os.path.lexists(store.root / "link") and leftovers() == []
    assert sorted(p.name for p in target.iterdir()) == files

    (store.root / "link").symlink_to(target)
    store.save("link", tiny_model(2), meta={"step": 1})
    assert not store.path("link").is_symlink() and store.load("link").meta["step"] == 1
    assert leftovers() == [] and sorted(p.name for p in target.iterdir()) == files
    assert json.loads((target / "meta.json").read_text())["step"] == 7
    store.append_metrics("link", {"type": "step", "step": 2, "loss": 1.0})
    assert not (target / "metrics.jsonl").exists() or "step" not in (target / "metrics.jsonl").read_text()

    # A dangling link is listed as damaged and rm removes it.
    (store.root / "dangling").symlink_to(tmp_path / "nowhere")
    rows = {row.name: row for row in store.list()}
    assert "symbolic link" in rows["dangling"].damaged
    store.delete("dangling")
    assert not os.path.lexists(store.root / "dangling")

    # Links an older version left behind (.link.deleted-*, .link.old-*) are cleaned up when listing.
    (store.root / ".link.deleted-99999999-0123abcd").symlink_to(target)
    (store.root / ".link.old-99999999-0123abcd").symlink_to(target)
    store.list()
    assert leftovers() == [] and sorted(p.name for p in target.iterdir()) == files


# ------------------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_weights_are_found_in_every_float_dtype(dtype):
    from gpt2term.core.store.validate import non_finite_tensor

    for bad in ([math.nan], [math.inf], [-math.inf], [math.inf, -math.inf]):
        weights = torch.randn(5000).to(dtype)
        weights[1234 : 1234 + len(bad)] = torch.tensor(bad, dtype=dtype)
        state = {"ok": torch.randn(3, 3).to(dtype), "ids": torch.arange(4), "bad": weights, "later": weights.clone()}
        assert non_finite_tensor(state) == "bad", bad
    assert non_finite_tensor({"ok": torch.randn(64, 64).to(dtype), "empty": torch.empty(0, dtype=dtype)}) is None


@pytest.mark.parametrize(
    ("dtype", "value"),
    [(torch.float32, 3e38), (torch.float16, 65000.0), (torch.bfloat16, 3e38), (torch.float64, 1e308)],
)
def test_huge_but_finite_weights_are_accepted(dtype, value):
    """Their sum overflows to inf: the fast check alone would call them non-finite."""
    from gpt2term.core.store.validate import non_finite_tensor

    huge = torch.full((1000,), value, dtype=dtype)
    assert torch.isfinite(huge).all()
    assert non_finite_tensor({"huge": huge, "negative": -huge}) is None


def test_a_checkpoint_with_huge_weights_loads_and_one_with_a_nan_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    torch.manual_seed(0)
    model = GPTModel(TINY)
    with torch.no_grad():
        model.trf_blocks[1].ff.layers[0].weight.fill_(3e38)
    store.save("huge", model, meta={"step": 1})
    assert resolve_weights("huge", store).name == "huge"
    info = store.info("huge")
    state = {k: v.clone() for k, v in store.load("huge").state_dict.items()}
    state["trf_blocks.1.att.W_value.weight"][3, 4] = math.nan
    save_file(state, str(info.path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"non-finite weights \(nan or inf in trf_blocks\.1\.att\.W_value\.weight\)"
    ):
        resolve_weights("huge", store)
