"""Corpus -> ids -> windows -> batches: the course's split and windows, the cache, and the errors users meet."""

from __future__ import annotations

import array
import math

import pytest
import torch

from gpt2term import locations
from gpt2term.core import data
from gpt2term.core.data import (
    CorpusError,
    GPTDataset,
    ShuffledBatches,
    evaluation_batches,
    load_corpus,
    require_windows,
)
from gpt2term.core.tokenizer import ENDOFTEXT, default_tokenizer


@pytest.fixture
def tok():
    return default_tokenizer()


def test_folder_corpus_is_joined_split_by_characters_then_tokenized_like_the_course(tmp_path, tok):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First document. It talks about cats.\nAnd dogs too.")
    (folder / "sub" / "b.md").write_text("# Second\n\nThe second one, in markdown, is about birds.")
    (folder / "ignored.csv").write_text("not,text")
    corpus = load_corpus([folder], val_ratio=0.25)

    text = ENDOFTEXT.join([(folder / "a.txt").read_text(), (folder / "sub" / "b.md").read_text()])
    split = int(0.75 * len(text))
    assert corpus.documents == 2 and corpus.characters == len(text)
    assert corpus.train_ids.tolist() == tok.encode(text[:split])
    assert corpus.val_ids.tolist() == tok.encode(text[split:])
    assert tok.eot_id in corpus.train_ids.tolist()


