"""Named runs (`train --recipe NAME`) and the choices of a few settings, kept free of torch so the command line
can list them in its options without importing the engine."""

from __future__ import annotations

from typing import Any

COURSE_PROMPT = "Every effort moves you"
SCHEDULES = ("constant", "cosine", "linear")  # the learning rate after the warmup (see training.schedule)
EVAL_TIMINGS = ("interval", "book")  # after steps N, 2N, ... / after updates 1, N+1, 2N+1, ... (chapter 5's loop)
INITS = ("gpt2", "book")  # a new model's weights: GPT-2's normal(0, 0.02) / PyTorch's layer defaults (the book's)
SAMPLE_TIMINGS = ("eval", "epoch")  # a greedy sample after each evaluation / after each epoch (chapter 5)
# Whole runs in one word (`train --recipe NAME`): each replaces the defaults of the settings it names, and an
# option given explicitly still wins. "book" is chapter 5's run of `train_model_simple` on GPT_CONFIG_124M with
# qkv_bias=False (its stride, left unset, is the context length: 256, as the book's loader is built).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "book": {
        "preset": "gpt2-124M",
        "model": {"qkv_bias": False, "drop_rate": 0.1},
        "init": "book",
        "context_length": 256,
        "stride": None,
        "lr": 4e-4,
        "weight_decay": 0.1,
        "schedule": "constant",
        "warmup_steps": 0,
        "grad_clip": None,
        "batch_size": 2,
        "epochs": 10,
        "eval_interval": 5,
        "eval_iters": 5,
        "eval_timing": "book",
        "sample_prompt": COURSE_PROMPT,
        "sample_tokens": 50,
        "sample_every": "epoch",
        "seed": 123,
        "val_ratio": 0.1,
    },
}
