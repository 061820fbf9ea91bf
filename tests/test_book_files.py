"""The book's files as a reader has them: a `model.pth` carries no head count (`--n-heads`, and the `model.json` our
exports write beside it), a `model_and_optimizer.pth` trains on with its AdamW state, `pth-optimizer` exports carry
the run's learning rate, and every file written gets the user's normal permissions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from gpt2term.cli import cli
from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import CheckpointError, InputError
from gpt2term.core.interop import export_book_pth, export_hf
from gpt2term.core.model import GPTModel
from gpt2term.core.store.resolve import open_model, resolve_weights
from gpt2term.core.store.store import CheckpointStore

EIGHT = GPTConfig(vocab_size=64, context_length=16, emb_dim=256, n_heads=8, n_layers=1, drop_rate=0.0)
IDS = torch.tensor([[1, 5, 9, 2, 63, 7, 0, 33]])


def eight_heads(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(EIGHT).eval()


def logits(model: GPTModel) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# ------------------------------------------------------------------------------------------------ --n-heads


def test_a_book_pth_of_8_heads_imports_with_n_heads_8_and_gives_the_original_logits(tmp_path):
    model = eight_heads()
    torch.save(model.state_dict(), tmp_path / "model.pth")  # the book's line: no config anywhere
    want = logits(model)

    guessed = resolve_weights(str(tmp_path / "model.pth"))
    assert guessed.config.n_heads == 4  # 64-dim heads assumed, and the user is told so
    assert any("assuming 4 heads of 64 dims" in n and "--n-heads" in n for n in guessed.notices)
    assert not torch.allclose(logits(guessed.build_model()), want, atol=1e-4)

    given = resolve_weights(str(tmp_path / "model.pth"), n_heads=8)
    assert given.config == EIGHT.with_(drop_rate=0.1) and not any("assuming" in n for n in given.notices)
    assert torch.allclose(logits(given.build_model()), want, atol=1e-6)

    result = run("ckpt", "import", str(tmp_path / "model.pth"), "--name", "book8", "--n-heads", "8")
    assert result.exit_code == 0, result.output
    imported = CheckpointStore().load("book8")
    assert imported.config.n_heads == 8
    assert torch.allclose(logits(imported.build_model()), want, atol=1e-6)
    opened = open_model(str(tmp_path / "model.pth"), n_heads=8, remember=False)
    assert torch.allclose(logits(opened.model), want, atol=1e-5)


def test_every_command_that_reads_a_pth_takes_n_heads(tmp_path):
    torch.save(eight_heads().state_dict(), tmp_path / "model.pth")
    pth = str(tmp_path / "model.pth")
    # The prompt "A" is one token (id 32), inside this model's 64-word vocabulary.
    given = run("inspect", "attention", "A", "-c", pth, "--n-heads", "8", "--json")
    assert given.exit_code == 0, given.output
    assert len(json.loads(given.stdout)["attention"][0]) == 8
    assumed = run("inspect", "attention", "A", "-c", pth)
    assert assumed.exit_code == 0 and "assuming 4 heads of 64 dims" in assumed.stderr
    assert "mean over 4 heads" in assumed.stdout
    lens = run("inspect", "lens", "A", "-c", pth, "--n-heads", "8", "--json")
    assert lens.exit_code == 0, lens.output
    generated = run("generate", "A", "-c", pth, "--n-heads", "8", "-n", "3")
    assert generated.exit_code == 0 and "assuming" not in generated.stderr and "8 heads of 32 dims" in generated.stderr
    wrong = run("eval", "-c", pth, "--n-heads", "3")
    assert wrong.exit_code == 2 and len(wrong.stderr.strip().splitlines()) == 1
    assert "--n-heads 3 does not divide its 256 embedding dims; pass a divisor of 256" in wrong.stderr
    trained = run("train", "-n", "x", "--from", pth, "--n-heads", "6", "--max-steps", "1")
    assert trained.exit_code == 2 and "--n-heads 6 does not divide" in trained.stderr


def test_n_heads_that_disagrees_with_a_files_config_is_one_line_error(tmp_path):
    store = CheckpointStore()
    store.save("own", eight_heads())
    export_hf(eight_heads().state_dict(), EIGHT, tmp_path / "hf")
    for spec in ("own", str(tmp_path / "hf"), str(store.path("own"))):
        with pytest.raises(InputError, match=r"has its config \(8 heads of 32 dims\); --n-heads 4 disagrees"):
            resolve_weights(spec, store, n_heads=4)
        assert resolve_weights(spec, store, n_heads=8).config.n_heads == 8  # agreeing is fine
    result = run("generate", "hi", "-c", "own", "--n-heads", "2")
    assert result.exit_code == 2 and "--n-heads 2 disagrees" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- model.json


def test_our_pth_exports_write_model_json_and_round_trip_exactly(tmp_path):
    model = eight_heads(1)
    store = CheckpointStore()
    store.save("eight", model)
    for fmt, file in (("pth", "model.pth"), ("pth-optimizer", "model_and_optimizer.pth")):
        out = tmp_path / fmt
        out.mkdir()
        result = run("ckpt", "export", "eight", "--format", fmt, "-o", str(out))
        assert result.exit_code == 0, result.output
        config = json.loads((out / "model.json").read_text())
        assert config == {
            "vocab_size": 64,
            "context_length": 16,
            "emb_dim": 256,
            "n_heads": 8,
            "n_layers": 1,
            "drop_rate": 0.0,
            "qkv_bias": True,
        }  # fmt: skip  (the course's GPT_CONFIG names)
        assert f"wrote {out / 'model.json'}" in result.stdout
        imported = run("ckpt", "import", str(out / file), "--name", f"back-{fmt}")
        assert imported.exit_code == 0 and "note:" not in imported.stderr, imported.output
        back = store.load(f"back-{fmt}")
        assert back.config == EIGHT
        assert torch.equal(logits(back.build_model()), logits(model))
        assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary file left


def test_a_damaged_or_foreign_model_json_is_refused_in_one_line(tmp_path):
    model = eight_heads()
    export_book_pth(model.state_dict(), EIGHT, tmp_path / "model.pth")
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model.json: not a usable config .*fix or remove .*--n-heads"):
        resolve_weights(str(tmp_path / "model.pth"))
    (tmp_path / "model.json").write_text(json.dumps(EIGHT.with_(emb_dim=128).to_dict()))
    with pytest.raises(CheckpointError, match=r"does not belong to model.pth: its emb_dim is 128 but the weights"):
        resolve_weights(str(tmp_path / "model.pth"))
    (tmp_path / "model.json").write_text(json.dumps(EIGHT.to_dict()))
    with pytest.raises(InputError, match="--n-heads 4 disagrees"):
        resolve_weights(str(tmp_path / "model.pth"), n_heads=4)
    result = run("generate", "A", "-c", str(tmp_path / "model.pth"), "-n", "1")
    assert result.exit_code == 0 and "note:" not in result.stderr
    # Another model's export into the same folder would silently re-shape this one: refused without --force.
    other = GPTConfig(vocab_size=64, context_length=16, emb_dim=64, n_heads=2, n_layers=1)
    with pytest.raises(InputError, match="model.json already exists and holds another model's config"):
        export_book_pth(GPTModel(other).state_dict(), other, tmp_path / "other.pth")


# ------------------------------------------------------------------------------------- pth-optimizer's lr


def test_pth_optimizer_carries_the_runs_lr_not_the_last_scheduled_one(tmp_path):
    model = eight_heads()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model(IDS).sum().backward()
    optimizer.step()
    for group in optimizer.param_groups:
        group["lr"] = 1e-4  # where a cosine schedule left it at the end of the run
    store = CheckpointStore()
    store.save("run", model, meta={"training": {"lr": 1e-3}}, optimizer_state=optimizer.state_dict())
    result = run("ckpt", "export", "run", "--format", "pth-optimizer", "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "param groups carry lr=0.001 (the run's --lr)" in result.stderr
    assert "AdamW(lr=...) + optimizer.load_state_dict(...) resumes at lr=0.001" in result.stderr
    saved = torch.load(tmp_path / "model_and_optimizer.pth", weights_only=True)["optimizer_state_dict"]
    assert [g["lr"] for g in saved["param_groups"]] == [1e-3]
    # The course's resume: whatever lr its AdamW is built with, load_state_dict sets the file's.
    reader = torch.optim.AdamW(eight_heads().parameters(), lr=5e-4, weight_decay=0.1)
    reader.load_state_dict(saved)
    assert reader.param_groups[0]["lr"] == 1e-3

    store.save("fresh", model)  # no run, no optimizer state: a fresh AdamW, lr as the course builds it
    result = run("ckpt", "export", "fresh", "--format", "pth-optimizer", "-o", str(tmp_path / "f"))
    assert "param groups carry lr=0.0004 (a fresh AdamW's)" in result.stderr


# ------------------------------------------------------------------------------------------- permissions


def test_store_and_export_files_get_the_users_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        model = eight_heads()
        optimizer = torch.optim.AdamW(model.parameters())
        store = CheckpointStore(tmp_path / "store")
        info = store.save("p", model, optimizer_state=optimizer.state_dict(), trainer_state={"step": 1})
        files = list(info.path.iterdir())
        assert len(files) >= 4  # weights, optimizer and trainer state, meta.json
        for fmt in ("hf", "pth", "pth-optimizer"):
            files += store.export("p", fmt, tmp_path / fmt if fmt == "hf" else tmp_path / f"{fmt}.pth").paths
        modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
        assert set(modes.values()) == {"0o644"}, modes
        os.umask(0o027)  # the user's umask, not a fixed mode
        info = store.save("q", model)
        assert oct((info.path / "model.safetensors").stat().st_mode & 0o777) == "0o640"
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- the book's AdamW state, continued

CFG = dict(vocab_size=50257, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0, qkv_bias=False)
WORDS = "Every effort moves you forward, and the small steps add up to a long walk through the quiet town. "

# The course's loop, as chapter 5 writes it, in a process of its own: N steps, then the file the book saves; then
# that file read back from disk into a new model and AdamW, and one more step on the batch gpt2term's run takes first
# (saved to the last argument).
BOOK_LOOP = r"""
import sys, torch
import torch.nn.functional as F
from gpt2term.core.config import GPTConfig
from gpt2term.core.data import GPTDataset, ShuffledBatches, load_corpus
from gpt2term.core.model import GPTModel

