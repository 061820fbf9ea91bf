"""The loss surface (issue 15, part 3): filter-normalised directions checked against a quadratic known in closed
form, the centre equal to the trainer's own validation loss and to `evaluate_ids`, exact restores, the cache
beside the weights, cancel, and the command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gpt2term.cli import cli
from gpt2term.core.data import load_corpus
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.surface import (
    SURFACE_FILE,
    SurfaceCancelled,
    SurfaceOptions,
    alphas,
    compute_surface,
    filter_normalised_direction,
    loss_surface,
    prepare_target,
)
from gpt2term.core.training import Trainer, TrainingSettings, evaluate_ids
from gpt2term.core.training import evaluation as evaluation_module

CONTEXT = 16


class Quadratic(nn.Module):
    """loss = sum(a * w^2) + sum(c * b^2): its surface along any direction is known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.w = nn.Parameter(torch.randn(3, 4))
        self.b = nn.Parameter(torch.randn(4))
        self.a = torch.rand(3, 4) + 0.5
        self.c = torch.rand(4) + 0.5

    def loss(self) -> float:
        with torch.no_grad():
            return float((self.a * self.w**2).sum() + (self.c * self.b**2).sum())


def closed_form(toy: Quadratic, w: torch.Tensor, b: torch.Tensor) -> float:
    return float((toy.a * w.double() ** 2).sum() + (toy.c * b.double() ** 2).sum())


