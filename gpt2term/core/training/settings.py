"""What a run is made of: one setting per `gpt2term train` option, checked before anything slow happens, and which
of them `--resume` keeps (changing them would not continue the same run)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from gpt2term.core.data import ENCODING_ERRORS, normalize_sources
from gpt2term.core.devices import check_threads, resolve_dtype
from gpt2term.core.errors import CheckpointError, InputError
from gpt2term.core.generation import check_seed
from gpt2term.core.recipes import COURSE_PROMPT, EVAL_TIMINGS, INITS, RECIPES, SAMPLE_TIMINGS, SCHEDULES

if TYPE_CHECKING:
    from gpt2term.core.store.store import CheckpointStore

DEFAULT_EPOCHS = 1
MAX_GRAD_ACCUM = 4096  # far past any real use; a larger count is a typo that would make one step run for days
PYDOC_PROMPT = 'The "for" statement is used to'
# Settings that define the run itself, so `--resume` keeps them: the weights' shape and origin (preset, model,
# init_from), the text and how it is tokenized, cut and split (corpus, encoding_errors, context_length, stride,
# val_ratio), and the data order a saved position points into (batch_size, seed). The train form derives its
# fixed fields from this list.
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


@dataclass
class TrainingSettings:
    """Every option of a run (one field per `gpt2term train` option), saved with each checkpoint for `--resume`."""

    name: str = "my-gpt"
    corpus: list[str] = field(default_factory=list)  # files, folders of .txt/.md, or "pydoc"; empty means pydoc
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # GPTConfig fields overriding the preset (emb_dim, ...)
    init_from: str | None = None  # --from: a checkpoint name or weights path to fine-tune
    init: str = "gpt2"  # a new model's weights (see INITS); the book recipe draws them as the book's GPTModel does
    fresh_optimizer: bool = False  # --from a book model_and_optimizer.pth: start a new AdamW instead of its state
    resume: bool = False
    overwrite: bool = False
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 8
    context_length: int | None = None  # default: the model's
    stride: int | None = None  # default: context_length
    lr: float = 5e-4
    schedule: str = "cosine"  # after the warmup: constant, cosine or linear (see SCHEDULES)
    min_lr_ratio: float = 0.1  # the cosine or linear decay ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    warmup_steps: int | None = None  # default: a tenth of the run, at most 100 steps
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    eval_interval: int = 50
    eval_iters: int = 5
    eval_at_start: bool = True  # evaluate the untrained (or loaded) model before the first update
    eval_timing: str = "interval"  # see EVAL_TIMINGS
    save_interval: int = 500  # 0: only at the end, on stop and on Ctrl-C
    val_ratio: float = 0.1
    seed: int = 123
    device: str = "auto"
    dtype: str = "float32"
    compile: bool = False
    sample_prompt: str | None = None  # default: one that fits the corpus
    sample_tokens: int = 30
    sample_every: str = "eval"  # see SAMPLE_TIMINGS
    encoding_errors: str = "strict"
    threads: int | None = None
    recipe: str = "default"  # the RECIPES entry the run's defaults came from

    @classmethod
    def from_recipe(cls, recipe: str, **given: Any) -> TrainingSettings:
        """The recipe's settings over the defaults, then the `given` ones over both (`model` merged key by key)."""
        if recipe not in RECIPES:
            raise InputError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
        values = {k: v for k, v in RECIPES[recipe].items() if k != "model"}
        model = {**RECIPES[recipe].get("model", {}), **(given.pop("model", None) or {})}
        if "max_steps" in given and "epochs" not in given:
            values.pop("epochs", None)  # a recipe's length in epochs gives way to --max-steps
        return cls(**{**values, **given, "model": model, "recipe": recipe})

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
        # nan passes every comparison below
        for option in ("epochs", "lr", "weight_decay", "grad_clip", "min_lr_ratio"):
            value = getattr(self, option)
            if value is not None and not math.isfinite(value):
                raise InputError(f"--{option.replace('_', '-')} must be a finite number, got {value}")
        if self.lr <= 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.save_interval < 0 or (self.warmup_steps or 0) < 0:
            raise InputError("--weight-decay, --save-interval and --warmup-steps cannot be negative")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InputError(f"--min-lr-ratio must be between 0 and 1, got {self.min_lr_ratio}")
        for option, allowed in (
            ("schedule", SCHEDULES),
            ("init", INITS),
            ("eval_timing", EVAL_TIMINGS),
            ("sample_every", SAMPLE_TIMINGS),
            ("recipe", tuple(RECIPES)),
        ):
            if getattr(self, option) not in allowed:
                raise InputError(
                    f"--{option.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, option)!r}"
                )
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

    if overrides.get("init_from") is not None:  # a fine-tuned run's own saved `init_from` is no such request
        raise InputError("--resume continues a run and --from starts a new one; give only one of them")
    store = store or CheckpointStore()
    if not store.exists(name):
        raise InputError(f"no checkpoint named {name!r} to resume; start it without --resume (see gpt2term ckpt list)")
    meta = store.info(name).meta or {}
    saved = meta.get("training")
    if not isinstance(saved, dict):
        carried = " (its AdamW state carries over)" if store.info(name).has_optimizer else ""
        raise CheckpointError(
            f"checkpoint {name!r} was not saved by a training run, so it has nothing to resume; "
            f"continue training it with: gpt2term train --from {name} --name NEW_NAME{carried}"
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
