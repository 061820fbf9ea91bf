"""The store against real processes and real disks: two writers racing for a lock, broken lock files, a full disk
(a small tmpfs filled to the edge) and a read-only data folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gpt2term.cli import cli
from gpt2term.core.config import GPTConfig
from gpt2term.core.data import load_corpus
from gpt2term.core.errors import CheckpointError, StorageError
from gpt2term.core.interop import export_book_pth, export_hf
from gpt2term.core.model import GPTModel
from gpt2term.core.store.locks import LOCK_GRACE_S, CheckpointLocked
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.training import Trainer, TrainingSettings

TINY = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
SMALL = ["--emb-dim", "8", "--n-layers", "1", "--n-heads", "2", "--context-length", "16", "--batch-size", "4"]
DEADLINE_S = 120


def tiny_model(seed: int) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(TINY).eval()


def hidden_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.exists() else []


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(["Once upon a time there was a small model.", "It learned to count: one, two."] * 40))
    return path


# ------------------------------------------------------------------------------------------------ the lock


RACER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from gpt2term.core.store.locks import CheckpointLocked
    from gpt2term.core.store.store import CheckpointStore

    store, signals, rounds = CheckpointStore(Path(sys.argv[1])), Path(sys.argv[2]), int(sys.argv[3])
    print("ready", flush=True)
    for i in range(rounds):
        go = signals / f"go-{i}"
        while not go.exists():  # both racers spin here, so they reach the lock at the same moment
            pass
        try:
            lock = store.lock("run").acquire()
            print(f"{i} got", flush=True)
        except CheckpointLocked as exc:
            lock = None
            print(f"{i} refused {exc}", flush=True)
        sys.stdin.readline()  # the parent has seen both answers
        if lock is not None:
            lock.release()
        print(f"{i} released", flush=True)
    """
)


