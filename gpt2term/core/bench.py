"""Side-by-side benchmarks: our engine against what a user would otherwise run, in one process, on one machine.

Speed claims are only worth the measurement behind them, and a shared 2-core machine is noisy, so each benchmark
runs the contenders alternately (A B, B A, ...), takes medians, and prints the machine and its load with the numbers.
`transformers` is optional here: without it the benchmark reports our numbers alone and says how to get the rest.

- `bench_generate`: greedy decoding (our `generate`, which also reports probabilities and alternatives each step,
  against `GPT2LMHeadModel.generate(do_sample=False)` with the same weights), tokens/s after the first token,
  time to the first token, and whether both produced the same tokens.
- `bench_train`: training throughput (tokens/s) of our training step against a plain PyTorch loop over
  `GPT2LMHeadModel` of the same shape (AdamW, same batch, context, gradient clipping and number format), on the CPU
  or a CUDA GPU, with model FLOPs utilisation (`flops_per_token`) where the peak is known, and `profile` for the
  top ops of both steps.
"""

from __future__ import annotations

import contextlib
import math
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
from gpt2term.core.devices import autocast
from gpt2term.core.errors import InputError
from gpt2term.core.memory import require_memory, require_training_memory
from gpt2term.core.model import GPTModel
from gpt2term.core.peers import WorkerProcess

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


def cpu_identity() -> dict[str, str]:
    """Vendor, family and model number as lscpu shows them (a marketing name can be wrong or generic)."""
    wanted = {"vendor_id": "vendor", "cpu family": "family", "model": "model"}
    found: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in wanted and wanted[key] not in found:
                found[wanted[key]] = value.strip()
            if not line.strip() and found:  # the first processor's block is enough
                break
    return found


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
        "cpu_id": cpu_identity(),
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


def _decoding_dtype_available(dtype: str) -> bool:
    """Whether our decoding knows this dtype (int8 arrives with its own change; until then it is skipped)."""
    from gpt2term.core.accel import decode

    try:
        wanted = decode.inference_dtype(dtype)
    except InputError:
        return False
    return wanted != torch.int8 or accel.enabled()  # int8 exists only on the fast path


def available_threads() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_thread_counts(spec: str) -> list[int]:
    """`--threads 4` or a sweep `--threads 1,2,all` ("all": every core this process may use)."""
    from gpt2term.core.devices import check_threads

    counts: list[int] = []
    for part in str(spec).split(","):
        part = part.strip().lower()
        if part == "all":
            n = available_threads()
        elif part.isdigit() and int(part) >= 1:
            n = int(part)
        else:
            raise InputError(f"--threads takes a count or a list like 1,2,all; {part!r} is neither")
        check_threads(n)
        if n not in counts:
            counts.append(n)
    return counts


def _load_model(checkpoint: str | None, preset_name: str, seed: int) -> tuple[GPTModel, str]:
    if checkpoint is None:
        torch.manual_seed(seed)
        return GPTModel(preset(preset_name)), f"random {preset_name} (seed {seed})"
    from gpt2term.core.store.resolve import resolve_weights

    return resolve_weights(checkpoint).build_model(), checkpoint


