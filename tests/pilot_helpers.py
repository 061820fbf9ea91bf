"""What Pilot tests of the app share: waiting on real conditions, never on sleeps."""

from __future__ import annotations

from collections.abc import Callable


async def settle(pilot, condition: Callable[[], bool], what: str) -> None:
    """Let workers finish and their messages be handled until `condition` holds (bounded: fails, never hangs)."""
    for _ in range(100):
        if condition():
            return
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
    raise AssertionError(f"never happened: {what}")


def screen_text(app) -> str:
    """What the terminal shows now, as plain text (each line the width of the screen)."""
    import io

    from rich.console import Console

    console = Console(
        width=app.size.width, height=app.size.height, file=io.StringIO(), record=True, legacy_windows=False
    )
    console.print(app.screen._compositor.render_update(full=True))
    return console.export_text()
