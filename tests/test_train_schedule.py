"""The run's recipe pieces: schedules, the step-0 evaluation, the book's evaluation timing and per-epoch samples,
the qkv bias switch, and the one-line errors for settings that cannot work."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from gpt2term.cli import cli
from gpt2term.core.errors import InputError
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.training import Trainer, TrainingSettings, learning_rate
from gpt2term.core.training.schedule import Schedule

SMALL_MODEL = {"emb_dim": 32, "n_layers": 1, "n_heads": 2, "drop_rate": 0.0}
SMALL = ["--emb-dim", "32", "--n-layers", "1", "--n-heads", "2", "--context-length", "16", "--batch-size", "4"]


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(["The quick brown fox jumps over the lazy dog.", "Every effort moves you."] * 20))
    return path


def settings(corpus_file, **changes) -> TrainingSettings:
    values = dict(name="run", corpus=[str(corpus_file)], model=dict(SMALL_MODEL), context_length=16, batch_size=4,
                  max_steps=6, lr=1e-3, eval_interval=3, eval_iters=1, save_interval=0, sample_tokens=2)  # fmt: skip
    return TrainingSettings(**{**values, **changes})


def run(s: TrainingSettings) -> list:
    events: list = []
    Trainer(s, listeners=[events.append]).run()
    return events


def of_type(events, kind):
    return [e for e in events if e.type == kind]


def test_each_schedule_kind_and_no_warmup_when_warmup_is_zero():
    def lrs(kind, warmup):
        return [learning_rate(s, 1.0, warmup, 10, 0.2, kind) for s in range(11)]

    assert lrs("constant", 0) == [1.0] * 11
    assert lrs("constant", 4)[:5] == [0.25, 0.5, 0.75, 1.0, 1.0] and lrs("constant", 4)[-1] == 1.0
    assert lrs("linear", 0) == pytest.approx([1.0 - 0.08 * s for s in range(11)])
    cosine = lrs("cosine", 0)
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.6) and cosine[10] == pytest.approx(0.2)
    assert all(lrs(kind, 0)[0] == 1.0 for kind in ("constant", "cosine", "linear"))  # the first step is at the peak
    assert Schedule(1.0, 0.2, 0, 10, "linear").to_dict() == {
        "lr": 1.0, "min_lr_ratio": 0.2, "warmup_steps": 0, "total_steps": 10, "kind": "linear"}  # fmt: skip


def test_the_run_follows_its_schedule_and_its_checkpoint_records_the_kind(corpus_file):
    events = run(settings(corpus_file, schedule="linear", warmup_steps=0, min_lr_ratio=0.5, max_steps=5))
    assert [e.lr for e in of_type(events, "step")] == pytest.approx([1e-3, 9e-4, 8e-4, 7e-4, 6e-4])
    state = CheckpointStore().load("run", with_state=True).trainer_state
    assert state["scheduler"]["kind"] == "linear" and state["settings"]["schedule"] == "linear"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"schedule": "step"}, "--schedule must be one of constant, cosine, linear, got 'step'"),
        ({"min_lr_ratio": 1.5}, "--min-lr-ratio must be between 0 and 1, got 1.5"),
        ({"min_lr_ratio": -0.1}, "--min-lr-ratio must be between 0 and 1, got -0.1"),
        ({"min_lr_ratio": math.nan}, "--min-lr-ratio must be a finite number, got nan"),
        ({"eval_timing": "often"}, "--eval-timing must be one of interval, book, got 'often'"),
        ({"sample_every": "step"}, "--sample-every must be one of eval, epoch, got 'step'"),
        ({"recipe": "nope"}, "--recipe must be one of default, book, got 'nope'"),
    ],
)
def test_settings_that_cannot_work_say_so_in_one_line(corpus_file, changes, message):
    with pytest.raises(InputError) as caught:
        settings(corpus_file, **changes).validate()
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["--schedule", "step"], "'step' is not one of"), (["--min-lr-ratio", "2"], "2.0 is not in the range")],
)
def test_the_cli_refuses_a_bad_schedule_in_one_line(corpus_file, args, expected):
    result = CliRunner().invoke(cli, ["train", str(corpus_file), "--name", "bad", *SMALL, *args])
    assert result.exit_code == 2 and expected in result.stderr
    assert not CheckpointStore().exists("bad")


def test_step_zero_evaluation_can_be_turned_off_and_the_books_timing_counts_from_the_first_update(corpus_file):
    interval = run(settings(corpus_file, name="a", max_steps=8))
    assert [e.step for e in of_type(interval, "eval")] == [0, 3, 6, 8]
    assert [e.step for e in of_type(interval, "sample")] == [3, 6, 8]  # no sample before training
    quiet = run(settings(corpus_file, name="b", max_steps=8, eval_at_start=False, eval_timing="book"))
    assert [e.step for e in of_type(quiet, "eval")] == [1, 4, 7, 8]  # the book's global steps 0, 3, 6, then the end


def test_samples_after_each_epoch(corpus_file):
    events = run(settings(corpus_file, sample_every="epoch", max_steps=9, eval_interval=100))
    per_epoch = int(of_type(events, "start")[0].steps_per_epoch)
    assert 2 <= per_epoch <= 4
    ends = list(range(per_epoch, 10, per_epoch))
    assert [e.step for e in of_type(events, "sample")] == sorted({*ends, 9})
    assert [e.step for e in of_type(events, "eval")] == [0, 9]


def test_resume_does_not_repeat_the_step_zero_evaluation(corpus_file):
    first = run(settings(corpus_file, max_steps=2))
    assert [e.step for e in of_type(first, "eval")] == [0, 2]
    from gpt2term.core.training import resume_settings

    again = run(resume_settings("run", max_steps=4))
    assert [e.step for e in of_type(again, "eval")] == [3, 4]


@pytest.mark.parametrize(("flag", "bias"), [(None, True), ("--no-qkv-bias", False), ("--qkv-bias", True)])
def test_qkv_bias_switch_reaches_the_weights_and_meta(corpus_file, flag, bias):
    args = ["train", str(corpus_file), "--name", "q", *SMALL, "--max-steps", "1", "--no-eval-at-start", "--json"]
    result = CliRunner().invoke(cli, args + ([flag] if flag else []))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[0]["config"]["qkv_bias"] is bias
    assert [r["step"] for r in records if r["type"] == "eval"] == [1]  # --no-eval-at-start: only the last
    store = CheckpointStore()
    assert store.info("q").meta["config"]["qkv_bias"] is bias
    assert ("trf_blocks.0.att.W_query.bias" in store.load_model("q").state_dict()) is bias


def test_a_recipe_cannot_be_given_with_resume(corpus_file):
    run(settings(corpus_file, name="r", max_steps=1))
    result = CliRunner().invoke(cli, ["train", "--name", "r", "--resume", "--recipe", "book"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: --recipe starts a new run; --resume keeps the settings the run was saved with"
    )
