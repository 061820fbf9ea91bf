"""The data as the model sees it (`gpt2term inspect data`, issue 15 part 2): the rows shown are the rows a real
`Trainer` feeds, the targets are the inputs shifted by one, and the counts are the datasets'."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from gpt2term.cli import cli
from gpt2term.core.data import GPTDataset, load_corpus, split_point
from gpt2term.core.data_view import data_pipeline, id_matrix
from gpt2term.core.tokenizer import default_tokenizer
from gpt2term.core.training import Trainer, TrainingSettings
from gpt2term.core.training.trainer import Trainer as TrainerClass

TINY_MODEL = {"emb_dim": 16, "n_heads": 2, "n_layers": 1}


@pytest.fixture
def corpus_file(tmp_path):
    """Enough text for a handful of windows of 8 tokens, few enough that a short run crosses an epoch boundary."""
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(f"word{i} is number {i}." for i in range(20)))
    return path


def settings_for(corpus_file, **extra) -> TrainingSettings:
    values = dict(
        name="data-run",
        corpus=[str(corpus_file)],
        model=TINY_MODEL,
        context_length=8,
        batch_size=3,
        seed=7,
        eval_at_start=False,
        eval_interval=1000,
        save_interval=0,
        sample_tokens=0,
        device="cpu",
    )
    return TrainingSettings(**(values | extra))


def fed_batches(monkeypatch, settings: TrainingSettings) -> list[tuple[list, list]]:
    """Every micro-batch a real Trainer run takes from its own batch order, as (inputs, targets) rows."""
    seen: list[tuple[list, list]] = []
    original = TrainerClass._next_batch

    def recording(self, plan):
        inputs, targets = original(self, plan)
        seen.append((inputs.tolist(), targets.tolist()))
        return inputs, targets

    monkeypatch.setattr(TrainerClass, "_next_batch", recording)
    Trainer(settings).run()
    return seen


@pytest.mark.parametrize(("stride", "grad_accum"), [(None, 1), (3, 1), (5, 2)])
def test_the_rows_shown_are_the_rows_the_trainer_feeds_at_each_step(monkeypatch, corpus_file, stride, grad_accum):
    windows = data_pipeline(settings_for(corpus_file, stride=stride)).windows
    batch_size = windows // 3  # three batches an epoch (and a window left over where it does not divide)
    settings = settings_for(corpus_file, stride=stride, grad_accum=grad_accum, batch_size=batch_size)
    steps = math.ceil(7 / grad_accum)  # into the third epoch: reshuffled twice
    seen = fed_batches(
        monkeypatch,
        settings_for(corpus_file, stride=stride, grad_accum=grad_accum, batch_size=batch_size, max_steps=steps),
    )
    assert len(seen) == steps * grad_accum
    epochs = set()
    for step in range(1, steps + 1):
        view = data_pipeline(settings, step=step)
        inputs, targets = seen[(step - 1) * grad_accum]  # a step's first micro-batch
        assert [w.input_ids for w in view.batch] == inputs, f"step {step}"
        assert [w.target_ids for w in view.batch] == targets, f"step {step}"
        assert view.batches_per_epoch == 3 and view.shape == (batch_size, 8)
        epochs.add(view.epoch)
    assert epochs == {1, 2, 3}


def test_targets_are_the_inputs_shifted_by_one_and_windows_are_the_ids_every_stride(corpus_file):
    settings = settings_for(corpus_file, stride=3)
    view = data_pipeline(settings, step=2)
    corpus = load_corpus([str(corpus_file)], val_ratio=settings.val_ratio)
    ids = corpus.train_ids.tolist()
    for window in [*view.first_windows, *view.batch]:
        assert window.start == window.window * 3
        assert window.input_ids == ids[window.start : window.start + 8]
        assert window.target_ids == ids[window.start + 1 : window.start + 9]
        assert window.target_ids[:-1] == window.input_ids[1:]
    assert [w.window for w in view.first_windows] == [0, 1, 2]
    assert len({w.window for w in view.batch}) == len(view.batch)  # a batch never repeats a window


def test_counts_are_the_datasets_and_the_split_is_the_courses(corpus_file):
    settings = settings_for(corpus_file, stride=3, val_ratio=0.25)
    view = data_pipeline(settings)
    corpus = load_corpus([str(corpus_file)], val_ratio=0.25)
    assert (view.train_tokens, view.val_tokens) == (corpus.train_tokens, corpus.val_tokens)
    assert view.windows == len(GPTDataset(corpus.train_ids, 8, 3)) == math.ceil((corpus.train_tokens - 8) / 3)
    assert view.val_windows == len(GPTDataset(corpus.val_ids, 8)) == math.ceil((corpus.val_tokens - 8) / 8)
    assert view.batches_per_epoch == view.windows // 3
    assert view.dropped_windows == view.windows % 3
    # The course's split: the text cut by characters, each part tokenized on its own.
    text = corpus_file.read_text()
    assert view.characters == len(text) and view.split_at == split_point(len(text), 0.25) == int(0.75 * len(text))
    tokenizer = default_tokenizer()
    assert tokenizer.encode(text[: view.split_at]) == corpus.train_ids.tolist()
    assert tokenizer.encode(text[view.split_at :]) == corpus.val_ids.tolist()
    assert view.first_tokens == [(i, tokenizer.token_text(i)) for i in corpus.train_ids[:12].tolist()]


def test_a_batch_larger_than_the_windows_is_lowered_as_the_trainer_does(corpus_file):
    view = data_pipeline(settings_for(corpus_file, batch_size=10_000))
    assert view.batch_size == view.windows and view.batches_per_epoch == 1 and view.requested_batch_size == 10_000
    assert len(view.batch) == view.windows


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_json_is_the_engines_view(corpus_file):
    args = ("--context-length", "8", "--batch-size", "3", "--seed", "7", "--stride", "5", "--val-ratio", "0.2")
    result = run("inspect", "data", str(corpus_file), *args, "--step", "4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    view = data_pipeline(settings_for(corpus_file, stride=5, val_ratio=0.2), step=4)
    for key in ("train_tokens", "val_tokens", "windows", "batches_per_epoch", "val_windows", "split_at"):
        assert data[key] == getattr(view, key), key
    assert [{"input_ids": r["input_ids"], "target_ids": r["target_ids"]} for r in data["batch"]] == [
        {"input_ids": w.input_ids, "target_ids": w.target_ids} for w in view.batch
    ]
    assert data["shape"] == [3, 8]


def test_cli_text_shows_the_windows_as_the_course_prints_them(corpus_file):
    result = run("inspect", "data", str(corpus_file), "--context-length", "8", "--batch-size", "3", "--seed", "7")
    assert result.exit_code == 0, result.output
    view = data_pipeline(settings_for(corpus_file))
    first = view.first_windows[0]
    assert "inputs  = " + id_matrix([w.input_ids for w in view.first_windows], 8, indent=10) in result.stdout
    assert "targets = " + id_matrix([w.target_ids for w in view.batch], 8, indent=10) in result.stdout
    assert f"[[{first.input_ids[0]:>5}, {first.input_ids[1]:>5}," in result.stdout
    assert "shape (3, 8)" in result.stdout
    assert f"{view.windows:,} training windows" in result.stdout
    assert f"{view.batches_per_epoch:,} batches per epoch" in result.stdout


def test_cli_without_a_corpus_shows_trains_default_pydoc():
    result = run("inspect", "data", "--json", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    default = load_corpus(None)
    assert data["corpus"] == "pydoc (built in)" and data["train_tokens"] == default.train_tokens
    assert data["context_length"] == 128  # the tiny preset's, as train's default --preset
    assert len(data["batch"]) == 2 and len(data["batch"][0]["input_ids"]) == 128


def test_a_too_small_corpus_gives_trains_error(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("far too short to train on")
    shown = run("inspect", "data", str(small))
    trained = run("train", str(small), "--name", "never", "--device", "cpu")
    assert shown.exit_code == trained.exit_code == 2
    error = [line for line in shown.stderr.splitlines() if line.startswith("error:")]
    assert error and "too short for context length 128" in error[0] and "lower --context-length" in error[0]
    assert error[0] in trained.stderr.splitlines()


def test_inspect_data_takes_trains_options_with_trains_defaults():
    train = {p.name: p for p in cli.commands["train"].params}
    data = {p.name: p for p in cli.commands["inspect"].commands["data"].params}
    shared = ("recipe", "preset", "batch_size", "context_length", "stride", "val_ratio", "seed", "encoding_errors")
    for name in shared:
        assert data[name].opts == train[name].opts, name
        assert data[name].default == train[name].default, name
        assert repr(data[name].type) == repr(train[name].type), name


def test_the_book_recipe_gives_its_windows():
    result = run("inspect", "data", "--recipe", "book", "--json")
    data = json.loads(result.stdout)
    assert (data["context_length"], data["stride"], data["batch_size"], data["seed"]) == (256, 256, 2, 123)


def test_a_checkpoints_context_is_the_window_and_a_longer_one_is_refused_as_train_refuses_it(corpus_file):
    import torch

    from gpt2term.core.config import GPTConfig
    from gpt2term.core.errors import InputError
    from gpt2term.core.model import GPTModel
    from gpt2term.core.store.store import CheckpointStore

    torch.manual_seed(0)
    CheckpointStore().save("short", GPTModel(GPTConfig(emb_dim=16, n_heads=2, n_layers=1, context_length=6)))
    view = data_pipeline(settings_for(corpus_file, init_from="short", context_length=None))
    assert view.context_length == 6 and view.shape == (3, 6)
    too_long = settings_for(corpus_file, init_from="short", context_length=7)
    with pytest.raises(InputError) as shown:
        data_pipeline(too_long)
    with pytest.raises(InputError) as trained:
        Trainer(too_long).run()
    assert str(shown.value) == str(trained.value)
    assert "longer than the model's context (6)" in str(shown.value)
