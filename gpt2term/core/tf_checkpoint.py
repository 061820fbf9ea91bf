"""OpenAI's original GPT-2 checkpoint, the `124M/` folder the book's download script writes, read without TensorFlow.

The book needs TensorFlow only to read this folder. Its weights are a TensorFlow "V2 tensor bundle":
- `model.ckpt.index` is a LevelDB-format table (an SSTable): a footer pointing at an index block, which points at
  data blocks of prefix-compressed key/value entries. Key "" holds a `BundleHeaderProto`; every other key is a
  variable's name with a `BundleEntryProto` (dtype, shape, shard, offset, size, crc32c) as its value. Both are
  protobuf messages, decoded here by hand (field numbers from tensorflow/core/protobuf/tensor_bundle.proto).
- `model.ckpt.data-00000-of-00001` holds the raw little-endian tensors at those offsets.
- `hparams.json` gives the sizes (n_vocab, n_ctx, n_embd, n_head, n_layer).
The variables carry OpenAI's names (`model/h0/attn/c_attn/w`, ...) and GPT-2's Conv1D layout, the layout Hugging Face
kept, so they are renamed to Hugging Face's names and mapped to the course's by `interop.from_hf_state_dict`.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import CheckpointError, Gpt2termError
from gpt2term.core.interop import LoadedWeights, from_hf_state_dict

INDEX_SUFFIX = ".index"
DEFAULT_PREFIX = "model.ckpt"
HPARAMS_FILE = "hparams.json"
SOURCE_PREFIX = "tensorflow:"
TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB's table magic number, the last 8 bytes of every .index file
FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the magic
BLOCK_TRAILER_SIZE = 5  # after each block: a compression type byte and the block's masked crc32c
DT_FLOAT = 1  # tensorflow/core/framework/types.proto
DTYPE_NAMES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 6: "int8", 7: "string", 9: "int64", 10: "bool"}
DTYPE_NAMES.update({14: "bfloat16", 19: "float16"})


def is_tf_checkpoint_folder(path: Path) -> bool:
    """A folder TensorFlow's Saver wrote: a `checkpoint` file naming the prefix, or a `model.ckpt.index`."""
    return path.is_dir() and ((path / "checkpoint").is_file() or (path / (DEFAULT_PREFIX + INDEX_SUFFIX)).is_file())


# ---------------------------------------------------------------------------------------------------- crc32c


def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1).astype(np.uint32)
    return t


_T8 = _byte_table()
_T8_LIST = [int(x) for x in _T8]
_T16: np.ndarray | None = None  # two bytes per step, built on first use (256 KB)