def _take_turns(
    model: GPTModel,
    hf: Any,
    ct2: dict[str, Any],
    dtypes: list[str],
    prompt_ids: list[int],
    tokens: int,
    repeats: int,
    threads: int,
    use: Callable[[str], None],
    say: Progress,
) -> tuple[dict[str, list[GenerationRun]], list[int] | None]:
    """Every contender warmed up once, then `repeats` rounds in alternating order; the runs of each, and our
    float32 tokens when fp32 is not among `dtypes` but the peers need it as their reference."""
    # Warm up every contender once (packs our weights, fills allocator caches), untimed.
    say(f"warming up ({threads} threads)")
    reference_fp32: list[int] | None = None
    for dt in dtypes:
        use(dt)
        _run_ours(model, prompt_ids, min(tokens, 8))
    if ct2 and "fp32" not in dtypes:  # the peers are checked against our float32: decode it once, untimed
        use("fp32")
        reference_fp32 = _run_ours(model, prompt_ids, tokens).tokens
    if hf is not None:
        _run_hf(hf, prompt_ids, min(tokens, 8))
    for generator in ct2.values():
        generator.run(prompt_ids, min(tokens, 8))

    contenders: list[str] = [*dtypes]
    if hf is not None:
        contenders.append("hf")
    contenders += [f"ct2:{q}" for q in ct2]
    runs: dict[str, list[GenerationRun]] = {who: [] for who in contenders}
    for r, ours_first in enumerate(_alternate(repeats)):
        say(f"round {r + 1}/{repeats} ({threads} threads)")
        for who in contenders if ours_first else contenders[::-1]:
            if who == "hf":
                runs[who].append(_run_hf(hf, prompt_ids, tokens))
            elif who.startswith("ct2:"):
                runs[who].append(GenerationRun(*ct2[who[4:]].run(prompt_ids, tokens)))
            else:
                use(who)  # switching dtype repacks; a no-op when it is already packed this way
                runs[who].append(_run_ours(model, prompt_ids, tokens))

    return runs, reference_fp32


def _measure_generation(
    model: GPTModel,
    hf: Any,
    ct2_folders: dict[str, Any],
    dtypes: list[str],
    prompt_ids: list[int],
    tokens: int,
    repeats: int,
    threads: int,
    say: Progress,
) -> dict[str, Any]:
    """Every contender in turns at the current thread count; medians, token checks and ratios."""
    from gpt2term.core.accel import threads as decode_threads

    prepare_s: dict[str, float] = {}
    packed_mb: dict[str, float] = {}

    def use(dt: str) -> None:
        started = time.perf_counter()
        accel.prepare_for_inference(model, dt)
        prepare_s[dt] = time.perf_counter() - started
        packed = accel.packed_weights(model)
        packed_mb[dt] = packed.nbytes() / 1e6 if packed is not None else 0.0

    with contextlib.ExitStack() as workers:
        ct2: dict[str, Any] = {}
        if ct2_folders:
            from gpt2term.core.peers import CT2Generator

            # Each in a process of its own (ended with this block), as a user would run it: see `peer_worker`.
            ct2 = {q: workers.enter_context(CT2Generator(folder, q, threads)) for q, folder in ct2_folders.items()}
        runs, reference_fp32 = _take_turns(model, hf, ct2, dtypes, prompt_ids, tokens, repeats, threads, use, say)

    ours: dict[str, Any] = {}
    for dt in dtypes:
        ours[dt] = _summarise(runs[dt]) | {
            "prepare_s": prepare_s.get(dt),
            "packed_weights_mb": round(packed_mb.get(dt, 0.0), 1),
        }
    hf_runs = runs.get("hf", [])
    hf_speed = _median([r.tokens_per_second for r in hf_runs])
    peers = {q: _summarise(runs[f"ct2:{q}"]) | {"compute_type": q} for q in ct2}
    reference_tokens = hf_runs[0].tokens if hf_runs else None
    measured: dict[str, Any] = {
        "threads": threads,
        "torch_threads": torch.get_num_threads(),  # what transformers ran with
        "decode_split": decode_threads.ways(),  # how many blocks our one-token matmuls were cut into
        "ours": ours,
        "transformers": _summarise(hf_runs) | {"dtype": "fp32"} if hf_runs else None,
        "ctranslate2": peers or None,
        "ratio": {dt: _ratio(ours[dt]["tokens_per_second"], hf_speed) for dt in dtypes},
        "tokens_match": {},
        "matching_prefix": {},
    }
    for dt in dtypes:
        mine = runs[dt][0].tokens
        # Every run of ours must agree with itself; against transformers when it ran, else against our fp32.
        reference = reference_tokens if reference_tokens is not None else runs[dtypes[0]][0].tokens
        consistent = all(run.tokens == mine for run in runs[dt])
        measured["tokens_match"][dt] = consistent and mine == reference
        measured["matching_prefix"][dt] = _matching_prefix(mine, reference)
    for low in ("bf16", "int8"):
        if "fp32" in dtypes and low in dtypes:
            measured[f"{low}_matches_fp32_prefix"] = _matching_prefix(runs[low][0].tokens, runs["fp32"][0].tokens)
    if ct2:
        # The goals compare like with like: our int8 against CTranslate2's int8, every other dtype against its fp32.
        measured["ratio_ctranslate2"] = {
            dt: _ratio(ours[dt]["tokens_per_second"], peers["int8" if dt == "int8" else "fp32"]["tokens_per_second"])
            for dt in dtypes
        }
        fp32_tokens = runs["fp32"][0].tokens if "fp32" in dtypes else reference_fp32 or []
        named = {f"gpt2term {dt}": runs[dt] for dt in dtypes if dt != "fp32"}
        named |= {"transformers fp32": hf_runs} if hf_runs else {}
        named |= {f"ctranslate2 {q}": runs[f"ct2:{q}"] for q in ct2}
        measured["same_as_fp32"] = {
            name: {
                "same": all(run.tokens == fp32_tokens for run in those),
                "matching_prefix": _matching_prefix(those[0].tokens, fp32_tokens),
            }
            for name, those in named.items()
        }
    return measured


