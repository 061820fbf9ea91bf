"""Corpus -> token ids (cached on disk, memory-mapped) -> sliding windows -> batches.

The shape is the course's (chapter 2's `GPTDatasetV1` and chapter 5's train/validation split): documents are joined
with `<|endoftext|>`, the joined text is split by a ratio *before* tokenizing, and each part is cut into windows of
`context_length` tokens with a stride, targets shifted by one. What is added is what a real corpus needs: ids are
written once to the user cache dir, keyed by the corpus' content hash, and read back memory-mapped, so a 100 MB
corpus is neither tokenized twice nor held in RAM; and the order of batches is a pure function of (seed, epoch,
position), so a stopped run can continue exactly where it stopped, on one process or several.
"""

from __future__ import annotations

import array
import codecs
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2term.core.errors import Gpt2termError, InputError
from gpt2term.core.tokenizer import ENDOFTEXT, Tokenizer, default_tokenizer

BUILTIN_CORPORA = ("pydoc",)
TEXT_SUFFIXES = (".txt", ".md")
ENCODING_ERRORS = ("strict", "replace", "ignore")
CACHE_FORMAT = 1  # bump when the cached files' layout or the tokenization changes
_READ_CHUNK = 8 << 20  # bytes read at a time: memory stays flat whatever the file size
_TOKENIZE_CHUNK = 1 << 20  # characters tokenized at a time
# A place where tokenizing two halves separately gives the same ids as tokenizing the whole: one space or newline
# between two non-space characters. GPT-2's pre-tokenizer never lets a piece run across it (letters, digits and
# punctuation pieces stop at whitespace; a lone whitespace before a non-space is its own piece or the start of the
# next one), so cutting just before it changes nothing.
_SAFE_CUT = re.compile(r"(?<=\S)(?=[ \n]\S)")


class CorpusError(InputError):
    """A corpus that cannot be read or is too small to train on."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a file (read lazily, in chunks) or a built-in text."""

    name: str
    path: Path | None = None
    text: str | None = None


def _pydoc_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{key}", text=topics[key]) for key in sorted(topics) if topics[key].strip()]


def resolve_corpus(sources: Sequence[str | os.PathLike] | None) -> list[Document]:
    """The documents of a corpus given as files, folders of .txt/.md files, or `pydoc` (also what no source means)."""
    if not sources:
        sources = ["pydoc"]
    documents: list[Document] = []
    for source in sources:
        path = Path(source).expanduser()
        if str(source) in BUILTIN_CORPORA and not path.exists():
            documents.extend(_pydoc_documents())
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise CorpusError(f"the folder {path} holds no .txt or .md files; put your text in such files")
            documents.extend(Document(str(p), path=p) for p in files)
        elif path.is_file():
            documents.append(Document(str(path), path=path))
        else:
            raise CorpusError(
                f"corpus not found: {source}; pass a text file, a folder of .txt/.md files, or 'pydoc' (built in)"
            )
    return documents


def normalize_sources(sources: Sequence[str | os.PathLike] | None) -> list[str]:
    """Sources as absolute paths (built-in names kept), so a saved run can be resumed from any folder."""
    normalized = []
    for source in sources or []:
        path = Path(source).expanduser()
        normalized.append(str(source) if str(source) in BUILTIN_CORPORA and not path.exists() else str(path.resolve()))
    return normalized


def describe_corpus(sources: Sequence[str | os.PathLike] | None) -> str:
    if not sources:
        return "pydoc (built in)"
    return ", ".join(str(s) for s in sources)


def _decoded_pieces(doc: Document, encoding_errors: str) -> Iterator[str]:
    """A document's text in pieces; invalid UTF-8 is reported with the file and the byte offset."""
    if doc.text is not None:
        yield doc.text
        return
    assert doc.path is not None
    decoder = codecs.getincrementaldecoder("utf-8")(errors=encoding_errors)
    offset = 0  # bytes handed to the decoder so far
    first = True
    with open(doc.path, "rb") as f:
        while True:
            chunk = f.read(_READ_CHUNK)
            held = len(decoder.getstate()[0])  # bytes of a character split across two chunks
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise CorpusError(
                    f"{doc.path}: invalid UTF-8 at byte {offset - held + exc.start}; fix the file, or pass "
                    "--encoding-errors replace to read it anyway"
                ) from None
            offset += len(chunk)
            if first and text.startswith("\ufeff"):  # a byte order mark is not text
                text = text[1:]
            if text:
                first = False
                yield text
            if not chunk:
                return


