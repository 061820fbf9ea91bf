"""The loss surface around a checkpoint: the course's "non-convex, many equivalent minima, flat basins dominate",
measured rather than told.

- A 1D slice and a 2D grid of the validation loss along random directions, filter-normalised (Li et al., 2018,
  "Visualizing the Loss Landscape of Neural Nets"): each row of a direction's weight matrix (one output neuron, one
  token's embedding) is rescaled to the norm of the same row of the weights, so a step of 1 is "as large as the
  weights" in every layer alike and the pictures of different models compare. As the paper does for biases and
  batch norm, one-dimensional parameters (biases, LayerNorm scale and shift) get no perturbation: their scale is
  not a filter's, and moving them by their own norm would dominate the picture.
- The straight line from another set of weights (by default the run's untrained initialisation) to these ones
  (Goodfellow et al., 2015): a loss that falls all the way says "basin", one that first rises says "barrier".

Every point sets the one model's weights from a saved copy (never by adding and subtracting again and again, so
nothing drifts) and the weights are copied back exactly at the end, also on cancel or error. The result is cached
beside the weights (`surface.json`), keyed by the options and the weights file, so reopening is instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2term.core.errors import InputError

SURFACE_FILE = "surface.json"
CACHE_FORMAT = 1
CACHE_ENTRIES = 4  # option sets kept per checkpoint (the newest first)
# Sized so the tiny preset's default finishes in about a minute on a busy 2-core CPU (each point is one forward
# pass over BATCHES x BATCH_SIZE windows); more batches give a less noisy but slower picture.
DEFAULT_GRID = 5
DEFAULT_POINTS = 7
DEFAULT_BATCHES = 1
DEFAULT_BATCH_SIZE = 2
DEFAULT_SEED = 0
BARRIER_TOLERANCE = 0.01  # a rise along the path smaller than this is noise, not a barrier


class SurfaceCancelled(Exception):
    """The user stopped the computation between two points; the weights are restored and nothing is cached."""


@dataclass(frozen=True)
class SurfaceOptions:
    grid: int = DEFAULT_GRID  # G: a G x G grid of (alpha, beta) in [-1, 1]^2
    points: int = DEFAULT_POINTS  # points of the 1D slice in [-1, 1], and of the path in [0, 1]
    batches: int = DEFAULT_BATCHES
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = DEFAULT_SEED  # of the random directions
    other: str | None = None  # the path's start: a checkpoint name or path; None: the run's initialisation

    def check(self) -> None:
        for name, value, least in (("grid", self.grid, 2), ("points", self.points, 2)):
            if value < least:
                raise InputError(f"--{name} must be at least {least} (got {value}); use an odd number such as 5")
        if self.batches < 1 or self.batch_size < 1:
            raise InputError("--batches and --batch-size must be at least 1")

    @property
    def evaluations(self) -> int:
        """Forward passes over the batches: the centre, then every point that is not the centre itself."""
        line = self.points - self.points % 2  # an odd slice has the centre itself in the middle
        grid = self.grid**2 - self.grid % 2
        path = self.points - 1  # its end is the checkpoint
        return 1 + line + grid + path

    def plan(self) -> str:
        return (
            f"{self.grid}x{self.grid} grid + {self.points} line points + {self.points} path points on "
            f"{self.batches} validation batch{'es' if self.batches > 1 else ''} of {self.batch_size} windows"
        )


def alphas(n: int, start: float = -1.0, stop: float = 1.0) -> list[float]:
    """`n` evenly spaced steps; with an odd `n` over [-1, 1] the middle one is exactly 0 (the checkpoint)."""
    return [start + (stop - start) * i / (n - 1) for i in range(n)]


@dataclass
class SurfaceProgress:
    done: int  # points evaluated so far
    total: int
    stage: str  # "centre", "line", "grid", "path"
    estimate_s: float | None  # the whole computation, once the centre point has been timed
    elapsed_s: float


@dataclass
class SurfaceResult:
    center_loss: float
    line: list[dict[str, float]]  # {"alpha", "loss"} along direction 1; alpha 0 is the checkpoint
    grid_alphas: list[float]
    grid: list[list[float]]  # grid[j][i]: alpha = grid_alphas[i] (direction 1), beta = grid_alphas[j] (direction 2)
    path: list[dict[str, float]]  # {"alpha", "loss"}: 0 the other weights, 1 these
    path_from: str  # what the path starts from, in words
    options: dict[str, Any]
    tokens: int  # validation tokens each point is measured on
    evaluations: int
    seconds: float
    notices: list[str] = field(default_factory=list)
    from_cache: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("from_cache")
        data.pop("notices")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SurfaceResult:
        def number(v: Any) -> float:
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise TypeError("not a number")
            return float(v)

        def pairs(items: Any) -> list[dict[str, float]]:
            return [{"alpha": number(p["alpha"]), "loss": number(p["loss"])} for p in items]

        return cls(
            center_loss=number(data["center_loss"]),
            line=pairs(data["line"]),
            grid_alphas=[number(a) for a in data["grid_alphas"]],
            grid=[[number(v) for v in row] for row in data["grid"]],
            path=pairs(data["path"]),
            path_from=str(data["path_from"]),
            options=dict(data["options"]),
            tokens=int(data["tokens"]),
            evaluations=int(data["evaluations"]),
            seconds=number(data["seconds"]),
        )

    def path_shape(self) -> tuple[str, str]:
        """("basin" or "barrier", one sentence with the numbers)."""
        losses = [p["loss"] for p in self.path]
        start, end = losses[0], losses[-1]
        top = max(range(len(losses)), key=losses.__getitem__)
        if losses[top] > max(start, end) + BARRIER_TOLERANCE:
            return "barrier", (
                f"the loss rises to {losses[top]:.3f} at alpha {self.path[top]['alpha']:.2f} on the way, "
                f"{losses[top] - max(start, end):.3f} above the higher end: a barrier between the two"
            )
        return "basin", (
            f"the loss goes from {start:.3f} to {end:.3f} without rising above its ends: one basin, "
            "reached along a straight line"
        )


# ------------------------------------------------------------------------------------------ directions and weights


def filter_normalised_direction(
    weights: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A random Gaussian direction, each row (filter) rescaled to the norm of the same row of `weights`.

    One-dimensional tensors (biases, LayerNorm) get zeros, as Li et al. do for biases and batch norm; rows of
    zero weights stay zero."""
    direction = {}
    for name, w in weights.items():
        if w.dim() <= 1:
            direction[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.dtype)
        rows, d_rows = w.reshape(w.shape[0], -1), d.view(w.shape[0], -1)
        d_rows.mul_(rows.norm(dim=1, keepdim=True) / d_rows.norm(dim=1, keepdim=True).clamp_min(1e-12))
        direction[name] = d
    return direction