def _apply(tabs: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A linear map on 32-bit crc registers, given by its action on each of the 4 bytes (tabs: [4, 256])."""
    return tabs[0][x & 0xFF] ^ tabs[1][(x >> 8) & 0xFF] ^ tabs[2][(x >> 16) & 0xFF] ^ tabs[3][x >> 24]


def _zeros_operator(nbytes: int) -> np.ndarray:
    """The map a register undergoes over `nbytes` zero bytes: how lanes computed apart are joined."""
    v = np.arange(256, dtype=np.uint32)
    one = np.stack([_T8, v, v << 8, v << 16]).astype(np.uint32)  # one zero byte: T[r & 0xff] ^ (r >> 8)
    result = None
    power = one
    while nbytes:
        if nbytes & 1:
            result = power if result is None else _apply(power, result)
        nbytes >>= 1
        if nbytes:
            power = _apply(power, power)
    return result


def _crc_bytes(crc: int, data: bytes) -> int:
    table = _T8_LIST
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c(data: bytes | bytearray | memoryview, max_lanes: int = 65536) -> int:
    """CRC-32C (Castagnoli), as TensorFlow checksums tensors and table blocks.

    Pure Python is far too slow for GPT-2's 500 MB, so large inputs are cut into equal lanes whose registers are
    advanced side by side with numpy (two bytes per step), then joined pairwise with the zero-bytes operator."""
    buf = np.frombuffer(data, dtype=np.uint8)
    n = buf.size
    lane = max(256, (-(-n // max_lanes) + 63) // 64 * 64)  # a multiple of 64 bytes
    lanes = n // lane
    if lanes < 16:
        return _crc_bytes(0xFFFFFFFF, bytes(buf)) ^ 0xFFFFFFFF
    global _T16
    if _T16 is None:
        r = np.arange(65536, dtype=np.uint32)
        for _ in range(2):
            r = _T8[r & 0xFF] ^ (r >> 8)
        _T16 = r
    # A register starting at 0xFFFFFFFF is a register starting at 0 over data whose first 4 bytes are inverted.
    head = buf[: lanes * lane].reshape(lanes, lane)
    first = head[0, :4] ^ np.uint8(0xFF)
    words = head.view(np.uint16)
    state = np.zeros(lanes, dtype=np.uint32)
    tmp = np.empty(lanes, dtype=np.uint32)
    step = 32
    for start in range(0, lane // 2, step):
        cols = np.ascontiguousarray(words[:, start : start + step].T)
        if start == 0:
            cols[0, 0], cols[1, 0] = first.view(np.uint16)
        for row in cols:
            np.bitwise_xor(state, row, out=tmp)
            np.bitwise_and(tmp, 0xFFFF, out=tmp)
            np.right_shift(state, 16, out=state)
            np.bitwise_xor(state, _T16[tmp], out=state)
    # Join: lane i's register, advanced over the lanes after it, XORed together (pairwise, in log2(lanes) rounds).
    size = 1 << (lanes - 1).bit_length()
    state = np.concatenate([np.zeros(size - lanes, dtype=np.uint32), state])  # zero lanes in front change nothing
    op = _zeros_operator(lane)
    while state.size > 1:
        state = _apply(op, state[0::2]) ^ state[1::2]
        op = _apply(op, op)
    return _crc_bytes(int(state[0]), bytes(buf[lanes * lane :])) ^ 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    """TensorFlow (like LevelDB) stores `((crc >> 15) | (crc << 17)) + 0xa282ead8`; this undoes it."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------- protobuf, varints


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("a varint runs past its end")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> dict[int, list[int | bytes]]:
    """A protobuf message's fields by number: varints and fixed numbers as ints, length-delimited ones as bytes."""
    out: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos : pos + length]), pos + length
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire} is not used by tensor bundles")
        if pos > len(buf):
            raise ValueError("a protobuf field runs past the end of its message")
        out.setdefault(number, []).append(value)
    return out


def _last(fields: dict[int, list], number: int, default: int = 0) -> int:
    values = fields.get(number)
    if not values:
        return default
    if not isinstance(values[-1], int):
        raise ValueError(f"field {number} is not a number")
    return values[-1]


@dataclass
class BundleEntry:
    """One variable's `BundleEntryProto`: where its bytes are and what they are."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked
    sliced: bool


def _entry(value: bytes) -> BundleEntry:
    f = _fields(value)
    dims = []
    for shape in f.get(2, []):  # TensorShapeProto: repeated Dim dim = 2 (Dim: int64 size = 1); unknown_rank = 3
        if not isinstance(shape, bytes):
            raise ValueError("shape is not a message")
        shape_fields = _fields(shape)
        for dim in shape_fields.get(2, []):
            if not isinstance(dim, bytes):
                raise ValueError("a dimension is not a message")
            dims.append(_last(_fields(dim), 1))
    return BundleEntry(
        dtype=_last(f, 1),
        shape=tuple(dims),
        shard_id=_last(f, 3),
        offset=_last(f, 4),
        size=_last(f, 5),
        crc32c=_last(f, 6),
        sliced=bool(f.get(7)),
    )


# --------------------------------------------------------------------------------------------- the .index table


def _block(index: bytes, handle: bytes, what: str) -> bytes:
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(index):
        raise ValueError(f"its {what} block runs past the end of the file (truncated?)")
    contents, kind = index[offset:end], index[end]
    if kind != 0:
        name = {1: "snappy", 2: "zstd"}.get(kind, f"type {kind}")
        raise CheckpointError(
            f"{what} block is {name}-compressed; gpt2term reads uncompressed index tables only, as TensorFlow's "
            "Saver writes them: re-save the checkpoint with TensorFlow"
        )
    stored = struct.unpack_from("<I", index, end + 1)[0]
    if unmask_crc(stored) != crc32c(index[offset : end + 1]):
        raise ValueError(f"its {what} block fails its checksum (damaged)")
    return contents


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """A block's key/value pairs: each key shares a prefix with the one before; restart points end the block."""
    if len(block) < 4:
        raise ValueError("a block is too short")
    restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 * (restarts + 1)
    if limit < 0:
        raise ValueError("a block's restart array is larger than the block")
    entries, key, pos = [], b"", 0
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + length > limit:
            raise ValueError("a table entry runs past its block")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + length]))
        pos += length
    return entries


