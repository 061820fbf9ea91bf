"""Make the README's screenshots with the app itself: `python -m gpt2term.tui.screenshots --checkpoint NAME`.

The app runs headless (Textual's Pilot), types a prompt, generates, and saves SVGs of what the screen shows, so
the pictures in the README are the real program. Re-run it whenever the screens change or a better model exists.
The train and checkpoints screenshots come from a real run started from the train screen's form, taken mid-run.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import click

from gpt2term.core.generation import DecodingSettings
from gpt2term.tui.app import Gpt2termApp, make_app
from gpt2term.tui.screens.prompt import PromptScreen
from gpt2term.tui.screens.train import TrainScreen

SMALL_SIZES = ((80, 24), (120, 36))  # the sizes a new user's terminal has: each footer must fit them whole


async def _loaded(app: Gpt2termApp, pilot) -> PromptScreen:
    for _ in range(600):
        if app.app_model is not None:
            break
        await app.workers.wait_for_complete()
        await pilot.pause()
    if app.app_model is None:
        raise click.ClickException("the model did not load; check --checkpoint with `gpt2term ckpt list`")
    screen = app.screen
    assert isinstance(screen, PromptScreen)
    return screen


async def _generate(app: Gpt2termApp, pilot, prompt: str) -> None:
    screen = app.screen
    assert isinstance(screen, PromptScreen)
    await pilot.press(*prompt, "enter")
    for _ in range(6000):
        if screen.turns and screen.turns[-1].state != "generating":
            break
        await app.workers.wait_for_complete()
        await pilot.pause()


async def _shoot(
    checkpoint: str | None,
    out: Path,
    size: tuple[int, int],
    name: str,
    prompts: list[str],
    settings: DecodingSettings,
    cursor_back: int,
    colours: bool,
    boundaries: bool,
    dialog: bool,
    inspect_keys: tuple[str, ...] = (),
) -> Path:
    app = make_app(checkpoint, keymap={})  # default keys, whatever the user's keymap says
    async with app.run_test(size=size) as pilot:
        screen = await _loaded(app, pilot)
        screen.settings = settings
        for prompt in prompts:
            await _generate(app, pilot, prompt)
        if colours:
            await pilot.press("ctrl+l")
        if boundaries:
            await pilot.press("ctrl+t")
        if cursor_back:
            await pilot.press("tab", *["left"] * cursor_back)
        if dialog:
            await pilot.press("ctrl+o")
        if inspect_keys:  # open a look-inside view from the token cursor, wait for its worker, move in it
            for _ in range(100):  # a word reads better than a space or a newline
                turn, index = screen.transcript.selected_turn_and_index
                if turn is None or index is None or turn.steps[index].text.strip().isalpha():
                    break
                await pilot.press("left")
            await pilot.press(inspect_keys[0])
            await app.workers.wait_for_complete()
            await pilot.pause()
            await pilot.press(*inspect_keys[1:])
            await app.workers.wait_for_complete()  # a key in the view may start its own worker (versus: the pick)
            await pilot.pause()
        app.clear_notifications()
        await pilot.pause()
        path = out / f"{name}.svg"
        app.save_screenshot(filename=path.name, path=str(out))
        return path


async def _shoot_training(
    checkpoint: str | None, out: Path, form: dict[str, str], shot_at: int, size: tuple[int, int]
) -> list[Path]:
    """Start a run from the train screen's form, and shoot it (and the checkpoints screen) once an evaluation at
    step `shot_at` or later is on screen; then stop it (it saves)."""
    app = make_app(checkpoint, keymap={})
    paths = []
    async with app.run_test(size=size) as pilot:
        await _loaded(app, pilot)
        await pilot.press("f3")
        screen = app.screen
        assert isinstance(screen, TrainScreen)
        for field_id, value in form.items():
            screen.form.query_one(f"#{field_id}").value = value
        reached = threading.Event()
        screen.listeners = [lambda e: reached.set() if e.type == "sample" and e.step >= shot_at else None]
        await pilot.press("f5")
        if not await asyncio.to_thread(reached.wait, 3600):
            raise click.ClickException("the run did not reach the step to shoot within an hour")

        async def shoot(name: str) -> None:
            app.clear_notifications()
            await pilot.pause(1.0)  # the loss plot redraws at most twice a second
            path = out / f"{name}.svg"
            app.save_screenshot(filename=path.name, path=str(out))
            paths.append(path)

        await shoot("train")
        for width, height in SMALL_SIZES:  # the footers (and everything else) at the widths a newcomer has
            await pilot.resize_terminal(width, height)
            await shoot(f"train-{width}x{height}")
        await pilot.resize_terminal(*size)
        await pilot.press("f4", "n")  # leave the run training
        table = app.screen.table
        for _ in range(200):  # the store is read in a worker
            if form["name"] in table.names:
                break
            await pilot.pause(0.05)
        table.move_cursor(row=table.get_row_index(form["name"]))
        await shoot("checkpoints")
        for width, height in SMALL_SIZES:
            await pilot.resize_terminal(width, height)
            await shoot(f"checkpoints-{width}x{height}")
        await pilot.resize_terminal(*size)
        await pilot.press("f3", "f8")
        await app.workers.wait_for_complete()
    return paths


async def _shoot_surface(checkpoint: str, out: Path, size: tuple[int, int] = (150, 44)) -> Path:
    """The checkpoints screen's loss-surface view of `checkpoint` (computed, or read from its cache)."""
    app = make_app(checkpoint, keymap={})
    async with app.run_test(size=size) as pilot:
        await _loaded(app, pilot)
        await pilot.press("f4")
        table = app.screen.table
        for _ in range(200):  # the store is read in a worker
            if checkpoint in table.names:
                break
            await pilot.pause(0.05)
        table.move_cursor(row=table.get_row_index(checkpoint))
        await pilot.press("u")
        view = app.screen
        while getattr(view, "computing", False):
            await app.workers.wait_for_complete()
            await pilot.pause()
        app.clear_notifications()
        await pilot.pause(0.5)
        path = out / "surface.svg"
        app.save_screenshot(filename=path.name, path=str(out))
        return path


