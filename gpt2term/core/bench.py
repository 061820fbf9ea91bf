"""Side-by-side benchmarks: our engine against what a user would otherwise run, in one process, on one machine.

Speed claims are only worth the measurement behind them, and a shared 2-core machine is noisy, so each benchmark
runs the contenders alternately (A B, B A, ...), takes medians, and prints the machine and its load with the numbers.
`transformers` is optional here: without it the benchmark reports our numbers alone and says how to get the rest.

- `bench_generate`: greedy decoding (our `generate`, which also reports probabilities and alternatives each step,
  against `GPT2LMHeadModel.generate(do_sample=False)` with the same weights), tokens/s after the first token,
  time to the first token, and whether both produced the same tokens.
- `bench_train`: training throughput (tokens/s) of our training step against a plain PyTorch loop over
  `GPT2LMHeadModel` of the same shape (AdamW, same batch, context, gradient clipping and number format).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gpt2term.core import accel
from gpt2term.core.config import GPTConfig, preset
from gpt2term.core.devices import autocast, resolve_dtype
from gpt2term.core.errors import InputError
from gpt2term.core.memory import require_memory, require_training_memory
from gpt2term.core.model import GPTModel

INSTALL_TRANSFORMERS = "pip install transformers (or: pip install 'gpt2term[test]')"
NO_TRANSFORMERS = f"transformers is not installed, so only our numbers are shown; to compare: {INSTALL_TRANSFORMERS}"
DEFAULT_PROMPT = "Every effort moves you"
TRAIN_LR = 5e-4  # the trainer's defaults (TrainingSettings): what `gpt2term train` runs with
TRAIN_WEIGHT_DECAY = 0.1
TRAIN_GRAD_CLIP = 1.0

Progress = Callable[[str], None]


# ------------------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo), else what the platform module knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return str(transformers.__version__)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What a number depends on: threads, versions, the CPU, and how busy the machine was."""
    info: dict[str, Any] = {
        "device": device,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers_version(),
        "python": platform.python_version(),
        "accel": accel.describe(),  # GPT2TERM_ACCEL=0 benchmarks the plain PyTorch model
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours and theirs else None


def _alternate(repeats: int) -> Iterator[bool]:
    """True when ours goes first in this round: A B, B A, A B, ... so drift in machine load hits both alike."""
    for r in range(repeats):
        yield r % 2 == 0


# ---------------------------------------------------------------------------------------------------- generate


@dataclass
class GenerationRun:
    """One timed greedy run: its tokens and when each arrived (seconds since the call)."""

    tokens: list[int]
    times: list[float]

    @property
    def time_to_first_token_s(self) -> float:
        return self.times[0]

    @property
    def tokens_per_second(self) -> float:
        """After the first token (which also pays for reading the prompt), as `generate`'s summary counts it."""
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return len(self.times) / self.times[-1] if self.times else 0.0
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def _run_ours(model: GPTModel, prompt_ids: list[int], tokens: int) -> GenerationRun:
    from gpt2term.core.generation import DecodingSettings, generate
    from gpt2term.core.tokenizer import default_tokenizer

    settings = DecodingSettings(max_new_tokens=tokens, temperature=0.0, stop_at_eos=False)
    ids, times = [], []
    start = time.perf_counter()
    for step in generate(model, default_tokenizer(), prompt_ids, settings):
        times.append(time.perf_counter() - start)
        ids.append(step.token_id)
    return GenerationRun(ids, times)


def _hf_model(model: GPTModel) -> Any:
    """transformers' GPT2LMHeadModel holding exactly `model`'s weights (tied head when ours is tied)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2term.core.interop import config_to_hf, to_hf_state_dict

    state, tied = to_hf_state_dict(model.state_dict(), model.cfg)
    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(model.cfg, tied)))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights did not map onto transformers' GPT-2: missing {missing}, unexpected {unexpected}")
    if tied:
        hf.tie_weights()
    return hf.eval()


def _run_hf(hf: Any, prompt_ids: list[int], tokens: int) -> GenerationRun:
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # the first call hands over the prompt
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter() - start)

        def end(self) -> None:
            pass

    clock = Clock()
    inputs = torch.tensor([prompt_ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=tokens,
            do_sample=False,
            eos_token_id=None,  # never stop early: ours runs with stop_at_eos=False
            pad_token_id=0,
            streamer=clock,
        )
    return GenerationRun(out[0, len(prompt_ids) :].tolist(), clock.times)


def _matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _summarise(runs: list[GenerationRun]) -> dict[str, Any]:
    return {
        "tokens_per_second": _median([r.tokens_per_second for r in runs]),
        "time_to_first_token_s": _median([r.time_to_first_token_s for r in runs]),
        "runs_tokens_per_second": [round(r.tokens_per_second, 3) for r in runs],
    }


def _generation_dtypes(dtype: str) -> list[str]:
    key = dtype.lower()
    if key == "both":
        return ["fp32", "bf16"]
    if key == "all":
        return ["fp32", "bf16", "int8"]
    if key in ("fp32", "float32"):
        return ["fp32"]
    if key in ("bf16", "bfloat16"):
        return ["bf16"]
    if key == "int8":
        return ["int8"]
    raise InputError(f"unknown --dtype {dtype!r}; choose fp32, bf16, int8, both or all")


def bench_generate(
    checkpoint: str | None = None,
    *,
    tokens: int = 200,
    repeats: int = 5,
    dtype: str = "fp32",
    preset_name: str = "gpt2-124M",
    prompt: str = DEFAULT_PROMPT,
    compare: bool = True,
    seed: int = 123,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Greedy decoding, ours (in each dtype asked) against transformers' fp32 `generate`, alternating runs."""
    from gpt2term.core.generation import check_max_new_tokens
    from gpt2term.core.tokenizer import default_tokenizer

    if tokens < 2:
        raise InputError(f"--tokens must be at least 2 (the first token also reads the prompt), got {tokens}")
    if repeats < 1:
        raise InputError(f"--repeats must be at least 1, got {repeats}")
    dtypes = _generation_dtypes(dtype)
    say = progress or (lambda _msg: None)
    if checkpoint is None:
        torch.manual_seed(seed)
        model = GPTModel(preset(preset_name))
        source = f"random {preset_name} (seed {seed})"
    else:
        from gpt2term.core.store.resolve import resolve_weights

        model = resolve_weights(checkpoint).build_model()
        source = checkpoint
    model.eval()
    check_max_new_tokens(tokens, model.cfg.context_length)
    prompt_ids = default_tokenizer().encode(prompt)[-model.cfg.context_length :]
    if not prompt_ids:
        raise InputError("the benchmark prompt is empty; pass some text with --prompt")
    hf = None
    missing = None
    if compare:
        if transformers_version() is None:
            missing = NO_TRANSFORMERS
        else:
            say("building transformers' GPT2LMHeadModel with the same weights")
            hf = _hf_model(model)

    prepare_s: dict[str, float] = {}
    packed_mb: dict[str, float] = {}

    def use(dt: str) -> None:
        started = time.perf_counter()
        accel.accelerate(model, dt)
        prepare_s[dt] = time.perf_counter() - started
        packed = accel.packed_weights(model)
        packed_mb[dt] = packed.nbytes() / 1e6 if packed is not None else 0.0

    # Warm up every contender once (packs our weights, fills allocator caches), untimed.
    say("warming up")
    for dt in dtypes:
        use(dt)
        _run_ours(model, prompt_ids, min(tokens, 8))
    if hf is not None:
        _run_hf(hf, prompt_ids, min(tokens, 8))

    ours_runs: dict[str, list[GenerationRun]] = {dt: [] for dt in dtypes}
    hf_runs: list[GenerationRun] = []
    for r, ours_first in enumerate(_alternate(repeats)):
        say(f"round {r + 1}/{repeats}")
        order: list[str] = [*dtypes, "hf"] if ours_first else ["hf", *dtypes]
        for who in order:
            if who == "hf":
                if hf is not None:
                    hf_runs.append(_run_hf(hf, prompt_ids, tokens))
            else:
                use(who)  # switching dtype repacks; a no-op when it is already packed this way
                ours_runs[who].append(_run_ours(model, prompt_ids, tokens))

    ours: dict[str, Any] = {}
    for dt in dtypes:
        ours[dt] = _summarise(ours_runs[dt]) | {
            "prepare_s": prepare_s.get(dt),
            "packed_weights_mb": round(packed_mb.get(dt, 0.0), 1),
        }
    reference_tokens = hf_runs[0].tokens if hf_runs else None
    result: dict[str, Any] = {
        "benchmark": "generate",
        "machine": machine_info(),
        "settings": {
            "model": source,
            "config": model.cfg.to_dict(),
            "parameters": model.num_parameters(),
            "prompt": prompt,
            "prompt_tokens": len(prompt_ids),
            "new_tokens": tokens,
            "repeats": repeats,
            "dtypes": dtypes,
            "decoding": "greedy",
        },
        "ours": ours,
        "transformers": _summarise(hf_runs) | {"dtype": "fp32"} if hf_runs else None,
        "ratio": {
            dt: _ratio(ours[dt]["tokens_per_second"], _median([r.tokens_per_second for r in hf_runs])) for dt in dtypes
        },
        "tokens_match": {},
        "matching_prefix": {},
        "note": missing,
    }
    for dt in dtypes:
        mine = ours_runs[dt][0].tokens
        # Every run of ours must agree with itself; against transformers when it ran, else against our fp32.
        reference = reference_tokens if reference_tokens is not None else ours_runs[dtypes[0]][0].tokens
        consistent = all(run.tokens == mine for run in ours_runs[dt])
        result["tokens_match"][dt] = consistent and mine == reference
        result["matching_prefix"][dt] = _matching_prefix(mine, reference)
    for low in ("bf16", "int8"):
        if "fp32" in dtypes and low in dtypes:
            low_tokens, fp32_tokens = ours_runs[low][0].tokens, ours_runs["fp32"][0].tokens
            result[f"{low}_matches_fp32_prefix"] = _matching_prefix(low_tokens, fp32_tokens)
    result["machine_after"] = {"load_average": machine_info().get("load_average")}
    return result


# ------------------------------------------------------------------------------------------------------- train


def _train_dtypes(dtype: str) -> list[str]:
    key = dtype.lower()
    if key == "both":
        return ["fp32", "bf16"]
    if key in ("fp32", "float32", "bf16", "bfloat16"):
        return ["bf16" if key.startswith("b") else "fp32"]
    raise InputError(f"unknown --dtype {dtype!r}; choose fp32, bf16 or both")


def _plain_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    amp: torch.dtype | None,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One training step the way chapter 5 (and a user's own loop) writes it, with the trainer's clipping."""
    device = torch.device("cpu")

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = logits_of(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN_GRAD_CLIP)
        optimizer.step()
        return float(loss.detach())

    return step


def _run_trainer(
    preset_name: str,
    cfg: GPTConfig,
    *,
    batch_size: int,
    context_length: int | None,
    total_steps: int,
    dtype: str,
    seed: int,
    between_steps: Callable[[int], None],
) -> tuple[list[float], list[float]]:
    """Our real `Trainer` (its optimizer, loss, clipping, data and events) on random token ids, in a temporary store.

    Returns each step's seconds and loss. A step is timed from the end of the previous step's event to its own
    event, so it includes all the trainer does per step; `between_steps(i)` runs in that gap, untimed (the other
    contender's step, so the two alternate).
    """
    import tempfile
    from pathlib import Path

    from gpt2term.core.data import TokenizedCorpus
    from gpt2term.core.store.store import CheckpointStore
    from gpt2term.core.training import StartEvent, StepEvent, Trainer, TrainingSettings

    window = cfg.context_length + 1
    generator = torch.Generator().manual_seed(seed + 1)
    train = torch.randint(
        0, cfg.vocab_size, ((total_steps + 1) * batch_size * cfg.context_length + window,), generator=generator
    )
    val = torch.randint(0, cfg.vocab_size, (2 * window,), generator=generator)
    corpus = TokenizedCorpus(
        train_ids=train.to(torch.uint16) if cfg.vocab_size <= 65536 else train,
        val_ids=val.to(torch.uint16) if cfg.vocab_size <= 65536 else val,
        content_hash="bench",
        description="random token ids",
        documents=1,
        characters=0,
        cache_path=None,
        from_cache=False,
    )
    settings = TrainingSettings(
        name="bench",
        preset=preset_name,
        batch_size=batch_size,
        context_length=context_length,
        max_steps=total_steps,
        eval_interval=total_steps,
        eval_iters=1,
        save_interval=0,
        sample_tokens=0,
        dtype=dtype,
        device="cpu",
        seed=seed,
    )
    times: list[float] = []
    losses: list[float] = []
    mark = time.perf_counter()

    def listen(event: object) -> None:
        nonlocal mark
        if isinstance(event, StartEvent):
            mark = time.perf_counter()
        elif isinstance(event, StepEvent):
            times.append(time.perf_counter() - mark)
            losses.append(event.loss)
            between_steps(len(times) - 1)
            mark = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="gpt2term-bench-") as folder:
        Trainer(settings, store=CheckpointStore(Path(folder)), listeners=[listen], corpus=corpus).run()
    return times, losses


def _hf_training_step(
    cfg: GPTConfig, amp: torch.dtype | None, seed: int
) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """A plain PyTorch loop over transformers' GPT2LMHeadModel of the same shape (untied, like ours)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2term.core.interop import config_to_hf

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(cfg, tied=False))).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=TRAIN_LR, weight_decay=TRAIN_WEIGHT_DECAY)
    return _plain_step(hf, optimizer, amp, lambda inputs: hf(inputs).logits)


