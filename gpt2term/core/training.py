"""The course's training loop made real: events, controls, checkpoints, exact resume, several processes.

`Trainer(settings).run()` is chapter 5's `train_model_simple` (zero_grad, forward, cross-entropy over flattened
logits, backward, AdamW step, evaluate every N steps, print a greedy sample) with what a real run needs: warmup and
cosine decay, gradient clipping and accumulation, checkpoints with everything needed to continue bit for bit, a
control object another thread can pause or stop it with, and DistributedDataParallel when started by torchrun.

It reports only through plain event objects handed to listeners (and appended, one JSON line each, to the
checkpoint's metrics.jsonl), so the CLI, the TUI and a process following the file all see the same run.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from gpt2term.core.accel import accelerate
from gpt2term.core.config import GPTConfig, preset
from gpt2term.core.data import (
    ENCODING_ERRORS,
    GPTDataset,
    ShuffledBatches,
    TokenizedCorpus,
    evaluation_batches,
    load_corpus,
    normalize_sources,
    require_windows,
)
from gpt2term.core.devices import autocast, check_threads, resolve_device, resolve_dtype
from gpt2term.core.errors import CheckpointError, Gpt2termError, InputError, StorageError
from gpt2term.core.generation import DecodingSettings, check_max_new_tokens, check_seed, generate
from gpt2term.core.memory import require_inference_memory, require_training_memory
from gpt2term.core.model import GPTModel
from gpt2term.core.tokenizer import default_tokenizer

if TYPE_CHECKING:
    from gpt2term.core.store.store import CheckpointStore

STATE_FORMAT = 1
DEFAULT_EPOCHS = 1
MAX_GRAD_ACCUM = 4096  # far past any real use; a larger count is a typo that would make one step run for days
OVERFIT_EVALS = 3  # validation loss rising this many evaluations in a row (while training loss falls) warns
PYDOC_PROMPT = 'The "for" statement is used to'
COURSE_PROMPT = "Every effort moves you"
# Settings that define the run itself: `--resume` keeps them (changing them would not continue the same run).
FIXED_ON_RESUME = (
    "corpus",
    "preset",
    "model",
    "init_from",
    "batch_size",
    "context_length",
    "stride",
    "val_ratio",
    "seed",
    "encoding_errors",
)


class TrainingDiverged(Gpt2termError):
    """The loss (or the gradient) became NaN or infinite; the run stopped without saving the broken weights."""


# ------------------------------------------------------------------------------------------------------ settings


@dataclass
class TrainingSettings:
    """Every option of a run (one field per `gpt2term train` option), saved with each checkpoint for `--resume`."""

    name: str = "my-gpt"
    corpus: list[str] = field(default_factory=list)  # files, folders of .txt/.md, or "pydoc"; empty means pydoc
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # GPTConfig fields overriding the preset (emb_dim, ...)
    init_from: str | None = None  # --from: a checkpoint name or weights path to fine-tune
    resume: bool = False
    overwrite: bool = False
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 8
    context_length: int | None = None  # default: the model's
    stride: int | None = None  # default: context_length
    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    warmup_steps: int | None = None  # default: a tenth of the run, at most 100 steps
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    eval_interval: int = 50
    eval_iters: int = 5
    save_interval: int = 500  # 0: only at the end, on stop and on Ctrl-C
    val_ratio: float = 0.1
    seed: int = 123
    device: str = "auto"
    dtype: str = "float32"
    compile: bool = False
    sample_prompt: str | None = None  # default: one that fits the corpus
    sample_tokens: int = 30
    encoding_errors: str = "strict"
    threads: int | None = None

    def validate(self) -> None:
        """One clear line for each setting that cannot work, before anything slow happens."""
        if not self.name or "/" in self.name or "\\" in self.name or self.name.startswith("."):
            raise InputError(f"invalid checkpoint name {self.name!r}; use letters, digits, '-', '_' or '.'")
        if self.epochs is not None and self.max_steps is not None:
            raise InputError("give either --epochs or --max-steps, not both")
        for option in ("batch_size", "grad_accum", "eval_iters", "eval_interval"):
            if getattr(self, option) < 1:
                raise InputError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(self, option)}")
        for option in ("epochs", "max_steps", "context_length", "stride"):
            value = getattr(self, option)
            if value is not None and value <= 0:
                raise InputError(f"--{option.replace('_', '-')} must be positive, got {value}")
        for option in ("epochs", "lr", "weight_decay", "grad_clip"):  # nan passes every comparison below
            value = getattr(self, option)
            if value is not None and not math.isfinite(value):
                raise InputError(f"--{option.replace('_', '-')} must be a finite number, got {value}")
        if self.lr <= 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.save_interval < 0 or (self.warmup_steps or 0) < 0:
            raise InputError("--weight-decay, --save-interval and --warmup-steps cannot be negative")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise InputError(f"--grad-clip must be positive, got {self.grad_clip}")
        if self.grad_accum > MAX_GRAD_ACCUM:
            raise InputError(
                f"--grad-accum {self.grad_accum} is more than {MAX_GRAD_ACCUM} micro-batches per step; "
                "for bigger steps raise --batch-size (or use fewer, longer steps)"
            )
        check_seed(self.seed)
        check_threads(self.threads)
        if not 0.0 < self.val_ratio < 1.0:
            raise InputError(f"--val-ratio must be between 0 and 1 (exclusive), got {self.val_ratio}")
        if self.encoding_errors not in ENCODING_ERRORS:
            raise InputError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)}")
        if self.resume and self.init_from:
            raise InputError("--resume continues a run and --from starts a new one; give only one of them")
        resolve_dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def prompt(self) -> str:
        if self.sample_prompt:
            return self.sample_prompt
        return PYDOC_PROMPT if not self.corpus or list(self.corpus) == ["pydoc"] else COURSE_PROMPT


def resume_settings(name: str, store: CheckpointStore | None = None, **overrides: Any) -> TrainingSettings:
    """The settings a run was saved with, to continue it; `overrides` may change how long and how it runs
    (steps, epochs, intervals, learning rate, device, ...) but not what defines the run (model, data, batch)."""
    from gpt2term.core.store.store import CheckpointStore

    store = store or CheckpointStore()
    if not store.exists(name):
        raise InputError(f"no checkpoint named {name!r} to resume; start it without --resume (see gpt2term ckpt list)")
    meta = store.info(name).meta or {}
    saved = meta.get("training")
    if not isinstance(saved, dict):
        raise CheckpointError(
            f"checkpoint {name!r} was not saved by a training run, so it has nothing to resume; "
            f"fine-tune it instead with: gpt2term train --from {name} --name NEW_NAME"
        )
    settings = TrainingSettings.from_dict(saved)
    if "corpus" in overrides:
        overrides["corpus"] = normalize_sources(overrides["corpus"])
    for key, value in overrides.items():
        if key in FIXED_ON_RESUME and value != getattr(settings, key):
            option = "corpus" if key == "corpus" else f"--{key.replace('_', '-')}"
            raise InputError(
                f"{option} cannot change when resuming {name!r} (the run was made with {getattr(settings, key)!r}); "
                f"to train further with other settings start a new run: gpt2term train --from {name} --name NEW"
            )
        setattr(settings, key, value)
    if "max_steps" in overrides and "epochs" not in overrides:
        settings.epochs = None
    if "epochs" in overrides and "max_steps" not in overrides:
        settings.max_steps = None
    settings.name, settings.resume, settings.overwrite = name, True, False
    return settings


# -------------------------------------------------------------------------------------------------------- events


@dataclass(kw_only=True)
class TrainingEvent:
    """Base of every event: `to_dict()` is the JSON line written to metrics.jsonl (with its `type`)."""

    type: ClassVar[str] = "event"
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


@dataclass
class StartEvent(TrainingEvent):
    type: ClassVar[str] = "start"
    name: str
    step: int
    total_steps: int
    epoch: int
    resumed: bool
    source: str
    parameters: int
    config: dict[str, Any]
    device: str
    dtype: str
    world_size: int
    corpus: str
    train_tokens: int
    val_tokens: int
    tokens_per_step: int
    steps_per_epoch: float
    settings: dict[str, Any]


@dataclass
class StepEvent(TrainingEvent):
    type: ClassVar[str] = "step"
    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    tokens_seen: int
    tokens_per_second: float
    elapsed_s: float
    eta_s: float | None


@dataclass
class EvalEvent(TrainingEvent):
    type: ClassVar[str] = "eval"
    step: int
    epoch: int
    tokens_seen: int
    train_loss: float
    val_loss: float
    train_perplexity: float
    val_perplexity: float


@dataclass
class SampleEvent(TrainingEvent):
    type: ClassVar[str] = "sample"
    step: int
    prompt: str
    text: str


@dataclass
class CheckpointEvent(TrainingEvent):
    type: ClassVar[str] = "checkpoint"
    step: int
    name: str
    path: str
    reason: str  # periodic, requested, final, stopped, interrupted


@dataclass
class WarningEvent(TrainingEvent):
    type: ClassVar[str] = "warning"
    step: int
    kind: str  # overfitting, small-corpus, corpus-changed, ...
    message: str


@dataclass
class PauseEvent(TrainingEvent):
    type: ClassVar[str] = "pause"
    step: int
    paused: bool


@dataclass
class FinishedEvent(TrainingEvent):
    """The last event of a run that ended normally; also what `Trainer.run()` returns."""

    type: ClassVar[str] = "finished"
    step: int
    total_steps: int
    epoch: int
    tokens_seen: int
    status: str  # completed, stopped, interrupted
    train_loss: float | None
    val_loss: float | None
    elapsed_s: float
    checkpoint: str | None  # the name saved to, None when nothing needed saving
    message: str


@dataclass
class FailedEvent(TrainingEvent):
    type: ClassVar[str] = "failed"
    step: int
    kind: str  # diverged, error, interrupted
    message: str
    last_good_step: int | None  # the step of the checkpoint left on disk, if any


Listener = Callable[[TrainingEvent], None]

EVENT_TYPES: dict[str, type[TrainingEvent]] = {
    cls.type: cls
    for cls in (
        StartEvent,
        StepEvent,
        EvalEvent,
        SampleEvent,
        CheckpointEvent,
        WarningEvent,
        PauseEvent,
        FinishedEvent,
        FailedEvent,
    )
}


def event_from_dict(record: dict[str, Any]) -> TrainingEvent | None:
    """The event a metrics.jsonl line was written from, so a process following the file sees what a listener saw.

    None for a line this version cannot read (an unknown type, a missing field): a follower skips it.
    Unknown extra keys are ignored, so lines from newer writers still load.
    """
    cls = EVENT_TYPES.get(str(record.get("type")))
    if cls is None:
        return None
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in record.items() if k in names})
    except TypeError:
        return None


def perplexity(loss: float) -> float:
    """exp(loss), kept finite for display (an untrained model's perplexity is about the vocabulary size)."""
    return math.exp(min(loss, 700.0))


class OverfittingWatch:
    """Warns once when validation loss has risen for `evals` evaluations in a row while training loss fell.

    That pattern (and not a single noisy uptick) is the course's picture of overfitting: the model keeps getting
    better at its training text and worse at text it has not seen.
    """

    def __init__(self, evals: int = OVERFIT_EVALS) -> None:
        self.evals = evals
        self.history: list[list[float]] = []  # recent [train_loss, val_loss]
        self.warned = False

    def update(self, train_loss: float, val_loss: float) -> str | None:
        self.history = [*self.history, [train_loss, val_loss]][-(self.evals + 1) :]
        if len(self.history) <= self.evals:
            return None
        trains = [h[0] for h in self.history]
        vals = [h[1] for h in self.history]
        rising = all(b > a for a, b in zip(vals, vals[1:], strict=False))
        falling = all(b < a for a, b in zip(trains, trains[1:], strict=False))
        if not rising:
            self.warned = False
            return None
        if not falling or self.warned:
            return None
        self.warned = True
        return (
            f"validation loss rose for {self.evals} evaluations in a row ({vals[0]:.3f} -> {vals[-1]:.3f}) while "
            f"training loss fell ({trains[0]:.3f} -> {trains[-1]:.3f}): the model is memorising its training text; "
            "stop here, add text, or raise the dropout"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history], "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [list(h) for h in state.get("history", [])]
        self.warned = bool(state.get("warned", False))


# ------------------------------------------------------------------------------------------------------- control


class TrainingControl:
    """Pause, resume, stop or save a run from any thread (or a signal handler); the trainer obeys between steps.

    A paused trainer blocks on a condition variable (no polling) until resumed, stopped or asked to save.
    The lock is re-entrant so a signal handler that interrupts the main thread while it holds the lock cannot hang.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._paused = False
        self._stop_reason: str | None = None
        self._save_requested = False
        self._saving = False

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Marks a checkpoint being written: a second Ctrl-C then waits for it instead of breaking it half-way."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    @property
    def saving_now(self) -> bool:
        return self._saving

    def pause(self) -> None:
        with self._cond:
            self._paused = True
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def stop(self, reason: str = "stopped") -> None:
        """Finish the current step, save, and end the run ("interrupted" is Ctrl-C's reason, "terminated" SIGTERM's)."""
        with self._cond:
            if self._stop_reason is None:
                self._stop_reason = reason
            self._cond.notify_all()

    def save_now(self) -> None:
        with self._cond:
            self._save_requested = True
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def stop_requested(self) -> bool:
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def take_save_request(self) -> bool:
        with self._cond:
            requested, self._save_requested = self._save_requested, False
            return requested

    def wait_while_paused(self) -> None:
        """Block while paused; return early when a stop or a save is asked for (the trainer handles it)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._paused or self._stop_reason is not None or self._save_requested)


