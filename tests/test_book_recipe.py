"""`--recipe book`: chapter 5's run in one word, proven against a loop written the way the course writes it."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from gpt2term.cli import cli
from gpt2term.core.config import PRESETS, GPTConfig
from gpt2term.core.errors import InputError
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.training import Trainer, TrainingSettings
from gpt2term.core.training.trainer import _RunPlan

SMALL = {"emb_dim": 64, "n_layers": 2, "n_heads": 2}  # the book's 124M is too slow for a test; the recipe is not


@pytest.fixture(scope="module")
def pydoc_file(tmp_path_factory):
    """About 200 KB of Python's own documentation (what `pydoc` trains on), as a user's text file."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics) if topics[key].strip())[:200_000]
    path = tmp_path_factory.mktemp("corpus") / "pydoc.txt"
    path.write_text(text)
    return path


def book_settings(corpus, **given) -> TrainingSettings:
    return TrainingSettings.from_recipe("book", name="book", corpus=[str(corpus)], **given)


def test_the_book_recipe_is_chapter_5s_run():
    s = TrainingSettings.from_recipe("book", name="b")
    s.validate()
    cfg = PRESETS[s.preset].with_(**s.model, context_length=s.context_length)
    assert cfg == GPTConfig(context_length=256, emb_dim=768, n_heads=12, n_layers=12, drop_rate=0.1, qkv_bias=False)
    assert (s.lr, s.weight_decay, s.schedule, s.warmup_steps, s.grad_clip) == (4e-4, 0.1, "constant", 0, None)
    assert (s.batch_size, s.stride, s.epochs, s.max_steps) == (2, None, 10, None)  # stride None: the context, 256
    assert (s.eval_interval, s.eval_iters, s.eval_timing, s.eval_at_start) == (5, 5, "book", True)
    assert (s.sample_prompt, s.sample_every, s.seed, s.val_ratio) == ("Every effort moves you", "epoch", 123, 0.1)
    assert s.recipe == "book" and s.to_dict()["recipe"] == "book"
    # Every setting stays overridable; a length in steps replaces the recipe's epochs.
    o = TrainingSettings.from_recipe("book", name="b", lr=1e-3, max_steps=7, model={"emb_dim": 64, "qkv_bias": True})
    assert (o.lr, o.max_steps, o.epochs, o.schedule) == (1e-3, 7, None, "constant")
    assert o.model == {"qkv_bias": True, "drop_rate": 0.1, "emb_dim": 64}
    assert TrainingSettings.from_recipe("default", name="d") == TrainingSettings(name="d")
    with pytest.raises(InputError, match="unknown recipe 'nope'; choose one of: default, book"):
        TrainingSettings.from_recipe("nope", name="b")


def test_a_fresh_gpt2_124m_without_qkv_bias_is_what_the_book_recipe_trains(pydoc_file, monkeypatch):
    """The recipe's own model (no override), built as the trainer builds it, stopped before its first update."""
    built = {}

    def stop_after_build(self, plan, checkpoint):
        built["plan"], built["model"] = plan, self.model
        raise KeyboardInterrupt

    original = Trainer._build

    def build(self, plan, checkpoint):
        state = original(self, plan, checkpoint)
        stop_after_build(self, plan, checkpoint)
        return state

    monkeypatch.setattr(Trainer, "_build", build)
    with pytest.raises(KeyboardInterrupt):
        Trainer(book_settings(pydoc_file)).run()
    plan, model = built["plan"], built["model"]
    assert plan.cfg.qkv_bias is False and plan.cfg.emb_dim == 768 and plan.context_length == 256
    assert plan.train_set.stride == 256 and plan.batches.batch_size == 2
    assert model.trf_blocks[0].att.W_query.bias is None and model.num_parameters() == plan.cfg.parameters()