def bench_generate(
    checkpoint: str | None = None,
    *,
    tokens: int = 200,
    repeats: int = 5,
    dtype: str = "fp32",
    preset_name: str = "gpt2-124M",
    prompt: str = DEFAULT_PROMPT,
    compare: bool = True,
    peers: bool = False,
    busy: int = 0,
    thread_counts: list[int] | None = None,
    peer_cache: Any = None,
    seed: int = 123,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Greedy decoding, ours (in each dtype asked) against transformers' fp32 `generate`, alternating runs.

    `peers` adds CTranslate2 in fp32 and int8 on the same weights (and needs transformers); `busy` runs that many
    spinning processes beside the whole measurement; `thread_counts` measures everything once per thread count.
    """
    from gpt2term.core.busy import busy as busy_processes
    from gpt2term.core.devices import set_threads
    from gpt2term.core.generation import check_max_new_tokens
    from gpt2term.core.tokenizer import default_tokenizer

    if tokens < 2:
        raise InputError(f"--tokens must be at least 2 (the first token also reads the prompt), got {tokens}")
    if repeats < 1:
        raise InputError(f"--repeats must be at least 1, got {repeats}")
    if busy < 0:
        raise InputError(f"--busy must be 0 or more, got {busy}")
    dtypes = _generation_dtypes(dtype)
    unavailable = [dt for dt in dtypes if not _decoding_dtype_available(dt)]
    dtypes = [dt for dt in dtypes if dt not in unavailable]
    if not dtypes:
        raise InputError(f"--dtype {dtype} is not available in this version of gpt2term; choose fp32 or bf16")
    if peers:
        from gpt2term.core.peers import require_peers

        require_peers()
    say = progress or (lambda _msg: None)
    model, source = _load_model(checkpoint, preset_name, seed)
    model.eval()
    check_max_new_tokens(tokens, model.cfg.context_length)
    prompt_ids = default_tokenizer().encode(prompt)[-model.cfg.context_length :]
    if not prompt_ids:
        raise InputError("the benchmark prompt is empty; pass some text with --prompt")
    hf = None
    notes = []
    if compare or peers:
        if transformers_version() is None:
            notes.append(NO_TRANSFORMERS)
        else:
            say("building transformers' GPT2LMHeadModel with the same weights")
            hf = _hf_model(model)
    ct2_folders: dict[str, Any] = {}
    if peers:
        from gpt2term.core.peers import convert

        ct2_folders = convert(model.state_dict(), model.cfg, ["fp32", "int8"], cache_root=peer_cache, progress=say)
    if unavailable:
        notes.append(f"--dtype {' and '.join(unavailable)} is not available in this version of gpt2term; skipped")

    before = machine_info()
    original_threads = torch.get_num_threads()
    counts = thread_counts or [original_threads]
    sweep: list[dict[str, Any]] = []
    try:
        with busy_processes(busy) as spinners:
            if spinners:
                say(f"{len(spinners)} busy process{'es' if len(spinners) != 1 else ''} spinning beside the runs")
            for n in counts:
                set_threads(n)  # our decode split, transformers and CTranslate2 all follow this count
                sweep.append(_measure_generation(model, hf, ct2_folders, dtypes, prompt_ids, tokens, repeats, n, say))
            after = machine_info()
    finally:
        torch.set_num_threads(original_threads)

    result: dict[str, Any] = {
        "benchmark": "generate",
        "machine": before,
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
            "busy_processes": busy,
            "threads": counts,
            "peers": sorted(ct2_folders) if peers else [],
            "peer_models": {q: str(folder) for q, folder in ct2_folders.items()},  # cached; delete to free the disk
        },
        **{k: v for k, v in sweep[0].items() if k != "threads"},  # the first (or only) thread count
        "note": "; ".join(notes) or None,
    }
    if thread_counts:
        result["sweep"] = sweep
    if peers:
        from gpt2term.core.peers import peer_versions

        result["machine"]["ctranslate2"] = peer_versions()["ctranslate2"]
    result["machine_after"] = {"load_average": after.get("load_average")}
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
    device: torch.device | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One training step the way chapter 5 (and a user's own loop) writes it, with the trainer's clipping."""
    device = device or torch.device("cpu")

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> float:
        inputs, targets = inputs.to(device), targets.to(device)
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
    device: str = "cpu",
    compile_model: bool = False,
    pad_vocab: int | None = None,
) -> tuple[list[float], list[float]]:
    """Our real `Trainer` (its optimizer, loss, clipping, data and events) on random token ids, in a temporary store.

    Returns each step's seconds and loss. A step is timed from the end of the previous step's event to its own
    event, so it includes all the trainer does per step; `between_steps(i)` runs in that gap, untimed (the other
    contender's step, so the two alternate). `pad_vocab` is `accel.pad_vocabulary`'s multiple (None: its default).
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
        device=device,
        compile=compile_model,
        seed=seed,
    )
    times: list[float] = []
    losses: list[float] = []
    mark = time.perf_counter()

    def listen(event: object) -> None:
        nonlocal mark
        if isinstance(event, StartEvent):
            assert trainer.model is not None
            accel.pad_vocabulary(trainer.model, pad_vocab)  # before the first forward (and the first compile)
            mark = time.perf_counter()
        elif isinstance(event, StepEvent):
            times.append(time.perf_counter() - mark)
            losses.append(event.loss)
            between_steps(len(times) - 1)
            mark = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="gpt2term-bench-") as folder:
        trainer = Trainer(settings, store=CheckpointStore(Path(folder)), listeners=[listen], corpus=corpus)
        trainer.run()
    return times, losses


def _hf_training_step(
    cfg: GPTConfig, amp: torch.dtype | None, seed: int, device: torch.device | None = None
) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """A plain PyTorch loop over transformers' GPT2LMHeadModel of the same shape (untied, like ours), with
    PyTorch's default AdamW for the device: what a user's own loop gets."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2term.core.interop import config_to_hf

    torch.manual_seed(seed)
    device = device or torch.device("cpu")
    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(cfg, tied=False))).to(device).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=TRAIN_LR, weight_decay=TRAIN_WEIGHT_DECAY)
    return _plain_step(hf, optimizer, amp, lambda inputs: hf(inputs).logits, device)