def test_the_surface_of_a_quadratic_along_filter_normalised_directions_is_the_closed_form_at_every_point():
    toy = Quadratic()
    w0, b0 = toy.w.detach().clone(), toy.b.detach().clone()
    other = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    options = SurfaceOptions(grid=5, points=7, seed=11)
    result = compute_surface(toy, toy.loss, options, other=other, path_from="a random point")

    generator = torch.Generator().manual_seed(11)
    d1 = filter_normalised_direction({"w": w0, "b": b0}, generator)
    d2 = filter_normalised_direction({"w": w0, "b": b0}, generator)
    # Filter-normalised: each row of the direction as long as the same row of the weights; no bias direction.
    assert torch.allclose(d1["w"].norm(dim=1), w0.norm(dim=1), rtol=1e-6)
    assert torch.equal(d1["b"], torch.zeros(4)) and not torch.allclose(d1["w"], d2["w"])
    assert result.center_loss == pytest.approx(closed_form(toy, w0, b0), rel=1e-6)
    for point in result.line:
        expected = closed_form(toy, w0 + point["alpha"] * d1["w"], b0)
        assert point["loss"] == pytest.approx(expected, rel=1e-5)
    assert [p["alpha"] for p in result.line] == alphas(7) and result.line[3]["alpha"] == 0.0
    for j, beta in enumerate(result.grid_alphas):
        for i, alpha in enumerate(result.grid_alphas):
            expected = closed_form(toy, w0 + alpha * d1["w"] + beta * d2["w"], b0)
            assert result.grid[j][i] == pytest.approx(expected, rel=1e-5)
    for point in result.path:  # the path moves every parameter, biases too
        t = point["alpha"]
        expected = closed_form(toy, (1 - t) * other["w"] + t * w0, (1 - t) * other["b"] + t * b0)
        assert point["loss"] == pytest.approx(expected, rel=1e-5)
    assert result.path[0]["loss"] == pytest.approx(closed_form(toy, other["w"], other["b"]), rel=1e-6)
    assert result.evaluations == options.evaluations == 1 + 6 + 24 + 6
    # The slice is the grid's beta-0 row along the same first direction: the same weights, the same numbers.
    middle = result.grid[len(result.grid_alphas) // 2]
    assert middle[0] == result.line[0]["loss"] and middle[-1] == result.line[-1]["loss"]
    # Restored bit for bit.
    assert torch.equal(toy.w, w0) and torch.equal(toy.b, b0)


def test_cancel_stops_between_points_and_restores_the_weights():
    toy = Quadratic()
    w0 = toy.w.detach().clone()
    stop = threading.Event()
    seen = []

    def progress(p) -> None:
        seen.append(p.done)
        if p.done == 3:
            stop.set()

    with pytest.raises(SurfaceCancelled):
        compute_surface(toy, toy.loss, SurfaceOptions(), other={"w": w0, "b": toy.b}, path_from="x",
                        progress=progress, cancel=stop)  # fmt: skip
    assert max(seen) == 3
    assert torch.equal(toy.w, w0)


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = ["The quick brown fox jumps over the lazy dog.", "A stitch in time saves nine.", "Every effort moves."]
    path.write_text("\n".join(lines * 40))
    return path


def train_run(corpus_file, name: str = "run", **changes) -> None:
    values = dict(
        name=name,
        corpus=[str(corpus_file)],
        model={"emb_dim": 32, "n_layers": 1, "n_heads": 2, "drop_rate": 0.1},
        context_length=CONTEXT,
        batch_size=4,
        max_steps=4,
        lr=3e-3,
        eval_interval=4,
        eval_iters=2,
        save_interval=0,
        sample_tokens=0,
    )
    values.update(changes)
    Trainer(TrainingSettings(**values)).run()


def test_the_centre_is_the_trainers_validation_loss_and_evaluate_ids_on_the_same_windows(corpus_file):
    train_run(corpus_file)
    store = CheckpointStore()
    meta = store.info("run").meta
    # The trainer's last evaluation: 2 batches of 4 windows from evaluation_batches, on the saved weights.
    result = loss_surface("run", SurfaceOptions(grid=3, points=3, batches=2, batch_size=4))
    assert result.center_loss == pytest.approx(meta["val_loss"], abs=1e-6)
    # Every validation window (evaluation_batches takes them all, in order): what `gpt2term eval` computes.
    everything = SurfaceOptions(grid=2, points=2, batches=1000, batch_size=8)
    target = prepare_target("run", everything)
    windows = len(target.dataset)
    assert [int(i) for b in target.batches for i in b] == list(range(windows))
    corpus = load_corpus([str(corpus_file)])
    expected = evaluate_ids(target.model, corpus.val_ids, context_length=CONTEXT, max_tokens=windows * CONTEXT)
    assert target.loss() == pytest.approx(expected.loss, abs=1e-6)
    # The model the surface moved is back to the checkpoint's weights, bit for bit, and in eval mode.
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    compute_surface(target.model, target.loss, everything, other=target.other, path_from="init")
    after = target.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = store.load("run").state_dict
    assert all(torch.equal(saved[k], after[k]) for k in saved)


def test_the_path_starts_at_the_runs_initialisation(corpus_file):
    train_run(corpus_file)
    result = loss_surface("run", SurfaceOptions(grid=2, points=3, batches=1, batch_size=4))
    # The untrained GPT-2 (seed 123) is uniformly unsure: ln(50257) at the path's start.
    assert result.path[0]["loss"] == pytest.approx(10.82, abs=0.3)
    assert result.path[-1]["loss"] == result.center_loss < result.path[0]["loss"]
    assert "seed 123" in result.path_from
    target = prepare_target("run", SurfaceOptions(grid=2, points=3, batches=1, batch_size=4))
    torch.manual_seed(123)
    fresh = GPTModel(target.model.cfg).state_dict()  # what `train` starts the run from (seed 123, init gpt2)
    assert all(torch.equal(fresh[k], target.other[k]) for k in fresh)


def count_evaluations(monkeypatch) -> list[int]:
    calls = [0]
    real = evaluation_module.mean_loss

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation_module, "mean_loss", counting)
    return calls