def test_the_book_recipe_starts_from_the_books_initial_weights():
    """The book seeds 123 and builds its GPTModel with PyTorch's default init of each layer, in its order: tok_emb,
    pos_emb, then per block W_query, W_key, W_value, out_proj and the two feed-forward layers (its LayerNorms draw
    nothing), then out_head. The recipe's `init="book"` must hold exactly those weights; GPT-2's init does not."""
    assert TrainingSettings.from_recipe("book", name="b").init == "book"
    cfg = GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=2, qkv_bias=False)
    e = cfg.emb_dim
    torch.manual_seed(123)
    drawn = [torch.nn.Embedding(cfg.vocab_size, e).weight, torch.nn.Embedding(cfg.context_length, e).weight]
    for _ in range(cfg.n_layers):
        drawn += [torch.nn.Linear(e, e, bias=False).weight for _ in range(3)]
        for fan_in, fan_out in ((e, e), (e, 4 * e), (4 * e, e)):
            layer = torch.nn.Linear(fan_in, fan_out)
            drawn += [layer.weight, layer.bias]
    drawn.append(torch.nn.Linear(e, cfg.vocab_size, bias=False).weight)
    for init, same in (("book", True), ("gpt2", False)):
        torch.manual_seed(123)
        model = GPTModel(cfg, init=init)
        ours = [p for name, p in model.named_parameters() if not name.endswith(("scale", "shift"))]
        assert len(ours) == len(drawn)
        assert all(torch.equal(a, b) for a, b in zip(ours, drawn, strict=True)) is same, init