class TransformersLoop(WorkerProcess):
    """`_hf_training_step` in a process of its own (`train_peer_worker`), one step per call, on the same batches."""

    module = "gpt2term.core.train_peer_worker"
    label = "transformers' training loop"

    def __init__(self, cfg: GPTConfig, dt: str, seed: int, device: torch.device, batches_file: str) -> None:
        spec = {"config": cfg.to_dict(), "amp": dt, "seed": seed, "device": str(device), "batches": batches_file}
        super().__init__(spec | {"threads": torch.get_num_threads()})

    def step(self, i: int, profile: bool = False) -> tuple[float, float | None]:
        """Step `i`'s loss and seconds (None when profiled)."""
        reply = self._ask({"step": i, "profile": profile})
        return float(reply["loss"]), reply["seconds"]

    def ops(self) -> list[dict[str, Any]]:
        """The profiled steps' top ops (`_op_table`)."""
        return self._ask({"ops": True})["ops"]


# bf16 dense tensor-core peaks (TFLOPS, no sparsity) from the vendors' data sheets, matched against
# torch.cuda.get_device_name(); the first match wins, so "A100" is tried before "A10" and "H100 PCIe" before "H100".
GPU_PEAK_BF16_TFLOPS: list[tuple[str, str, float]] = [
    (r"\bA100\b", "A100", 312.0),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.0),
    (r"\bH100\b", "H100 SXM", 989.0),
    (r"\bH200\b", "H200", 989.0),
    (r"\bL4\b", "L4", 121.0),
    (r"\bA10\b", "A10", 125.0),
    (r"\bRTX 4090\b", "RTX 4090", 165.0),
    (r"\bRTX 3090\b", "RTX 3090", 71.0),
]


