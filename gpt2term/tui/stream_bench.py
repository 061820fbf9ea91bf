"""How fast the app streams tokens against the engine alone (what `gpt2term generate` runs), same model and prompt.

The app runs headless under Textual's Pilot in this process, so both sides decode with the same weights, threads
and machine; runs alternate in pairs (engine, app, app, engine, ...) and the ratio is the median of each pair's,
so drift in the machine's speed, which moves both runs of a pair alike, cancels out. The app's speed is counted as
a user sees it: from the moment the first token is on screen to the moment the last one is.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from gpt2term.core.generation import DecodingSettings, Summary, generate
from gpt2term.core.model import GPTModel
from gpt2term.core.tokenizer import default_tokenizer

APP_TOP_N = 30  # what the prompt screen asks the engine for (alternatives for its probability panel)


def _engine_run(model: GPTModel, prompt: str, settings: DecodingSettings) -> float:
    tokenizer = default_tokenizer()
    steps = list(generate(model, tokenizer, tokenizer.encode(prompt), settings))
    return Summary.of(steps).tokens_per_second


async def _app_runs(model: GPTModel, prompt: str, settings: DecodingSettings, order: list[str]) -> dict[str, list]:
    from gpt2term.tui.app import make_app
    from gpt2term.tui.screens.prompt import PromptScreen

    results: dict[str, list] = {"engine": [], "app": [], "app_engine": [], "app_flushes": [], "ui_share": []}
    app = make_app(model=model, model_name="bench", keymap={})
    async with app.run_test(size=(120, 40)) as pilot:
        deadline = time.monotonic() + 600
        while app.app_model is None and time.monotonic() < deadline:
            await pilot.pause(0.01)
        screen = app.screen
        assert isinstance(screen, PromptScreen)
        screen.shown_at = {}  # the screen records its redraw times only when asked
        for who in order:
            if who == "engine":
                results["engine"].append(_engine_run(model, prompt, settings))
                continue
            screen.settings = settings
            turn = screen.start_generation(prompt)
            assert turn is not None
            await app.workers.wait_for_complete()  # no polling beside the decoder: it would take its CPU
            while turn.state == "generating" and time.monotonic() < deadline:
                await pilot.pause()
            shown = [(t, n, cpu) for t, n, cpu in screen.shown_at.get(turn.id, []) if n >= 1]
            (first, first_n, first_cpu), (last, last_n, last_cpu) = shown[0], shown[-1]
            # A redraw shows every token that came since the last one: count those after the first redraw's. All
            # of them in one redraw means the screen kept up with the decoder: the thread's own rate.
            rate = (last_n - first_n) / (last - first) if last > first else turn.summary.tokens_per_second
            results["app"].append(rate)
            results["app_engine"].append(turn.summary.tokens_per_second)
            results["app_flushes"].append(len(shown))
            # What the decoder lost to the UI: the UI thread's CPU time while the tokens streamed, as a share.
            results["ui_share"].append((last_cpu - first_cpu) / (last - first) if last > first else 0.0)
    return results


def bench_app(model: GPTModel, *, tokens: int = 200, repeats: int = 3, prompt: str = "Every effort moves you") -> dict:
    """Tokens/s of the engine alone and of the app showing them, medians of alternating runs."""
    settings = DecodingSettings(max_new_tokens=tokens, stop_at_eos=False, top_n=APP_TOP_N)
    _engine_run(model, prompt, DecodingSettings(max_new_tokens=4, top_n=APP_TOP_N))  # warm-up, untimed
    order: list[str] = []
    for r in range(repeats):
        order += ["engine", "app"] if r % 2 == 0 else ["app", "engine"]
    runs = asyncio.run(_app_runs(model, prompt, settings, order))
    engine = statistics.median(runs["engine"])
    app = statistics.median(runs["app"])
    result: dict[str, Any] = {
        "engine_tokens_per_second": engine,
        "app_tokens_per_second": app,
        "app_vs_engine": statistics.median(a / e for a, e in zip(runs["app"], runs["engine"], strict=True) if e),
        # The generation thread's own rate inside the app: below the engine's when the UI takes its CPU.
        "app_thread_tokens_per_second": statistics.median(runs["app_engine"]),
        "app_screen_updates": runs["app_flushes"],
        # The UI thread's CPU seconds per second of streaming (median): on a machine whose cores the decoder fills,
        # about the share of its speed the app costs it, and steadier from run to run than the tokens/s are.
        "app_ui_cpu_share": statistics.median(runs["ui_share"]),
        "runs": {k: [round(v, 2) for v in runs[k]] for k in ("engine", "app", "app_engine")},
        "tokens": tokens,
        "repeats": repeats,
        "prompt": prompt,
    }
    return result