async def _shoot_data(checkpoint: str | None, out: Path, size: tuple[int, int], steps: int = 1) -> Path:
    """The data view opened from the train screen with the form's defaults (the run one key starts), moved on to
    the batch of step `steps`, once its worker has read the corpus."""
    from gpt2term.tui.screens.data_view import DataView

    app = make_app(checkpoint, keymap={})
    async with app.run_test(size=size) as pilot:
        await _loaded(app, pilot)
        await pilot.press("f3", "ctrl+t")
        view = app.screen
        if not isinstance(view, DataView):
            raise click.ClickException("the data view did not open from the train screen")
        for _ in range(6000):
            if view.pipeline is not None or view.failure is not None:
                break
            await app.workers.wait_for_complete()
            await pilot.pause()
        await pilot.press(*["right"] * (steps - 1))
        app.clear_notifications()
        await pilot.pause()
        path = out / "data.svg"
        app.save_screenshot(filename=path.name, path=str(out))
        return path


LOSS_SHOT_TEXT = "The list method append adds an item to the end of the list."


async def shoot_loss(
    checkpoint: str, out: Path, size: tuple[int, int] = (120, 44), text: str = LOSS_SHOT_TEXT, dropout: bool = True
) -> Path:
    """The loss view from the checkpoints screen: `checkpoint` selected, `text` typed in the dialog, the six steps
    computed, and (with `dropout`) the train-mode / eval-mode losses shown."""
    app = make_app(checkpoint, keymap={})
    async with app.run_test(size=size) as pilot:
        await _loaded(app, pilot)
        await pilot.press("f4")
        screen = app.screen
        for _ in range(600):  # the store is read in a worker
            if getattr(screen, "listed", False):
                break
            await pilot.pause(0.05)
        table = screen.table
        table.move_cursor(row=table.get_row_index(checkpoint))
        await pilot.press("x")
        app.screen.query_one("#loss-text").value = text
        await pilot.press("enter")
        view = app.screen
        for _ in range(6000):
            await app.workers.wait_for_complete()
            await pilot.pause()
            if view.steps is not None or view.failure is not None:
                break
        if dropout:
            await pilot.press("d")
            for _ in range(6000):
                await app.workers.wait_for_complete()
                await pilot.pause()
                if view.dropout is not None or view.failure is not None:
                    break
        app.clear_notifications()
        await pilot.pause()
        path = out / "loss.svg"
        app.save_screenshot(filename=path.name, path=str(out))
        return path


