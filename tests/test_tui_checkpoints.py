"""Pilot tests of the checkpoints screen: the table shows the store, and its actions change the store on disk."""

from __future__ import annotations

import asyncio

import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.tui.app import make_app
from gpt2term.tui.dialogs import ConfirmScreen, ExportScreen, ImportScreen, NameScreen
from gpt2term.tui.screens.checkpoints import CheckpointsScreen
from gpt2term.tui.screens.prompt import PromptScreen
from gpt2term.tui.widgets.checkpoint_table import CheckpointDetails
from gpt2term.tui.widgets.training_charts import LossPlot
from tests.pilot_helpers import settle
from tests.test_interop_export import TINY, make_hf_cache, tiny_model

SMALL = GPTConfig(emb_dim=32, n_heads=2, n_layers=1, context_length=16)


def small_model(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(SMALL)


def small_app():
    return make_app(model=small_model(), model_name="small", keymap={})


async def open_checkpoints(pilot) -> CheckpointsScreen:
    await pilot.press("f4")
    screen = pilot.app.screen
    assert isinstance(screen, CheckpointsScreen)
    await settle(pilot, lambda: screen.listed, "the store listed")  # read in a worker
    return screen


async def select(pilot, screen: CheckpointsScreen, name: str) -> None:
    """Move the table's cursor to `name` with the arrow keys."""
    await pilot.press(*["up"] * len(screen.table.names))
    for _ in range(len(screen.table.names)):
        if screen.table.selected_name == name:
            return
        await pilot.press("down")
    assert screen.table.selected_name == name


def notified(app, text: str) -> bool:
    return any(text in n.message for n in app._notifications)


def test_the_table_shows_the_store_sorts_and_renames_copies_deletes_and_loads_on_disk():
    store = CheckpointStore()
    store.save("alpha", small_model(1), meta={"step": 1200, "tokens_seen": 9_000_000, "val_loss": 3.25,
                                             "source": "trained from scratch"})  # fmt: skip
    store.save("beta", small_model(2), meta={"step": 30, "val_loss": 5.5, "source": "test"})
    for n in range(1, 4):
        store.append_metrics("beta", {"type": "step", "step": n, "loss": 9.0 - n})
    store.append_metrics("beta", {"type": "eval", "step": 3, "val_loss": 6.5, "train_loss": 6.0})
    (store.root / "broken").mkdir()
    (store.root / "broken" / "meta.json").write_text("{not json")

    async def scenario() -> None:
        app = small_app()
        async with app.run_test(size=(140, 40)) as pilot:
            screen = await open_checkpoints(pilot)
            table = screen.table
            assert set(table.names) == {"alpha", "beta", "broken"}
            await pilot.press("s", "s")  # updated -> source -> name
            assert table.names == ["alpha", "beta", "broken"] and table.sort_column == "name"
            row = [str(cell) for cell in table.get_row("alpha")]
            assert row[:5] == ["alpha", "3.2M", "1,200", "9.0M", "3.250"] and row[7] == "trained from scratch"
            assert str(table.get_row("broken")[7]).startswith("damaged: meta.json is unreadable")
            # Sort by a column's header: step, largest first; again: smallest first (the damaged one stays last).
            column_x = 1 + sum(c.get_render_width(table) for c in table.ordered_columns[:2])  # after the border
            await pilot.click("#ckpt-table", offset=(column_x + 2, 1))
            assert table.sort_column == "step" and table.names == ["alpha", "beta", "broken"]
            await pilot.click("#ckpt-table", offset=(column_x + 2, 1))
            assert table.names == ["beta", "alpha", "broken"]

            # Details of the selected one, with its loss history from metrics.jsonl.
            await select(pilot, screen, "beta")
            details = str(screen.query_one(CheckpointDetails).render())
            assert "1 layers · 32 dims · 2 heads · context 16" in details and "source  test" in details
            plot = screen.query_one(LossPlot)
            assert plot.train.steps == [1, 2, 3] and plot.val.values == [6.5]

            # Rename (a taken name is explained in the dialog), then on disk.
            await pilot.press("r")
            dialog = app.screen
            assert isinstance(dialog, NameScreen)
            dialog.query_one("#name").value = "alpha"
            await pilot.press("enter")
            assert app.screen is dialog and "already exists" in str(dialog.query_one("#name-error").render())
            dialog.query_one("#name").value = "gamma"
            await pilot.press("enter")
            await settle(pilot, lambda: "gamma" in table.names, "the renamed row")
            assert store.exists("gamma") and not (store.root / "beta").exists()
            assert store.read_metrics("gamma")[0]["loss"] == 8.0 and table.selected_name == "gamma"

            # Copy, then delete the copy: No keeps it, Yes removes the folder.
            await pilot.press("c")
            assert app.screen.query_one("#name").value == "gamma-copy"
            await pilot.press("enter")
            await settle(pilot, lambda: "gamma-copy" in table.names, "the copy")
            copied, source = store.load("gamma-copy").state_dict, store.load("gamma").state_dict
            assert all(copied[k].equal(source[k]) for k in source)
            await select(pilot, screen, "gamma-copy")
            await pilot.press("d")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("enter")  # the focused button is "Keep"
            await settle(pilot, lambda: app.screen is screen, "the confirmation closed")
            assert (store.root / "gamma-copy").is_dir()
            await pilot.press("d")
            await settle(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation again")
            await pilot.press("y")
            await settle(pilot, lambda: "gamma-copy" not in table.names, "the row gone")
            assert not (store.root / "gamma-copy").exists() and notified(app, "Deleted gamma-copy.")

            # A damaged one cannot be loaded: a notification says why, nothing changes.
            await select(pilot, screen, "broken")
            await pilot.press("l")
            assert notified(app, "broken is damaged: meta.json is unreadable") and app.current_mode == "checkpoints"

            # Enter loads the selected one in the prompt screen.
            await select(pilot, screen, "alpha")
            await pilot.press("enter")
            await settle(pilot, lambda: app.app_model is not None and app.app_model.name == "alpha", "alpha loaded")
            assert isinstance(app.screen, PromptScreen) and app.app_model.trained_steps == 1200
            assert store.most_recent() == "alpha"

    asyncio.run(scenario())


def test_export_then_import_and_gpt2_from_the_hugging_face_cache(tmp_path, monkeypatch):
    store = CheckpointStore()
    store.save("alpha", small_model(1), meta={"step": 5})
    monkeypatch.setenv("HF_HUB_CACHE", str(make_hf_cache(tmp_path / "hf", "models--openai-community--gpt2",
                                                         tiny_model(7), TINY)))  # fmt: skip

    async def scenario() -> None:
        app = small_app()
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await open_checkpoints(pilot)
            await pilot.press("e")
            dialog = app.screen
            assert isinstance(dialog, ExportScreen) and dialog.query_one("#path").value.endswith("alpha-hf")
            dialog.query_one("#path").value = str(tmp_path / "out-hf")
            await pilot.press("enter")
            await settle(pilot, lambda: notified(app, "Exported alpha to"), "the export")
            assert (tmp_path / "out-hf" / "model.safetensors").is_file()
            # Again to the same place: refused (nothing overwritten) and said so.
            await pilot.press("e")
            app.screen.query_one("#path").value = str(tmp_path / "out-hf")
            await pilot.press("enter")
            await settle(pilot, lambda: notified(app, "already exists"), "the refusal")

            # Import what was exported, then a GPT-2 from the (fake) Hugging Face cache, then a missing file.
            await pilot.press("i")
            dialog = app.screen
            assert isinstance(dialog, ImportScreen) and [m.name for m in dialog.cached] == ["gpt2"]
            dialog.query_one("#spec").value = str(tmp_path / "out-hf")
            dialog.query_one("#name").value = "alpha-back"
            await pilot.press("ctrl+s")
            await settle(pilot, lambda: "alpha-back" in screen.table.names, "the imported row")
            back, original = store.load("alpha-back").state_dict, store.load("alpha").state_dict
            assert all(back[k].equal(original[k]) for k in original)

            await pilot.press("i")
            app.screen.query_one("#hf-cache").focus()
            await pilot.press("enter")  # the highlighted (first) cached model fills in the path
            assert app.screen.query_one("#spec").value == "gpt2"
            await pilot.press("ctrl+s")
            await settle(pilot, lambda: "gpt2" in screen.table.names, "GPT-2 from the cache")
            assert store.info("gpt2").get("source") == "huggingface-cache:openai-community/gpt2"

            # A missing file: said inside the dialog, which stays open with what was typed (issue 14).
            before = sorted(p.name for p in store.root.iterdir())
            await pilot.press("i")
            app.screen.query_one("#spec").value = str(tmp_path / "nothing-here.safetensors")
            app.screen.query_one("#name").value = "typed-name"
            await pilot.press("ctrl+s")
            await pilot.pause()
            dialog = app.screen
            assert isinstance(dialog, ImportScreen)
            assert "nothing-here.safetensors: no such file or folder" in str(dialog.query_one("#import-error").render())
            assert dialog.query_one("#name").value == "typed-name"
            assert sorted(p.name for p in store.root.iterdir()) == before
            await pilot.press("escape")
            assert isinstance(app.screen, CheckpointsScreen)

    asyncio.run(scenario())