def read_index(path: Path) -> tuple[int, dict[str, BundleEntry]]:
    """The bundle's shard count and its entries by variable name, from a `.index` file."""
    try:
        index = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc}); check the path") from exc
    try:
        if len(index) < FOOTER_SIZE or struct.unpack_from("<Q", index, len(index) - 8)[0] != TABLE_MAGIC:
            raise ValueError("it does not end with the table magic number (truncated, or not a .index file)")
        footer = index[-FOOTER_SIZE:]
        _, pos = _varint(footer, 0)  # the metaindex block's handle: TensorFlow leaves it empty
        _, pos = _varint(footer, pos)
        index_block = _block(index, footer[pos:], "index")
        header: dict | None = None
        entries: dict[str, BundleEntry] = {}
        for _, handle in _block_entries(index_block):
            for key, value in _block_entries(_block(index, handle, "data")):
                if key == b"":
                    header = _fields(value)
                else:
                    entries[key.decode("utf-8", "replace")] = _entry(value)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (ValueError, struct.error) as exc:
        raise CheckpointError(f"{path}: not a readable TensorFlow checkpoint index ({exc}); download it again") from exc
    if header is None:
        raise CheckpointError(f"{path}: no bundle header in this index; is it a TensorFlow V2 checkpoint?")
    if _last(header, 2) != 0:
        raise CheckpointError(f"{path}: a big-endian checkpoint; gpt2term reads little-endian ones (as OpenAI's)")
    return _last(header, 1, 1), entries


# ---------------------------------------------------------------------------------------------- the checkpoint


def _prefix(folder: Path) -> str:
    """The checkpoint's file prefix: the `checkpoint` file names it (`model_checkpoint_path: "model.ckpt"`)."""
    try:
        text = (folder / "checkpoint").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return DEFAULT_PREFIX
    found = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', text, re.MULTILINE)
    return Path(found[1]).name if found else DEFAULT_PREFIX


def read_hparams(folder: Path) -> GPTConfig:
    file = folder / HPARAMS_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{folder}: no {HPARAMS_FILE} beside the checkpoint; it holds GPT-2's sizes (the book's download script "
            "writes it): copy it from the download"
        )
    try:
        hp = json.loads(file.read_text(encoding="utf-8"))
        return GPTConfig(
            vocab_size=hp["n_vocab"],
            context_length=hp["n_ctx"],
            emb_dim=hp["n_embd"],
            n_heads=hp["n_head"],
            n_layers=hp["n_layer"],
            drop_rate=0.1,
            qkv_bias=True,
        )
    except (OSError, ValueError, KeyError, TypeError, RecursionError, Gpt2termError) as exc:
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise CheckpointError(f"{file}: not GPT-2's hparams.json ({what}); copy it again from the download") from exc


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """OpenAI's variable names and the shapes hparams.json implies (linear weights are Conv1D's [1, in, out])."""
    d, ff = cfg.emb_dim, 4 * cfg.emb_dim
    shapes = {"model/wte": (cfg.vocab_size, d), "model/wpe": (cfg.context_length, d)}
    for i in range(cfg.n_layers):
        h = f"model/h{i}/"
        for norm in ("ln_1", "ln_2"):
            shapes[h + norm + "/g"] = shapes[h + norm + "/b"] = (d,)
        for layer, (n_in, n_out) in {
            "attn/c_attn": (d, 3 * d),
            "attn/c_proj": (d, d),
            "mlp/c_fc": (d, ff),
            "mlp/c_proj": (ff, d),
        }.items():
            shapes[f"{h}{layer}/w"] = (1, n_in, n_out)
            shapes[f"{h}{layer}/b"] = (n_out,)
    shapes["model/ln_f/g"] = shapes["model/ln_f/b"] = (d,)
    return shapes


def hf_name(tf_name: str) -> str:
    """`model/h3/attn/c_attn/w` -> `h.3.attn.c_attn.weight`: the names Hugging Face kept from OpenAI's."""
    name = re.sub(r"^h(\d+)/", r"h.\1/", tf_name.removeprefix("model/"))
    name = re.sub(r"/(g|w)$", "/weight", re.sub(r"/b$", "/bias", name))
    if name in ("wte", "wpe"):
        name += "/weight"
    return name.replace("/", ".")


