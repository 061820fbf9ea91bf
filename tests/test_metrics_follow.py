"""Following a run's metrics.jsonl from outside: new lines only, half-written lines wait, replaced files reopened."""

from __future__ import annotations

import json
import os
import shutil

import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.follow import MetricsFollower
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.training import EvalEvent, StartEvent, StepEvent, event_from_dict


def step(n: int) -> dict:
    return StepEvent(
        step=n, total_steps=10, epoch=1, loss=10.0 - n, lr=1e-3, grad_norm=1.0, tokens_seen=64 * n,
        tokens_per_second=100.0, elapsed_s=float(n), eta_s=1.0,
    ).to_dict()  # fmt: skip


def start(name: str = "run") -> dict:
    return StartEvent(
        name=name, step=0, total_steps=10, epoch=1, resumed=False, source="trained from scratch", parameters=1,
        config={}, device="cpu", dtype="float32", world_size=1, corpus="pydoc", train_tokens=100, val_tokens=10,
        tokens_per_step=64, steps_per_epoch=2.0, settings={},
    ).to_dict()  # fmt: skip


def append(path, *records: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def test_events_come_back_from_their_json_lines_and_unknown_ones_are_skipped():
    record = json.loads(json.dumps(step(3)))
    event = event_from_dict(record)
    assert isinstance(event, StepEvent) and event.to_dict() == record
    evaluation = EvalEvent(step=2, epoch=1, tokens_seen=5, train_loss=1.0, val_loss=2.0, train_perplexity=2.7,
                           val_perplexity=7.4)  # fmt: skip
    assert event_from_dict({**evaluation.to_dict(), "added_later": 1}) == evaluation
    assert event_from_dict({"type": "step", "step": 1}) is None  # fields missing
    assert event_from_dict({"type": "telemetry"}) is None


def test_only_new_complete_lines_are_returned(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsFollower(path) as follower:
        assert follower.poll().records == []  # not written yet
        append(path, start(), step(1))
        assert [r["type"] for r in follower.poll().records] == ["start", "step"]
        assert follower.poll().records == []
        line = json.dumps(step(2))
        with open(path, "a") as f:
            f.write(line[:20])  # the writer is in the middle of a line
        assert follower.poll().records == []
        with open(path, "a") as f:
            f.write(line[20:] + "\nnot json\n")
        assert [r["step"] for r in follower.poll().records] == [2]


def test_a_long_file_is_read_a_chunk_at_a_time(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append(path, start(), *[step(n) for n in range(1, 200)])
    follower = MetricsFollower(path, chunk_bytes=4096)
    seen, polls = [], 0
    while True:
        update = follower.poll()
        polls += 1
        seen += [r["step"] for r in update.records]
        if not update.more:
            break
    assert seen == list(range(0, 200)) and polls > 5


def test_a_copy_put_in_place_continues_and_another_runs_file_starts_over(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append(path, start(), step(1), step(2))
    follower = MetricsFollower(path)
    assert len(follower.poll().records) == 3
    # A save without hard links: the same history copied to a new file (new inode), then one more line.
    copy = tmp_path / "copy.jsonl"
    shutil.copy2(path, copy)
    append(copy, step(3))
    os.replace(copy, path)
    update = follower.poll()
    assert follower.reopened == 1 and not update.reset
    assert [r["step"] for r in update.records] == [3]
    # `train --overwrite`: a new run's file at the same path.
    other = tmp_path / "other.jsonl"
    append(other, start("again"), step(1))
    os.replace(other, path)
    update = follower.poll()
    assert update.reset and [r["type"] for r in update.records] == ["start", "step"]
    assert update.records[0]["name"] == "again"


def test_following_survives_the_stores_saves_of_the_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=64, emb_dim=16, n_heads=2, n_layers=1, context_length=8))
    store.append_metrics("run", start())
    follower = MetricsFollower(store.metrics_path("run"))
    assert len(follower.poll().records) == 1
    for n in (1, 2):
        store.append_metrics("run", step(n))
        store.save("run", model, meta={"step": n})  # renames a new folder into place, metrics carried over
    store.append_metrics("run", step(3))
    update = follower.poll()
    assert not update.reset and [r["step"] for r in update.records] == [1, 2, 3]
    assert [r["step"] for r in store.read_metrics("run")] == [0, 1, 2, 3]
