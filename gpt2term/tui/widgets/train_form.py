"""The train screen's form: what to train on, which model, how long. It only builds `TrainingSettings`.

Its defaults are a run worth watching on a laptop CPU (the `tiny` preset on the built-in pydoc corpus, 300
steps with an evaluation every 25), so one key starts it. "Model" offers a new model from a preset, or each
stored checkpoint to resume (its saved settings fixed, as `train --resume` keeps them) or to fine-tune
(`train --from`). "Recipe" fills the form with a named run (`train --recipe`; "book" is chapter 5's) and gives
the defaults of the settings the form does not show.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Grid, VerticalScroll
from textual.widgets import Button, Checkbox, Input, Label, Select

from gpt2term.core.config import PRESETS, GPTConfig, preset
from gpt2term.core.devices import DEVICES
from gpt2term.core.errors import CheckpointError, Gpt2termError, InputError
from gpt2term.core.memory import parameter_count
from gpt2term.core.recipes import RECIPES, SCHEDULES
from gpt2term.core.store.layout import suggest_name
from gpt2term.core.store.store import CheckpointInfo, CheckpointStore
from gpt2term.core.training import FIXED_ON_RESUME as FIXED_SETTINGS
from gpt2term.core.training import TrainingSettings, resume_settings
from gpt2term.formatting import format_count
from gpt2term.tui.messages import StoreListed

DEFAULT_PRESET = "tiny"
DEFAULT_STEPS = 300
DEFAULT_EVAL_INTERVAL = 25
DEFAULT_SAVE_INTERVAL = 100
FINE_TUNE_CONTEXT = 256  # fine-tuning a 1024-context GPT-2 on a CPU: start with shorter windows
DTYPES = ("float32", "bfloat16")

# (field id, label, kind): kind "int", "float", "text"; the model's shape first, then the run's.
FIELDS = (
    ("name", "Name", "text"),
    ("corpus", "Corpus", "text"),
    ("n_layers", "Layers", "int"),
    ("emb_dim", "Emb dim", "int"),
    ("n_heads", "Heads", "int"),
    ("context_length", "Context", "int"),
    ("max_steps", "Steps", "int?"),
    ("epochs", "Epochs", "float?"),
    ("batch_size", "Batch size", "int"),
    ("lr", "Learn. rate", "float"),
    ("min_lr_ratio", "Min lr ×", "float"),
    ("eval_interval", "Eval every", "int"),
    ("save_interval", "Save every", "int"),
    ("seed", "Seed", "int"),
)
MODEL_FIELDS = ("n_layers", "emb_dim", "n_heads")
# The setting a field edits, where it is not the field's own name.
FIELD_SETTINGS = dict.fromkeys(MODEL_FIELDS, "model")
# Fields a resumed run keeps as saved: those whose setting `train --resume` keeps (the core decides which).
FIXED_ON_RESUME = tuple(f for f, _, _ in FIELDS if FIELD_SETTINGS.get(f, f) in FIXED_SETTINGS)
# The one-key run's values of the fields a recipe fills (a recipe's own values replace them).
FORM_DEFAULTS = {
    "max_steps": DEFAULT_STEPS,
    "epochs": None,
    "batch_size": 8,
    "lr": 5e-4,
    "min_lr_ratio": 0.1,
    "eval_interval": DEFAULT_EVAL_INTERVAL,
    "seed": 123,
}


@dataclass(frozen=True)
class ModelChoice:
    kind: str  # "new", "resume", "from"
    name: str  # a preset, or a checkpoint name

    @property
    def value(self) -> str:
        return f"{self.kind}:{self.name}"

    @classmethod
    def parse(cls, value: str) -> ModelChoice:
        kind, _, name = value.partition(":")
        return cls(kind, name)


def resumable(info: CheckpointInfo) -> bool:
    """Saved by a training run with its optimizer and settings: `train --resume` can continue it."""
    return info.damaged is None and info.has_optimizer and isinstance(info.get("training"), dict)


def model_options(rows: list[CheckpointInfo]) -> list[tuple[str, str]]:
    options = []
    for name in PRESETS:
        options.append((f"new {name}", ModelChoice("new", name).value))
    for row in rows:
        if row.damaged is not None:
            continue
        step = row.get("step")
        if resumable(row):
            options.append((f"resume {row.name} @{step}", ModelChoice("resume", row.name).value))
        options.append((f"fine-tune {row.name}", ModelChoice("from", row.name).value))
    return options


def corpus_text(sources: list[str]) -> str:
    return " ".join(shlex.quote(s) for s in sources) if sources else "pydoc"


def corpus_label(sources: list[str]) -> str:
    if not sources or sources == ["pydoc"]:
        return "pydoc"
    return Path(sources[0]).stem or "corpus"


class TrainForm(VerticalScroll):
    """Inputs for every setting of a run; `read()` turns them into `TrainingSettings` or says what to fix."""

    def __init__(self, store: CheckpointStore, **kwargs) -> None:
        super().__init__(**kwargs)
        self.store = store
        self._auto_name = ""  # the name the form made up last (replaced when the model changes)
        self._filling = False
        self._rows: dict[str, CheckpointInfo] = {}  # the store as last listed
        self.choosing: ModelChoice | None = None  # a choice to make once the store is listed
        # Selects the form itself set (id: value): their Changed message, handled after the fill, fills nothing.
        self._quiet: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        with Grid(id="train-grid"):
            yield Label("Recipe")
            yield Select([(r, r) for r in RECIPES], value="default", allow_blank=False, compact=True, id="recipe")
            yield Label("Model")
            yield Select(
                model_options([]),
                value=ModelChoice("new", DEFAULT_PRESET).value,
                allow_blank=False,
                compact=True,
                id="model",
            )
            for field_id, label, kind in FIELDS:
                yield Label(label)
                input_type = "integer" if kind.startswith("int") else "number" if kind.startswith("float") else "text"
                yield Input(id=field_id, type=input_type, compact=True, select_on_focus=False)
            yield Label("Schedule")
            yield Select([(k, k) for k in SCHEDULES], value="cosine", allow_blank=False, compact=True, id="schedule")
            yield Label("QKV bias")
            yield Checkbox("query/key/value", value=True, compact=True, id="qkv_bias")
            yield Label("Eval at 0")
            yield Checkbox("before training", value=True, compact=True, id="eval_at_start")
            yield Label("Device")
            yield Select([(d, d) for d in DEVICES], value="auto", allow_blank=False, compact=True, id="device")
            yield Label("Dtype")
            yield Select([(d, d) for d in DTYPES], value="float32", allow_blank=False, compact=True, id="dtype")
        yield Button("Start", id="start", variant="success", compact=True)

    def on_mount(self) -> None:
        self.query_one("#corpus", Input).placeholder = "pydoc, or files / folders"
        self.query_one("#max_steps", Input).placeholder = "empty: use epochs"
        self.query_one("#epochs", Input).placeholder = "empty: 1"
        self.reset_defaults()

    # ------------------------------------------------------------------ filling in

    def _set(self, field_id: str, value: object, *, disabled: bool = False) -> None:
        widget = self.query_one(f"#{field_id}", Input)
        widget.value = "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
        widget.disabled = disabled

    def value(self, field_id: str) -> str:
        return self.query_one(f"#{field_id}", Input).value.strip()

    @property
    def choice(self) -> ModelChoice:
        return ModelChoice.parse(str(self.query_one("#model", Select).value))

    def refresh_models(self, then: ModelChoice | None = None) -> None:
        """The checkpoints to resume or fine-tune, as the store has them now (the current choice is kept), read
        by a worker: listing the store may repair a crashed save. `then`: the choice to make once they are in."""
        if then is not None:
            self.choosing = then
        self._list_store()

    @work(thread=True, exclusive=True, exit_on_error=False, group="list")
    def _list_store(self) -> None:
        self.post_message(StoreListed(self.store.list()))

    def on_store_listed(self, message: StoreListed) -> None:
        message.stop()  # the form's own listing, not the screen's
        self._rows = {row.name: row for row in message.rows}
        select = self.query_one("#model", Select)
        current = str(select.value)
        options = model_options(message.rows)
        values = [value for _, value in options]
        self._filling = True
        try:
            select.set_options(options)
            select.value = current if current in values else ModelChoice("new", DEFAULT_PRESET).value
        finally:
            self._filling = False
        choice, self.choosing = self.choosing, None
        if choice is not None and choice.value in values:
            select.value = choice.value
            self._apply_choice(choice)

    def reset_defaults(self) -> None:
        """The one-key run: the tiny preset on pydoc, 300 steps, evaluated every 25."""
        self.refresh_models()
        self._filling = True
        try:
            self._fill_recipe("default")
            self._set("corpus", "pydoc")
            self._set("save_interval", DEFAULT_SAVE_INTERVAL)
            self.query_one("#device", Select).value = "auto"
            self.query_one("#dtype", Select).value = "float32"
            self.new_name()
        finally:
            self._filling = False

    @property
    def recipe(self) -> str:
        return str(self.query_one("#recipe", Select).value)

    def _select(self, field_id: str, value: str) -> None:
        select = self.query_one(f"#{field_id}", Select)
        if str(select.value) != value:
            self._quiet[field_id] = value
            select.value = value

    def _set_by_form(self, field_id: str, event: Select.Changed) -> bool:
        """Whether this Changed message is of a value the form set itself (not the user's choice)."""
        return self._quiet.pop(field_id, None) == str(event.value)

    def _check(self, field_id: str, value: bool, *, disabled: bool = False) -> None:
        box = self.query_one(f"#{field_id}", Checkbox)
        box.value, box.disabled = value, disabled

    def _fill_recipe(self, recipe: str) -> None:
        """The recipe's model (a new one of its preset) and its values in every field it has; the corpus stays."""
        given = RECIPES[recipe]
        settings = TrainingSettings.from_recipe(recipe)
        self._select("recipe", recipe)
        preset_name = given.get("preset", DEFAULT_PRESET)
        self._select("model", ModelChoice("new", preset_name).value)  # its own fill would undo the recipe's
        self._fill_new(preset_name)
        cfg = preset(preset_name).with_(**settings.model)
        for field_id in MODEL_FIELDS:
            self._set(field_id, getattr(cfg, field_id))
        self._set("context_length", settings.context_length or cfg.context_length)
        self._check("qkv_bias", cfg.qkv_bias)
        values = FORM_DEFAULTS | {k: getattr(settings, k) for k in FORM_DEFAULTS if k in given}
        if "epochs" in given:
            values["max_steps"] = None
        for field_id, value in values.items():
            self._set(field_id, value)
        self.query_one("#schedule", Select).value = settings.schedule
        self._check("eval_at_start", settings.eval_at_start)

    def new_name(self) -> None:
        """A name no checkpoint has yet, from the model and the corpus (e.g. tiny-pydoc, tiny-pydoc-2)."""
        choice = self.choice
        if choice.kind == "resume":
            return
        try:
            sources = shlex.split(self.value("corpus"))
        except ValueError:
            sources = []
        base = suggest_name(f"{choice.name}-ft" if choice.kind == "from" else f"{choice.name}-{corpus_label(sources)}")
        name, n = base, 2
        while self._taken(name):
            name, n = f"{base}-{n}", n + 1
        self._auto_name = name
        self._set("name", name)

    def _taken(self, name: str) -> bool:
        try:
            return bool(name) and self.store.path(name).exists()
        except Gpt2termError:
            return False  # an invalid name: `read()` says why

    def _fill_new(self, preset_name: str) -> None:
        cfg = preset(preset_name)
        for field_id in MODEL_FIELDS:
            self._set(field_id, getattr(cfg, field_id))
        self._set("context_length", cfg.context_length)
        for field_id in FIXED_ON_RESUME:
            self.query_one(f"#{field_id}", Input).disabled = False
        self.query_one("#name", Input).disabled = False
        self.query_one("#recipe", Select).disabled = False
        self._check("qkv_bias", cfg.qkv_bias)

    def _info(self, name: str) -> CheckpointInfo:
        if name not in self._rows:
            raise CheckpointError(f"no checkpoint named {name!r}; see `gpt2term ckpt list` for the names")
        return self._rows[name]

    def _fill_from(self, name: str) -> None:
        info = self._info(name)
        cfg = info.config or GPTConfig()
        for field_id in MODEL_FIELDS:
            self._set(field_id, getattr(cfg, field_id), disabled=True)
        self._check("qkv_bias", cfg.qkv_bias, disabled=True)
        self.query_one("#recipe", Select).disabled = False
        self._set("context_length", min(cfg.context_length, FINE_TUNE_CONTEXT))
        for field_id in ("corpus", "batch_size", "seed", "context_length", "name"):
            self.query_one(f"#{field_id}", Input).disabled = False

    def _fill_resume(self, name: str) -> None:
        info = self._info(name)
        saved = TrainingSettings.from_dict(info.get("training") or {})
        cfg = info.config or GPTConfig()
        for field_id in MODEL_FIELDS:
            self._set(field_id, getattr(cfg, field_id))
        self._check("qkv_bias", cfg.qkv_bias, disabled=True)
        self._select("recipe", saved.recipe if saved.recipe in RECIPES else "default")
        self.query_one("#recipe", Select).disabled = True
        self.query_one("#schedule", Select).value = saved.schedule if saved.schedule in SCHEDULES else "cosine"
        self._set("min_lr_ratio", saved.min_lr_ratio)
        self._set("context_length", saved.context_length or cfg.context_length)
        self._set("corpus", corpus_text(saved.corpus))
        self._set("batch_size", saved.batch_size)
        self._set("seed", saved.seed)
        for field_id in FIXED_ON_RESUME:
            self.query_one(f"#{field_id}", Input).disabled = True
        self._set("name", name, disabled=True)
        step = int(info.get("step") or 0)
        total = self._planned_steps(name) or saved.max_steps
        if total and step < total:
            self._set("max_steps", total)
        else:
            self._set("max_steps", step + (total or DEFAULT_STEPS))  # it did its steps: as many again
        self._set("epochs", None)
        self._set("lr", saved.lr)
        self._set("eval_interval", saved.eval_interval)
        self._set("save_interval", saved.save_interval)
        self.query_one("#device", Select).value = saved.device if saved.device in DEVICES else "auto"
        self.query_one("#dtype", Select).value = saved.dtype if saved.dtype in DTYPES else "float32"

    def _planned_steps(self, name: str) -> int | None:
        """How many steps the run meant to do (its last start event says)."""
        starts = [r for r in self.store.read_metrics(name) if r.get("type") == "start"]
        total = starts[-1].get("total_steps") if starts else None
        return int(total) if isinstance(total, int | float) else None

    def choose(self, choice: ModelChoice) -> None:
        """Pick a model choice as if the user had (used by the checkpoints screen's Train action)."""
        self.refresh_models(then=choice)

    @on(Select.Changed, "#recipe")
    def _recipe_changed(self, event: Select.Changed) -> None:
        if self._set_by_form("recipe", event) or self._filling or event.value is Select.BLANK:
            return
        self._filling = True
        try:
            was_auto = self.value("name") == self._auto_name
            self._fill_recipe(str(event.value))
            if was_auto or not self.value("name"):
                self.new_name()
        finally:
            self._filling = False

    @on(Select.Changed, "#model")
    def _model_changed(self, event: Select.Changed) -> None:
        if not self._set_by_form("model", event) and not self._filling and event.value is not Select.BLANK:
            self._apply_choice(ModelChoice.parse(str(event.value)))

    def _apply_choice(self, choice: ModelChoice) -> None:
        self._filling = True
        try:
            was_auto = self.value("name") == self._auto_name
            if choice.kind == "new":
                self._fill_new(choice.name)
            elif choice.kind == "from":
                self._fill_from(choice.name)
            else:
                self._fill_resume(choice.name)
            if choice.kind != "resume" and (was_auto or not self.value("name") or self._taken(self.value("name"))):
                self.new_name()
        except Gpt2termError as exc:
            self.notify(str(exc), title="Cannot use that checkpoint", severity="error")
        finally:
            self._filling = False

    # ------------------------------------------------------------------ reading

    def _number(self, field_id: str, kind: str) -> int | float | None:
        text = self.value(field_id)
        label = dict((f, label) for f, label, _ in FIELDS)[field_id]
        if not text:
            if kind.endswith("?"):
                return None
            raise InputError(f"{label} is empty; give it a value")
        try:
            return int(text) if kind.startswith("int") else float(text)
        except ValueError:
            whole = "a whole number" if kind.startswith("int") else "a number"
            raise InputError(f"{label} {text!r} is not {whole}; fix the field") from None

    def read(self, *, check_name: bool = True) -> TrainingSettings:
        """The settings of the run the form describes; an `InputError` naming the field to fix otherwise.
        `check_name` False: a Name already taken is no error (the data view does not write a checkpoint)."""
        numbers = {f: self._number(f, kind) for f, _, kind in FIELDS if kind != "text"}
        if numbers["max_steps"] is not None and numbers["epochs"] is not None:
            raise InputError("give either Steps or Epochs, not both; clear one of them")
        device = str(self.query_one("#device", Select).value)
        dtype = str(self.query_one("#dtype", Select).value)
        choice = self.choice
        length = {"max_steps": numbers["max_steps"], "epochs": numbers["epochs"]}
        if choice.kind == "resume":
            changes = {k: v for k, v in length.items() if v is not None} or {"epochs": None, "max_steps": None}
            return resume_settings(
                choice.name,
                self.store,
                **changes,
                lr=numbers["lr"],
                schedule=str(self.query_one("#schedule", Select).value),
                min_lr_ratio=numbers["min_lr_ratio"],
                eval_interval=numbers["eval_interval"],
                save_interval=numbers["save_interval"],
                device=device,
                dtype=dtype,
            )
        try:
            sources = shlex.split(self.value("corpus"))
        except ValueError as exc:
            raise InputError(f"Corpus: {exc}; quote paths that contain spaces") from None
        name = self.value("name")
        if check_name and self._taken(name):
            raise InputError(
                f"a checkpoint named {name!r} already exists; pick another Name, or choose 'resume {name}' as the Model"
            )
        qkv_bias = self.query_one("#qkv_bias", Checkbox).value
        recipe = self.recipe
        settings = TrainingSettings.from_recipe(
            recipe,
            name=name,
            corpus=sources,
            batch_size=int(numbers["batch_size"]),
            context_length=int(numbers["context_length"]),
            lr=float(numbers["lr"]),
            min_lr_ratio=float(numbers["min_lr_ratio"]),
            schedule=str(self.query_one("#schedule", Select).value),
            eval_at_start=self.query_one("#eval_at_start", Checkbox).value,
            eval_interval=int(numbers["eval_interval"]),
            save_interval=int(numbers["save_interval"]),
            seed=int(numbers["seed"]),
            device=device,
            dtype=dtype,
            max_steps=None if numbers["max_steps"] is None else int(numbers["max_steps"]),
            epochs=numbers["epochs"],
        )
        if choice.kind == "new":
            settings.preset = choice.name
            base = preset(choice.name)
            model = {k: v for k, v in settings.model.items() if k not in MODEL_FIELDS}  # the recipe's (dropout, bias)
            model.update({f: int(numbers[f]) for f in MODEL_FIELDS if int(numbers[f]) != getattr(base, f)})
            model.pop("qkv_bias", None)
            if qkv_bias != base.qkv_bias or "qkv_bias" in RECIPES[recipe].get("model", {}):
                model["qkv_bias"] = qkv_bias  # what the box shows, even where it is the preset's own
            settings.model = model
            base.with_(**settings.model, context_length=settings.context_length)  # a shape that cannot work says so
        else:
            settings.init_from = choice.name
        settings.validate()
        return settings

    def describe(self) -> str:
        """What one key starts now, for the screen's hint."""
        choice = self.choice
        what = {
            "new": f"a new {choice.name} model",
            "resume": f"resume {choice.name}",
            "from": f"fine-tune {choice.name}",
        }
        steps = self.value("max_steps")
        length = f"{steps} steps" if steps else f"{self.value('epochs') or 1} epoch(s)"
        try:
            params = ""
            if choice.kind == "new":
                cfg = preset(choice.name).with_(
                    **{f: int(self.value(f)) for f in MODEL_FIELDS},
                    context_length=int(self.value("context_length")),
                    qkv_bias=self.query_one("#qkv_bias", Checkbox).value,
                )
                params = f" ({format_count(_parameters(cfg))} parameters)"
        except (ValueError, Gpt2termError):
            params = ""
        return f"{what[choice.kind]}{params} on {self.value('corpus') or 'pydoc'}, {length}"


def _parameters(cfg: GPTConfig) -> int:
    """The model's count from its shapes: building even a meta-device model took seconds on the screen's first
    open (the first F3 felt stuck)."""
    return parameter_count(cfg)
