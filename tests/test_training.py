"""The trainer: the loss falls, resuming is exact, NaN stops cleanly, controls work, events reach metrics.jsonl."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import InputError
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.training import (
    OverfittingWatch,
    Trainer,
    TrainingControl,
    TrainingDiverged,
    TrainingSettings,
    evaluate_ids,
    learning_rate,
    resume_settings,
)

SMALL_MODEL = {"emb_dim": 32, "n_layers": 2, "n_heads": 2, "drop_rate": 0.0}


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = [
        "The quick brown fox jumps over the lazy dog.",
        "A stitch in time saves nine.",
        "Every effort moves you forward.",
    ]
    path.write_text("\n".join(lines * 40))
    return path


def small_settings(corpus_file, **changes) -> TrainingSettings:
    values = dict(
        name="run",
        corpus=[str(corpus_file)],
        model=dict(SMALL_MODEL),
        context_length=16,
        batch_size=4,
        max_steps=6,
        lr=3e-3,
        eval_interval=3,
        eval_iters=2,
        save_interval=0,
        sample_tokens=4,
    )
    values.update(changes)
    return TrainingSettings(**values)


def run(settings: TrainingSettings, control: TrainingControl | None = None, listeners=()) -> tuple[list, object]:
    events: list = []
    result = Trainer(settings, control=control, listeners=[events.append, *listeners]).run()
    return events, result


def of_type(events, kind: str) -> list:
    return [e for e in events if e.type == kind]


def test_loss_falls_far_below_its_start_and_validation_perplexity_is_reported(corpus_file):
    settings = small_settings(corpus_file, name="learn", model={**SMALL_MODEL, "emb_dim": 64}, max_steps=40, lr=5e-3)
    settings.eval_interval = 20
    events, result = run(settings)

    steps = of_type(events, "step")
    assert abs(steps[0].loss - math.log(50257)) < 0.3  # an untrained GPT-2 is uniformly unsure
    evals = of_type(events, "eval")
    assert [e.step for e in evals] == [0, 20, 40]  # step 0: before the first update
    assert abs(evals[0].val_loss - math.log(50257)) < 0.3 and evals[0].tokens_seen == 0
    assert evals[-1].val_loss < 2.0 and evals[-1].train_loss < 2.0
    assert evals[-1].val_perplexity == pytest.approx(math.exp(evals[-1].val_loss))
    assert [s.step for s in of_type(events, "sample")] == [20, 40]
    assert result.status == "completed" and result.step == 40 and result.val_loss == evals[-1].val_loss
    assert steps[-1].tokens_seen == 40 * 4 * 16 and steps[-1].tokens_per_second > 0

    meta = CheckpointStore().info("learn").meta
    assert meta["step"] == 40 and meta["val_loss"] == pytest.approx(evals[-1].val_loss)
    assert meta["training"]["max_steps"] == 40


def test_every_event_is_a_json_line_in_metrics_readable_during_the_run(corpus_file):
    store = CheckpointStore()
    seen_during_run = []

    def follow(event):
        if event.type == "step" and event.step == 2:
            seen_during_run.extend(store.read_metrics("run"))  # what another process tailing the file sees

    events, _ = run(small_settings(corpus_file), listeners=[follow])
    assert [r["type"] for r in seen_during_run] == ["start", "eval", "step", "step"]
    records = store.read_metrics("run")
    assert [r["type"] for r in records] == [e.type for e in events]
    assert records == [e.to_dict() for e in events]
    assert {"start", "step", "eval", "sample", "checkpoint", "finished"} <= {r["type"] for r in records}


def test_stop_and_resume_gives_the_same_weights_and_losses_bit_for_bit(corpus_file):
    """Dropout on, gradient accumulation, and an epoch boundary inside the run: all of it must continue exactly."""
    changes = dict(model={**SMALL_MODEL, "drop_rate": 0.1}, grad_accum=2, max_steps=8, eval_interval=3, lr=1e-3)
    straight, _ = run(small_settings(corpus_file, name="straight", **changes))

    control = TrainingControl()

    def stop_at_four(event):
        if event.type == "step" and event.step == 4:
            control.stop()

    first, stopped = run(small_settings(corpus_file, name="split", **changes), control, [stop_at_four])
    assert stopped.status == "stopped" and stopped.step == 4 and stopped.checkpoint == "split"
    second, resumed = run(resume_settings("split"))
    assert resumed.status == "completed" and resumed.step == 8
    assert of_type(second, "start")[0].resumed and of_type(second, "step")[0].step == 5

    def losses(events):
        return [(e.step, e.loss) for e in of_type(events, "step")], [
            (e.step, e.train_loss, e.val_loss) for e in of_type(events, "eval")
        ]

    assert losses(first + second) == losses(straight)
    assert of_type(straight, "start")[0].steps_per_epoch < 8  # the run did cross an epoch boundary
    store = CheckpointStore()
    a, b = store.load("straight").state_dict, store.load("split").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert store.load("split").meta["source"] == "trained from scratch"


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus_file):
    trainer_box = {}

    def poison(event):
        if event.type == "step" and event.step == 4:
            with torch.no_grad():
                trainer_box["trainer"].model.tok_emb.weight[:] = float("nan")

    settings = small_settings(corpus_file, name="nan", max_steps=10, save_interval=3)
    events: list = []
    trainer = Trainer(settings, listeners=[events.append, poison])
    trainer_box["trainer"] = trainer
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5.*'nan' \(step 3\) is kept"):
        trainer.run()

    failed = of_type(events, "failed")
    assert len(failed) == 1 and failed[0].kind == "diverged" and failed[0].last_good_step == 3
    assert not of_type(events, "finished")
    checkpoint = CheckpointStore().load("nan", with_state=True)
    assert checkpoint.meta["step"] == 3 and checkpoint.trainer_state["step"] == 3
    assert all(torch.isfinite(t).all() for t in checkpoint.state_dict.values())
    assert CheckpointStore().read_metrics("nan")[-1]["type"] == "failed"


def test_pause_blocks_between_steps_save_now_and_stop_work_from_another_thread(corpus_file):
    control = TrainingControl()
    events: list = []
    paused = threading.Event()
    saved_while_paused = threading.Event()

    def listener(event):
        events.append(event)
        if event.type == "step" and event.step == 2:
            control.pause()
        if event.type == "pause" and event.paused:
            paused.set()
        if event.type == "checkpoint" and event.reason == "requested":
            saved_while_paused.set()
        if event.type == "step" and event.step == 3:
            control.stop()

    trainer = Trainer(small_settings(corpus_file, max_steps=50), control=control, listeners=[listener])
    worker = threading.Thread(target=trainer.run)
    worker.start()
    try:
        assert paused.wait(120)
        control.save_now()
        assert saved_while_paused.wait(120)
        assert max(e.step for e in of_type(events, "step")) == 2  # nothing trained while paused
        control.resume()
        worker.join(120)
    finally:
        if worker.is_alive():  # a failed assertion above must not leave the run blocked
            control.stop()
            worker.join(120)
    assert not worker.is_alive()
    assert [e.reason for e in of_type(events, "checkpoint")] == ["requested", "stopped"]
    assert [e.paused for e in of_type(events, "pause")] == [True, False]
    assert of_type(events, "finished")[0].status == "stopped"
    assert CheckpointStore().info("run").meta["step"] == 3


def test_fine_tuning_from_a_checkpoint_starts_a_new_run_from_its_weights(corpus_file):
    base_events, _ = run(small_settings(corpus_file, name="base", max_steps=15, lr=1e-2, eval_interval=15))
    base = CheckpointStore().load("base").state_dict
    events, _ = run(small_settings(corpus_file, name="tuned", init_from="base", max_steps=1, lr=1e-9))
    start = of_type(events, "start")[0]
    assert start.step == 0 and not start.resumed and start.source == "fine-tuned from base"
    # It starts where the base run ended, not from an untrained model's ~10.8.
    assert of_type(events, "step")[0].loss < of_type(base_events, "step")[0].loss - 2
    tuned = CheckpointStore().load("tuned").state_dict
    assert all(torch.allclose(base[k], tuned[k], atol=1e-6) for k in base)


def test_bf16_autocast_training_stops_and_resumes_bit_for_bit(corpus_file):
    """bf16 autocast (on a CPU without bf16 instructions: oneDNN float32 on bf16-rounded operands) with dropout and
    gradient accumulation continues exactly where it stopped."""
    changes = dict(model={**SMALL_MODEL, "drop_rate": 0.1}, grad_accum=2, max_steps=4, lr=1e-3, dtype="bfloat16")
    straight, _ = run(small_settings(corpus_file, name="straight", **changes))
    control = TrainingControl()

    def stop_at_two(event):
        if event.type == "step" and event.step == 2:
            control.stop()

    first, _ = run(small_settings(corpus_file, name="split", **changes), control, [stop_at_two])
    second, resumed = run(resume_settings("split"))
    assert resumed.status == "completed" and resumed.step == 4
    assert [(e.step, e.loss) for e in of_type(first + second, "step")] == [
        (e.step, e.loss) for e in of_type(straight, "step")
    ]
    store = CheckpointStore()
    a, b = store.load("straight").state_dict, store.load("split").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_fine_tuned_run_resumes_like_any_other(corpus_file):
    run(small_settings(corpus_file, name="base", max_steps=2))
    run(small_settings(corpus_file, name="tuned", init_from="base", max_steps=2))
    events, _ = run(resume_settings("tuned", max_steps=4))
    start = of_type(events, "start")[0]
    assert start.resumed and start.step == 2 and start.source == "fine-tuned from base"
    assert CheckpointStore().info("tuned").get("step") == 4
    with pytest.raises(InputError, match="--resume continues a run and --from starts a new one"):
        resume_settings("tuned", init_from="base")


def test_an_existing_name_is_not_overwritten_by_accident(corpus_file):
    run(small_settings(corpus_file, max_steps=1))
    with pytest.raises(InputError, match="already exists.*--resume.*--overwrite"):
        run(small_settings(corpus_file, max_steps=1))
    with pytest.raises(InputError, match="--batch-size cannot change when resuming"):
        resume_settings("run", batch_size=2)
    events, _ = run(small_settings(corpus_file, max_steps=1, overwrite=True))
    assert [r["type"] for r in CheckpointStore().read_metrics("run")][0] == "start"  # the old run's log is gone
    assert len(of_type(events, "start")) == 1


def test_overfitting_warning_needs_val_rising_while_train_falls():
    watch = OverfittingWatch(evals=3)
    assert [watch.update(t, v) for t, v in [(3.0, 3.0), (2.5, 3.1), (2.0, 3.2)]] == [None, None, None]
    message = watch.update(1.5, 3.3)
    assert message and "rose for 3 evaluations" in message
    assert watch.update(1.0, 3.4) is None  # warned once, not at every evaluation
    watch2 = OverfittingWatch(evals=3)
    assert all(watch2.update(t, v) is None for t, v in [(3.0, 3.0), (2.5, 3.1), (2.6, 3.2), (2.0, 3.3)])


def test_learning_rate_warms_up_then_decays_to_the_floor():
    lrs = [learning_rate(s, peak=1.0, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[20] == pytest.approx(0.1)


def test_evaluate_ids_scores_every_token_once():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    ids = torch.randint(0, 97, (30,))
    result = evaluate_ids(model, ids.to(torch.uint16), batch_size=2)
    assert result.tokens == 29
    model.eval()
    with torch.no_grad():
        nll = 0.0
        for start in range(0, 29, 8):
            chunk = ids[start : start + 9]
            logits = model(chunk[None, :-1])[0]
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
    assert result.loss == pytest.approx(nll / 29, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
