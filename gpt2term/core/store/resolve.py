"""What a user means by a model name or path, and the one way both faces (CLI and TUI) turn it into a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt2term.core import tf_checkpoint
from gpt2term.core.accel import accelerate
from gpt2term.core.config import GPTConfig, preset
from gpt2term.core.errors import CheckpointError, InputError
from gpt2term.core.interop import find_hf_cached, load_hf_cached, load_weights_file
from gpt2term.core.model import GPTModel
from gpt2term.core.store.layout import MAX_NAME_LENGTH, NAME_RE, WEIGHTS_FILE, is_checkpoint_folder, suggest_name
from gpt2term.core.store.store import Checkpoint, CheckpointStore, load_folder
from gpt2term.core.store.validate import non_finite_tensor


def _usable(checkpoint: Checkpoint) -> Checkpoint:
    """Weights with NaN or inf would only print `perplexity nan`: refuse them in one line instead."""
    bad = non_finite_tensor(checkpoint.state_dict)
    if bad is not None:
        raise CheckpointError(
            f"{checkpoint.name!r} has non-finite weights (nan or inf in {bad}): the run that wrote it diverged; "
            "use an earlier checkpoint, or train again with a lower --lr"
        )
    return checkpoint


def resolve_weights(
    spec: str,
    store: CheckpointStore | None = None,
    *,
    n_heads: int | None = None,
    prefer_store: bool = True,
    with_state: bool = False,
) -> Checkpoint:
    """What a user means by `--checkpoint SPEC`: a store name, else a path (a checkpoint folder of ours, HF
    safetensors file or folder, a book .pth), else a GPT-2 in the local Hugging Face cache ("gpt2", ...).
    `n_heads` (`--n-heads`) is the head count of a file that carries no config; for one that does, it must agree.
    `with_state` also reads a store checkpoint's optimizer and trainer state (`train --from`)."""
    store = store or CheckpointStore()
    spec = str(spec)
    is_name = bool(NAME_RE.match(spec)) and ".." not in spec and len(spec) <= MAX_NAME_LENGTH
    if prefer_store and is_name and store.exists(spec):
        return _heads_agree(_usable(store.load(spec, with_state=with_state)), n_heads)
    path = Path(spec).expanduser()
    if path.exists():
        if is_checkpoint_folder(path):
            return _heads_agree(_usable(load_folder(path, suggest_name(path.name), with_state=with_state)), n_heads)
        if path.name == WEIGHTS_FILE and is_checkpoint_folder(path.parent):  # our model.safetensors, by its path
            folder = load_folder(path.parent, suggest_name(path.parent.name), with_state=with_state)
            return _heads_agree(_usable(folder), n_heads)
        loaded = load_weights_file(path, n_heads)
        stem = path.parent.name if path.is_file() and path.stem in ("model", "pytorch_model") else path.stem
        if loaded.source.startswith(tf_checkpoint.SOURCE_PREFIX):
            stem = tf_checkpoint.name_for(loaded.source)
    else:
        cached = find_hf_cached(spec) if is_name or spec.count("/") == 1 else None
        if cached is None:
            if not is_name or path.suffix in (".safetensors", ".pth", ".pt", ".bin"):
                load_weights_file(path)  # raises its "no such file" error naming the path
            raise CheckpointError(
                f"{spec!r}: no checkpoint of that name, no such file or folder, and no GPT-2 of that name in the "
                "Hugging Face cache; see `gpt2term ckpt list`, check the path, or run `gpt2term ckpt download gpt2`"
            )
        loaded = load_hf_cached(cached)
        stem = cached.name
    checkpoint = Checkpoint(
        name=suggest_name(stem),
        config=loaded.config,
        # Half-precision files compute in float32 on CPU, as they did before the store existed.
        state_dict={k: v.float() if v.is_floating_point() else v for k, v in loaded.state_dict.items()},
        meta={"source": loaded.source, "config": loaded.config.to_dict()},
        optimizer_state=loaded.optimizer_state,
        trainer_state=None,
        notices=list(loaded.notices),
    )
    return _heads_agree(_usable(checkpoint), n_heads)


def _heads_agree(checkpoint: Checkpoint, n_heads: int | None) -> Checkpoint:
    """A --n-heads for weights whose config names the head count is a mistake unless it says the same."""
    if n_heads is not None and n_heads != checkpoint.config.n_heads:
        raise InputError(
            f"{checkpoint.name!r} has its config ({checkpoint.config.n_heads} heads of {checkpoint.config.head_dim} "
            f"dims); --n-heads {n_heads} disagrees: drop --n-heads (it is only for .pth files without a config)"
        )
    return checkpoint


UNTRAINED_NAME = "gpt2-124M"
UNTRAINED_SEED = 123  # the same random model every time, in every face


@dataclass
class OpenedModel:
    """A model ready to run, and what a face needs to describe it (each face words it its own way)."""

    model: GPTModel
    name: str
    notices: list[str] = field(default_factory=list)  # how the weights were read, for the user
    step: int | None = None  # meta.json's step; None: unknown (imported weights) or untrained
    source: str = ""
    untrained: bool = False
    store_name: str | None = None  # set when it came from the store

    @property
    def config(self) -> GPTConfig:
        return self.model.cfg


def default_checkpoint(store: CheckpointStore | None = None) -> str | None:
    """The one rule for "no --checkpoint given", in every command and in the app: the last one used, if it still
    loads; else the most recently updated loadable one; None means the untrained GPT-2 124M (`untrained_model`)."""
    return (store or CheckpointStore()).most_recent()


def untrained_model(device: torch.device | str = "cpu") -> GPTModel:
    """GPT-2 124M with random weights (fixed seed), for trying the program before any training or import."""
    torch.manual_seed(UNTRAINED_SEED)
    return GPTModel(preset(UNTRAINED_NAME)).to(device).eval()


def open_model(
    spec: str | None,
    store: CheckpointStore | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype | None = None,
    remember: bool = True,
    float32: bool = False,
    n_heads: int | None = None,
) -> OpenedModel:
    """The one way a name or a path (see `resolve_weights`) becomes a running model, for the CLI and the TUI:
    resolved, refused if non-finite, built on `device`, accelerated (`dtype`: see `accelerate`). None: the untrained
    GPT-2 124M. With `remember`, a store checkpoint becomes the one opened next time; `float32` casts weights saved
    in half precision (evaluation measures in float32); `n_heads`: see `resolve_weights`."""
    if spec is None:
        if n_heads is not None:
            raise InputError("--n-heads describes a weights file; give the file with --checkpoint PATH.pth")
        return OpenedModel(accelerate(untrained_model(device), dtype), UNTRAINED_NAME, untrained=True)
    store = store or CheckpointStore()
    loaded = resolve_weights(spec, store, n_heads=n_heads)
    model = loaded.build_model(device)
    if float32:
        model = model.float()
    if remember and loaded.store_name:
        store.mark_used(loaded.store_name)
    step = loaded.meta.get("step")
    return OpenedModel(
        accelerate(model, dtype),
        loaded.name,
        list(loaded.notices),
        step=int(step) if isinstance(step, int | float) else None,
        source=str(loaded.meta.get("source") or ""),
        untrained=step == 0,
        store_name=loaded.store_name,
    )