@contextlib.contextmanager
def stop_on_signals(
    control: TrainingControl,
    signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM),
    *,
    second_interrupts: bool = True,
) -> Iterator[None]:
    """First Ctrl-C (or any SIGTERM, what `kill`, systemd, Docker and job schedulers send): stop after the current
    step and save. A second Ctrl-C interrupts at once (nothing new saved), unless `second_interrupts` is False: under
    torchrun the launcher passes the user's Ctrl-C on to its workers again. During a save the second one waits for
    the save to finish (the run then ends): raised inside torch.save it would come out as a RuntimeError.

    Only the main thread can own signal handlers; elsewhere this does nothing (the app stops runs with the control).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = list(signals)

    def handler(signum: int, frame: object) -> None:
        if signum == signal.SIGTERM or not control.stop_requested or not second_interrupts:
            control.stop("terminated" if signum == signal.SIGTERM else "interrupted")
        elif not control.saving_now:  # a stop is already asked for, so the run ends right after the save
            for sig in signals:
                signal.signal(sig, signal.SIG_DFL)
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -------------------------------------------------------------------------------------------------- distributed


@dataclass
class _Distributed:
    """Where this process sits in a torchrun job (rank 0 of 1 when started normally)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_spec: str) -> tuple[_Distributed, torch.device]:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_spec, local_rank)
        if world_size <= 1:
            return cls(), device
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns), device

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------ schedule