def bench_train(
    preset_name: str = "tiny",
    *,
    batch_size: int = 8,
    context_length: int | None = None,
    steps: int = 6,
    warmup: int = 2,
    dtype: str = "both",
    compare: bool = True,
    seed: int = 123,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Training tokens/s, ours against transformers, one step each in turn, median step time after warm-up."""
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise InputError("--batch-size and --steps must be at least 1 (and warm-up steps 0 or more)")
    say = progress or (lambda _msg: None)
    cfg = preset(preset_name)
    if context_length:
        if context_length < 1:
            raise InputError(f"--context-length must be positive, got {context_length}")
        cfg = cfg.with_(context_length=context_length)
    context = cfg.context_length
    dtypes = _train_dtypes(dtype)
    missing = None
    run_hf = compare and transformers_version() is not None
    if compare and not run_hf:
        missing = NO_TRANSFORMERS
    require_training_memory(cfg, batch_size, context)
    require_memory(
        (warmup + steps) * batch_size * (context + 1) * 8, "the benchmark's token batches", "use fewer --steps"
    )
    generator = torch.Generator().manual_seed(seed)
    batches = torch.randint(0, cfg.vocab_size, (warmup + steps, batch_size, context + 1), generator=generator)
    tokens_per_step = batch_size * context

    results: dict[str, Any] = {"ours": {}, "transformers": {} if run_hf else None, "ratio": {}}
    for dt in dtypes:
        amp = resolve_dtype(dt)
        theirs = _hf_training_step(cfg, amp, seed) if run_hf else None
        hf_times: list[float] = []
        hf_losses: list[float] = []

        def their_step(
            i: int, dt: str = dt, theirs: Callable | None = theirs, times: list = hf_times, losses: list = hf_losses
        ) -> None:
            say(f"{dt}: step {i + 1}/{warmup + steps}" + (" (warm-up)" if i < warmup else ""))
            if theirs is None:
                return
            batch = batches[i]
            started = time.perf_counter()
            losses.append(theirs(batch[:, :-1], batch[:, 1:]))
            times.append(time.perf_counter() - started)

        our_times, our_losses = _run_trainer(
            preset_name,
            cfg,
            batch_size=batch_size,
            context_length=context_length,
            total_steps=warmup + steps,
            dtype="bfloat16" if dt == "bf16" else "float32",
            seed=seed,
            between_steps=their_step,
        )
        timed = {"ours": (our_times, our_losses)}
        if run_hf:
            timed["transformers"] = (hf_times, hf_losses)
        for name, (times, losses) in timed.items():
            step_s = _median(times[warmup:])
            results[name][dt] = {
                "tokens_per_second": tokens_per_step / step_s if step_s else None,
                "step_s": step_s,
                "runs_step_s": [round(t, 4) for t in times[warmup:]],
                "first_loss": losses[0],
                "last_loss": losses[-1],
            }
        results["ratio"][dt] = (
            _ratio(results["ours"][dt]["tokens_per_second"], results["transformers"][dt]["tokens_per_second"])
            if run_hf
            else None
        )
    return {
        "benchmark": "train",
        "machine": machine_info(),
        "settings": {
            "preset": preset_name,
            "config": cfg.to_dict(),
            "batch_size": batch_size,
            "context_length": context,
            "tokens_per_step": tokens_per_step,
            "steps": steps,
            "warmup_steps": warmup,
            "dtypes": dtypes,
            "ours": "gpt2term's Trainer (its own optimizer, loss and per-step work), timed step by step",
            "transformers": f"plain loop: AdamW lr={TRAIN_LR} weight_decay={TRAIN_WEIGHT_DECAY}, grad clip "
            f"{TRAIN_GRAD_CLIP}, F.cross_entropy on the logits",
        },
        **results,
        "note": missing,
    }