def test_the_cache_opens_without_evaluating_and_a_changed_or_damaged_one_recomputes(corpus_file, monkeypatch):
    train_run(corpus_file)
    store = CheckpointStore()
    calls = count_evaluations(monkeypatch)
    options = SurfaceOptions(grid=3, points=3, batches=1, batch_size=4)
    first = loss_surface("run", options)
    assert calls[0] == options.evaluations and not first.from_cache
    cache = store.path("run") / SURFACE_FILE
    assert json.loads(cache.read_text())["entries"][0]["result"]["center_loss"] == first.center_loss
    again = loss_surface("run", options)
    assert calls[0] == options.evaluations and again.from_cache
    assert again.grid == first.grid and again.line == first.line and again.path == first.path
    assert store.info("run").damaged is None  # `ckpt list` still trusts the folder
    # Other options: computed (and kept beside the first).
    loss_surface("run", SurfaceOptions(grid=3, points=3, batches=1, batch_size=4, seed=5))
    assert calls[0] == 2 * options.evaluations
    assert loss_surface("run", options).from_cache
    # A damaged cache file is ignored and written again.
    cache.write_text("{not json")
    assert not loss_surface("run", options).from_cache
    assert calls[0] == 3 * options.evaluations and json.loads(cache.read_text())["entries"]
    # Changed weights (a newer save of the checkpoint): recomputed.
    weights = store.path("run") / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not loss_surface("run", options).from_cache
    assert calls[0] == 4 * options.evaluations


def test_a_full_disk_computes_warns_and_caches_nothing(corpus_file, tmp_path):
    train_run(corpus_file)
    mount = tmp_path / "full"
    mount.mkdir()
    folder = CheckpointStore().path("run")
    size = sum(f.stat().st_size for f in folder.iterdir()) + 2**20
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True,
                       capture_output=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); this test needs root")
    try:
        subprocess.run(["cp", "-a", str(folder), str(mount / "run")], check=True)
        fd = os.open(mount / "filler", os.O_CREAT | os.O_WRONLY)
        try:  # fill the disk to the last byte
            for size in (65536, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)
        result = loss_surface(str(mount / "run"), SurfaceOptions(grid=2, points=2, batches=1, batch_size=4))
        assert [n for n in result.notices if "could not cache the loss surface: the disk is full" in n]
        assert sorted(p.name for p in (mount / "run").iterdir()) == sorted(p.name for p in folder.iterdir())
    finally:  # lazily when busy (weights still mapped by this process): never leave a mount behind
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_the_command_prints_json_and_the_pictures(corpus_file):
    train_run(corpus_file)
    runner = CliRunner()
    args = ["inspect", "surface", "run", "--grid", "3", "--points", "3", "--batch-size", "4"]
    out = runner.invoke(cli, [*args, "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    engine = loss_surface("run", SurfaceOptions(grid=3, points=3, batch_size=4), use_cache=False)
    assert data["center_loss"] == pytest.approx(engine.center_loss, abs=1e-9)
    assert [p["alpha"] for p in data["line"]] == [-1.0, 0.0, 1.0]
    assert (
        len(data["grid"]) == 3
        and all(len(row) == 3 for row in data["grid"])
        and data["grid"][1][1] == data["center_loss"]
    )
    assert [p["alpha"] for p in data["path"]] == [0.0, 0.5, 1.0] and data["path_shape"] in ("basin", "barrier")
    assert "about" in out.stderr and "3x3 grid + 3 line points + 3 path points" in out.stderr
    text = runner.invoke(cli, args)
    assert text.exit_code == 0
    assert f"validation loss at the checkpoint: {engine.center_loss:.4f}" in text.stdout
    assert (
        "(from the cache)" in text.stdout
        and "◆◆" in text.stdout
        and ("basin:" in text.stdout or "barrier:" in text.stdout)
    )
    bad = runner.invoke(cli, ["inspect", "surface", "no-such-run"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1


def test_ctrl_c_stops_the_command_at_once_and_caches_nothing(corpus_file):
    train_run(corpus_file)
    env = dict(os.environ)
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2term", "inspect", "surface", "run", "--grid", "40", "--batches", "8"],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for the first point (the estimate) before interrupting
        line = process.stderr.readline()
        lines.append(line)
        if line.startswith("about ") or not line:
            break
    assert any(line.startswith("about ") for line in lines), lines
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Ctrl-C: the loss surface stopped; nothing cached" in err
    assert not (CheckpointStore().path("run") / SURFACE_FILE).exists()
