"""The Train form's recipe, schedule, qkv bias and step-0 evaluation: a recipe fills the fields, what the fields
say is what runs, and the untrained model's loss (step 0) reaches the screen."""

from __future__ import annotations

import asyncio

from textual.widgets import Checkbox, Select

from gpt2term.core.training import EvalEvent, FinishedEvent
from tests.test_tui_train import SMALL, corpus_file, fill, open_train, settle, small_app, start  # noqa: F401


def test_choosing_the_book_recipe_fills_the_form_and_the_fields_still_win():
    async def scenario() -> None:
        app = small_app()
        async with app.run_test(size=(100, 40)) as pilot:
            screen = await open_train(pilot)
            form = screen.form
            assert form.recipe == "default" and form.read().recipe == "default"
            form.query_one("#recipe", Select).value = "book"
            await settle(pilot, lambda: form.value("context_length") == "256", "the book's context")
            await pilot.pause()
            assert str(form.query_one("#model", Select).value) == "new:gpt2-124M"
            values = {f: form.value(f) for f in ("emb_dim", "n_layers", "batch_size", "lr", "epochs", "max_steps")}
            assert values == {"emb_dim": "768", "n_layers": "12", "batch_size": "2", "lr": "0.0004", "epochs": "10",
                              "max_steps": ""}  # fmt: skip
            assert (form.value("eval_interval"), form.value("seed"), form.value("context_length")) == (
                "5",
                "123",
                "256",
            )
            assert str(form.query_one("#schedule", Select).value) == "constant"
            assert form.query_one("#qkv_bias", Checkbox).value is False
            assert form.query_one("#eval_at_start", Checkbox).value is True
            s = form.read()
            assert (s.recipe, s.preset, s.model, s.context_length, s.epochs, s.max_steps) == (
                "book", "gpt2-124M", {"qkv_bias": False, "drop_rate": 0.1}, 256, 10, None)  # fmt: skip
            assert (s.schedule, s.warmup_steps, s.grad_clip, s.eval_timing, s.sample_every, s.lr) == (
                "constant", 0, None, "book", "epoch", 4e-4)  # fmt: skip
            assert "gpt2-124M model (162.4M parameters)" in str(screen.query_one("#run-help").render())

            # Each field still overrides the recipe.
            form.query_one("#schedule", Select).value = "linear"
            form.query_one("#qkv_bias", Checkbox).value = True
            form.query_one("#eval_at_start", Checkbox).value = False
            fill(screen, min_lr_ratio="0.5", max_steps="7", epochs="", emb_dim="64", n_heads="2")
            await pilot.pause()
            s = form.read()
            assert (s.schedule, s.min_lr_ratio, s.eval_at_start, s.max_steps, s.epochs) == (
                "linear",
                0.5,
                False,
                7,
                None,
            )
            assert s.model == {"qkv_bias": True, "drop_rate": 0.1, "emb_dim": 64, "n_heads": 2}
            fill(screen, min_lr_ratio="2")
            assert any("must be between 0 and 1" in str(e) for e in _errors(form))

            # Back to the default recipe: the one-key run again.
            form.query_one("#recipe", Select).value = "default"
            await settle(pilot, lambda: form.value("context_length") == "128", "the tiny preset's context")
            await pilot.pause()
            s = form.read()
            assert (s.recipe, s.preset, s.max_steps, s.schedule, s.model, s.eval_timing) == (
                "default", "tiny", 300, "cosine", {}, "interval")  # fmt: skip

    asyncio.run(scenario())


def _errors(form) -> list[Exception]:
    try:
        form.read()
    except Exception as exc:  # the form's InputError
        return [exc]
    return []


def test_the_step_zero_evaluation_reaches_the_train_screen(corpus_file):  # noqa: F811
    async def scenario() -> None:
        app = small_app()
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await open_train(pilot)
            screen.form.query_one("#recipe", Select).value = "book"
            await settle(pilot, lambda: screen.form.value("context_length") == "256", "the book's context")
            await pilot.pause()
            fill(screen, corpus=str(corpus_file), name="book-small", max_steps="2", epochs="", **SMALL)
            recorder = await start(pilot, screen)
            await recorder.until(lambda ev: any(isinstance(e, FinishedEvent) for e in ev), "the end of the run")
            assert [e.step for e in recorder.of(EvalEvent)] == [0, 1, 2]
            await settle(pilot, lambda: screen.state.status == "completed", "the finished run")
            assert screen.state.val_loss.steps == [0, 1, 2]
            assert abs(screen.state.val_loss.values[0] - 10.82) < 0.3  # ln(50257): the untrained model
            log = "\n".join(screen.log_view.lines_written)
            assert "eval at step 0: train loss" in log

    asyncio.run(scenario())


def test_resuming_a_book_run_shows_its_recipe_fixed_and_keeps_its_own_fields(corpus_file):  # noqa: F811
    from gpt2term.core.training import Trainer, TrainingSettings
    from gpt2term.tui.widgets.train_form import ModelChoice

    model = {"emb_dim": 32, "n_layers": 1, "n_heads": 2}
    saved = TrainingSettings.from_recipe("book", name="bk", corpus=[str(corpus_file)], model=model, context_length=16,
                                         max_steps=2, eval_iters=1, sample_tokens=2)  # fmt: skip
    Trainer(saved).run()

    async def scenario() -> None:
        app = small_app()
        async with app.run_test(size=(100, 40)) as pilot:
            screen = await open_train(pilot)
            form = screen.form
            form.choose(ModelChoice("resume", "bk"))
            await settle(pilot, lambda: form.value("name") == "bk", "the resumed run's fields")
            for _ in range(5):  # the Select messages of that fill are handled after it
                await pilot.pause()
            recipe = form.query_one("#recipe", Select)
            assert (str(recipe.value), recipe.disabled) == ("book", True)
            assert (form.value("context_length"), form.value("emb_dim"), form.value("batch_size")) == ("16", "32", "2")
            assert str(form.query_one("#schedule", Select).value) == "constant"
            assert str(form.query_one("#model", Select).value) == "resume:bk"
            s = form.read()
            assert (s.resume, s.recipe, s.eval_timing, s.schedule, s.model["qkv_bias"]) == (
                True, "book", "book", "constant", False)  # fmt: skip

    asyncio.run(scenario())