def learning_rate(step: int, peak: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to `peak`, then cosine decay to `peak * min_ratio` at `total_steps` (appendix D's schedule).

    A pure function of the step: resuming needs no scheduler object, only the step and the settings.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    min_lr = peak * min_ratio
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def _cpu_copy(value: Any) -> Any:
    """Optimizer state with every tensor on the CPU, so a GPU run's checkpoint resumes on a CPU-only machine."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(v) for v in value)
    return value


# ------------------------------------------------------------------------------------------------------- trainer


UNWRITTEN_EVENTS = 100_000  # metrics lines kept in memory while the disk refuses them; the oldest go first


class Trainer:
    """Runs one training run to its end (max steps or epochs), a stop, or a failure; see the module docstring.

    `run()` does all the slow work (tokenizing, building the model) so that it can be called from a worker thread.
    After setup, `model` is the plain `GPTModel` being trained (on its device).
    """

    def __init__(
        self,
        settings: TrainingSettings,
        *,
        store: CheckpointStore | None = None,
        control: TrainingControl | None = None,
        listeners: Iterable[Listener] = (),
        corpus: TokenizedCorpus | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.control = control or TrainingControl()
        self.listeners: list[Listener] = list(listeners)
        self.corpus = corpus
        self.model: GPTModel | None = None
        self.step = 0
        self.epoch = 0  # index of the epoch the next micro-batch comes from
        self.position = 0  # index of the next micro-batch within that epoch
        self.tokens_seen = 0
        self.total_steps = 0
        self._dist = _Distributed()
        self._saved_step: int | None = None
        self._last_eval: EvalEvent | None = None
        self._overfitting = OverfittingWatch()
        self._elapsed_before = 0.0  # training time of earlier sessions of this run (resume)
        self._replace_existing = False
        self._pending_metrics = None  # train --overwrite: this run's metrics.jsonl until its first save
        self._started = False  # failures before the start event are only raised, not logged
        self._unwritten: deque[dict[str, Any]] = deque(maxlen=UNWRITTEN_EVENTS)  # metrics lines the disk refused
        self._metrics_warned = False

    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)

    # ---------------------------------------------------------------------------------------------- plumbing

    def _emit(self, event: TrainingEvent) -> None:
        if not self._dist.is_main:
            return
        if self.store is not None:
            self._append_metrics(event.to_dict())
        for listener in list(self.listeners):
            listener(event)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        """A failed append (a full disk) must not lose the run: its lines wait in memory and are written, in
        order, by the next append that succeeds; the user is warned once per failure."""
        assert self.store is not None
        self._unwritten.append(record)
        try:
            while self._unwritten:
                self.store.append_metrics(self.settings.name, self._unwritten[0], path=self._pending_metrics)
                self._unwritten.popleft()
        except StorageError as exc:
            if not self._metrics_warned:
                self._metrics_warned = True
                warning = WarningEvent(
                    step=self.step,
                    kind="metrics-unwritten",
                    message=f"{exc} (training goes on; its events wait in memory until they can be written)",
                )
                self._unwritten.append(warning.to_dict())
                for listener in list(self.listeners):
                    listener(warning)
        else:
            self._metrics_warned = False

    def run(self) -> FinishedEvent:
        """Train; returns the finished event. Raises `TrainingDiverged` on a NaN loss, `Gpt2termError` on bad input."""
        settings = self.settings
        settings.corpus = normalize_sources(settings.corpus)
        settings.validate()
        from gpt2term.core.store.store import CheckpointStore

        self._dist, device = _Distributed.from_environment(settings.device)
        try:
            if self.store is None:
                self.store = CheckpointStore()
            lock = self.store.lock(settings.name) if self._dist.is_main else contextlib.nullcontext()
            with lock:
                try:
                    return self._run(device)
                except TrainingDiverged:
                    raise  # its FailedEvent is already out
                except BaseException as exc:
                    if not self._started:
                        raise
                    kind = "interrupted" if isinstance(exc, KeyboardInterrupt) else "error"
                    message = str(exc) or type(exc).__name__
                    self._emit(FailedEvent(step=self.step, kind=kind, message=message, last_good_step=self._saved_step))
                    raise
                finally:
                    if self._pending_metrics is not None:  # never saved: the old checkpoint stays as it was
                        shutil.rmtree(self._pending_metrics.parent, ignore_errors=True)
        finally:
            self._dist.close()

    # ------------------------------------------------------------------------------------------------ set-up

    def _prepare_checkpoint(self) -> Any:
        """What the run starts from: its own checkpoint (resume), another's weights (--from), or nothing."""
        s, store = self.settings, self.store
        assert store is not None
        exists = store.exists(s.name)
        if s.resume:
            if not exists:
                raise InputError(f"no checkpoint named {s.name!r} to resume; start it without --resume")
            checkpoint = store.load(s.name, with_state=True)
            if not checkpoint.trainer_state or checkpoint.optimizer_state is None:
                raise CheckpointError(
                    f"checkpoint {s.name!r} has no training state to resume from; "
                    f"fine-tune it instead: gpt2term train --from {s.name} --name NEW_NAME"
                )
            return checkpoint
        if exists and self._dist.is_main:
            if store.info(s.name).meta is not None and not s.overwrite:
                raise InputError(
                    f"a checkpoint named {s.name!r} already exists; continue it with --resume, "
                    "choose another --name, or pass --overwrite to replace it"
                )
            # Replaced by the first save; until then it stays, with its own metrics (see `_pending_metrics`).
            self._replace_existing = True
        if s.init_from:
            from gpt2term.core.store.resolve import resolve_weights

            return resolve_weights(s.init_from, store)
        return None

    def _load_corpus(self, context_length: int) -> TokenizedCorpus:
        s = self.settings
        corpus = self.corpus
        if corpus is None:
            # Rank 0 tokenizes (and caches) first; the others then read the cache instead of racing to write it.
            if self._dist.is_main:
                corpus = load_corpus(s.corpus, val_ratio=s.val_ratio, encoding_errors=s.encoding_errors)
            self._dist.barrier()
            if corpus is None:
                corpus = load_corpus(s.corpus, val_ratio=s.val_ratio, encoding_errors=s.encoding_errors)
        require_windows(corpus, context_length, s.val_ratio)
        return corpus

    def _run(self, device: torch.device) -> FinishedEvent:
        s = self.settings
        dist = self._dist
        started = time.perf_counter()
        if s.threads:
            torch.set_num_threads(s.threads)
        amp_dtype = resolve_dtype(s.dtype)
        checkpoint = self._prepare_checkpoint()

        if checkpoint is not None:
            cfg: GPTConfig = checkpoint.config
            if s.model.get("drop_rate") is not None:
                cfg = cfg.with_(drop_rate=s.model["drop_rate"])
        else:
            cfg = preset(s.preset).with_(**s.model)
            if s.context_length:
                cfg = cfg.with_(context_length=s.context_length)
        context_length = s.context_length or cfg.context_length
        if context_length > cfg.context_length:
            raise InputError(
                f"--context-length {context_length} is longer than the model's context ({cfg.context_length}); "
                f"use {cfg.context_length} or less"
            )
        check_max_new_tokens(s.sample_tokens, cfg.context_length)  # before the first sample, not at it
        require_training_memory(cfg, 1, context_length, device)  # the model alone, before reading the corpus
        corpus = self._load_corpus(context_length)
        train_set = GPTDataset(corpus.train_ids, context_length, s.stride)
        val_set = GPTDataset(corpus.val_ids, context_length)
        batches = ShuffledBatches(len(train_set), s.batch_size, s.seed, dist.world_size)
        require_training_memory(cfg, batches.batch_size, context_length, device)
        per_epoch = batches.batches_per_epoch / s.grad_accum
        if s.max_steps:
            self.total_steps = s.max_steps
        else:
            self.total_steps = max(1, math.ceil((s.epochs or DEFAULT_EPOCHS) * per_epoch))
        warmup = s.warmup_steps if s.warmup_steps is not None else min(100, self.total_steps // 10)

        torch.manual_seed(s.seed)
        model = accelerate(GPTModel(cfg))
        if checkpoint is not None:
            model.load_state_dict(checkpoint.state_dict)
        model.to(device)
        model.train()
        self.model = model
        # fused: AdamW's update as one kernel per step instead of about ten elementwise passes over every parameter
        # tensor (measured on a CPU core, tiny preset: 138 -> 18 ms per step); same rule, same state_dict.
        fused = True if device.type in ("cpu", "cuda") else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, fused=fused)
        state = checkpoint.trainer_state if s.resume else None
        if state is not None:
            optimizer.load_state_dict(checkpoint.optimizer_state)
            self._restore(state, device)
        elif dist.rank:
            torch.manual_seed(s.seed + dist.rank)  # same initial weights, different dropout on every rank
        self._saved_step = self.step if s.resume else None

        train_model: torch.nn.Module = model
        ddp_model = None
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            train_model = ddp_model
        if s.compile:
            train_model = torch.compile(train_model)

        tokens_per_step = context_length * batches.batch_size * dist.world_size * s.grad_accum
        if s.resume:
            source = str(checkpoint.meta.get("source") or "trained")  # a resumed run keeps what it was
        else:
            source = f"fine-tuned from {s.init_from}" if s.init_from else "trained from scratch"
        if self._replace_existing:
            self._pending_metrics = self.store.pending_metrics(s.name)
        self._started = True
        self._emit(
            StartEvent(
                name=s.name,
                step=self.step,
                total_steps=self.total_steps,
                epoch=self.epoch + 1,
                resumed=s.resume,
                source=source,
                parameters=model.num_parameters(),
                config=cfg.to_dict(),
                device=str(device),
                dtype="bfloat16" if amp_dtype is not None else "float32",
                world_size=dist.world_size,
                corpus=corpus.description,
                train_tokens=corpus.train_tokens,
                val_tokens=corpus.val_tokens,
                tokens_per_step=tokens_per_step,
                steps_per_epoch=per_epoch,
                settings=s.to_dict(),
            )
        )

        warnings = []
        if batches.batch_size < s.batch_size:
            warnings.append(
                (
                    "small-corpus",
                    f"the training part has only {len(train_set)} windows of {context_length} tokens; "
                    f"the batch size is lowered from {s.batch_size} to {batches.batch_size}",
                )
            )
        if state is not None and state.get("data", {}).get("content_hash") != corpus.content_hash:
            warnings.append(
                ("corpus-changed", "the corpus changed since this run was saved; training goes on with the new text")
            )
        saved_world = int(state.get("world_size", 1)) if state is not None else dist.world_size
        if saved_world != dist.world_size:
            # Same place in the data order, counted in this run's (differently sized) global batches.
            self.position = self.position * saved_world // dist.world_size
            if self.position >= batches.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            warnings.append(
                (
                    "world-size-changed",
                    f"this run was saved by {saved_world} processes and continues on {dist.world_size}: "
                    "same data order and settings, but not bit for bit",
                )
            )
        for kind, text in warnings:
            self._emit(WarningEvent(step=self.step, kind=kind, message=text))

        tokenizer = default_tokenizer()
        prompt = s.prompt()
        prompt_ids = tokenizer.encode(prompt)
        # Rank 0 evaluates alone, on as many windows as the global batch would hold: the same numbers as one process.
        eval_batches = s.eval_iters * dist.world_size
        train_eval = evaluation_batches(len(train_set), batches.batch_size, eval_batches)
        val_eval = evaluation_batches(len(val_set), batches.batch_size, eval_batches)
        self._schedule = {
            "kind": "warmup-cosine",
            "lr": s.lr,
            "min_lr_ratio": s.min_lr_ratio,
            "warmup_steps": warmup,
            "total_steps": self.total_steps,
        }
        data_state = {
            "content_hash": corpus.content_hash,
            "train_tokens": corpus.train_tokens,
            "batches_per_epoch": batches.batches_per_epoch,
        }

        def save(reason: str) -> None:
            self._check_weights(model, train_set, batches, device, amp_dtype)
            if dist.is_main:
                with self.control.saving():
                    self._save(model, optimizer, reason, source, data_state, device)
            self._saved_step = self.step

        recent: deque[tuple[int, float]] = deque(maxlen=20)  # (tokens, seconds) of recent steps, for tokens/s
        session_start = time.perf_counter()
        status = "completed"
        message = ""
        if self.step >= self.total_steps:
            message = (
                f"{s.name!r} has already done its {self.total_steps} steps; pass --max-steps (or --epochs) with a "
                "larger number to train it further"
            )
        while self.step < self.total_steps:
            # ---- between steps: the control (the same decision on every rank)
            if self.control.paused:
                self._emit(PauseEvent(step=self.step, paused=True))
                while self.control.paused and not self.control.stop_requested:
                    self.control.wait_while_paused()
                    if self.control.take_save_request():
                        save("requested")
                self._emit(PauseEvent(step=self.step, paused=False))
            reason = self.control.stop_reason
            stop_code = 0.0 if reason is None else 2.0 if reason in ("interrupted", "terminated") else 1.0
            flags = torch.tensor([stop_code, float(self.control.take_save_request())], dtype=torch.float64)
            if dist.enabled:
                flags = dist.all_reduce(flags.to(device), op="max").cpu()
            if flags[1] > 0:
                save("requested")
            if flags[0] > 0:
                status = "interrupted" if flags[0] >= 2 else "stopped"
                break

            # ---- one optimizer step: grad_accum micro-batches
            step_start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for micro in range(s.grad_accum):
                index = batches.indices(self.epoch, self.position, dist.rank)
                inputs, targets = train_set.batch(index)
                inputs, targets = inputs.to(device), targets.to(device)
                self.position += 1
                if self.position == batches.batches_per_epoch:
                    self.epoch, self.position = self.epoch + 1, 0
                sync = contextlib.nullcontext()
                if ddp_model is not None and micro < s.grad_accum - 1:
                    sync = ddp_model.no_sync()  # gradients are averaged across ranks once, on the last micro-batch
                with sync:
                    with autocast(device, amp_dtype):
                        # The course's F.cross_entropy(logits.flatten(0, 1), targets.flatten()), computed inside the
                        # model a slice of rows at a time, so the [tokens, vocabulary] logits never exist whole.
                        loss = train_model(inputs, targets=targets)
                    (loss / s.grad_accum).backward()
                loss_sum += loss.detach()
            mean_loss = dist.all_reduce(loss_sum / s.grad_accum) / dist.world_size
            loss_value = float(mean_loss)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip or math.inf))
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                self._diverged(loss_value, grad_norm)
            lr = learning_rate(self.step, s.lr, warmup, self.total_steps, s.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            self.step += 1
            self.tokens_seen += tokens_per_step
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - step_start
            recent.append((tokens_per_step, seconds))
            window_time = sum(t for _, t in recent)
            tokens_per_second = sum(n for n, _ in recent) / window_time if window_time > 0 else 0.0
            self._emit(
                StepEvent(
                    step=self.step,
                    total_steps=self.total_steps,
                    epoch=self.epoch + 1 if self.position else self.epoch,
                    loss=loss_value,
                    lr=lr,
                    grad_norm=grad_norm,
                    tokens_seen=self.tokens_seen,
                    tokens_per_second=tokens_per_second,
                    elapsed_s=self._elapsed_before + time.perf_counter() - session_start,
                    eta_s=(self.total_steps - self.step) * window_time / len(recent),
                )
            )

            # ---- evaluation, sample, periodic save
            if self.step % s.eval_interval == 0 or self.step == self.total_steps:
                if dist.is_main:
                    self._evaluate(model, train_set, val_set, train_eval, val_eval, device, amp_dtype)
                    self._sample(model, tokenizer, prompt, prompt_ids, s.sample_tokens)
                dist.barrier()
            if s.save_interval and self.step % s.save_interval == 0 and self.step < self.total_steps:
                save("periodic")

        self._elapsed_before += time.perf_counter() - session_start
        saved = None
        if self.step > (self._saved_step or 0):
            save({"completed": "final"}.get(status, status))
            saved = s.name
        elif self._saved_step is not None:
            saved = s.name  # nothing new since the last save
        if not message:
            message = {
                "completed": f"finished {self.step} steps",
                "stopped": f"stopped at step {self.step}",
                "interrupted": f"interrupted at step {self.step}",
            }[status]
            if status == "interrupted" and self.control.stop_reason == "terminated":
                message = f"stopped by SIGTERM at step {self.step}"
            if saved:
                message += f"; saved checkpoint {s.name!r}"
            if status != "completed" and saved:
                message += f"; continue with: gpt2term train --name {s.name} --resume"
            elif not saved:
                message += "; nothing was saved"
        finished = FinishedEvent(
            step=self.step,
            total_steps=self.total_steps,
            epoch=self.epoch + 1 if self.position else self.epoch,
            tokens_seen=self.tokens_seen,
            status=status,
            train_loss=self._last_eval.train_loss if self._last_eval else None,
            val_loss=self._last_eval.val_loss if self._last_eval else None,
            elapsed_s=time.perf_counter() - started,
            checkpoint=saved,
            message=message,
        )
        self._emit(finished)
        return finished

    # ---------------------------------------------------------------------------------------------- pieces

    @torch.no_grad()
    def _check_weights(self, model, train_set, batches, device, amp_dtype) -> None:
        """Before a save: weights that hold NaN or inf, or that give a non-finite loss (weights of 1e10 are finite
        and give NaN), are never published over the last good checkpoint. The loss is taken in eval mode on the
        next training batch, so no random number is drawn and the run goes on exactly as it would have."""
        bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        loss = math.nan
        if bad is None:
            inputs, targets = train_set.batch(batches.indices(self.epoch, self.position, 0))
            model.eval()
            try:
                with autocast(device, amp_dtype):
                    loss = float(model(inputs.to(device), targets=targets.to(device)))
            finally:
                model.train()
        broken = torch.tensor([0.0 if math.isfinite(loss) else 1.0], dtype=torch.float64)
        if self._dist.enabled:
            broken = self._dist.all_reduce(broken.to(device), op="max").cpu()
        if broken[0] > 0:
            what = f"{bad} holds nan or inf" if bad else f"the loss on the weights became {loss}"
            self._diverged(math.nan, math.nan, what=f"{what} after step {self.step}")

    def _diverged(self, loss: float, grad_norm: float, *, what: str | None = None) -> None:
        what = what or (
            f"the loss became {loss} at step {self.step + 1}"
            if not math.isfinite(loss)
            else f"the gradient norm became {grad_norm} at step {self.step + 1}"
        )
        kept = (
            f"the last good checkpoint {self.settings.name!r} (step {self._saved_step}) is kept"
            if self._saved_step is not None and self.store is not None and self.store.exists(self.settings.name)
            else f"the earlier checkpoint {self.settings.name!r} is left as it was"
            if self._pending_metrics is not None
            else "no checkpoint had been saved yet"
        )
        message = f"{what}, so training stopped; {kept}; lower --lr or set --grad-clip"
        last_good = self._saved_step if "kept" in kept else None
        self._emit(FailedEvent(step=self.step, kind="diverged", message=message, last_good_step=last_good))
        raise TrainingDiverged(message)

    @torch.no_grad()
    def _mean_loss(
        self,
        model: GPTModel,
        dataset: GPTDataset,
        batches: list[torch.Tensor],
        device: torch.device,
        amp_dtype: torch.dtype | None,
    ) -> float:
        total, count = 0.0, 0
        for index in batches:
            inputs, targets = dataset.batch(index)
            with autocast(device, amp_dtype):
                loss = model(inputs.to(device), targets=targets.to(device))
            total += float(loss) * len(index)
            count += len(index)
        return total / max(1, count)

    def _evaluate(self, model, train_set, val_set, train_eval, val_eval, device, amp_dtype) -> None:
        model.eval()
        try:
            train_loss = self._mean_loss(model, train_set, train_eval, device, amp_dtype)
            val_loss = self._mean_loss(model, val_set, val_eval, device, amp_dtype)
        finally:
            model.train()
        event = EvalEvent(
            step=self.step,
            epoch=self.epoch + 1 if self.position else self.epoch,
            tokens_seen=self.tokens_seen,
            train_loss=train_loss,
            val_loss=val_loss,
            train_perplexity=perplexity(train_loss),
            val_perplexity=perplexity(val_loss),
        )
        self._last_eval = event
        self._emit(event)
        self._check_overfitting(train_loss, val_loss)

    def _check_overfitting(self, train_loss: float, val_loss: float) -> None:
        message = self._overfitting.update(train_loss, val_loss)
        if message:
            self._emit(WarningEvent(step=self.step, kind="overfitting", message=message))

    def _sample(self, model: GPTModel, tokenizer, prompt: str, prompt_ids: list[int], tokens: int) -> None:
        if tokens <= 0:
            return
        settings = DecodingSettings(max_new_tokens=tokens, temperature=0.0, stop_at_eos=False, top_n=1)
        text = "".join(step.text for step in generate(model, tokenizer, prompt_ids, settings))
        self._emit(SampleEvent(step=self.step, prompt=prompt, text=text))

    def _trainer_state(self, data_state: dict[str, Any], device: torch.device) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch_cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(device)
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self._elapsed_before,
            "scheduler": dict(self._schedule),
            "rng": rng,
            "settings": self.settings.to_dict(),
            "data": dict(data_state),
            "overfitting": self._overfitting.state_dict(),
            "last_eval": {k: v for k, v in asdict(self._last_eval).items() if k != "time"} if self._last_eval else {},
            "world_size": self._dist.world_size,
        }

    def _restore(self, state: dict[str, Any], device: torch.device) -> None:
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"checkpoint {self.settings.name!r} has a training state this version cannot read")
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.tokens_seen = int(state["tokens_seen"])
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        self._overfitting.load_state_dict(state.get("overfitting", {}))
        last = state.get("last_eval") or {}
        self._last_eval = EvalEvent(**last) if last else None
        rng = state.get("rng", {})
        if self._dist.rank == 0 and "torch_cpu" in rng:
            torch.set_rng_state(rng["torch_cpu"])
        elif self._dist.rank:
            torch.manual_seed(self.settings.seed + self._dist.rank + 7919 * self.step)
        if device.type == "cuda" and "torch_cuda" in rng and self._dist.rank == 0:
            torch.cuda.set_rng_state(rng["torch_cuda"], device)

    def _save(self, model, optimizer, reason, source, data_state, device) -> None:
        assert self.store is not None
        last = self._last_eval
        meta = {
            "step": self.step,
            "epoch": self.epoch,
            "tokens_seen": self.tokens_seen,
            "train_loss": last.train_loss if last else None,
            "val_loss": last.val_loss if last else None,
            "train_perplexity": last.train_perplexity if last else None,
            "val_perplexity": last.val_perplexity if last else None,
            "source": source,
            "training": self.settings.to_dict() | {"resume": False, "overwrite": False},
        }
        info = self.store.save(
            self.settings.name,
            model,
            meta=meta,
            optimizer_state=_cpu_copy(optimizer.state_dict()),
            trainer_state=self._trainer_state(data_state, device),
            metrics_from=self._pending_metrics,
        )
        if self._pending_metrics is not None:  # its file now is the checkpoint's metrics.jsonl
            shutil.rmtree(self._pending_metrics.parent, ignore_errors=True)
            self._pending_metrics = None
        self._emit(CheckpointEvent(step=self.step, name=self.settings.name, path=str(info.path), reason=reason))