def gpu_peak_tflops(device_name: str) -> tuple[str, float] | None:
    """The bf16 dense peak of a GPU known by its name (what `torch.cuda.get_device_name` says), else None."""
    import re

    for pattern, label, tflops in GPU_PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return label, tflops
    return None


def flops_parameters(cfg: GPTConfig) -> int:
    """N of the 6N estimate: every parameter but the two embedding tables, which are looked up, not multiplied
    (for GPT-2 124M this is nanoGPT's count, whose token table doubles as the head)."""
    from gpt2term.core.memory import parameter_count

    return parameter_count(cfg) - cfg.vocab_size * cfg.emb_dim - cfg.context_length * cfg.emb_dim


def flops_per_token(cfg: GPTConfig, context_length: int) -> int:
    """Training FLOPs per token, forward and backward: 6N + 12·L·H·Q·T (PaLM's appendix B, nanoGPT's estimate_mfu),
    with T the sequence length trained on and H·Q = emb_dim."""
    return 6 * flops_parameters(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context_length


def mfu(tokens_per_second: float | None, flops_token: int, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: the FLOPs the model needs per second over the device's peak (0.4 = 40%)."""
    if not tokens_per_second or not peak_tflops:
        return None
    return tokens_per_second * flops_token / (peak_tflops * 1e12)


PROFILE_STEPS = 2  # profiled steps of each contender, after the timed ones (the profiler slows what it watches)
PROFILE_TOP = 15


def _profiler(device: torch.device) -> Any:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities, record_shapes=True)


def _op_table(profs: list[Any], device: torch.device, top: int = PROFILE_TOP) -> list[dict[str, Any]]:
    """Top ops by self time over the profiled steps (device time on a GPU), each with its share of their total."""
    field = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    self_us: dict[str, float] = {}
    calls: dict[str, int] = {}
    for prof in profs:
        for e in prof.key_averages():
            self_us[e.key] = self_us.get(e.key, 0.0) + float(getattr(e, field, 0.0))
            calls[e.key] = calls.get(e.key, 0) + e.count
    total = sum(self_us.values()) or 1.0
    n = max(1, len(profs))
    return [
        {"op": op, "share": us / total, "self_ms_per_step": us / 1e3 / n, "calls_per_step": calls[op] / n}
        for op, us in sorted(self_us.items(), key=lambda kv: -kv[1])[:top]
    ]


def _fp32_matmuls(where: torch.device) -> str:
    """Which kernels our float32 training runs its matrix multiplies on, here (see `accel.linear`)."""
    if where.type != "cpu" or not accel.enabled():
        return "PyTorch's matmul (both)"
    if accel.linear.onednn_training():
        blocks = "oneDNN (this CPU has AVX-512)"
    else:
        blocks = "PyTorch's (MKL on an Intel CPU)" if accel.linear.mkl_on_intel() else "PyTorch's (no AVX-512 here)"
    head = "oneDNN" if accel.linear.onednn_head() else "PyTorch's"
    return f"ours: the blocks' linears on {blocks}, the head's loss on {head}; transformers' loop: PyTorch's matmul"


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
    device: str = "cpu",
    compile_model: bool = False,
    pad_vocab: int | None = None,
    peak_tflops: float | None = None,
    profile: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Training tokens/s, ours against transformers, one step each in turn, median step time after warm-up.

    `device` "cuda" runs both on the GPU (bf16 autocast with `dtype` bf16, the trainer's fused AdamW, SDPA's flash
    attention, the head padded as `accel.pad_vocabulary` says, `compile_model` for torch.compile); the same code
    runs on the CPU. MFU is given against `peak_tflops`, or the known bf16 peak of the GPU. `profile` adds the top
    ops of a few more steps of each (not timed).
    """
    from gpt2term.core.devices import resolve_device

    if batch_size < 1 or steps < 1 or warmup < 0:
        raise InputError("--batch-size and --steps must be at least 1 (and warm-up steps 0 or more)")
    if peak_tflops is not None and not (peak_tflops > 0 and math.isfinite(peak_tflops)):
        raise InputError(f"--peak-tflops must be a positive number, got {peak_tflops}")
    if pad_vocab is not None and pad_vocab < 0:
        raise InputError(f"--pad-vocab must be 0 (no padding) or a positive multiple, got {pad_vocab}")
    where = resolve_device(device)  # --device cuda without a GPU: the one-line error, before anything is built
    if where.type not in ("cpu", "cuda"):
        raise InputError(f"bench train runs on cpu or cuda, not {where.type}; use --device cpu or cuda")
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
    require_training_memory(cfg, batch_size, context, where)
    extra = PROFILE_STEPS if profile else 0
    total = warmup + steps + extra
    require_memory(total * batch_size * (context + 1) * 8, "the benchmark's token batches", "use fewer --steps")
    generator = torch.Generator().manual_seed(seed)
    batches = torch.randint(0, cfg.vocab_size, (total, batch_size, context + 1), generator=generator)
    tokens_per_step = batch_size * context
    flops_token = flops_per_token(cfg, context)
    peak, peak_source = peak_tflops, "--peak-tflops" if peak_tflops else None
    gpu_name = torch.cuda.get_device_name(where) if where.type == "cuda" else None
    if peak is None and gpu_name is not None:
        known = gpu_peak_tflops(gpu_name)
        if known is not None:
            peak, peak_source = known[1], f"{known[0]} bf16 dense peak"
    peak_note = None
    if peak is None:
        peak_note = (
            f"MFU needs the peak of {gpu_name!r}, which is not in the table; pass --peak-tflops"
            if gpu_name
            else "MFU on a CPU needs its peak: pass --peak-tflops"
        )

    results: dict[str, Any] = {"ours": {}, "transformers": {} if run_hf else None, "ratio": {}}
    profiles: dict[str, Any] = {"ours": {}, "transformers": {}} if profile else {}
    with contextlib.ExitStack() as scratch:
        if run_hf:  # their loop runs in its own process (see `train_peer_worker`), on these same batches
            import tempfile

            batches_file = os.path.join(scratch.enter_context(tempfile.TemporaryDirectory(prefix="gpt2term-")), "b.pt")
            torch.save(batches, batches_file)
        for dt in dtypes:
            theirs = scratch.enter_context(TransformersLoop(cfg, dt, seed, where, batches_file)) if run_hf else None
            hf_times: list[float] = []
            hf_losses: list[float] = []
            watching: list[Any] = []  # our step's profiler, started when the step before it ended

            def their_step(
                i: int,
                dt: str = dt,
                theirs: TransformersLoop | None = theirs,
                times: list = hf_times,
                losses: list = hf_losses,
                watching: list = watching,
            ) -> None:
                # Called when our step i ended: its profiler (if any) stops, theirs runs, the next one of ours starts.
                first_profiled = warmup + steps
                if watching:
                    prof = watching.pop()
                    prof.stop()
                    profiles["ours"].setdefault(dt, []).append(prof)
                phase = " (warm-up)" if i < warmup else " (profiled)" if i >= first_profiled else ""
                say(f"{dt}: step {i + 1}/{total}{phase}")
                if theirs is not None:
                    loss, seconds = theirs.step(i, profile=i >= first_profiled)
                    losses.append(loss)
                    if seconds is not None:
                        times.append(seconds)
                if profile and first_profiled - 1 <= i < total - 1:
                    prof = _profiler(where)
                    prof.start()
                    watching.append(prof)

            our_times, our_losses = _run_trainer(
                preset_name,
                cfg,
                batch_size=batch_size,
                context_length=context_length,
                total_steps=total,
                dtype="bfloat16" if dt == "bf16" else "float32",
                seed=seed,
                between_steps=their_step,
                device=str(where),
                compile_model=compile_model,
                pad_vocab=pad_vocab,
            )
            timed = {"ours": (our_times, our_losses)}
            if theirs is not None:
                timed["transformers"] = (hf_times, hf_losses)
                if profile:
                    profiles["transformers"][dt] = theirs.ops()
                theirs.close()
            for name, (times, losses) in timed.items():
                step_s = _median(times[warmup : warmup + steps])
                speed = tokens_per_step / step_s if step_s else None
                results[name][dt] = {
                    "tokens_per_second": speed,
                    "step_s": step_s,
                    "runs_step_s": [round(t, 4) for t in times[warmup : warmup + steps]],
                    "first_loss": losses[0],
                    "last_loss": losses[-1],
                    "mfu": mfu(speed, flops_token, peak),
                }
            results["ratio"][dt] = (
                _ratio(results["ours"][dt]["tokens_per_second"], results["transformers"][dt]["tokens_per_second"])
                if run_hf
                else None
            )
    for dt, profs in list(profiles.get("ours", {}).items()):
        profiles["ours"][dt] = _op_table(profs, where)
    accelerated = accel.enabled()
    default_pad = accel.vocab_pad.DEFAULT_MULTIPLE if where.type == "cuda" else 0
    padded = (pad_vocab if pad_vocab is not None else default_pad) if accelerated else 0
    notes = [n for n in (missing, peak_note) if n]
    if where.type == "cpu" and (compile_model or (pad_vocab or 0) > 1):
        notes.append("the GPU code path, run on the CPU: unmeasured on a GPU here")
    return {
        "benchmark": "train",
        "machine": machine_info(str(where)) | ({"gpu": gpu_name} if gpu_name else {}),
        "settings": {
            "preset": preset_name,
            "config": cfg.to_dict(),
            "batch_size": batch_size,
            "context_length": context,
            "tokens_per_step": tokens_per_step,
            "steps": steps,
            "warmup_steps": warmup,
            "dtypes": dtypes,
            "device": str(where),
            "compile": compile_model,
            "vocab_padded_to": accel.vocab_pad.padded_size(cfg.vocab_size, padded),
            "attention": "scaled_dot_product_attention, causal (flash kernel on CUDA in bf16)",
            "optimizer": "AdamW, fused kernel (ours); PyTorch's default AdamW (transformers' loop)",
            "fp32_matmuls": _fp32_matmuls(where),
            "bf16_matmuls": (
                "ours: oneDNN float32 on bf16-rounded operands (this CPU has no bf16 instructions); transformers' "
                "loop: PyTorch's bf16 matmul"
                if where.type == "cpu" and accel.enabled() and accel.linear.bf16_emulated()
                else "PyTorch's bf16 matmul (both)"
            ),
            "flops_per_token": flops_token,
            "flops_formula": "6N + 12*L*H*Q*T, N = parameters without the embedding tables",
            "peak_tflops": peak,
            "peak_source": peak_source,
            "ours": "gpt2term's Trainer (its own optimizer, loss and per-step work), timed step by step",
            "transformers": f"plain loop in a process of its own: AdamW lr={TRAIN_LR} "
            f"weight_decay={TRAIN_WEIGHT_DECAY}, grad clip {TRAIN_GRAD_CLIP}, F.cross_entropy on the logits",
            "memory": "ours keeps the memory it frees for its next step (glibc's thresholds raised while it trains)"
            if accel.keeps_training_memory(where)
            else "each loop as its allocator gives it",
        },
        **results,
        "profile": profiles or None,
        "note": "; ".join(notes) or None,
    }