@click.command()
@click.option("--checkpoint", "-c", help="Model to show (a store name or a path); default: the most recent one.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="screenshots", show_default=True)
@click.option("--prompt", "prompts", multiple=True, help="Prompts to run, in order (repeatable).")
@click.option("--max-new-tokens", "-n", default=40, show_default=True)
@click.option("--temperature", "-t", default=0.0, show_default=True)
@click.option("--top-k", type=int)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--screens",
    type=click.Choice(["all", "prompt", "train", "inspect", "data", "surface", "loss", "learn"]),
    default="all",
    show_default=True,
    help="prompt: the prompt screen's shots; train: a run from the train screen, and the checkpoints screen; "
    "inspect: the attention and logit-lens views; data: the data view of the train screen; surface: the loss "
    "surface of --checkpoint; loss: the loss view of --checkpoint (also in all); learn: data, loss and surface.",
)
@click.option("--run-name", default="pydoc-demo", show_default=True, help="Checkpoint name of the run to shoot.")
@click.option("--run-steps", default=300, show_default=True, help="Steps of that run (it is stopped after the shot).")
@click.option("--shot-at", default=150, show_default=True, help="Shoot at the first evaluation from this step on.")
@click.option(
    "--run-form",
    default="",
    help="Other form fields of the run, id=value, comma-separated (e.g. context_length=64,eval_interval=10); "
    "by default the form's own defaults, the run one key starts.",
)
def main(
    checkpoint: str | None,
    out: Path,
    prompts: tuple[str, ...],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    screens: str,
    run_name: str,
    run_steps: int,
    shot_at: int,
    run_form: str,
) -> None:
    """Write screenshots/prompt.svg, prompt-80x24.svg, prompt-120x36.svg, tokens.svg, settings.svg, attention.svg,
    lens.svg, compare.svg, versus.svg (it needs a second checkpoint in the store), data.svg, loss.svg, surface.svg,
    train.svg, train-80x24.svg, train-120x36.svg, checkpoints.svg, checkpoints-80x24.svg and checkpoints-120x36.svg."""
    out.mkdir(parents=True, exist_ok=True)
    if screens in ("surface", "loss") and not checkpoint:
        raise click.ClickException(f"--screens {screens} needs --checkpoint NAME (a checkpoint in the store)")
    if screens in ("all", "learn", "data"):
        click.echo(f"wrote {asyncio.run(_shoot_data(checkpoint, out, (130, 58)))}")
    if screens in ("all", "learn", "loss") and checkpoint:
        click.echo(f"wrote {asyncio.run(shoot_loss(checkpoint, out))}")
    if screens in ("all", "learn", "surface") and checkpoint:
        click.echo(f"wrote {asyncio.run(_shoot_surface(checkpoint, out))}")
    if screens in ("learn", "data", "loss", "surface"):
        return
    if screens in ("all", "train"):
        form = dict(item.split("=", 1) for item in run_form.split(",") if item)
        form |= {"name": run_name, "max_steps": str(run_steps)}
        for path in asyncio.run(_shoot_training(checkpoint, out, form, shot_at, (140, 42))):
            click.echo(f"wrote {path}")
        if screens == "train":
            return
    prompts_list = list(prompts) or ["The list method append", "A function is defined with"]
    settings = DecodingSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, top_n=30
    )
    shots = [
        ("prompt", (140, 40), prompts_list, 6, True, False, False),
        ("prompt-80x24", (80, 24), prompts_list[-1:], 3, False, False, False),
        ("prompt-120x36", (120, 36), prompts_list, 0, False, False, False),
        ("tokens", (110, 30), prompts_list[-1:], 0, True, True, False),
        ("settings", (100, 30), prompts_list[-1:], 0, False, False, True),
    ]
    if screens == "inspect":
        shots = []
    for name, size, shot_prompts, back, colours, boundaries, dialog in shots:
        path = asyncio.run(
            _shoot(checkpoint, out, size, name, shot_prompts, settings, back, colours, boundaries, dialog)
        )
        click.echo(f"wrote {path}")
    # The cursor on a token a few from the end; attention shown for the last layer's mean, the lens as it opens.
    for name, back, keys in (
        ("attention", 4, ("a", "up")),
        ("lens", 4, ("l",)),
        ("compare", 0, ("ctrl+b",)),
        ("versus", 0, ("ctrl+n", "enter")),
    ):
        path = asyncio.run(
            _shoot(checkpoint, out, (110, 32), name, prompts_list[-1:], settings, back, False, False, False, keys)
        )
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