# ---------------------------------------------------------------------------------------------------- evaluation


@dataclass
class CorpusEvaluation:
    """Mean loss over every token of a corpus (each predicted once, from up to a full context of history)."""

    loss: float
    perplexity: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


@torch.no_grad()
def evaluate_ids(
    model: GPTModel,
    ids: torch.Tensor,
    *,
    context_length: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> CorpusEvaluation:
    """Loss and perplexity of `model` on a stream of ids, cut into consecutive windows (the last may be shorter)."""
    n = int(ids.numel())
    if n < 2:
        raise InputError("the text has fewer than 2 tokens, so there is nothing to predict; give a longer corpus")
    context = min(context_length or model.cfg.context_length, model.cfg.context_length)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    full = (n - 1) // context  # windows of exactly `context` targets
    require_inference_memory(model.cfg, max(1, min(batch_size, full)), context, device)
    total_nll, total_tokens = 0.0, 0
    try:
        dataset = GPTDataset(ids, context)
        for start in range(0, full, batch_size):
            index = torch.arange(start, min(full, start + batch_size))
            inputs, targets = dataset.batch(index)
            with autocast(device, amp_dtype):
                logits = model(inputs.to(device))
            total_nll += float(
                F.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten(), reduction="sum")
            )
            total_tokens += targets.numel()
        rest = (n - 1) - full * context
        if rest:
            chunk = ids[full * context :].to(torch.int64)
            with autocast(device, amp_dtype):
                logits = model(chunk[None, :-1].to(device))
            total_nll += float(F.cross_entropy(logits[0].float(), chunk[1:].to(device), reduction="sum"))
            total_tokens += rest
    finally:
        model.train(was_training)
    loss = total_nll / total_tokens
    return CorpusEvaluation(loss=loss, perplexity=perplexity(loss), tokens=total_tokens)