def read_tf_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], GPTConfig, Path]:
    """The checkpoint's tensors in Hugging Face's names, its config, and its folder. `path`: the folder, or its
    `.index` file."""
    path = Path(path).expanduser()
    if path.is_dir():
        folder, prefix = path, _prefix(path)
    else:  # any of its files: model.ckpt.index, model.ckpt.meta, model.ckpt.data-00000-of-00001
        folder, prefix = path.parent, re.sub(r"\.(index|meta|data-\d+-of-\d+)$", "", path.name)
    index_file = folder / (prefix + INDEX_SUFFIX)
    if not index_file.is_file():
        raise CheckpointError(f"{folder}: no {index_file.name} in this folder; point at the folder the download wrote")
    cfg = read_hparams(folder)
    shards, entries = read_index(index_file)
    if shards != 1:
        raise CheckpointError(
            f"{index_file}: the checkpoint is split into {shards} shards; gpt2term reads single-shard checkpoints "
            "(as OpenAI's are): re-save it with TensorFlow as one shard"
        )
    data_file = folder / f"{prefix}.data-00000-of-00001"
    try:
        data_size = data_file.stat().st_size
    except OSError as exc:
        raise CheckpointError(
            f"{folder}: no {data_file.name} (the checkpoint's weights) beside {index_file.name}; download it again"
        ) from exc
    wanted = expected_shapes(cfg)
    for name, shape in wanted.items():
        entry = entries.get(name)
        if entry is None:
            raise CheckpointError(f"{index_file}: no variable {name!r}; is this a GPT-2 checkpoint from OpenAI?")
        if entry.dtype != DT_FLOAT:
            dtype = DTYPE_NAMES.get(entry.dtype, f"dtype {entry.dtype}")
            raise CheckpointError(
                f"{index_file}: {name} holds {dtype} numbers; gpt2term reads float32 checkpoints (OpenAI's are)"
            )
        if entry.sliced:
            raise CheckpointError(f"{index_file}: {name} is saved in slices (partitioned); gpt2term cannot join them")
        if entry.shape != shape:
            raise CheckpointError(
                f"{index_file}: {name} has shape {list(entry.shape)} but {HPARAMS_FILE} implies {list(shape)}; "
                f"the {HPARAMS_FILE} does not belong to this checkpoint"
            )
        if entry.size != 4 * math.prod(shape):
            raise CheckpointError(f"{index_file}: {name} claims {entry.size} bytes for shape {list(shape)}; damaged")
        if entry.offset + entry.size > data_size:
            raise CheckpointError(
                f"{data_file}: ends at byte {data_size} but {name} needs bytes up to {entry.offset + entry.size}; "
                "the file is truncated: download it again"
            )
    tensors: dict[str, torch.Tensor] = {}
    try:
        with data_file.open("rb") as f:
            for name, shape in wanted.items():
                entry = entries[name]
                f.seek(entry.offset)
                raw = bytearray(entry.size)
                if f.readinto(raw) != entry.size:
                    raise CheckpointError(f"{data_file}: ends inside {name}; the file is truncated: download it again")
                if crc32c(raw) != unmask_crc(entry.crc32c):
                    raise CheckpointError(
                        f"{data_file}: {name} fails its checksum; the file is damaged: download it again"
                    )
                array = np.frombuffer(raw, dtype="<f4").reshape(shape)
                tensor = torch.from_numpy(array.astype(np.float32, copy=False))
                tensors[hf_name(name)] = tensor.squeeze(0) if len(shape) == 3 else tensor
    except OSError as exc:
        raise CheckpointError(f"{data_file}: cannot be read ({exc.strerror or exc}); check the file") from exc
    return tensors, cfg, folder


def load_tf_checkpoint(path: Path) -> LoadedWeights:
    """OpenAI's GPT-2 checkpoint folder (or one of its files) as the course's model: the head tied to the token
    embedding, as GPT-2's is, and copied into `out_head` as the book's `load_weights_into_gpt` does."""
    tensors, cfg, folder = read_tf_checkpoint(path)
    return LoadedWeights(from_hf_state_dict(tensors, cfg), cfg, f"{SOURCE_PREFIX}{folder.absolute()}")


def name_for(source: str) -> str:
    """A store name for a checkpoint read from `source`: OpenAI's folders are named after their size (124M/)."""
    folder = Path(source.removeprefix(SOURCE_PREFIX)).name
    return f"openai-gpt2-{folder}" if re.fullmatch(r"\d+M", folder) else folder


def is_tf_checkpoint_file(path: Path) -> bool:
    return path.is_file() and re.search(r"\.ckpt[^/]*\.(index|meta|data-\d+-of-\d+)$", path.name) is not None