def test_two_processes_starting_at_the_same_moment_never_both_get_the_lock(tmp_path):
    rounds = 40
    root, signals = tmp_path / "store", tmp_path / "signals"
    root.mkdir()
    signals.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(root), str(signals), str(rounds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        for racer in racers:
            assert racer.stdout.readline().strip() == "ready", racer.stderr.read()
        winners = []
        for i in range(rounds):
            (signals / f"go-{i}").touch()
            answers = [racer.stdout.readline().strip() for racer in racers]
            got = [n for n, answer in enumerate(answers) if answer == f"{i} got"]
            assert len(got) == 1, f"round {i}: {answers}"
            winners.append(got[0])
            loser = answers[1 - got[0]]
            assert f"process {racers[got[0]].pid}" in loser  # the refusal names the holder, read from a whole lock
            for racer in racers:
                racer.stdin.write("\n")
                racer.stdin.flush()
            assert [racer.stdout.readline().strip() for racer in racers] == [f"{i} released"] * 2
            assert hidden_entries(root) == []  # no lock, no half-made lock file left
        for racer in racers:
            racer.stdin.close()
            assert racer.wait(timeout=DEADLINE_S) == 0, racer.stderr.read()
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()


def test_a_lock_naming_an_impossible_process_is_a_clear_error(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    store.save("run", tiny_model(1))
    lock_file = store.lock_path("run")
    lock_file.write_text(json.dumps({"pid": 10**20, "host": socket.gethostname(), "token": "x"}))
    for attempt in (lambda: store.lock("run").acquire(), lambda: store.save("run", tiny_model(2))):
        with pytest.raises(CheckpointError, match=r"process id 100000000000000000000.*remove it") as caught:
            attempt()
        assert str(lock_file) in str(caught.value) and "\n" not in str(caught.value)
    assert store.lock_holder("run") is None and [row.name for row in store.list()] == ["run"]
    assert store.load("run").meta["step"] is None and lock_file.exists()  # untouched: the user decides


def test_a_lock_path_that_is_a_folder_is_a_clear_error(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    store.save("run", tiny_model(1))
    store.lock_path("run").mkdir()
    for attempt in (lambda: store.lock("run").acquire(), lambda: store.save("run", tiny_model(2))):
        with pytest.raises(CheckpointError, match=r"is a folder, not a lock file; remove it"):
            attempt()
    assert [row.name for row in store.list()] == ["run"] and store.lock_path("run").is_dir()


def test_an_unreadable_lock_is_held_while_young_and_stale_once_old(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    store.root.mkdir(parents=True)
    lock_file = store.lock_path("run")
    for content in ("", '{"pid": 12'):  # just created by a writer (older versions wrote it after creating it)
        lock_file.write_text(content)
        with pytest.raises(CheckpointLocked, match="being locked by another process right now"):
            store.lock("run").acquire()
        assert store.lock_holder("run") is not None
    old = time.time() - LOCK_GRACE_S - 1  # left half-written by a process killed long ago
    os.utime(lock_file, (old, old))
    assert store.lock_holder("run") is None
    with store.lock("run"):
        assert store.lock_holder("run").pid == os.getpid()
    assert hidden_entries(store.root) == []


# ------------------------------------------------------------------------------------------------ disks


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 32 MiB tmpfs as GPT2TERM_HOME: a real file system that can be filled up, or remounted read-only."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {done.stderr.strip()}")
    monkeypatch.setenv("GPT2TERM_HOME", str(mount_point))
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Take all the free space of `disk` but `leave` bytes, in one file (deleting it frees the space again)."""
    filler = disk / f"filler-{leave}"
    stat = os.statvfs(disk)
    size = stat.f_bavail * stat.f_frsize - leave
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize <= leave
    return filler


@pytest.mark.parametrize(
    ("leave", "fails_in"),
    [(0, "the lock file"), (16 << 10, "model.safetensors"), (600 << 10, "optimizer.pt")],
)
def test_a_save_on_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(small_disk, leave, fails_in):
    store = CheckpointStore()
    optimizer_state = {"state": {0: {"exp_avg": torch.zeros(400_000)}}, "param_groups": []}  # 1.6 MB
    store.save("run", tiny_model(1), meta={"step": 1}, optimizer_state=optimizer_state)
    before = store.load("run", with_state=True)
    fill(small_disk, leave)
    with pytest.raises(StorageError) as caught:
        store.save("run", tiny_model(2), meta={"step": 2}, optimizer_state=optimizer_state)
    message = str(caught.value)
    assert "\n" not in message and "the disk is full" in message and str(store.root) in message
    assert "free of" in message and "the previous checkpoint 'run' (step 1) is intact" in message
    after = store.load("run", with_state=True)
    assert after.meta["step"] == 1
    assert all(torch.equal(before.state_dict[k], after.state_dict[k]) for k in before.state_dict)
    assert torch.equal(after.optimizer_state["state"][0]["exp_avg"], optimizer_state["state"][0]["exp_avg"])
    assert hidden_entries(store.root) == []  # no temporary folder, no lock file


def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(small_disk):
    model = tiny_model(1)
    fill(small_disk, leave=16 << 10)  # room to start writing, not to finish
    for export, target in ((export_hf, small_disk / "hf"), (export_book_pth, small_disk / "book.pth")):
        with pytest.raises(StorageError, match=r"could not export to .*: the disk is full at") as caught:
            export(model.state_dict(), TINY, target)
        assert "\n" not in str(caught.value) and str(target) in str(caught.value)
    assert sorted(p.name for p in small_disk.rglob("*") if p.is_file()) == ["filler-16384"]


def test_tokenizing_a_corpus_onto_a_full_disk_is_one_line_and_leaves_nothing(small_disk, corpus_file):
    fill(small_disk)
    with pytest.raises(StorageError, match=r"could not cache the tokenized corpus: the disk is full at") as caught:
        load_corpus([str(corpus_file)])
    assert "\n" not in str(caught.value) and str(small_disk / "cache") in str(caught.value)
    assert [p for p in (small_disk / "cache").rglob("*") if p.is_file()] == []


def test_the_tokenizer_cache_on_a_full_disk_is_skipped_and_leaves_nothing(small_disk):
    from gpt2term.core import tokenizer as tokmod

    fill(small_disk, leave=400 << 10)  # room to start writing the 835 kB ranks file, not to finish
    ranks = tokmod._bundled_ranks(tokmod._bundled_bpe_files())
    assert len(ranks) == 50256
    assert [p.name for p in small_disk.rglob("*") if p.is_file()] == ["filler-409600"]


def test_train_on_a_full_disk_is_one_line_exit_2_and_leaves_no_lock(small_disk, corpus_file):
    fill(small_disk)
    command = [sys.executable, "-m", "gpt2term", "train", str(corpus_file), "--name", "run", *SMALL, "--max-steps", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not lock checkpoint 'run': the disk is full at")
    assert hidden_entries(small_disk / "checkpoints") == []  # no 0-byte lock left to block the next try


def test_a_disk_filling_up_mid_run_stops_it_with_one_line_and_the_last_save_intact(small_disk, corpus_file):
    command = [sys.executable, "-m", "gpt2term", "train", str(corpus_file), "--name", "run", *SMALL,
               "--max-steps", "1000", "--save-interval", "2", "--eval-interval", "1000", "--json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    events = []
    try:
        for line in process.stdout:  # the run has saved once: freeze it, fill the disk, let it go on
            events.append(json.loads(line))
            if events[-1]["type"] == "checkpoint":
                process.send_signal(signal.SIGSTOP)
                fill(small_disk)
                process.send_signal(signal.SIGCONT)
                break
        else:
            pytest.fail(process.stderr.read())
        events += [json.loads(line) for line in process.stdout]
        assert process.wait(timeout=DEADLINE_S) == 2
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read()
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: could not save checkpoint 'run': the disk is full at")
    last_saved = [e["step"] for e in events if e["type"] == "checkpoint"][-1]  # saves may land before the freeze
    assert f"the previous checkpoint 'run' (step {last_saved}) is intact" in errors[0]
    assert events[-1]["type"] == "failed" and events[-1]["last_good_step"] == last_saved
    store = CheckpointStore()
    assert store.load("run", with_state=True).meta["step"] == last_saved
    assert hidden_entries(store.root) == []  # lock released, temporary folder removed


def test_metrics_appends_failing_mid_run_do_not_lose_the_run(small_disk, corpus_file):
    store = CheckpointStore()
    settings = TrainingSettings(
        name="run", corpus=[str(corpus_file)], model={"emb_dim": 8, "n_layers": 1, "n_heads": 2},
        context_length=16, batch_size=4, max_steps=8, eval_interval=4, eval_iters=1, save_interval=0, sample_tokens=2,
    )  # fmt: skip
    events, filler = [], []

    def disk(event) -> None:
        events.append(event)
        if event.type == "step" and event.step == 2:
            filler.append(fill(small_disk))  # steps 3..5 (and an eval) cannot be appended
            # ... once the last page of metrics.jsonl is used up too: a blank line (readers skip it) fills it.
            metrics = store.metrics_path("run")
            with open(metrics, "ab") as f:
                f.write(b" " * (-(metrics.stat().st_size + 1) % os.statvfs(small_disk).f_frsize) + b"\n")
        elif event.type == "step" and event.step == 5:
            filler.pop().unlink()  # room again before the final save

    result = Trainer(settings, store=store, listeners=[disk]).run()
    assert result.status == "completed" and store.load("run").meta["step"] == 8
    warnings = [e for e in events if e.type == "warning" and e.kind == "metrics-unwritten"]
    assert len(warnings) == 1 and "the disk is full" in warnings[0].message and "\n" not in warnings[0].message
    records = store.read_metrics("run")
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == list(range(1, 9))  # every step, in order: the refused lines were written once there was room
    assert [r["type"] for r in records].count("warning") == 1 and records[-1]["type"] == "finished"


def test_generate_works_on_a_read_only_or_full_data_folder(small_disk):
    store = CheckpointStore()
    torch.manual_seed(0)
    store.save("run", GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=8, n_heads=2, n_layers=1)))
    command = ["generate", "Hello", "-c", "run", "-n", "3", "--no-stop", "--json"]
    remount = ["mount", "-o", "remount,ro", str(small_disk)]
    assert subprocess.run(remount, capture_output=True).returncode == 0
    with pytest.raises(OSError):
        (small_disk / "probe").touch()
    read_only = CliRunner().invoke(cli, command, catch_exceptions=False)
    assert subprocess.run([*remount[:2], "remount,rw", str(small_disk)], capture_output=True).returncode == 0
    fill(small_disk)
    full = CliRunner().invoke(cli, command, catch_exceptions=False)
    for done in (read_only, full):
        assert done.exit_code == 0, done.output
        assert json.loads(done.stdout.splitlines()[-1])["summary"]["tokens"] == 3
    assert read_only.stdout.splitlines()[:3] == full.stdout.splitlines()[:3]  # greedy: the same tokens
    assert hidden_entries(small_disk) == []  # no half-written state file left
