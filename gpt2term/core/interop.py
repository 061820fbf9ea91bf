"""Other tools' GPT-2 weight formats, in and out: Hugging Face `GPT2LMHeadModel` and the book's `.pth` files.

Hugging Face stores GPT-2's linear layers as `Conv1D` with weights shaped [in, out] (ours are `nn.Linear`,
[out, in], so they are transposed) and fuses query, key and value into one `c_attn` (split into the course's
`W_query`, `W_key`, `W_value`). Nothing here imports `transformers`: the formats are plain tensors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt2term.core.accel.skeleton import meta_device
from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import CheckpointError, Gpt2termError, InputError
from gpt2term.core.model import GPTModel
from gpt2term.core.store.atomic import (
    fsync_path,
    give_user_permissions,
    replace_atomically,
    storage_error,
    temp_beside,
    torch_save_synced,
)

HEAD_DIM_GUESS = 64  # every released GPT-2 size uses 64-dimensional heads
BOOK_CONFIG_FILE = "model.json"  # written beside every .pth we export: a state_dict carries no head count


def with_given_heads(cfg: GPTConfig, n_heads: int, source: object) -> GPTConfig:
    """The shapes' config with the head count the user gave (`--n-heads`): the one thing shapes cannot tell."""
    if n_heads < 1 or cfg.emb_dim % n_heads:
        divisors = [h for h in range(1, cfg.emb_dim + 1) if cfg.emb_dim % h == 0 and cfg.emb_dim // h >= 8]
        hint = ", ".join(str(h) for h in divisors[-4:]) or "1"
        raise InputError(
            f"{source}: --n-heads {n_heads} does not divide its {cfg.emb_dim} embedding dims; pass a divisor of "
            f"{cfg.emb_dim} (e.g. {hint})"
        )
    return cfg.with_(n_heads=n_heads)


def _heads_notice(cfg: GPTConfig, n_heads: int | None) -> str:
    if n_heads is not None:
        return f"{cfg.n_heads} heads of {cfg.head_dim} dims, as given by --n-heads"
    return f"assuming {cfg.n_heads} heads of {HEAD_DIM_GUESS} dims (pass --n-heads if it was trained with others)"


@dataclass
class LoadedWeights:
    """A model's weights in our names, its config, and what the user should be told about how they were read."""

    state_dict: dict[str, torch.Tensor]
    config: GPTConfig
    source: str
    notices: list[str] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None

    def build_model(self, device: torch.device | str = "cpu") -> GPTModel:
        with meta_device():
            model = GPTModel(self.config)
        model = model.to_empty(device=device)
        load_state_dict_checked(model, self.state_dict, self.source)
        model.float()  # half-precision files compute in float32 unless the user asks otherwise
        model.eval()
        return model


def load_state_dict_checked(model: GPTModel, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict`, with a one-line error naming the first mismatch instead of torch's wall of text."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own and not k.endswith(".att.mask")]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise CheckpointError(
            f"{source}: weights do not fit a GPT model ({what}, {len(missing)} missing, {len(unexpected)} unexpected); "
            "is it a GPT-2 / gpt2term / book GPTModel file?"
        )
    for k, v in own.items():
        if not state_dict[k].is_floating_point():
            raise CheckpointError(
                f"{source}: {k} holds {str(state_dict[k].dtype).removeprefix('torch.')} numbers; weights must be "
                "floats (quantized files cannot be loaded)"
            )
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(state_dict[k].shape)} but the config expects {tuple(v.shape)}; "
                "the config does not match these weights"
            )
    model.load_state_dict(state_dict, strict=False, assign=True)


# ---------------------------------------------------------------------------------------------- Hugging Face GPT-2


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    return GPTConfig(
        vocab_size=int(hf.get("vocab_size", 50257)),
        context_length=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
        emb_dim=int(hf["n_embd"]),
        n_heads=int(hf["n_head"]),
        n_layers=int(hf["n_layer"]),
        drop_rate=float(hf.get("resid_pdrop", 0.1)),
        qkv_bias=True,
    )


def config_to_hf(cfg: GPTConfig, tied: bool) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_layer": cfg.n_layers,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }


def _strip_hf_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.startswith("transformer."):
            k = k[len("transformer.") :]
        out[k] = v
    return out


def is_hf_state_dict(sd: dict[str, Any]) -> bool:
    return any(k in sd for k in ("wte.weight", "transformer.wte.weight"))


def infer_hf_config(sd: dict[str, torch.Tensor]) -> GPTConfig:
    """A config read off the tensor shapes, assuming GPT-2's 64-dimensional heads (config.json was missing)."""
    sd = _strip_hf_prefix(sd)
    vocab, emb = sd["wte.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k)))
    return config_from_hf(
        {
            "vocab_size": vocab,
            "n_positions": sd["wpe.weight"].shape[0],
            "n_embd": emb,
            "n_head": max(1, emb // HEAD_DIM_GUESS),
            "n_layer": layers,
        }
    )


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 tensors -> our state_dict. Accepts `transformer.` prefixes, tied or present `lm_head`,
    and ignores the `attn.bias` / `attn.masked_bias` buffers older files carry."""
    sd = _strip_hf_prefix(sd)
    d = cfg.emb_dim
    out: dict[str, torch.Tensor] = {
        "tok_emb.weight": sd["wte.weight"],
        "pos_emb.weight": sd["wpe.weight"],
        "final_norm.scale": sd["ln_f.weight"],
        "final_norm.shift": sd["ln_f.bias"],
        # A tied head is copied, as the course does when it loads GPT-2: our out_head is its own parameter.
        "out_head.weight": sd["lm_head.weight"] if "lm_head.weight" in sd else sd["wte.weight"].clone(),
    }
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        q, k, v = sd[h + "attn.c_attn.weight"].split(d, dim=1)
        qb, kb, vb = sd[h + "attn.c_attn.bias"].split(d, dim=0)
        out.update(
            {
                b + "att.W_query.weight": q.t(),
                b + "att.W_key.weight": k.t(),
                b + "att.W_value.weight": v.t(),
                b + "att.W_query.bias": qb,
                b + "att.W_key.bias": kb,
                b + "att.W_value.bias": vb,
                b + "att.out_proj.weight": sd[h + "attn.c_proj.weight"].t(),
                b + "att.out_proj.bias": sd[h + "attn.c_proj.bias"],
                b + "ff.layers.0.weight": sd[h + "mlp.c_fc.weight"].t(),
                b + "ff.layers.0.bias": sd[h + "mlp.c_fc.bias"],
                b + "ff.layers.2.weight": sd[h + "mlp.c_proj.weight"].t(),
                b + "ff.layers.2.bias": sd[h + "mlp.c_proj.bias"],
                b + "norm1.scale": sd[h + "ln_1.weight"],
                b + "norm1.shift": sd[h + "ln_1.bias"],
                b + "norm2.scale": sd[h + "ln_2.weight"],
                b + "norm2.shift": sd[h + "ln_2.bias"],
            }
        )
    if not cfg.qkv_bias:
        for key in [k for k in out if k.endswith(("W_query.bias", "W_key.bias", "W_value.bias"))]:
            del out[key]
    return {k: v.contiguous() for k, v in out.items()}


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> tuple[dict[str, torch.Tensor], bool]:
    """Our state_dict -> Hugging Face `GPT2LMHeadModel` names. Returns the tensors and whether the head is tied.

    A model trained without query/key/value biases (the course's default) gets zero biases, which compute the same.
    """
    d = cfg.emb_dim
    tied = torch.equal(sd["out_head.weight"], sd["tok_emb.weight"])
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": sd["tok_emb.weight"],
        "transformer.wpe.weight": sd["pos_emb.weight"],
        "transformer.ln_f.weight": sd["final_norm.scale"],
        "transformer.ln_f.bias": sd["final_norm.shift"],
    }
    if not tied:
        out["lm_head.weight"] = sd["out_head.weight"]
    for i in range(cfg.n_layers):
        h, b = f"transformer.h.{i}.", f"trf_blocks.{i}."
        zeros = torch.zeros(d, dtype=sd[b + "att.W_query.weight"].dtype)
        biases = [sd.get(b + f"att.{n}.bias", zeros) for n in ("W_query", "W_key", "W_value")]
        out.update(
            {
                h + "attn.c_attn.weight": torch.cat(
                    [sd[b + f"att.{n}.weight"].t() for n in ("W_query", "W_key", "W_value")], dim=1
                ),
                h + "attn.c_attn.bias": torch.cat(biases),
                h + "attn.c_proj.weight": sd[b + "att.out_proj.weight"].t(),
                h + "attn.c_proj.bias": sd[b + "att.out_proj.bias"],
                h + "mlp.c_fc.weight": sd[b + "ff.layers.0.weight"].t(),
                h + "mlp.c_fc.bias": sd[b + "ff.layers.0.bias"],
                h + "mlp.c_proj.weight": sd[b + "ff.layers.2.weight"].t(),
                h + "mlp.c_proj.bias": sd[b + "ff.layers.2.bias"],
                h + "ln_1.weight": sd[b + "norm1.scale"],
                h + "ln_1.bias": sd[b + "norm1.shift"],
                h + "ln_2.weight": sd[b + "norm2.scale"],
                h + "ln_2.bias": sd[b + "norm2.shift"],
            }
        )
    return {k: v.contiguous() for k, v in out.items()}, tied


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); is it complete?") from exc


def load_hf(path: Path, n_heads: int | None = None) -> LoadedWeights:
    """A Hugging Face GPT-2 `model.safetensors` (with `config.json` beside it when present) or its folder.
    `n_heads` is the head count for a file without a config (its shapes cannot tell it)."""
    folder = path if path.is_dir() else path.parent
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{path}: no model.safetensors in this folder; point at a save_pretrained() folder")
    sd = read_safetensors(file)
    if "tok_emb.weight" in sd or "out_head.weight" in sd:  # the course's names: gpt2term's own, or the book's
        return load_course_safetensors(file, sd, n_heads)
    notices = []
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            cfg = config_from_hf(json.loads(config_file.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, Gpt2termError) as exc:
            raise CheckpointError(
                f"{config_file}: not a GPT-2 config.json ({exc}); remove it to infer from shapes"
            ) from exc
    else:
        try:
            cfg = infer_hf_config(sd)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(
                f"{file}: not a GPT-2 model (neither Hugging Face names such as wte.weight nor gpt2term's such as "
                "tok_emb.weight)"
            ) from exc
        if n_heads is not None:
            cfg = with_given_heads(cfg, n_heads, file)
        notices.append(
            f"no config.json beside {file.name}: config inferred from shapes ({cfg.n_layers} layers, "
            f"{cfg.emb_dim} dims), {_heads_notice(cfg, n_heads)}"
        )
    try:
        ours = from_hf_state_dict(sd, cfg)
    except KeyError as exc:
        raise CheckpointError(f"{file}: not a GPT-2 model (no tensor {exc.args[0]!r})") from exc
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{file}: tensor shapes do not match its config ({cfg.n_layers} layers, {cfg.emb_dim} dims); "
            "the config.json does not belong to these weights"
        ) from exc
    return LoadedWeights(ours, cfg, f"huggingface:{file}", notices)


def load_course_safetensors(file: Path, sd: dict[str, torch.Tensor], n_heads: int | None = None) -> LoadedWeights:
    """A safetensors file in the course's names (gpt2term's own, or the book's pretrained
    `gpt2-small-124M.safetensors`): the config from the meta.json beside it when there is one, else read off the
    shapes."""
    meta_file = file.parent / "meta.json"
    cfg = None
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            if isinstance(meta, dict) and "config" in meta:
                cfg = GPTConfig.from_dict(meta["config"], complete=True)
        except (OSError, ValueError, RecursionError, Gpt2termError) as exc:
            raise CheckpointError(f"{meta_file}: no usable config ({exc}); remove it to infer from shapes") from exc
    notices = []
    pair = ("tok_emb.weight", "out_head.weight")
    if (pair[0] in sd) != (pair[1] in sd):  # safetensors' save_model keeps one name of a tied pair
        present, absent = pair if pair[0] in sd else pair[::-1]
        sd = {**sd, absent: sd[present].clone()}
        notices.append(f"{file.name} holds {present} only (the head was tied to the token embedding): used it for both")
    if cfg is None:
        try:
            cfg = infer_book_config(sd)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{file}: not a whole GPTModel (no {exc}); is the file complete?") from exc
        if n_heads is not None:
            cfg = with_given_heads(cfg, n_heads, file)
        notices.append(
            f"no meta.json beside {file.name}: config read off its shapes ({cfg.n_layers} layers, {cfg.emb_dim} "
            f"dims, context {cfg.context_length}), {_heads_notice(cfg, n_heads)}"
        )
    sd = {k: v for k, v in sd.items() if not k.endswith(".att.mask")}
    return LoadedWeights(sd, cfg, f"safetensors:{file}", notices)


# ------------------------------------------------------------------------------------------- the book's .pth files


def torch_load_safely(path: Path) -> Any:
    """`torch.load` with `weights_only=True`: tensors and plain containers only; a pickled object is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused, the file contains pickled Python objects that could run code; "
            "re-save it with torch.save(model.state_dict(), path)"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({exc}); is it complete?") from exc


def infer_book_config(sd: dict[str, torch.Tensor]) -> GPTConfig:
    vocab, emb = sd["tok_emb.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"trf_blocks\.(\d+)\.", k)))
    return GPTConfig(
        vocab_size=vocab,
        context_length=sd["pos_emb.weight"].shape[0],
        emb_dim=emb,
        n_heads=max(1, emb // HEAD_DIM_GUESS),
        n_layers=layers,
        qkv_bias="trf_blocks.0.att.W_query.bias" in sd,
    )


def read_book_config(path: Path, sd: dict[str, torch.Tensor]) -> GPTConfig | None:
    """The `model.json` beside a `.pth` (what our exports write, in the course's GPT_CONFIG names), checked against
    the weights' shapes so that one left over from another model is refused rather than trusted."""
    file = path.parent / BOOK_CONFIG_FILE
    if not file.is_file():
        return None
    fix = f"fix or remove {file} (then pass --n-heads)"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        cfg = GPTConfig.from_dict(data, complete=True)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError, Gpt2termError) as exc:
        raise CheckpointError(f"{file}: not a usable config ({str(exc)[:120]}); {fix}") from exc
    try:
        shapes = infer_book_config(sd)
    except (KeyError, ValueError):
        return cfg  # an incomplete state_dict: load_state_dict_checked names what is missing
    for key in ("vocab_size", "context_length", "emb_dim", "n_layers", "qkv_bias"):
        if getattr(cfg, key) != getattr(shapes, key):
            raise CheckpointError(
                f"{file} does not belong to {path.name}: its {key} is {getattr(cfg, key)} but the weights have "
                f"{getattr(shapes, key)}; {fix}"
            )
    return cfg


def load_book_pth(path: Path, cfg: GPTConfig | None = None, n_heads: int | None = None) -> LoadedWeights:
    """The book's `model.pth` (a state_dict) or `model_and_optimizer.pth` (model and optimizer state dicts).
    The config: `cfg`, else the `model.json` beside it, else read off the shapes with `n_heads` heads (or, without
    it, GPT-2's 64-dimensional heads, with a notice saying so)."""
    data = torch_load_safely(path)
    optimizer_state = None
    if isinstance(data, dict) and "model_state_dict" in data:
        optimizer_state = data.get("optimizer_state_dict")
        data = data["model_state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: not a state_dict; save one with torch.save(model.state_dict(), path)")
    if is_hf_state_dict(data):
        notices = []
        if cfg is None:
            cfg = infer_hf_config(data)
            if n_heads is not None:
                cfg = with_given_heads(cfg, n_heads, path)
            notices.append(f"{path.name} holds no config: {_heads_notice(cfg, n_heads)}")
        return LoadedWeights(from_hf_state_dict(data, cfg), cfg, f"pth:{path}", notices, optimizer_state)
    if "tok_emb.weight" not in data:
        raise CheckpointError(f"{path}: no tok_emb.weight; this is not a GPTModel state_dict from the book")
    sd = {k: v for k, v in data.items() if not k.endswith(".att.mask")}
    notices = []
    if cfg is None:
        cfg = read_book_config(path, sd)
    if cfg is None:
        cfg = infer_book_config(sd)
        if n_heads is not None:
            cfg = with_given_heads(cfg, n_heads, path)
        notices.append(
            f"{path.name} holds no config: read off its shapes ({cfg.n_layers} layers, {cfg.emb_dim} dims, "
            f"context {cfg.context_length}, qkv_bias={cfg.qkv_bias}), {_heads_notice(cfg, n_heads)}"
        )
    return LoadedWeights(sd, cfg, f"pth:{path}", notices, optimizer_state)


def load_weights_file(path: Path, n_heads: int | None = None) -> LoadedWeights:
    """Any weights file or folder a user may point at: HF safetensors (file or folder), a book `.pth`, or OpenAI's
    TensorFlow checkpoint folder. `n_heads`: the head count of a file that carries no config (`--n-heads`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return load_hf(path, n_heads)
        for name in ("model_and_optimizer.pth", "model.pth"):
            if (path / name).is_file():
                return load_book_pth(path / name, n_heads=n_heads)
        from gpt2term.core import tf_checkpoint  # OpenAI's TensorFlow folder; it builds on this module

        if tf_checkpoint.is_tf_checkpoint_folder(path):
            return tf_checkpoint.load_tf_checkpoint(path)  # hparams.json has the heads; resolve checks --n-heads
        raise CheckpointError(
            f"{path}: no model.safetensors, model.pth or TensorFlow model.ckpt.index inside; point at the weights file"
        )
    if path.suffix == ".safetensors":
        return load_hf(path, n_heads)
    if path.suffix in (".pth", ".pt", ".bin"):
        return load_book_pth(path, n_heads=n_heads)
    from gpt2term.core import tf_checkpoint

    if tf_checkpoint.is_tf_checkpoint_file(path):
        return tf_checkpoint.load_tf_checkpoint(path)
    raise CheckpointError(
        f"{path}: unknown weights format; expected .safetensors, .pth or a TensorFlow checkpoint folder"
    )


# ------------------------------------------------------------------------------------------------- writing files
# Everything written goes to a temporary file beside its target, is flushed to disk, and is then renamed into place:
# an export interrupted half-way never leaves a half-written file under the name a user (or transformers) will open.
# The rule itself (fsync, temporary names, the rename) is the store's, in core/store/atomic.py.


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory: safetensors refuses tied or aliased tensors."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
        if v.numel() and key in seen:
            v = v.clone()
        seen.add(key)
        out[k] = v
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write and fsync a safetensors file (in place: callers write into a temporary folder or file)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(_unshared(tensors), str(path), metadata={"format": "pt", **(metadata or {})})
    except SafetensorError as exc:
        # A failed write (a full disk) arrives as "I/O error: ... (os error 28)": raise it as the OSError it is.
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found[1])
        raise OSError(code, os.strerror(code), str(path)) from None
    give_user_permissions(path)
    fsync_path(path)


def _refuse_overwrite(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise InputError(f"{target} already exists; pass --force to overwrite it, or choose another output path")


EXPORT_FORMATS = {
    "hf": "Hugging Face folder (transformers' from_pretrained)",
    "pth": "the book's model.pth",
    "pth-optimizer": "the book's model_and_optimizer.pth",
}


@dataclass
class ExportResult:
    """What an export wrote, and what the user should know about it (e.g. an optimizer state made up fresh)."""

    paths: list[Path]
    notices: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _writing_to(target: Path) -> Iterator[None]:
    """An output path that cannot be written is one line naming it: a full or read-only disk with its free space
    (the user makes room), anything else (a missing folder, /proc) as a path to change."""
    try:
        yield
    except OSError as exc:
        where = Path(exc.filename or target).expanduser().absolute()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise storage_error(exc, f"export to {where}", where.parent, "any file already there is untouched") from exc
        reason = exc.strerror or str(exc)
        raise InputError(f"cannot write {where}: {reason}; choose another output path") from exc


def export_hf(
    state_dict: dict[str, torch.Tensor], cfg: GPTConfig, folder: Path, *, overwrite: bool = False
) -> ExportResult:
    """A folder `transformers.GPT2LMHeadModel.from_pretrained(folder)` loads: `model.safetensors` + `config.json`."""
    folder = Path(folder).expanduser()
    with _writing_to(folder):
        return _export_hf(state_dict, cfg, folder, overwrite)


def _export_hf(state_dict: dict[str, torch.Tensor], cfg: GPTConfig, folder: Path, overwrite: bool) -> ExportResult:
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file; the Hugging Face format is a folder, pass a folder path to -o")
    weights, config_file = folder / "model.safetensors", folder / "config.json"
    _refuse_overwrite(weights, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    hf_sd, tied = to_hf_state_dict(state_dict, cfg)
    tmp = temp_beside(weights)
    try:
        write_safetensors(hf_sd, tmp)
        replace_atomically(tmp, weights)
    finally:
        tmp.unlink(missing_ok=True)
    tmp = temp_beside(config_file)
    try:
        tmp.write_text(json.dumps(config_to_hf(cfg, tied), indent=2) + "\n")
        fsync_path(tmp)
        replace_atomically(tmp, config_file)
    finally:
        tmp.unlink(missing_ok=True)
    notices = []
    if not cfg.qkv_bias:
        notices.append("the model has no query/key/value biases; GPT-2's format requires them, so they are zeros")
    return ExportResult([weights, config_file], notices)


def book_state_dict(
    state_dict: dict[str, torch.Tensor], cfg: GPTConfig, include_mask: bool = True
) -> dict[str, torch.Tensor]:
    """Our state_dict as the book's GPTModel holds it: the same names, plus each block's causal `att.mask` buffer
    (the book registers it as a persistent buffer, so its strict `load_state_dict` expects it; ours ignores it)."""
    out: dict[str, torch.Tensor] = {}
    mask = torch.triu(torch.ones(cfg.context_length, cfg.context_length), diagonal=1) if include_mask else None
    for k, v in state_dict.items():
        out[k] = v.detach().to("cpu")
        if mask is not None and k.endswith(".att.out_proj.bias"):  # the book's order: after the attention's params
            out[k[: -len("out_proj.bias")] + "mask"] = mask
    return out


def fresh_adamw_state(state_dict: dict[str, torch.Tensor], lr: float = 0.0004, weight_decay: float = 0.1) -> dict:
    """The state_dict of a just-created `AdamW(model.parameters(), ...)` (the course's settings), for a model that
    has no optimizer state of its own: the course's `optimizer.load_state_dict(...)` then works unchanged."""
    params = [torch.nn.Parameter(torch.empty(0)) for _ in state_dict]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay).state_dict()


def _count_params(optimizer_state: dict) -> int:
    return sum(len(g.get("params", [])) for g in optimizer_state.get("param_groups", []))


def export_book_pth(
    state_dict: dict[str, torch.Tensor],
    cfg: GPTConfig,
    path: Path,
    *,
    optimizer_state: dict | None = None,
    with_optimizer: bool = False,
    overwrite: bool = False,
    lr: float | None = None,
) -> ExportResult:
    """The book's files: `model.pth` (`torch.save(model.state_dict(), ...)`), or with `with_optimizer`,
    `model_and_optimizer.pth` (`{"model_state_dict": ..., "optimizer_state_dict": ...}`). A folder path gets the
    book's file name inside it. Both load with `weights_only=True`, as torch.load does by default.
    Beside it goes `model.json` (the config, which a state_dict lacks), read back on import. `lr`: the learning
    rate every param group carries (the run's --lr; `load_state_dict` sets it on the reader's optimizer), instead
    of the last scheduled one."""
    path = Path(path).expanduser()
    with _writing_to(path):
        return _export_book_pth(state_dict, cfg, path, optimizer_state, with_optimizer, overwrite, lr)


def _export_book_pth(
    state_dict: dict[str, torch.Tensor],
    cfg: GPTConfig,
    path: Path,
    optimizer_state: dict | None,
    with_optimizer: bool,
    overwrite: bool,
    lr: float | None = None,
) -> ExportResult:
    if path.is_dir():
        path = path / ("model_and_optimizer.pth" if with_optimizer else "model.pth")
    _refuse_overwrite(path, overwrite)
    config_file = path.parent / BOOK_CONFIG_FILE
    config_text = json.dumps(book_config(cfg), indent=2) + "\n"
    if config_file.exists() and not overwrite and _read_text(config_file) != config_text:
        raise InputError(
            f"{config_file} already exists and holds another model's config; pass --force to overwrite it, "
            "or export into another folder"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    notices: list[str] = []
    model_sd = book_state_dict(state_dict, cfg)
    payload: dict[str, Any] = model_sd
    if with_optimizer:
        why = "the run's --lr"
        if optimizer_state is None:
            optimizer_state, why = fresh_adamw_state(state_dict), "a fresh AdamW's"
            notices.append(
                "this checkpoint has no optimizer state: wrote a fresh AdamW state (lr 0.0004, weight_decay 0.1)"
            )
        elif lr is not None:
            groups = [{**g, "lr": lr} for g in optimizer_state.get("param_groups", [])]
            optimizer_state = {**optimizer_state, "param_groups": groups}
        else:
            why = "as imported: no training run set it"
        rates = sorted({g["lr"] for g in optimizer_state.get("param_groups", []) if isinstance(g.get("lr"), float)})
        if rates:
            shown = ", ".join(f"{r:g}" for r in rates)
            notices.append(
                f"param groups carry lr={shown} ({why}); the course's AdamW(lr=...) + optimizer.load_state_dict(...) "
                f"resumes at lr={shown} whatever lr it was built with (set param_groups' lr after loading to change it)"
            )
        if _count_params(optimizer_state) != len(state_dict):
            notices.append(
                f"the optimizer state covers {_count_params(optimizer_state)} tensors but the model has "
                f"{len(state_dict)} parameters; build the optimizer the way it was trained before loading it"
            )
        elif len(optimizer_state.get("param_groups", [])) > 1:
            notices.append(
                f"the optimizer state has {len(optimizer_state['param_groups'])} parameter groups; "
                "load it into an optimizer built with the same groups"
            )
        payload = {"model_state_dict": model_sd, "optimizer_state_dict": optimizer_state}
    tmp = temp_beside(path)
    try:
        torch_save_synced(payload, tmp)
        replace_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    tmp = temp_beside(config_file)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(config_text)
        fsync_path(tmp)
        replace_atomically(tmp, config_file)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult([path, config_file], notices)


def book_config(cfg: GPTConfig) -> dict[str, Any]:
    """The config as the course writes GPT_CONFIG_124M: the same key names, so a reader can pass it to GPTModel."""
    return {k: cfg.to_dict()[k] for k in BOOK_CONFIG_KEYS}


BOOK_CONFIG_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


# ------------------------------------------------------------------------------------ the Hugging Face local cache

HF_GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_GPT2_OWNER = "openai-community"


class MissingExtra(Gpt2termError):
    """An optional dependency (an extra) is not installed."""


@dataclass
class HFCachedModel:
    """A GPT-2 model already downloaded by `huggingface_hub` (by transformers, or by `gpt2term ckpt download`)."""

    name: str  # what a user types: "gpt2", "gpt2-medium", ... for OpenAI's sizes, else the repository id
    repo_id: str
    folder: Path  # the snapshot folder: config.json and the weights
    weights: Path


def _snapshot_folder(repo_dir: Path) -> Path | None:
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    candidates = []
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip())
    if snapshots.is_dir():
        candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for folder in candidates:
        if (folder / "config.json").is_file() and any(
            (folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")
        ):
            return folder
    return None


def find_hf_cached_models(cache: Path | None = None) -> list[HFCachedModel]:
    """GPT-2 models in the local Hugging Face cache, offered by name: no download, no `huggingface_hub` needed."""
    from gpt2term.locations import hf_cache_dir

    cache = Path(cache) if cache is not None else hf_cache_dir()
    found: list[HFCachedModel] = []
    try:
        repo_dirs = sorted(p for p in cache.iterdir() if p.name.startswith("models--") and p.is_dir())
    except OSError:
        return found
    for repo_dir in repo_dirs:
        folder = _snapshot_folder(repo_dir)
        if folder is None:
            continue
        try:
            if json.loads((folder / "config.json").read_text()).get("model_type") != "gpt2":
                continue
        except (OSError, ValueError, AttributeError):
            continue
        repo_id = repo_dir.name[len("models--") :].replace("--", "/")
        owner, _, short = repo_id.rpartition("/")
        name = short if owner in ("", HF_GPT2_OWNER) else repo_id
        weights = folder / "model.safetensors"
        found.append(
            HFCachedModel(name, repo_id, folder, weights if weights.is_file() else folder / "pytorch_model.bin")
        )
    return found


def find_hf_cached(name: str, cache: Path | None = None) -> HFCachedModel | None:
    """The cached model a user means by `name` ("gpt2", "openai-community/gpt2", "someone/gpt2-poems")."""
    for model in find_hf_cached_models(cache):
        if name in (model.name, model.repo_id):
            return model
    return None


def load_hf_cached(model: HFCachedModel) -> LoadedWeights:
    if model.weights.suffix == ".safetensors":
        loaded = load_hf(model.folder)
    else:  # older downloads only have pytorch_model.bin: a plain state_dict, read with weights_only=True
        cfg = config_from_hf(json.loads((model.folder / "config.json").read_text()))
        loaded = load_book_pth(model.weights, cfg)
    loaded.source = f"huggingface-cache:{model.repo_id}"
    return loaded


def download_hf(size: str) -> HFCachedModel:
    """Fetch one of OpenAI's GPT-2 sizes into the Hugging Face cache (with its progress bar), via the `hub` extra."""
    if size not in HF_GPT2_SIZES:
        raise InputError(f"unknown GPT-2 size {size!r}; choose one of: {', '.join(HF_GPT2_SIZES)}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise MissingExtra(
            "downloading needs the optional 'hub' extra; install it with: pip install 'gpt2term[hub]' "
            "(or pip install huggingface_hub)"
        ) from exc
    repo_id = f"{HF_GPT2_OWNER}/{size}"
    try:
        folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as exc:  # network, disk, authentication: huggingface_hub raises many kinds
        raise CheckpointError(
            f"could not download {repo_id} ({type(exc).__name__}: {exc}); check your connection and try again"
        ) from exc
    return HFCachedModel(size, repo_id, folder, folder / "model.safetensors")