def test_ids_are_cached_by_content_and_memory_mapped(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("Some words to tokenize. " * 50)
    first = load_corpus([path])
    assert not first.from_cache
    assert first.cache_path is not None and first.cache_path.is_relative_to(locations.cache_dir())
    assert first.train_ids.dtype == torch.uint16

    again = load_corpus([path])
    assert again.from_cache and torch.equal(again.train_ids, first.train_ids)
    assert torch.equal(again.val_ids, first.val_ids)
    # The cached file is the ids, nothing else: 2 bytes per token.
    assert (first.cache_path / "train.u16").stat().st_size == 2 * first.train_tokens

    path.write_text("Different words now. " * 50)  # same name, new content: a new entry
    changed = load_corpus([path])
    assert not changed.from_cache and changed.content_hash != first.content_hash


def test_streamed_tokenization_cuts_only_where_ids_do_not_change(tmp_path, tok):
    """Big corpora are tokenized piece by piece; the cut rule keeps the ids identical to one-shot tokenization."""
    from pydoc_data.topics import topics

    text = ENDOFTEXT.join(topics[k] for k in sorted(topics))[:200_000] + "  trailing  spaces\n\n\n"
    writer = data._IdWriter(tmp_path / "ids.u16", tok, chunk_chars=700)
    for start in range(0, len(text), 3001):
        writer.write(text[start : start + 3001])
    writer.close()
    ids = array.array("H")
    ids.frombytes((tmp_path / "ids.u16").read_bytes())
    assert ids.tolist() == tok.encode(text)


def test_builtin_pydoc_corpus_needs_no_file():
    corpus = load_corpus(None)
    assert corpus.description.startswith("pydoc")
    assert corpus.train_tokens > 100_000 and corpus.val_tokens > 10_000
    assert load_corpus(["pydoc"]).content_hash == corpus.content_hash


def test_windows_follow_the_course_dataset():
    ids = torch.arange(23, dtype=torch.int64).to(torch.uint16)
    dataset = GPTDataset(ids, context_length=4, stride=3)
    assert len(dataset) == len(range(0, 23 - 4, 3))  # the course's `range(0, len(ids) - max_length, stride)`
    x, y = dataset[2]
    assert x.tolist() == [6, 7, 8, 9] and y.tolist() == [7, 8, 9, 10]
    xs, ys = dataset.batch(torch.tensor([0, len(dataset) - 1]))
    assert xs.dtype == torch.int64 and xs.shape == (2, 4)
    assert ys[1].tolist() == list(range(3 * (len(dataset) - 1) + 1, 3 * (len(dataset) - 1) + 5))
    assert int(ys.max()) <= 22
    assert len(GPTDataset(ids[:4], context_length=4)) == 0  # 4 tokens cannot give 4 inputs and 4 targets


def test_windows_of_uint16_ids_keep_ids_above_32767():
    """Cached ids are uint16; GPT-2's vocabulary goes up to 50256 (torch 2.4 to 2.6 cannot index uint16 tensors)."""
    ids = torch.tensor([0, 1, 40000, 50256, 65535, 7, 32768, 3]).to(torch.uint16)
    inputs, targets = GPTDataset(ids, 3).batch(torch.tensor([0, 1]))
    assert inputs.dtype == torch.int64
    assert inputs.tolist() == [[0, 1, 40000], [50256, 65535, 7]]
    assert targets.tolist() == [[1, 40000, 50256], [65535, 7, 32768]]


def test_batches_are_a_per_epoch_permutation_and_ranks_split_the_global_batch():
    single = ShuffledBatches(n_windows=20, batch_size=6, seed=7)
    assert single.batches_per_epoch == 3  # the incomplete last batch is dropped
    epoch0 = torch.cat([single.indices(0, p) for p in range(3)])
    assert len(set(epoch0.tolist())) == 18
    assert not torch.equal(epoch0, torch.cat([single.indices(1, p) for p in range(3)]))
    assert torch.equal(single.indices(0, 1), ShuffledBatches(20, 6, seed=7).indices(0, 1))  # pure function

    two = ShuffledBatches(n_windows=20, batch_size=3, seed=7, world_size=2)
    for position in range(3):
        ranks = torch.cat([two.indices(0, position, rank) for rank in range(2)])
        assert torch.equal(ranks, single.indices(0, position))


def test_evaluation_batches_are_fixed_and_spread_over_the_data():
    batches = evaluation_batches(n_windows=100, batch_size=4, max_batches=2)
    flat = torch.cat(batches).tolist()
    assert len(batches) == 2 and flat[0] == 0 and flat[-1] == 99
    assert flat == evaluation_batches(100, 4, 2)[0].tolist() + evaluation_batches(100, 4, 2)[1].tolist()
    assert torch.cat(evaluation_batches(5, 4, 10)).tolist() == [0, 1, 2, 3, 4]


def test_missing_and_empty_corpora_name_the_problem(tmp_path):
    with pytest.raises(CorpusError, match=r"corpus not found: .*nope\.txt.*pydoc"):
        load_corpus([tmp_path / "nope.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus([tmp_path / "empty.txt"])
    (tmp_path / "folder").mkdir()
    with pytest.raises(CorpusError, match=r"no \.txt or \.md files"):
        load_corpus([tmp_path / "folder"])


def test_too_short_corpus_says_how_many_tokens_it_needs_and_has(tmp_path):
    (tmp_path / "short.txt").write_text("Just a few words here, not many at all.")
    corpus = load_corpus([tmp_path / "short.txt"])
    with pytest.raises(CorpusError) as info:
        require_windows(corpus, context_length=32, val_ratio=0.1)
    message = str(info.value)
    have = corpus.train_tokens + corpus.val_tokens
    assert f"needs about {math.ceil(33 / 0.1)} tokens" in message and f"but has {have}" in message
    assert "--context-length" in message


def test_invalid_utf8_names_the_file_and_byte_offset_and_replace_goes_on(tmp_path):
    path = tmp_path / "bad.txt"
    good = "é" * 3000 + "abc"  # 6003 bytes of valid UTF-8 first
    path.write_bytes(good.encode() + b"\xff\xfe then more text")
    with pytest.raises(CorpusError) as info:
        load_corpus([path])
    assert str(path) in str(info.value) and "byte 6003" in str(info.value)
    assert "--encoding-errors replace" in str(info.value)

    corpus = load_corpus([path], encoding_errors="replace")
    assert "\ufffd" in default_tokenizer().decode(corpus.val_ids.tolist())


def test_invalid_utf8_offset_is_right_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_READ_CHUNK", 16)
    path = tmp_path / "split.txt"
    path.write_bytes("aaaaaaaaaaaaaaa€".encode() + b"x\x80y")  # the euro sign straddles the first chunk boundary
    with pytest.raises(CorpusError, match="byte 19;"):
        load_corpus([path])
