"""The loop itself: `Trainer.run()` plans a run, builds its model and optimizer, then steps until the end, a stop or
a failure, evaluating, sampling and saving on the way (see the package docstring)."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from gpt2term.core.accel import accelerate, training_memory
from gpt2term.core.config import GPTConfig, preset
from gpt2term.core.data import (
    GPTDataset,
    ShuffledBatches,
    TokenizedCorpus,
    evaluation_batches,
    load_corpus,
    normalize_sources,
    require_windows,
    training_windows,
)
from gpt2term.core.devices import autocast, resolve_dtype
from gpt2term.core.errors import CheckpointError, Gpt2termError, InputError, StorageError
from gpt2term.core.generation import DecodingSettings, check_max_new_tokens, generate
from gpt2term.core.memory import require_training_memory
from gpt2term.core.metrics import perplexity
from gpt2term.core.model import GPTModel
from gpt2term.core.tokenizer import Tokenizer, default_tokenizer
from gpt2term.core.training.control import TrainingControl
from gpt2term.core.training.distributed import _Distributed
from gpt2term.core.training.evaluation import OverfittingWatch, mean_loss
from gpt2term.core.training.events import (
    CheckpointEvent,
    EvalEvent,
    FailedEvent,
    FinishedEvent,
    Listener,
    PauseEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    TrainingEvent,
    WarningEvent,
)
from gpt2term.core.training.schedule import Schedule, default_warmup
from gpt2term.core.training.settings import DEFAULT_EPOCHS, TrainingSettings

if TYPE_CHECKING:
    from gpt2term.core.store.store import CheckpointStore

STATE_FORMAT = 1
UNWRITTEN_EVENTS = 100_000  # metrics lines kept in memory while the disk refuses them; the oldest go first
SPEED_WINDOW = 20  # steps the tokens/s and the ETA are averaged over


class TrainingDiverged(Gpt2termError):
    """The loss (or the gradient) became NaN or infinite; the run stopped without saving the broken weights."""


class _EvaluationCut(Exception):
    """A stop arrived during an evaluation: it ends early and is not reported (a part would read as the whole)."""


@dataclass
class _RunPlan:
    """What a run is, decided once before its first step: model shape, data and how it is cut, length, schedule."""

    device: torch.device
    amp_dtype: torch.dtype | None
    cfg: GPTConfig
    context_length: int
    corpus: TokenizedCorpus
    train_set: GPTDataset
    val_set: GPTDataset
    batches: ShuffledBatches
    steps_per_epoch: float
    tokens_per_step: int
    schedule: Schedule
    train_eval: list[torch.Tensor]  # fixed evaluation batches (the same at every evaluation)
    val_eval: list[torch.Tensor]
    source: str  # what the checkpoint's "source" says: trained from scratch, fine-tuned from ...
    tokenizer: Tokenizer
    prompt: str
    prompt_ids: list[int]

    @property
    def data_state(self) -> dict[str, Any]:
        """What a resume compares the corpus against."""
        return {
            "content_hash": self.corpus.content_hash,
            "train_tokens": self.corpus.train_tokens,
            "batches_per_epoch": self.batches.batches_per_epoch,
        }


def _cpu_copy(value: Any) -> Any:
    """Optimizer state with every tensor on the CPU, so a GPU run's checkpoint resumes on a CPU-only machine."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(v) for v in value)
    return value


def adamw_steps(optimizer_state: dict) -> int:
    """The updates an AdamW state has seen (its per-parameter step count), 0 for an unused one."""
    for entry in (optimizer_state.get("state") or {}).values():
        step = entry.get("step") if isinstance(entry, dict) else None
        if step is not None:
            return int(float(step))
    return 0


def load_adamw_state(optimizer: torch.optim.Optimizer, state: Any, source: str) -> None:
    """Another program's AdamW state (the book's `model_and_optimizer.pth`) into this run's optimizer, refused in one
    line where it cannot belong to this model: torch itself only notices a wrong shape at the first step."""
    fix = f"start a new optimizer with --fresh-optimizer (the weights of {source} are still used)"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        groups = state["param_groups"]
        indices = [i for g in groups for i in g["params"]]
        entries = state.get("state") or {}
        if len(groups) != len(optimizer.param_groups) or len(indices) != len(params):
            raise ValueError(f"it covers {len(indices)} tensors in {len(groups)} groups, the model has {len(params)}")
        for index, param in zip(indices, params, strict=True):
            for key in ("exp_avg", "exp_avg_sq"):
                moment = (entries.get(index) or {}).get(key)
                if moment is not None and tuple(moment.shape) != tuple(param.shape):
                    raise ValueError(f"its {key} #{index} has shape {tuple(moment.shape)}, not {tuple(param.shape)}")
        optimizer.load_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"the optimizer state of {source} does not fit this model ({exc}); {fix}") from exc