def _content_hash(documents: Sequence[Document], encoding_errors: str, val_ratio: float) -> str:
    """What the cached ids depend on: the bytes of every document in order, and how they were split and decoded."""
    h = hashlib.sha256(f"gpt2term-tokens v{CACHE_FORMAT} gpt2 {encoding_errors} {val_ratio!r}".encode())
    for doc in documents:
        h.update(b"\x00document\x00")
        if doc.text is not None:
            h.update(doc.text.encode("utf-8"))
            continue
        assert doc.path is not None
        with open(doc.path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                h.update(chunk)
    return h.hexdigest()


class _IdWriter:
    """Tokenizes text as it streams in, cutting only where that cannot change the ids, and appends uint16 ids."""

    def __init__(self, path: Path, tokenizer: Tokenizer, chunk_chars: int = _TOKENIZE_CHUNK) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._tokenizer = tokenizer
        self._chunk_chars = chunk_chars
        self._pending = ""
        self.count = 0

    def write(self, text: str) -> None:
        for start in range(0, len(text), self._chunk_chars):  # a huge piece is taken in slices: flat memory
            self._add(text[start : start + self._chunk_chars])

    def _add(self, text: str) -> None:
        self._pending += text
        if len(self._pending) < self._chunk_chars:
            return
        # The last safe cut, looked for near the end first (cheap), else anywhere.
        cut = None
        for match in _SAFE_CUT.finditer(self._pending, max(0, len(self._pending) - self._chunk_chars // 4)):
            cut = match.start()
        if cut is None:
            for match in _SAFE_CUT.finditer(self._pending):
                cut = match.start()
        if cut:
            self._emit(self._pending[:cut])
            self._pending = self._pending[cut:]

    def _emit(self, text: str) -> None:
        ids = self._tokenizer.encode(text)
        if ids:
            array.array("H", ids).tofile(self._file)
            self.count += len(ids)

    def close(self) -> None:
        self._emit(self._pending)
        self._pending = ""
        self._file.close()


@dataclass
class TokenizedCorpus:
    """A corpus' training and validation ids (uint16, memory-mapped from the cache) and where they came from."""

    train_ids: torch.Tensor
    val_ids: torch.Tensor
    content_hash: str
    description: str
    documents: int
    characters: int
    cache_path: Path | None
    from_cache: bool

    @property
    def train_tokens(self) -> int:
        return int(self.train_ids.numel())

    @property
    def val_tokens(self) -> int:
        return int(self.val_ids.numel())


def _map_ids(path: Path, count: int) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=torch.uint16)
    return torch.from_file(str(path), shared=False, size=count, dtype=torch.uint16)


def _cache_error(exc: OSError, root: Path) -> Gpt2termError:
    from gpt2term.core.store.atomic import storage_error

    return storage_error(exc, "cache the tokenized corpus", root, "nothing was cached and the corpus is untouched")


def _tokens_cache_root() -> Path:
    from gpt2term import locations

    return locations.cache_dir() / "tokens"


def split_point(characters: int, val_ratio: float) -> int:
    """The character where the validation text begins: the course's `int(train_ratio * len(text_data))`, in one
    place so that `inspect data` shows the split `load_corpus` made."""
    return int((1.0 - val_ratio) * characters)


def load_corpus(
    sources: Sequence[str | os.PathLike] | None,
    *,
    val_ratio: float = 0.1,
    encoding_errors: str = "strict",
    tokenizer: Tokenizer | None = None,
) -> TokenizedCorpus:
    """Token ids of a corpus, tokenized once and cached by content hash; `val_ratio` 0 keeps everything for training.

    As in the course, the joined text is split at `int((1 - val_ratio) * characters)` and each part is tokenized on
    its own.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise InputError(f"the validation ratio must be in [0, 1), got {val_ratio}")
    if encoding_errors not in ENCODING_ERRORS:
        raise InputError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)}, got {encoding_errors!r}")
    documents = resolve_corpus(sources)
    description = describe_corpus(sources)
    empty = [d for d in documents if d.path is not None and d.path.stat().st_size == 0]
    if len(empty) == len(documents):
        raise CorpusError(f"the corpus is empty ({description}); add some text to it")
    documents = [d for d in documents if d not in empty]
    digest = _content_hash(documents, encoding_errors, val_ratio)
    root = _tokens_cache_root()
    folder = root / digest[:40]
    info_path = folder / "info.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            train_path, val_path = folder / "train.u16", folder / "val.u16"
            if (
                info.get("content_hash") == digest
                and train_path.stat().st_size == 2 * info["train_tokens"]
                and val_path.stat().st_size == 2 * info["val_tokens"]
            ):
                return TokenizedCorpus(
                    train_ids=_map_ids(train_path, info["train_tokens"]),
                    val_ids=_map_ids(val_path, info["val_tokens"]),
                    content_hash=digest,
                    description=description,
                    documents=info["documents"],
                    characters=info["characters"],
                    cache_path=folder,
                    from_cache=True,
                )
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is rebuilt below
    tokenizer = tokenizer or default_tokenizer()
    # First pass: validate the text and count characters (the split point is a character position).
    characters = 0
    for i, doc in enumerate(documents):
        characters += (len(ENDOFTEXT) if i else 0) + sum(len(p) for p in _decoded_pieces(doc, encoding_errors))
    if characters == 0:
        raise CorpusError(f"the corpus is empty ({description}); add some text to it")
    split_at = split_point(characters, val_ratio)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=root))
    except OSError as exc:
        raise _cache_error(exc, root) from exc
    try:
        train = _IdWriter(tmp / "train.u16", tokenizer)
        val = _IdWriter(tmp / "val.u16", tokenizer)
        position = 0

        def route(text: str) -> None:
            nonlocal position
            head = max(0, min(len(text), split_at - position))
            train.write(text[:head])
            val.write(text[head:])
            position += len(text)

        for i, doc in enumerate(documents):
            if i:
                route(ENDOFTEXT)
            for piece in _decoded_pieces(doc, encoding_errors):
                route(piece)
        train.close()
        val.close()
        info = {
            "content_hash": digest,
            "description": description,
            "documents": len(documents),
            "characters": characters,
            "train_tokens": train.count,
            "val_tokens": val.count,
            "val_ratio": val_ratio,
            "encoding_errors": encoding_errors,
        }
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
        try:
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except OSError:
            # Another process (a second rank) put the same ids in place first: use its copy.
            if not info_path.is_file():
                raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # never a corpus file's fault (those are read)
            raise _cache_error(exc, root) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenizedCorpus(
        train_ids=_map_ids(folder / "train.u16", info["train_tokens"]),
        val_ids=_map_ids(folder / "val.u16", info["val_tokens"]),
        content_hash=digest,
        description=description,
        documents=len(documents),
        characters=characters,
        cache_path=folder,
        from_cache=False,
    )


def require_windows(corpus: TokenizedCorpus, context_length: int, val_ratio: float, *, need_val: bool = True) -> None:
    """One clear error when a corpus cannot give one training and one validation window of `context_length`."""
    needed = context_length + 1  # a window of inputs plus the one-token shift of its targets
    train_short = corpus.train_tokens < needed
    val_short = need_val and corpus.val_tokens < needed
    if not (train_short or val_short):
        return
    total = corpus.train_tokens + corpus.val_tokens
    parts = [1.0 - val_ratio] + ([val_ratio] if need_val and val_ratio > 0 else [])
    total_needed = math.ceil(needed / min(parts))
    split = (
        f"{corpus.train_tokens} for training and {corpus.val_tokens} for validation"
        if need_val
        else f"{corpus.train_tokens}"
    )
    raise CorpusError(
        f"the corpus is too short for context length {context_length}: it needs about {total_needed} tokens "
        f"({needed} for one training and {needed} for one validation window at --val-ratio {val_ratio:g}) but has "
        f"{total} ({split}); add text or lower --context-length"
    )


class GPTDataset(torch.utils.data.Dataset):
    """The course's `GPTDatasetV1` over memory-mapped ids: window i is ids[i*stride : i*stride + context_length],
    its targets the same window shifted by one token. Windows are sliced on demand, never materialised."""

    def __init__(self, ids: torch.Tensor, context_length: int, stride: int | None = None) -> None:
        self.ids = ids
        # uint16 ids are gathered through an int16 view: torch 2.4 to 2.6 cannot index a uint16 tensor.
        self._unsigned16 = ids.dtype == torch.uint16
        self._gather_from = ids.view(torch.int16) if self._unsigned16 else ids
        self.context_length = context_length
        self.stride = stride or context_length
        if self.stride <= 0:
            raise InputError(f"the stride must be positive, got {self.stride}")
        span = ids.numel() - context_length
        self._count = max(0, math.ceil(span / self.stride)) if span > 0 else 0

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(torch.tensor([index]))
        return x[0], y[0]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets [len(indices), context_length] as int64, gathered from the memory-mapped ids."""
        starts = indices.to(torch.int64) * self.stride
        rows = self._gather_from[starts[:, None] + torch.arange(self.context_length + 1)].to(torch.int64)
        if self._unsigned16:
            rows &= 0xFFFF  # ids above 32767 came back negative through the int16 view
        return rows[:, :-1], rows[:, 1:]


class ShuffledBatches:
    """Which training windows each rank reads for micro-batch `position` of `epoch`.

    Each epoch is a fresh permutation drawn from `seed + epoch`, so the order needs no saved state beyond
    (epoch, position): that is what makes resuming exact. A global batch of `batch_size * world_size` windows is
    cut from the permutation and rank r takes the r-th slice, so K ranks see exactly the windows one process would
    see with a K times larger batch (the last incomplete batch of an epoch is dropped, as the course's loader does).
    """

    def __init__(self, n_windows: int, batch_size: int, seed: int, world_size: int = 1) -> None:
        if n_windows < world_size:
            raise CorpusError(f"{n_windows} training windows cannot feed {world_size} processes; add text")
        self.n_windows = n_windows
        self.world_size = world_size
        self.batch_size = min(batch_size, n_windows // world_size)  # a tiny corpus gets a smaller batch
        self.seed = seed
        self.batches_per_epoch = n_windows // (self.batch_size * world_size)
        self._epoch: int | None = None
        self._order: torch.Tensor | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(self.n_windows, generator=generator)
            self._epoch = epoch
        assert self._order is not None
        return self._order

    def place(self, micro_batch: int) -> tuple[int, int]:
        """(epoch, position) of a run's `micro_batch`-th micro-batch, counted from 0: the trainer moves one position
        on per micro-batch and starts the next epoch after an epoch's last batch."""
        if micro_batch < 0:
            raise IndexError(f"micro-batch {micro_batch} is before the start of the run")
        return divmod(micro_batch, self.batches_per_epoch)

    def indices(self, epoch: int, position: int, rank: int = 0) -> torch.Tensor:
        if not 0 <= position < self.batches_per_epoch:
            raise IndexError(f"position {position} outside an epoch of {self.batches_per_epoch} batches")
        start = (position * self.world_size + rank) * self.batch_size
        return self.order(epoch)[start : start + self.batch_size]


def training_windows(
    corpus: TokenizedCorpus, context_length: int, stride: int | None, batch_size: int, seed: int, world_size: int = 1
) -> tuple[GPTDataset, GPTDataset, ShuffledBatches]:
    """How a run cuts its corpus: training windows every `stride`, validation windows side by side (each
    validation token judged once), and the training windows' batch order. The trainer and `inspect data` both cut
    here, so what the data view shows is what a run reads."""
    train_set = GPTDataset(corpus.train_ids, context_length, stride)
    val_set = GPTDataset(corpus.val_ids, context_length)
    return train_set, val_set, ShuffledBatches(len(train_set), batch_size, seed, world_size)


def evaluation_batches(n_windows: int, batch_size: int, max_batches: int | None) -> list[torch.Tensor]:
    """Fixed batches for evaluation: windows spread evenly over the whole part, the same at every evaluation, so
    successive losses are comparable and no random state is consumed (exact resume depends on that)."""
    if n_windows == 0:
        return []
    wanted = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
    chosen = torch.linspace(0, n_windows - 1, wanted).round().to(torch.int64).unique()
    return list(chosen.split(batch_size))