def reference_loop(plan: _RunPlan, seed: int, steps: int, eval_freq: int, lr: float, weight_decay: float):
    """Chapter 5's `train_model_simple`, written from the course, fed the trainer's own batches in its order."""
    torch.manual_seed(seed)
    model = GPTModel(plan.cfg, init="book")  # the course's model, not accelerated, with the book's initial weights
    initial = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def calc_loss_batch(inputs, targets):
        logits = model(inputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def calc_loss_loader(dataset, batches):
        total = 0.0
        for index in batches:
            total += calc_loss_batch(*dataset.batch(index)).item()
        return total / len(batches)

    def evaluate_model():
        model.eval()
        with torch.no_grad():
            train_loss = calc_loss_loader(plan.train_set, plan.train_eval)
            val_loss = calc_loss_loader(plan.val_set, plan.val_eval)
        model.train()
        return train_loss, val_loss

    model.train()
    losses, evals = [], [(0, *evaluate_model())]
    global_step = -1
    epoch, position = 0, 0
    for _ in range(steps):
        inputs, targets = plan.train_set.batch(plan.batches.indices(epoch, position))
        position += 1
        if position == plan.batches.batches_per_epoch:
            epoch, position = epoch + 1, 0
        optimizer.zero_grad()
        loss = calc_loss_batch(inputs, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        global_step += 1
        if global_step % eval_freq == 0:
            evals.append((global_step + 1, *evaluate_model()))
    return initial, losses, evals


def test_the_book_recipe_gives_the_reference_loops_losses_step_by_step(pydoc_file, monkeypatch, capsys):
    steps = 11  # the book's evaluations after updates 1, 6 and 11
    settings = book_settings(
        pydoc_file, model=dict(SMALL), context_length=32, max_steps=steps, eval_iters=3, sample_tokens=0
    )
    settings.save_interval = 0
    seen = {}
    original_build = Trainer._build

    def build(self, plan, checkpoint):
        state = original_build(self, plan, checkpoint)
        seen["plan"], seen["initial"] = plan, copy.deepcopy(self.model.state_dict())
        return state

    monkeypatch.setattr(Trainer, "_build", build)
    events = []
    Trainer(settings, listeners=[events.append]).run()
    ours = [e.loss for e in events if e.type == "step"]
    our_evals = [(e.step, e.train_loss, e.val_loss) for e in events if e.type == "eval"]
    assert [e.lr for e in events if e.type == "step"] == [4e-4] * steps

    plan = seen["plan"]
    assert plan.cfg.drop_rate == 0.1 and plan.cfg.qkv_bias is False
    assert [len(b) for b in plan.train_eval + plan.val_eval] == [2] * 6  # full batches: a mean of batch means
    initial, theirs, their_evals = reference_loop(plan, 123, steps, 5, 4e-4, 0.1)
    assert all(torch.equal(initial[k], v) for k, v in seen["initial"].items())  # same weights to start from
    with capsys.disabled():
        print("\nstep  trainer      reference")
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            print(f"{i + 1:4d}  {a:.6f}  {b:.6f}")
        print("eval at step: trainer (train, val) | reference (train, val)")
        for a, b in zip(our_evals, their_evals, strict=True):
            print(f"{a[0]:4d}  {a[1]:.6f} {a[2]:.6f} | {b[1]:.6f} {b[2]:.6f}")
    assert ours == pytest.approx(theirs, abs=1e-5, rel=0)
    assert [s for s, _, _ in our_evals] == [s for s, _, _ in their_evals] == [0, 1, 6, 11]
    for (_, *a), (_, *b) in zip(our_evals, their_evals, strict=True):
        assert a == pytest.approx(b, abs=1e-5, rel=0)
    assert abs(our_evals[0][2] - math.log(50257)) < 0.3


def test_train_recipe_book_on_the_command_line(pydoc_file):
    args = ["train", str(pydoc_file), "--name", "book", "--recipe", "book", "--max-steps", "10", "--json",
            "--emb-dim", "32", "--n-layers", "2", "--n-heads", "2", "--context-length", "64", "--sample-tokens", "3",
            "--eval-iters", "1"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    evals = [e for e in events if e["type"] == "eval"]
    assert evals[0]["step"] == 0 and abs(evals[0]["val_loss"] - math.log(50257)) < 0.3
    assert [e["step"] for e in evals] == [0, 1, 6, 10]
    assert {e["lr"] for e in events if e["type"] == "step"} == {4e-4}
    assert len([e for e in events if e["type"] == "step"]) == 10
    start = events[0]
    assert start["config"]["qkv_bias"] is False and start["settings"]["recipe"] == "book"
    store = CheckpointStore()
    info = store.info("book")
    assert info.meta["config"]["qkv_bias"] is False and info.meta["training"]["recipe"] == "book"
    metrics = [r for r in store.read_metrics("book") if r.get("type") == "eval"]
    assert metrics[0]["step"] == 0
    weights = store.load_model("book").state_dict()
    assert not [k for k in weights if any(p in k for p in ("W_query.bias", "W_key.bias", "W_value.bias"))]
    assert "trf_blocks.0.att.W_query.weight" in weights


def test_book_eval_lines_carry_the_books_step_label(pydoc_file):
    args = ["train", str(pydoc_file), "--name", "label", "--recipe", "book", "--max-steps", "6",
            "--emb-dim", "32", "--n-layers", "1", "--n-heads", "2", "--context-length", "16", "--sample-tokens", "2",
            "--eval-iters", "1"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 1", "step 6"]
    assert "Ep" not in lines[0]
    assert "| Ep 1 (Step 000000): Train loss " in lines[1] and "| Ep 1 (Step 000005): Train loss " in lines[2]
    train_loss = lines[1].split("train loss ")[1].split()[0]
    assert f"Train loss {train_loss}, Val loss " in lines[1]


def test_train_help_lists_the_recipes_and_the_new_switches():
    result = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--recipe [default|book]" in text and "'book' (chapter 5's run: gpt2-124M without qkv bias" in text
    switches = [
        "--schedule [constant|cosine|linear]",
        "--min-lr-ratio",
        "--qkv-bias / --no-qkv-bias",
        "--eval-at-start / --no-eval-at-start",
        "--eval-timing [interval|book]",
        "--sample-every [eval|epoch]",
    ]
    assert [s for s in switches if s not in text] == []
