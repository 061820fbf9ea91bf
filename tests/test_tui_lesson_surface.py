"""Pilot tests of the loss-surface view: the numbers it shows are the engine's, reopening is instant from the
cache, and Esc stops a computation between two points."""

from __future__ import annotations

import asyncio
import time

from gpt2term.core.store.store import CheckpointStore
from gpt2term.core.surface import SURFACE_FILE, SurfaceOptions, loss_surface
from gpt2term.tui.app import make_app
from gpt2term.tui.screens.surface_view import SurfaceView
from tests.pilot_helpers import screen_text, settle
from tests.test_lesson_surface import corpus_file, train_run  # noqa: F401 (a fixture)
from tests.test_tui_checkpoints import open_checkpoints, select, small_model


def test_the_view_shows_the_engines_numbers_and_reopens_from_the_cache(corpus_file):  # noqa: F811
    train_run(corpus_file)

    async def scenario() -> None:
        app = make_app(model=small_model(), model_name="small", keymap={})
        async with app.run_test(size=(150, 44)) as pilot:
            screen = await open_checkpoints(pilot)
            await select(pilot, screen, "run")
            await pilot.press("u")
            view = app.screen
            assert isinstance(view, SurfaceView)
            await settle(pilot, lambda: view.result is not None, "the surface computed")
            result = view.result
            assert not result.from_cache
            engine = loss_surface("run", SurfaceOptions(), use_cache=False)
            text = screen_text(app)
            assert f"centre loss {engine.center_loss:.4f}" in text
            assert f" {engine.grid[0][-1]:6.3f} " in str(view.query_one("#surface-heat").render())
            assert result.grid == engine.grid and result.path == engine.path
            assert ("basin:" in text or "barrier:" in text) and "about " not in text  # the estimate gave way
            await pilot.press("escape")
            assert app.screen is screen
            started = time.perf_counter()
            await pilot.press("u")
            view = app.screen
            await settle(pilot, lambda: view.result is not None, "the surface read from the cache")
            assert view.result.from_cache and view.result.grid == engine.grid
            assert time.perf_counter() - started < 5
            assert "from the cache" in screen_text(app)

    asyncio.run(scenario())


def test_escape_stops_the_computation_and_caches_nothing(corpus_file):  # noqa: F811
    train_run(corpus_file)

    async def scenario() -> None:
        app = make_app(model=small_model(), model_name="small", keymap={})
        async with app.run_test(size=(150, 44)) as pilot:
            view = SurfaceView("run", CheckpointStore(), SurfaceOptions(grid=60, batches=4))
            await app.push_screen(view)
            # the first point timed: the estimate is shown (the worker goes on, so no waiting for it)
            await settle(pilot, lambda: view.done >= 1, "the first point", workers=False)
            assert "about " in screen_text(app) and "60x60 grid" in screen_text(app)
            await pilot.press("escape")
            # it stops at the end of the current point, and says so
            await settle(pilot, lambda: not view.computing and "stopped" in screen_text(app), "the stop")
            assert view.cancelled and view.result is None and app.screen is view
            assert view.done < SurfaceOptions(grid=60, batches=4).evaluations
            assert "stopped" in screen_text(app)
            assert not (CheckpointStore().path("run") / SURFACE_FILE).exists()
            await pilot.press("escape")
            assert app.screen is not view

    asyncio.run(scenario())