class Trainer:
    """Runs one training run to its end (max steps or epochs), a stop, or a failure; see the package docstring.

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
        self._optimizer: torch.optim.Optimizer | None = None
        self._train_model: torch.nn.Module | None = None  # `model`, or its DDP / compiled wrapper
        self._ddp_model: torch.nn.Module | None = None
        self._saved_step: int | None = None
        self._last_eval: EvalEvent | None = None
        self._overfitting = OverfittingWatch()
        self._elapsed_before = 0.0  # training time of earlier sessions of this run (resume)
        self._session_start = 0.0
        self._recent: deque[tuple[int, float]] = deque(maxlen=SPEED_WINDOW)  # (tokens, seconds) of recent steps
        self._replace_existing = False
        self._pending_metrics = None  # train --overwrite: this run's metrics.jsonl until its first save
        self._started = False  # failures before the start event are only raised, not logged
        self._unwritten: deque[dict[str, Any]] = deque(maxlen=UNWRITTEN_EVENTS)  # metrics lines the disk refused
        self._optimizer_note: str | None = None  # train --from a file with AdamW state: the one line saying so
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

    def _run(self, device: torch.device) -> FinishedEvent:
        started = time.perf_counter()
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        checkpoint = self._prepare_checkpoint()
        plan = self._plan(checkpoint, device)
        state = self._build(plan, checkpoint)
        self._announce(plan, state)
        with training_memory(plan.device):
            status, message = self._train(plan)
        return self._finish(plan, status, message, started)

    # ---------------------------------------------------------------------------------------------- the loop

    def _train(self, plan: _RunPlan) -> tuple[str, str]:
        """Steps until the planned total or a stop: the status, and why nothing was done when nothing was."""
        self._session_start = time.perf_counter()
        status, message = "completed", ""
        if self.step >= self.total_steps:
            message = (
                f"{self.settings.name!r} has already done its {self.total_steps} steps; pass --max-steps "
                "(or --epochs) with a larger number to train it further"
            )
        if self.settings.eval_at_start and not self.settings.resume and self.step == 0 < self.total_steps:
            self._evaluate_at_start(plan)
        while self.step < self.total_steps:
            stop = self._obey_control(plan)
            if stop is not None:
                status = stop
                break
            step_start, epoch = time.perf_counter(), self.epoch
            loss, grad_norm, lr = self._train_step(plan)
            if plan.device.type == "cuda":
                torch.cuda.synchronize(plan.device)
            self._report_step(loss, grad_norm, lr, plan.tokens_per_step, time.perf_counter() - step_start)
            self._evaluate_and_save(plan, epoch_ended=self.epoch > epoch)
        self._elapsed_before += time.perf_counter() - self._session_start
        return status, message

    def _train_step(self, plan: _RunPlan) -> tuple[float, float, float]:
        """The course's step: zero_grad; forward, loss and backward per micro-batch; clip; set the rate; step.

        Returns the mean loss (over every rank), the gradient norm before clipping, and the learning rate used.
        """
        s, dist, optimizer = self.settings, self._dist, self._optimizer
        assert self.model is not None and self._train_model is not None and optimizer is not None
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=plan.device)
        for micro in range(s.grad_accum):
            inputs, targets = self._next_batch(plan)
            with self._sync_gradients(last=micro == s.grad_accum - 1):
                with autocast(plan.device, plan.amp_dtype):
                    # The course's F.cross_entropy(logits.flatten(0, 1), targets.flatten()), computed inside the
                    # model a slice of rows at a time, so the [tokens, vocabulary] logits never exist whole.
                    loss = self._train_model(inputs, targets=targets)
                (loss / s.grad_accum).backward()
            loss_sum += loss.detach()
        loss_value = float(dist.all_reduce(loss_sum / s.grad_accum) / dist.world_size)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip or math.inf))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self._diverged(loss_value, grad_norm)
        lr = plan.schedule.at(self.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        self.step += 1
        self.tokens_seen += plan.tokens_per_step
        return loss_value, grad_norm, lr

    # ------------------------------------------------------------------------------------------ around a step

    def _next_batch(self, plan: _RunPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch, on the device; moves the place in the data order on by one."""
        index = plan.batches.indices(self.epoch, self.position, self._dist.rank)
        inputs, targets = plan.train_set.batch(index)
        inputs, targets = inputs.to(plan.device), targets.to(plan.device)
        self.position += 1
        if self.position == plan.batches.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return inputs, targets

    def _sync_gradients(self, *, last: bool) -> contextlib.AbstractContextManager:
        """Under DDP, gradients are averaged across ranks once, on the last micro-batch of a step."""
        if self._ddp_model is not None and not last:
            return self._ddp_model.no_sync()
        return contextlib.nullcontext()

    def _obey_control(self, plan: _RunPlan) -> str | None:
        """Between steps: pause, save or stop as the control asks, the same decision on every rank. Returns the
        status to end the run with ("stopped", "interrupted"), or None to go on."""
        control = self.control
        if control.paused:
            self._emit(PauseEvent(step=self.step, paused=True))
            while control.paused and not control.stop_requested:
                control.wait_while_paused()
                if control.take_save_request():
                    self._save(plan, "requested")
            self._emit(PauseEvent(step=self.step, paused=False))
        reason = control.stop_reason
        stop_code = 0.0 if reason is None else 2.0 if reason in ("interrupted", "terminated") else 1.0
        flags = torch.tensor([stop_code, float(control.take_save_request())], dtype=torch.float64)
        if self._dist.enabled:
            flags = self._dist.all_reduce(flags.to(plan.device), op="max").cpu()
        if flags[1] > 0:
            self._save(plan, "requested")
        if flags[0] > 0:
            return "interrupted" if flags[0] >= 2 else "stopped"
        return None

    def _report_step(self, loss: float, grad_norm: float, lr: float, tokens: int, seconds: float) -> None:
        self._recent.append((tokens, seconds))
        window_time = sum(t for _, t in self._recent)
        tokens_per_second = sum(n for n, _ in self._recent) / window_time if window_time > 0 else 0.0
        self._emit(
            StepEvent(
                step=self.step,
                total_steps=self.total_steps,
                epoch=self._epoch_number(),
                loss=loss,
                lr=lr,
                grad_norm=grad_norm,
                tokens_seen=self.tokens_seen,
                tokens_per_second=tokens_per_second,
                elapsed_s=self._elapsed_before + time.perf_counter() - self._session_start,
                eta_s=(self.total_steps - self.step) * window_time / len(self._recent),
            )
        )

    def _evaluate_at_start(self, plan: _RunPlan) -> None:
        """Step 0: the loss before any update (about ln(50257) for a fresh model), so the curve has its start."""
        if self._dist.is_main:
            self._evaluate(plan)
        self._dist.barrier()

    def _evaluate_and_save(self, plan: _RunPlan, *, epoch_ended: bool = False) -> None:
        """Every `eval_interval` steps (and at the last) evaluate and sample on rank 0; every `save_interval` save.

        With `eval_timing` "book" the evaluations come where chapter 5's loop makes them: its global step counts
        from 0 after the first update, so after updates 1, N+1, 2N+1, ... With `sample_every` "epoch" the sample
        comes after each epoch's last batch (and at the end) instead of after each evaluation."""
        s = self.settings
        last = self.step == self.total_steps
        counted = self.step - 1 if s.eval_timing == "book" else self.step
        evaluate = counted % s.eval_interval == 0 or last
        sample = (epoch_ended or last) if s.sample_every == "epoch" else evaluate
        if evaluate or sample:
            if self._dist.is_main:
                if evaluate:
                    self._evaluate(plan)
                if sample and not self.control.stop_requested:  # a Ctrl-C cut the evaluation: no sample either
                    self._sample(plan)
            self._dist.barrier()
        if s.save_interval and self.step % s.save_interval == 0 and self.step < self.total_steps:
            self._save(plan, "periodic")

    def _epoch_number(self) -> int:
        """The epoch the last micro-batch came from, counted from 1."""
        return self.epoch + 1 if self.position else self.epoch

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

            return resolve_weights(s.init_from, store, n_heads=s.model.get("n_heads"), with_state=not s.fresh_optimizer)
        return None

    def _continues_optimizer(self, checkpoint: Any) -> bool:
        """--from weights that carry an AdamW state but no run of ours (the book's model_and_optimizer.pth, or one
        imported into the store) continues that state; a run's own checkpoint is a new run (fine-tuning)."""
        s = self.settings
        return bool(
            s.init_from
            and checkpoint is not None
            and checkpoint.optimizer_state is not None
            and not checkpoint.trainer_state
            and not s.fresh_optimizer
        )

    def _model_config(self, checkpoint: Any) -> GPTConfig:
        """The checkpoint's shape (only its dropout may change), or the preset's with the run's overrides."""
        s = self.settings
        if checkpoint is not None:
            cfg: GPTConfig = checkpoint.config
            if s.model.get("drop_rate") is not None:
                cfg = cfg.with_(drop_rate=s.model["drop_rate"])
            return cfg
        cfg = preset(s.preset).with_(**s.model)
        if s.context_length:
            cfg = cfg.with_(context_length=s.context_length)
        return cfg

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

    def _plan(self, checkpoint: Any, device: torch.device) -> _RunPlan:
        """Every decision made before the model exists, so a run that cannot work fails before anything slow."""
        s, dist = self.settings, self._dist
        amp_dtype = resolve_dtype(s.dtype)
        cfg = self._model_config(checkpoint)
        context_length = s.context_length or cfg.context_length
        if context_length > cfg.context_length:
            raise InputError(
                f"--context-length {context_length} is longer than the model's context ({cfg.context_length}); "
                f"use {cfg.context_length} or less"
            )
        check_max_new_tokens(s.sample_tokens, cfg.context_length)  # before the first sample, not at it
        require_training_memory(cfg, 1, context_length, device)  # the model alone, before reading the corpus
        corpus = self._load_corpus(context_length)
        train_set, val_set, batches = training_windows(
            corpus, context_length, s.stride, s.batch_size, s.seed, dist.world_size
        )
        require_training_memory(cfg, batches.batch_size, context_length, device)
        per_epoch = batches.batches_per_epoch / s.grad_accum
        if s.max_steps:
            self.total_steps = s.max_steps
        else:
            self.total_steps = max(1, math.ceil((s.epochs or DEFAULT_EPOCHS) * per_epoch))
        warmup = s.warmup_steps if s.warmup_steps is not None else default_warmup(self.total_steps)
        if s.resume:
            source = str(checkpoint.meta.get("source") or "trained")  # a resumed run keeps what it was
        else:
            source = f"fine-tuned from {s.init_from}" if s.init_from else "trained from scratch"
        # Rank 0 evaluates alone, on as many windows as the global batch would hold: the same numbers as one process.
        eval_batches = s.eval_iters * dist.world_size
        tokenizer = default_tokenizer()
        prompt = s.prompt()
        return _RunPlan(
            device=device,
            amp_dtype=amp_dtype,
            cfg=cfg,
            context_length=context_length,
            corpus=corpus,
            train_set=train_set,
            val_set=val_set,
            batches=batches,
            steps_per_epoch=per_epoch,
            tokens_per_step=context_length * batches.batch_size * dist.world_size * s.grad_accum,
            schedule=Schedule(s.lr, s.min_lr_ratio, warmup, self.total_steps, s.schedule),
            train_eval=evaluation_batches(len(train_set), batches.batch_size, eval_batches),
            val_eval=evaluation_batches(len(val_set), batches.batch_size, eval_batches),
            source=source,
            tokenizer=tokenizer,
            prompt=prompt,
            prompt_ids=tokenizer.encode(prompt),
        )

    def _build(self, plan: _RunPlan, checkpoint: Any) -> dict[str, Any] | None:
        """The model (seeded, or the checkpoint's weights), its optimizer and, on resume, where the run was.
        Returns the saved training state on resume, None otherwise."""
        s, dist, device = self.settings, self._dist, plan.device
        torch.manual_seed(s.seed)
        model = accelerate(GPTModel(plan.cfg, init=s.init))
        if checkpoint is not None:
            model.load_state_dict(checkpoint.state_dict)
        model.to(device)
        model.train()
        self.model = model
        # fused: AdamW's update as one kernel per step instead of about ten elementwise passes over every parameter
        # tensor; same rule, same state_dict.
        fused = True if device.type in ("cpu", "cuda") else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, fused=fused)
        state = checkpoint.trainer_state if s.resume else None
        if state is not None:
            optimizer.load_state_dict(checkpoint.optimizer_state)
            self._restore(state, device)
        elif self._continues_optimizer(checkpoint):
            load_adamw_state(optimizer, checkpoint.optimizer_state, s.init_from)
            for group in optimizer.param_groups:  # the state brings the moments; this run's settings the rest
                group["weight_decay"] = s.weight_decay
            self._optimizer_note = (
                f"continuing the AdamW state of {s.init_from} (moments and step counts, "
                f"{adamw_steps(checkpoint.optimizer_state)} steps); the learning rate is this run's --lr "
                "and schedule; --fresh-optimizer starts a new AdamW instead"
            )
        if dist.rank and state is None:
            torch.manual_seed(s.seed + dist.rank)  # same initial weights, different dropout on every rank
        self._saved_step = self.step if s.resume else None
        self._optimizer = optimizer

        self._train_model = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self._ddp_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
            self._train_model = self._ddp_model
        if s.compile:
            self._train_model = torch.compile(self._train_model)
        return state

    def _announce(self, plan: _RunPlan, state: dict[str, Any] | None) -> None:
        """The start event, then a warning for each way this run differs from what its settings promise."""
        s, dist = self.settings, self._dist
        assert self.model is not None and self.store is not None
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
                source=plan.source,
                parameters=self.model.num_parameters(),
                config=plan.cfg.to_dict(),
                device=str(plan.device),
                dtype="bfloat16" if plan.amp_dtype is not None else "float32",
                world_size=dist.world_size,
                corpus=plan.corpus.description,
                train_tokens=plan.corpus.train_tokens,
                val_tokens=plan.corpus.val_tokens,
                tokens_per_step=plan.tokens_per_step,
                steps_per_epoch=plan.steps_per_epoch,
                settings=s.to_dict(),
            )
        )

        warnings = []
        if plan.batches.batch_size < s.batch_size:
            warnings.append(
                (
                    "small-corpus",
                    f"the training part has only {len(plan.train_set)} windows of {plan.context_length} tokens; "
                    f"the batch size is lowered from {s.batch_size} to {plan.batches.batch_size}",
                )
            )
        if state is not None and state.get("data", {}).get("content_hash") != plan.corpus.content_hash:
            warnings.append(
                ("corpus-changed", "the corpus changed since this run was saved; training goes on with the new text")
            )
        saved_world = int(state.get("world_size", 1)) if state is not None else dist.world_size
        if saved_world != dist.world_size:
            # Same place in the data order, counted in this run's (differently sized) global batches.
            self.position = self.position * saved_world // dist.world_size
            if self.position >= plan.batches.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            warnings.append(
                (
                    "world-size-changed",
                    f"this run was saved by {saved_world} processes and continues on {dist.world_size}: "
                    "same data order and settings, but not bit for bit",
                )
            )
        if self._optimizer_note:
            warnings.append(("optimizer-continued", self._optimizer_note))
        for kind, text in warnings:
            self._emit(WarningEvent(step=self.step, kind=kind, message=text))

    def _finish(self, plan: _RunPlan, status: str, message: str, started: float) -> FinishedEvent:
        """The last save (unless nothing changed since the one before) and the finished event."""
        s = self.settings
        saved = None
        if self.step > (self._saved_step or 0):
            self._save(plan, {"completed": "final"}.get(status, status))
            saved = s.name
        elif self._saved_step is not None:
            saved = s.name  # nothing new since the last save
        finished = FinishedEvent(
            step=self.step,
            total_steps=self.total_steps,
            epoch=self._epoch_number(),
            tokens_seen=self.tokens_seen,
            status=status,
            train_loss=self._last_eval.train_loss if self._last_eval else None,
            val_loss=self._last_eval.val_loss if self._last_eval else None,
            elapsed_s=time.perf_counter() - started,
            checkpoint=saved,
            message=message or self._finished_message(status, saved),
        )
        self._emit(finished)
        return finished

    def _finished_message(self, status: str, saved: str | None) -> str:
        s = self.settings
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
        return message

    # ---------------------------------------------------------------------------------------------- pieces

    @torch.no_grad()
    def _check_weights(self, plan: _RunPlan) -> None:
        """Before a save: weights that hold NaN or inf, or that give a non-finite loss (weights of 1e10 are finite
        and give NaN), are never published over the last good checkpoint. The loss is taken in eval mode on the
        next training batch, so no random number is drawn and the run goes on exactly as it would have."""
        model = self.model
        assert model is not None
        bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        loss = math.nan
        if bad is None:
            inputs, targets = plan.train_set.batch(plan.batches.indices(self.epoch, self.position, 0))
            model.eval()
            try:
                with autocast(plan.device, plan.amp_dtype):
                    loss = float(model(inputs.to(plan.device), targets=targets.to(plan.device)))
            finally:
                model.train()
        broken = torch.tensor([0.0 if math.isfinite(loss) else 1.0], dtype=torch.float64)
        if self._dist.enabled:
            broken = self._dist.all_reduce(broken.to(plan.device), op="max").cpu()
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
    def _mean_loss(self, plan: _RunPlan, dataset: GPTDataset, batches: list[torch.Tensor]) -> float:
        assert self.model is not None
        # Ctrl-C: an evaluation can take many seconds; cut it short
        loss = mean_loss(
            self.model,
            dataset,
            batches,
            device=plan.device,
            amp_dtype=plan.amp_dtype,
            stopped=lambda: self.control.stop_requested,
        )
        if loss is None:
            raise _EvaluationCut
        return loss

    def _evaluate(self, plan: _RunPlan) -> None:
        assert self.model is not None
        self.model.eval()
        try:
            train_loss = self._mean_loss(plan, plan.train_set, plan.train_eval)
            val_loss = self._mean_loss(plan, plan.val_set, plan.val_eval)
        except _EvaluationCut:
            return
        finally:
            self.model.train()
        event = EvalEvent(
            step=self.step,
            epoch=self._epoch_number(),
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

    def _sample(self, plan: _RunPlan) -> None:
        """The course's greedy sample after each evaluation: what the model makes of the prompt so far."""
        assert self.model is not None
        if self.settings.sample_tokens <= 0:
            return
        settings = DecodingSettings(
            max_new_tokens=self.settings.sample_tokens, temperature=0.0, stop_at_eos=False, top_n=1
        )
        text = "".join(step.text for step in generate(self.model, plan.tokenizer, plan.prompt_ids, settings))
        self._emit(SampleEvent(step=self.step, prompt=plan.prompt, text=text))

    def _trainer_state(self, plan: _RunPlan) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch_cpu": torch.get_rng_state()}
        if plan.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(plan.device)
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self._elapsed_before,
            "scheduler": plan.schedule.to_dict(),
            "rng": rng,
            "settings": self.settings.to_dict(),
            "data": plan.data_state,
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

    def _save(self, plan: _RunPlan, reason: str) -> None:
        """Check the weights (every rank), then write the checkpoint (rank 0) with all a resume needs."""
        self._check_weights(plan)
        if self._dist.is_main:
            with self.control.saving():
                self._write_checkpoint(plan, reason)
        self._saved_step = self.step

    def _write_checkpoint(self, plan: _RunPlan, reason: str) -> None:
        assert self.store is not None and self.model is not None and self._optimizer is not None
        last = self._last_eval
        meta = {
            "step": self.step,
            "epoch": self.epoch,
            "tokens_seen": self.tokens_seen,
            "train_loss": last.train_loss if last else None,
            "val_loss": last.val_loss if last else None,
            "train_perplexity": last.train_perplexity if last else None,
            "val_perplexity": last.val_perplexity if last else None,
            "source": plan.source,
            "training": self.settings.to_dict() | {"resume": False, "overwrite": False},
        }
        info = self.store.save(
            self.settings.name,
            self.model,
            meta=meta,
            optimizer_state=_cpu_copy(self._optimizer.state_dict()),
            trainer_state=self._trainer_state(plan),
            metrics_from=self._pending_metrics,
        )
        if self._pending_metrics is not None:  # its file now is the checkpoint's metrics.jsonl
            shutil.rmtree(self._pending_metrics.parent, ignore_errors=True)
            self._pending_metrics = None
        self._emit(CheckpointEvent(step=self.step, name=self.settings.name, path=str(info.path), reason=reason))