cfg, corpus, path, after = GPTConfig(**eval(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]
data = load_corpus([corpus], val_ratio=0.1)
train = GPTDataset(data.train_ids, cfg.context_length, None)
batches = ShuffledBatches(len(train), 2, 123, 1)

def step(model, optimizer, indices):
    inputs, targets = train.batch(indices)
    optimizer.zero_grad()
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    optimizer.step()

# Chapter 5's training, then its save.
torch.manual_seed(123)
model = GPTModel(cfg)
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
for position in (3, 1, 2):
    step(model, optimizer, batches.indices(0, position))
torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}, path)
del model, optimizer

# Its load into a new model and optimizer, from the file on disk, and one more step.
checkpoint = torch.load(path, weights_only=True)
model = GPTModel(cfg)
model.load_state_dict(checkpoint["model_state_dict"])
optimizer = torch.optim.AdamW(model.parameters(), lr=0.0005, weight_decay=0.1)
optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
model.train()
step(model, optimizer, batches.indices(0, 0))
torch.save(model.state_dict(), after)
"""

CONTINUE = ["--n-heads", "2", "--max-steps", "1", "--lr", "4e-4", "--warmup-steps", "0", "--grad-clip", "0",
            "--drop-rate", "0", "--batch-size", "2", "--context-length", "8", "--eval-iters", "1",
            "--sample-tokens", "0", "--seed", "123"]  # fmt: skip


def book(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-c", BOOK_LOOP, repr(CFG), *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def gpt2term(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "gpt2term", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def run_ok(*args: str):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == {k for k in b if not k.endswith(".att.mask")}
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.once  # the first pass compares the fast trainer with the book's plain loop: the stronger check
def test_train_from_a_book_model_and_optimizer_pth_continues_its_adamw_state(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(WORDS * 4)
    pth = tmp_path / "model_and_optimizer.pth"
    book(str(corpus), str(pth), str(tmp_path / "book_next.pth"))
    want = torch.load(tmp_path / "book_next.pth", weights_only=True)

    proc = gpt2term("train", str(corpus), "--name", "cont", "--from", str(pth), *CONTINUE)  # a fresh process
    notes = [line for line in proc.stderr.splitlines() if "AdamW state" in line]
    assert len(notes) == 1 and "continuing the AdamW state of" in notes[0] and "3 steps" in notes[0], proc.stderr
    assert "--fresh-optimizer" in notes[0]
    assert max_difference(CheckpointStore().load("cont").state_dict, want) < 1e-6

    # Imported into the store first, the same: the imported checkpoint has the state but no training run. (These
    # runs are in this process: a fresh one for each would only add its start.)
    run_ok("ckpt", "import", str(pth), "--name", "book", "--n-heads", "2")
    run_ok("train", str(corpus), "--name", "cont2", "--from", "book", *CONTINUE)
    assert max_difference(CheckpointStore().load("cont2").state_dict, want) < 1e-6

    # --fresh-optimizer drops it: a new AdamW's first step lands elsewhere, and nothing says "continuing".
    proc = run_ok("train", str(corpus), "--name", "fresh", "--from", str(pth), "--fresh-optimizer", *CONTINUE)
    assert "AdamW state" not in proc.stderr
    assert max_difference(CheckpointStore().load("fresh").state_dict, want) > 1e-5


def test_resume_of_an_imported_optimizer_file_points_at_from(tmp_path):
    model = GPTModel(GPTConfig(**CFG))
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               tmp_path / "model_and_optimizer.pth")  # fmt: skip
    assert run("ckpt", "import", str(tmp_path / "model_and_optimizer.pth"), "-n", "b", "--n-heads", "2").exit_code == 0
    result = run("train", "--name", "b", "--resume")
    assert result.exit_code == 2
    assert "gpt2term train --from b --name NEW_NAME (its AdamW state carries over)" in result.stderr


def test_an_optimizer_state_of_another_model_is_refused_naming_fresh_optimizer(tmp_path):
    other = GPTModel(GPTConfig(**{**CFG, "emb_dim": 32}))
    state = torch.optim.AdamW(other.parameters())
    other(torch.tensor([[1, 2]])).sum().backward()
    state.step()
    payload = {"model_state_dict": GPTModel(GPTConfig(**CFG)).state_dict(), "optimizer_state_dict": state.state_dict()}
    torch.save(payload, tmp_path / "model_and_optimizer.pth")
    corpus = tmp_path / "c.txt"
    corpus.write_text(WORDS * 4)
    result = run("train", str(corpus), "-n", "x", "--from", str(tmp_path / "model_and_optimizer.pth"), *CONTINUE)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "does not fit this model" in result.stderr and "--fresh-optimizer" in result.stderr


# ------------------------------------------------------------------------------------------------- the app


from textual.geometry import Region  # noqa: E402


def screen_text(app) -> str:
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


@pytest.mark.once  # a dialog: GPT2TERM_ACCEL=0 cannot change it
def test_the_import_dialog_takes_n_heads_shows_the_notice_and_keeps_what_was_typed(tmp_path):
    import asyncio

    from gpt2term.tui.dialogs import ImportScreen
    from gpt2term.tui.screens.checkpoints import CheckpointsScreen
    from tests.pilot_helpers import settle
    from tests.test_tui_checkpoints import notified, open_checkpoints, small_app

    torch.save(eight_heads().state_dict(), tmp_path / "model.pth")
    (tmp_path / "notes.pth").write_text("not a model")
    store = CheckpointStore()

    async def scenario(size: tuple[int, int]) -> None:
        app = small_app()
        async with app.run_test(size=size) as pilot:
            screen = await open_checkpoints(pilot)
            await pilot.press("i")
            await pilot.pause()
            dialog = app.screen
            label = dialog.query_one("#import-label")
            shown = " ".join(strip.text for strip in label.render_lines(Region(0, 0, *label.size)))
            assert " ".join(shown.split()) == " ".join(str(label.render()).split())  # every word of it, wrapped
            assert "(+ config.json), the book's .pth (+ model.json), or a checkpoint folder" in " ".join(shown.split())
            text = screen_text(app)
            for words in ("Heads of a .pth without model.json (empty: 64-dim heads)", "Import", "Cancel"):
                assert words in text, (size, words, text)
            inner = dialog.query_one("#dialog").content_region
            assert all(inner.contains_region(w.region) for w in dialog.query("#dialog > *")), size
            if size[0] > 80:
                return
            dialog = app.screen
            dialog.query_one("#spec").value = str(tmp_path / "model.pth")
            dialog.query_one("#name").value = "guessed"
            await pilot.press("ctrl+s")
            await settle(pilot, lambda: "guessed" in screen.table.names, "the import with heads assumed")
            assert notified(app, "assuming 4 heads of 64 dims")
            await pilot.press("i")
            dialog = app.screen
            dialog.query_one("#spec").value = str(tmp_path / "model.pth")
            dialog.query_one("#name").value = "given"
            dialog.query_one("#n-heads").value = "8"
            await pilot.press("ctrl+s")
            await settle(pilot, lambda: "given" in screen.table.names, "the import with 8 heads")
            assert store.load("given").config.n_heads == 8
            # A file that is there but is no model: the dialog comes back with the error and what was typed.
            await pilot.press("i")
            dialog = app.screen
            dialog.query_one("#spec").value = str(tmp_path / "notes.pth")
            dialog.query_one("#name").value = "notes"
            dialog.query_one("#n-heads").value = "8"
            await pilot.press("ctrl+s")
            await settle(pilot, lambda: isinstance(app.screen, ImportScreen) and app.screen.error, "the error shown")
            again = app.screen
            assert "notes.pth: refused" in str(again.query_one("#import-error").render())
            assert again.query_one("#spec").value == str(tmp_path / "notes.pth")
            assert again.query_one("#name").value == "notes" and again.query_one("#n-heads").value == "8"
            await pilot.press("escape")
            assert isinstance(app.screen, CheckpointsScreen) and not store.exists("notes")

    asyncio.run(scenario((80, 24)))
    asyncio.run(scenario((120, 40)))


def test_the_app_opening_a_pth_by_path_shows_the_heads_notice(tmp_path):
    import asyncio

    from gpt2term.tui.app import make_app
    from tests.pilot_helpers import settle
    from tests.test_tui_checkpoints import notified

    torch.save(eight_heads().state_dict(), tmp_path / "model.pth")

    async def scenario(n_heads: int | None) -> None:
        app = make_app(str(tmp_path / "model.pth"), keymap={}, n_heads=n_heads)
        async with app.run_test(size=(100, 30)) as pilot:
            await settle(pilot, lambda: app.app_model is not None, "the model loaded")
            assert app.app_model.model.cfg.n_heads == (n_heads or 4)
            if n_heads is None:  # Textual adds a notification from a message: wait for it
                await settle(pilot, lambda: notified(app, "assuming 4 heads of 64 dims"), "the heads notice")
            else:
                assert not any("assuming" in notice for notice in app.app_model.notices)

    asyncio.run(scenario(None))
    asyncio.run(scenario(8))
