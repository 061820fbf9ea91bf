"""What Pilot tests of the app share: waiting on real conditions, never on sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def workers_finished(app) -> None:
    """Wait until every worker has ended, however it ended: the app's workers run with exit_on_error=False and
    report their own failures (a missing checkpoint is a notification), so a failed worker is not the test's error.
    Textual's wait_for_complete raises for one that failed if it is still registered when asked, which depends on
    how fast the worker failed."""
    await asyncio.gather(*[worker.wait() for worker in app.workers], return_exceptions=True)


async def settle(
    pilot, condition: Callable[[], bool], what: str, timeout_s: float = 60.0, *, workers: bool = True
) -> None:
    """Let workers finish and their messages be handled until `condition` holds (bounded: fails, never hangs).

    Bounded by time as well as by rounds: on a loaded machine a chain of workers and messages (a rename on disk,
    then the store read again) can take more than a hundred rounds of the event loop. `workers=False` only lets
    the app run between checks, for a test that holds a worker at a gate (or stops it) on purpose."""
    deadline = time.monotonic() + timeout_s
    rounds = 0
    while not condition():
        if rounds >= 100 and time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        rounds += 1
        if workers:
            await workers_finished(pilot.app)
            await pilot.pause()
        else:
            await pilot.pause(0.01)


async def drain(pilot) -> None:
    """Let every running worker finish and what it posted be handled: for a step that must come after the app's own
    reaction (the Train form lists the store in a worker, then refills itself from what it found)."""
    await workers_finished(pilot.app)
    await pilot.pause()


def screen_text(app) -> str:
    """What the terminal shows now, as plain text (each line the width of the screen)."""
    import io

    from rich.console import Console

    console = Console(
        width=app.size.width, height=app.size.height, file=io.StringIO(), record=True, legacy_windows=False
    )
    console.print(app.screen._compositor.render_update(full=True))
    return console.export_text()
