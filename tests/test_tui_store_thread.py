"""Listing the store may repair a crashed save (disk work): the TUI never does it on the UI thread."""

from __future__ import annotations

import asyncio
import threading

import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.generation import DecodingSettings
from gpt2term.core.model import GPTModel
from gpt2term.core.store.store import CheckpointStore
from gpt2term.tui.app import make_app
from gpt2term.tui.dialogs import FollowScreen
from gpt2term.tui.screens.checkpoints import CheckpointsScreen
from gpt2term.tui.screens.versus import VersusScreen
from tests.pilot_helpers import settle

SMALL = GPTConfig(emb_dim=32, n_heads=2, n_layers=1, context_length=16)


def test_the_checkpoints_table_the_follow_dialog_and_versus_list_the_store_off_the_ui_thread(monkeypatch):
    torch.manual_seed(0)
    store = CheckpointStore()
    store.save("other", GPTModel(SMALL), meta={"step": 3})
    store.append_metrics("other", {"type": "step", "step": 1, "loss": 9.0})
    listed_on: list[str] = []
    real_list = CheckpointStore.list

    def recording_list(self: CheckpointStore):
        listed_on.append(threading.current_thread().name)
        return real_list(self)

    monkeypatch.setattr(CheckpointStore, "list", recording_list)
    main = threading.current_thread().name

    async def scenario() -> None:
        app = make_app(model=GPTModel(SMALL), model_name="small", keymap={})
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, lambda: app.app_model is not None, "the model loaded")
            prompt = app.screen
            prompt.settings = DecodingSettings(max_new_tokens=2, top_n=3)
            await pilot.press("h", "i", "enter")
            await settle(pilot, lambda: prompt.turns and prompt.turns[-1].state == "done", "the generation")
            await pilot.press("ctrl+n")
            versus = app.screen
            assert isinstance(versus, VersusScreen)
            await settle(pilot, lambda: versus.names == ["other"], "the versus picker filled")
            await pilot.press("escape")

            await pilot.press("f4")
            checkpoints = app.screen
            assert isinstance(checkpoints, CheckpointsScreen)
            await settle(pilot, lambda: checkpoints.table.names == ["other"], "the table filled")

            await pilot.press("f3", "f9")
            await settle(pilot, lambda: isinstance(app.screen, FollowScreen), "the follow dialog")
            assert [c.name for c in app.screen.candidates] == ["other"]

    asyncio.run(scenario())
    assert len(listed_on) >= 3 and main not in listed_on, listed_on


def test_a_listing_that_finishes_after_a_newer_one_does_not_undo_a_rename_on_screen(monkeypatch):
    """Two listing threads racing: one read the store before a rename and finishes after the listing that followed
    it (the screen lists on resume and after each operation). The table keeps the newer one."""
    torch.manual_seed(0)
    store = CheckpointStore()
    store.save("alpha", GPTModel(SMALL), meta={"step": 3})
    real_list = CheckpointStore.list
    gate = threading.Event()
    held: list[list[str]] = []  # what the held listing read
    hold_next = threading.Event()

    def listing(self: CheckpointStore):
        rows = real_list(self)
        if hold_next.is_set():
            hold_next.clear()
            held.append([row.name for row in rows])
            assert gate.wait(60), "the test never released the held listing"
        return rows

    monkeypatch.setattr(CheckpointStore, "list", listing)

    async def scenario() -> None:
        app = make_app(model=GPTModel(SMALL), model_name="small", keymap={})
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f4")
            screen = app.screen
            assert isinstance(screen, CheckpointsScreen)
            await settle(pilot, lambda: screen.listed, "the store listed")
            hold_next.set()
            screen.reload()  # listing A: reads the store, then waits at the gate
            await settle(pilot, lambda: bool(held), "listing A read the store", workers=False)
            store.rename("alpha", "gamma")
            screen.reload()  # listing B: reads the renamed store and posts at once
            await settle(pilot, lambda: screen.table.names == ["gamma"], "listing B shown", workers=False)
            gate.set()  # A posts its stale rows now, after B's
            await settle(pilot, lambda: not any(w.is_running for w in app.workers), "listing A finished")
            await pilot.pause()
            assert held == [["alpha"]]
            assert screen.table.names == ["gamma"]

    asyncio.run(scenario())