class WeightSetter:
    """Moves one model's parameters to `base + a * d1 + b * d2` (or along a path) and back, exactly.

    Each point starts again from the saved copy, so rounding never accumulates; `restore` copies it back, so the
    model ends bit-identical to how it began."""

    def __init__(self, model: nn.Module) -> None:
        self.params = dict(model.named_parameters())
        with torch.no_grad():
            self.base = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def along(self, *terms: tuple[float, dict[str, torch.Tensor]]) -> None:
        for name, p in self.params.items():
            p.copy_(self.base[name])
            for coefficient, direction in terms:
                if coefficient:
                    p.add_(direction[name], alpha=coefficient)

    @torch.no_grad()
    def between(self, other: dict[str, torch.Tensor], alpha: float) -> None:
        """(1 - alpha) * other + alpha * base; exactly `other` at 0 and exactly the base at 1 (torch.lerp)."""
        for name, p in self.params.items():
            torch.lerp(other[name].to(p.dtype), self.base[name], alpha, out=p)

    @torch.no_grad()
    def restore(self) -> None:
        for name, p in self.params.items():
            p.copy_(self.base[name])


Cancel = threading.Event | Callable[[], bool] | None


def _cancelled(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


def compute_surface(
    model: nn.Module,
    loss: Callable[[], float],
    options: SurfaceOptions,
    *,
    other: dict[str, torch.Tensor],
    path_from: str,
    tokens: int = 0,
    progress: Callable[[SurfaceProgress], None] | None = None,
    cancel: Cancel = None,
) -> SurfaceResult:
    """The centre, the 1D slice, the 2D grid and the path, each point `loss()` of the model's current weights.

    Works for any module (the tests use a quadratic whose surface is known in closed form). `other` holds the
    path's start, a tensor per parameter name. `cancel` is checked between points (raises `SurfaceCancelled`)."""
    options.check()
    setter = WeightSetter(model)
    missing = [n for n in setter.params if n not in other or other[n].shape != setter.params[n].shape]
    if missing:
        raise InputError(
            f"the path's start ({path_from}) does not have this model's shape ({missing[0]} differs); "
            "give --from a checkpoint of the same configuration"
        )
    generator = torch.Generator().manual_seed(options.seed)
    d1 = filter_normalised_direction(setter.base, generator)
    d2 = filter_normalised_direction(setter.base, generator)
    total = options.evaluations
    started = time.perf_counter()
    done = 0
    per_point: float | None = None

    def report(stage: str) -> None:
        if progress is not None:
            elapsed = time.perf_counter() - started
            estimate = per_point * total if per_point is not None else None
            progress(SurfaceProgress(done, total, stage, estimate, elapsed))

    def point(stage: str) -> float:
        nonlocal done, per_point
        if _cancelled(cancel):
            raise SurfaceCancelled("stopped")
        value = float(loss())
        done += 1
        if per_point is None:
            per_point = time.perf_counter() - started
        report(stage)
        return value

    line_alphas, grid_alphas, path_alphas = alphas(options.points), alphas(options.grid), alphas(options.points, 0, 1)
    was_training = model.training
    model.eval()  # no dropout: every point is measured the same way
    try:
        report("centre")
        setter.restore()
        center = point("centre")
        line = []
        for a in line_alphas:
            if a == 0:
                line.append({"alpha": a, "loss": center})
                continue
            setter.along((a, d1))
            line.append({"alpha": a, "loss": point("line")})
        grid = []
        for b in grid_alphas:
            row = []
            for a in grid_alphas:
                if a == 0 and b == 0:
                    row.append(center)
                    continue
                setter.along((a, d1), (b, d2))
                row.append(point("grid"))
            grid.append(row)
        path = []
        for a in path_alphas:
            if a == 1:
                path.append({"alpha": a, "loss": center})
                continue
            setter.between(other, a)
            path.append({"alpha": a, "loss": point("path")})
    finally:
        setter.restore()
        model.train(was_training)
    return SurfaceResult(
        center_loss=center,
        line=line,
        grid_alphas=grid_alphas,
        grid=grid,
        path=path,
        path_from=path_from,
        options=asdict(options),
        tokens=tokens,
        evaluations=done,
        seconds=time.perf_counter() - started,
    )


# ------------------------------------------------------------------------------------------------ a GPT checkpoint


@dataclass
class SurfaceTarget:
    """What a checkpoint's surface is measured on: its model, its validation batches, the path's start."""

    name: str
    model: Any  # GPTModel
    dataset: Any  # GPTDataset of the validation part
    batches: list[torch.Tensor]
    other: dict[str, torch.Tensor]
    path_from: str
    folder: Path | None  # where the cache goes; None: weights outside a checkpoint folder (not cached)
    key: dict[str, Any]
    notices: list[str]

    @property
    def tokens(self) -> int:
        return sum(len(b) for b in self.batches) * self.dataset.context_length

    def loss(self) -> float:
        from gpt2term.core.training.evaluation import mean_loss

        device = next(self.model.parameters()).device
        with torch.inference_mode():
            value = mean_loss(self.model, self.dataset, self.batches, device=device)
        assert value is not None
        return value


def _folder_of(spec: str, store: Any) -> Path | None:
    from gpt2term.core.store.layout import MAX_NAME_LENGTH, NAME_RE, WEIGHTS_FILE, is_checkpoint_folder

    is_name = bool(NAME_RE.match(spec)) and ".." not in spec and len(spec) <= MAX_NAME_LENGTH
    if is_name and store.exists(spec):  # the same order as resolve_weights: a store name first, then a path
        return store.path(spec)
    path = Path(spec).expanduser()
    if is_checkpoint_folder(path):
        return path
    if path.name == WEIGHTS_FILE and is_checkpoint_folder(path.parent):
        return path.parent
    return None


def _weights_stamp(folder: Path | None, meta: dict) -> dict[str, Any]:
    """What identifies these weights cheaply: the weights file's size and mtime, and the step."""
    from gpt2term.core.store.layout import WEIGHTS_FILE

    stamp: dict[str, Any] = {"step": meta.get("step"), "updated": meta.get("updated")}
    if folder is not None:
        try:
            st = (folder / WEIGHTS_FILE).stat()
            stamp |= {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except OSError:
            pass
    return stamp


def _training(meta: dict) -> dict:
    training = meta.get("training")
    return training if isinstance(training, dict) else {}


def _data_settings(meta: dict, context_length: int) -> dict[str, Any]:
    """The corpus and how the run cut it (its validation part is what the surface is measured on)."""
    training = _training(meta)
    context = min(int(training.get("context_length") or context_length), context_length)
    return {
        "corpus": list(training.get("corpus") or []),
        "val_ratio": float(training.get("val_ratio") or 0.1),
        "encoding_errors": str(training.get("encoding_errors") or "strict"),
        "context_length": context,
    }


def _initialisation(meta: dict) -> tuple[int, str]:
    training = _training(meta)
    return int(training.get("seed", 123)), str(training.get("init") or "gpt2")


def surface_key(spec: str, options: SurfaceOptions, store: Any = None) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint's folder and the cache key, from meta.json and the weights file's stat alone (no loading),
    so a cached surface opens at once. (None, None) for weights outside a checkpoint folder."""
    from gpt2term.core.store.layout import read_meta
    from gpt2term.core.store.store import CheckpointStore

    store = store or CheckpointStore()
    folder = _folder_of(spec, store)
    if folder is None:
        return None, None
    meta = read_meta(folder)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if options.other is None:
        seed, init = _initialisation(meta)
        other: Any = {"seed": seed, "init": init}
    else:
        other_folder = _folder_of(options.other, store)
        other_meta = read_meta(other_folder) if other_folder is not None else {}
        other = {"spec": options.other, "weights": _weights_stamp(other_folder, other_meta)}
    key = {
        "format": CACHE_FORMAT,
        "options": asdict(options),
        "weights": _weights_stamp(folder, meta),
        "other": other,
        "data": _data_settings(meta, int(config.get("context_length") or 0) or 10**9),
    }
    return folder, key


def prepare_target(
    spec: str, options: SurfaceOptions, store: Any = None, *, n_heads: int | None = None
) -> SurfaceTarget:
    """Load the checkpoint, its corpus's validation windows (as its run cut them) and the path's start."""
    from gpt2term.core.accel import accelerate
    from gpt2term.core.data import GPTDataset, evaluation_batches, load_corpus
    from gpt2term.core.model import GPTModel
    from gpt2term.core.store.resolve import resolve_weights
    from gpt2term.core.store.store import CheckpointStore

    options.check()
    store = store or CheckpointStore()
    checkpoint = resolve_weights(spec, store, n_heads=n_heads)
    folder, key = surface_key(spec, options, store)
    notices = list(checkpoint.notices)
    if not _training(checkpoint.meta):
        notices.append("no training settings in this checkpoint: measured on pydoc's validation part, seed 123")
    settings = _data_settings(checkpoint.meta, checkpoint.config.context_length)
    data = load_corpus(
        settings["corpus"] or None, val_ratio=settings["val_ratio"], encoding_errors=settings["encoding_errors"]
    )
    context = settings["context_length"]
    dataset = GPTDataset(data.val_ids, context)
    if len(dataset) == 0:
        raise InputError(
            f"the validation part of {spec!r}'s corpus is shorter than one window of {context} tokens; "
            "train with a larger --val-ratio or more text"
        )
    batches = evaluation_batches(len(dataset), options.batch_size, options.batches)
    model = accelerate(checkpoint.build_model("cpu").float())
    if options.other is None:
        seed, init = _initialisation(checkpoint.meta)
        torch.manual_seed(seed)
        other = GPTModel(checkpoint.config, init=init).state_dict()
        path_from = f"the untrained initialisation (seed {seed}, init {init})"
    else:
        start = resolve_weights(options.other, store)
        other = {k: v.float() for k, v in start.state_dict.items()}
        path_from = start.name
    if folder is None:
        notices.append("these weights are not a checkpoint folder, so the surface is not cached")
    return SurfaceTarget(checkpoint.name, model, dataset, batches, other, path_from, folder, key or {}, notices)


def read_cached(folder: Path | None, key: dict[str, Any]) -> SurfaceResult | None:
    """The cached result for exactly this key, or None (no file, another key, or a damaged file: recomputed)."""
    if folder is None:
        return None
    try:
        entries = json.loads((folder / SURFACE_FILE).read_text(encoding="utf-8"))["entries"]
        for entry in entries:
            if entry["key"] == key:
                result = SurfaceResult.from_dict(entry["result"])
                result.from_cache = True
                return result
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


def write_cache(folder: Path, key: dict[str, Any], result: SurfaceResult) -> str | None:
    """Store the result beside the weights (write-then-rename); None, or why it could not (never raises)."""
    from gpt2term.core.store.atomic import replace_atomically, storage_error, temp_beside, write_json_synced

    target = folder / SURFACE_FILE
    try:
        entries = json.loads(target.read_text(encoding="utf-8"))["entries"]
        entries = [e for e in entries if isinstance(e, dict) and e.get("key") != key]
    except (OSError, ValueError, KeyError, TypeError):
        entries = []
    entries = [{"key": key, "result": result.to_dict()}, *entries][:CACHE_ENTRIES]
    tmp = temp_beside(target)
    try:
        write_json_synced(tmp, {"format": CACHE_FORMAT, "entries": entries})
        replace_atomically(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return str(storage_error(exc, "cache the loss surface", folder, "the surface was computed, not cached"))
    return None


def loss_surface(
    spec: str,
    options: SurfaceOptions | None = None,
    store: Any = None,
    *,
    n_heads: int | None = None,
    progress: Callable[[SurfaceProgress], None] | None = None,
    cancel: Cancel = None,
    use_cache: bool = True,
) -> SurfaceResult:
    """The loss surface of checkpoint `spec`, from its cache when the options and the weights are the same."""
    options = options or SurfaceOptions()
    options.check()
    if use_cache:
        folder, key = surface_key(spec, options, store)
        cached = read_cached(folder, key) if key is not None else None
        if cached is not None:
            return cached
    target = prepare_target(spec, options, store, n_heads=n_heads)
    result = compute_surface(
        target.model,
        target.loss,
        options,
        other=target.other,
        path_from=target.path_from,
        tokens=target.tokens,
        progress=progress,
        cancel=cancel,
    )
    result.notices = list(target.notices)
    if target.folder is not None:
        problem = write_cache(target.folder, target.key, result)
        if problem:
            result.notices.append(problem)
    return result


# ------------------------------------------------------------------------------------------ drawn in plain text

_BARS = " ▁▂▃▄▅▆▇█"
_SHADES = "░▒▓█"


def line_plot(points: list[dict[str, float]], height: int = 8, label: str = "alpha") -> str:
    """A column chart of loss against alpha, in block characters, with the loss range on the left."""
    losses = [p["loss"] for p in points]
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    levels = [(v - lo) / span * height * 8 for v in losses]
    lines = []
    for row in range(height - 1, -1, -1):
        cells = "".join(_BARS[max(0, min(8, int(round(level - row * 8))))] * 3 for level in levels)
        tick = f"{hi:8.3f} ┤" if row == height - 1 else f"{lo:8.3f} ┤" if row == 0 else "         │"
        lines.append(tick + cells)
    lines.append("         └" + "─" * (3 * len(points)))
    first, last = points[0]["alpha"], points[-1]["alpha"]
    lines.append(f"          {label} {first:g}".ljust(10 + 3 * len(points) - len(f"{last:g}")) + f"{last:g}")
    return "\n".join(lines)


def shade(value: float, lo: float, hi: float) -> str:
    """One of ░▒▓█ for a loss between lo (light: low loss) and hi (dark)."""
    t = (value - lo) / ((hi - lo) or 1.0)
    return _SHADES[max(0, min(len(_SHADES) - 1, int(t * len(_SHADES))))]


def heat_map(result: SurfaceResult) -> str:
    """The grid as shaded cells (light: low loss) beside its numbers; rows are beta, top is +1; ◆ the checkpoint."""
    values = [v for row in result.grid for v in row]
    lo, hi = min(values), max(values)
    alphas_ = result.grid_alphas
    lines = []
    for j in range(len(alphas_) - 1, -1, -1):
        cells = ""
        for i, value in enumerate(result.grid[j]):
            cells += "◆◆" if alphas_[i] == 0 and alphas_[j] == 0 else shade(value, lo, hi) * 2
        numbers = " ".join(f"{v:7.3f}" for v in result.grid[j])
        lines.append(f"beta {alphas_[j]:+5.2f} {cells}  {numbers}")
    lines.append(f"{'':11}{'alpha -1 … +1':<{2 * len(alphas_)}}  ░ {lo:.3f} (lowest) … █ {hi:.3f} (highest)")
    return "\n".join(lines)


def describe_result(result: SurfaceResult) -> str:
    """The whole result as text: what was measured, the slice, the heat map and the path's shape."""
    shape, why = result.path_shape()
    o = result.options
    how = f"{result.evaluations} evaluations, {result.seconds:.0f} s"
    cached = " (from the cache)" if result.from_cache else f" ({how})"
    return "\n".join(
        [
            f"validation loss at the checkpoint: {result.center_loss:.4f} on {result.tokens:,} tokens{cached}",
            "",
            f"1D slice along a random filter-normalised direction (seed {o.get('seed')}; alpha 0 is the checkpoint):",
            line_plot(result.line),
            "",
            f"2D grid along two such directions ({len(result.grid_alphas)}x{len(result.grid_alphas)}):",
            heat_map(result),
            "",
            f"straight path from {result.path_from} (alpha 0) to the checkpoint (alpha 1):",
            line_plot(result.path),
            f"{shape}: {why}",
        ]
    )
