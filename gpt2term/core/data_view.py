"""The data as the model sees it: the course's chapter 2 pipeline (text -> token ids -> windows -> input/target
pairs -> batches) with the numbers of one real run's settings.

Nothing here decides anything on its own: the split point, the windows and the batch order come from the same
functions the trainer calls (`split_point`, `training_windows`, `ShuffledBatches.place`), so the rows shown for a
step are the rows that step trains on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gpt2term.core.config import preset
from gpt2term.core.data import (
    GPTDataset,
    TokenizedCorpus,
    describe_corpus,
    load_corpus,
    normalize_sources,
    require_windows,
    split_point,
    training_windows,
)
from gpt2term.core.errors import InputError
from gpt2term.core.tokenizer import Tokenizer, default_tokenizer
from gpt2term.core.training.settings import TrainingSettings

FIRST_TOKENS = 12  # token ids shown with their texts
FIRST_WINDOWS = 3  # windows shown in corpus order, before the shuffled batch


@dataclass(frozen=True)
class WindowRows:
    """One window: where it starts in the training ids, its inputs, and its targets (the inputs shifted by one)."""

    window: int
    start: int
    input_ids: list[int]
    target_ids: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"window": self.window, "start": self.start, "input_ids": self.input_ids, "target_ids": self.target_ids}


@dataclass(frozen=True)
class DataPipeline:
    """Each stage of the pipeline with its numbers, for one step of a run with these settings."""

    corpus: str
    documents: int
    characters: int
    val_ratio: float
    split_at: int  # the character where the validation text begins
    train_tokens: int
    val_tokens: int
    first_tokens: list[tuple[int, str]]  # (id, text) of the first training tokens
    text_head: str  # the text those tokens spell
    context_length: int
    stride: int
    windows: int  # training windows
    val_windows: int
    batch_size: int  # per batch, as the trainer uses it (lowered for a corpus with fewer windows)
    requested_batch_size: int
    batches_per_epoch: int
    seed: int
    step: int  # counted from 1, as the trainer's progress counts it
    epoch: int  # counted from 1
    position: int  # the batch's place in its epoch, from 0
    first_windows: list[WindowRows]
    batch: list[WindowRows]

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.batch), self.context_length)

    @property
    def dropped_windows(self) -> int:
        """Windows an epoch leaves out: the last incomplete batch is dropped, as the course's loader does."""
        return self.windows - self.batches_per_epoch * self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "corpus": self.corpus,
            "documents": self.documents,
            "characters": self.characters,
            "val_ratio": self.val_ratio,
            "split_at": self.split_at,
            "train_tokens": self.train_tokens,
            "val_tokens": self.val_tokens,
            "first_tokens": [{"token_id": i, "text": t} for i, t in self.first_tokens],
            "context_length": self.context_length,
            "stride": self.stride,
            "windows": self.windows,
            "val_windows": self.val_windows,
            "batch_size": self.batch_size,
            "batches_per_epoch": self.batches_per_epoch,
            "seed": self.seed,
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "shape": list(self.shape),
            "first_windows": [w.to_dict() for w in self.first_windows],
            "batch": [w.to_dict() for w in self.batch],
        }


def run_context_length(settings: TrainingSettings) -> int:
    """The window length a run with these settings trains on: its own, else its model's, refused where the model
    is a checkpoint with a shorter context (as `Trainer._plan` decides)."""
    source = settings.init_from or (settings.name if settings.resume else None)
    if source is None:
        return settings.context_length or preset(settings.preset).with_(**settings.model).context_length
    from gpt2term.core.store.resolve import resolve_weights
    from gpt2term.core.store.store import CheckpointStore

    store = CheckpointStore()
    if store.exists(source) and (config := store.info(source).config) is not None:
        model_context = config.context_length  # the meta says it: no need to read the weights
    else:
        model_context = resolve_weights(source, store, n_heads=settings.model.get("n_heads")).config.context_length
    wanted = settings.context_length or model_context
    if wanted > model_context:
        raise InputError(
            f"--context-length {wanted} is longer than the model's context ({model_context}); "
            f"use {model_context} or less"
        )
    return wanted


def run_corpus(settings: TrainingSettings, progress: Callable[[str], None] | None = None) -> TokenizedCorpus:
    """The token ids a run with these settings reads (tokenized once, then from the cache)."""
    if progress is not None:
        progress(f"reading and tokenizing {describe_corpus(settings.corpus)} (cached after the first time)")
    return load_corpus(
        normalize_sources(settings.corpus), val_ratio=settings.val_ratio, encoding_errors=settings.encoding_errors
    )


def _rows(dataset: GPTDataset, windows: list[int]) -> list[WindowRows]:
    if not windows:
        return []
    inputs, targets = dataset.batch(torch.tensor(windows))
    return [
        WindowRows(window=w, start=w * dataset.stride, input_ids=x.tolist(), target_ids=y.tolist())
        for w, x, y in zip(windows, inputs, targets, strict=True)
    ]


def data_pipeline(
    settings: TrainingSettings,
    *,
    step: int = 1,
    corpus: TokenizedCorpus | None = None,
    tokenizer: Tokenizer | None = None,
    progress: Callable[[str], None] | None = None,
) -> DataPipeline:
    """The pipeline for `settings` (one process) and the batch that step `step` reads first (with --grad-accum K a
    step reads K batches, in order).

    `progress` hears what is being computed (tokenizing a large corpus the first time takes a while).
    """
    if step < 1:
        raise InputError(f"--step counts from 1 (the first step), got {step}")
    if settings.stride is not None and settings.stride <= 0:
        raise InputError(f"--stride must be positive, got {settings.stride}")
    report = progress or (lambda what: None)
    context_length = run_context_length(settings)
    if corpus is None:
        corpus = run_corpus(settings, progress)
    require_windows(corpus, context_length, settings.val_ratio)
    report("cutting windows and drawing the batch order")
    train_set, val_set, batches = training_windows(
        corpus, context_length, settings.stride, settings.batch_size, settings.seed
    )
    epoch, position = batches.place((step - 1) * settings.grad_accum)
    tokenizer = tokenizer or default_tokenizer()
    head = corpus.train_ids[:FIRST_TOKENS].to(torch.int64).tolist()
    return DataPipeline(
        corpus=corpus.description,
        documents=corpus.documents,
        characters=corpus.characters,
        val_ratio=settings.val_ratio,
        split_at=split_point(corpus.characters, settings.val_ratio),
        train_tokens=corpus.train_tokens,
        val_tokens=corpus.val_tokens,
        first_tokens=[(int(i), tokenizer.token_text(int(i))) for i in head],
        text_head=tokenizer.decode([int(i) for i in head]),
        context_length=context_length,
        stride=train_set.stride,
        windows=len(train_set),
        val_windows=len(val_set),
        batch_size=batches.batch_size,
        requested_batch_size=settings.batch_size,
        batches_per_epoch=batches.batches_per_epoch,
        seed=settings.seed,
        step=step,
        epoch=epoch + 1,
        position=position,
        first_windows=_rows(train_set, list(range(min(FIRST_WINDOWS, len(train_set))))),
        batch=_rows(train_set, batches.indices(epoch, position).tolist()),
    )


# ------------------------------------------------------------------------------------- as text (CLI and app)

ID_WIDTH = 5  # the widest GPT-2 id, 50256


def id_matrix(rows: list[list[int]], columns: int, indent: int = 0) -> str:
    """Rows of ids as the course prints a tensor (`[[16833, 3626, 6100], ...]`), each cut to `columns` ids with an
    ellipsis, every id right-aligned so that a target row sits under its input row shifted by one place."""
    lines = []
    for r, row in enumerate(rows):
        cells = ", ".join(f"{i:>{ID_WIDTH}}" for i in row[:columns]) + (", …" if len(row) > columns else "")
        opening = "[[" if r == 0 else " " * indent + " ["
        closing = "]]" if r == len(rows) - 1 else "],"
        lines.append(f"{opening}{cells}{closing}")
    return "\n".join(lines) if rows else "[]"


def shown_token(text: str) -> str:
    """A token's text quoted, with its whitespace made visible (a newline is a token of its own)."""
    return repr(text)


def aligned_pair(tokenizer: Tokenizer, window: WindowRows, columns: int) -> list[str]:
    """Four lines: the input tokens and ids, then the target tokens and ids, in shared columns, so the target at
    each position is visibly the input at the next one."""
    ins, outs = window.input_ids[:columns], window.target_ids[:columns]
    texts_in = [shown_token(tokenizer.token_text(i)) for i in ins]
    texts_out = [shown_token(tokenizer.token_text(i)) for i in outs]
    widths = [max(len(a), len(b), ID_WIDTH) for a, b in zip(texts_in, texts_out, strict=True)]
    more = " …" if len(window.input_ids) > columns else ""

    def line(label: str, cells: list[str]) -> str:
        return f"{label:<7} " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)) + more

    return [
        line("input", texts_in),
        line("", [str(i) for i in ins]),
        line("target", texts_out),
        line("", [str(i) for i in outs]),
    ]


def pipeline_stages(view: DataPipeline) -> list[tuple[str, str]]:
    """Each stage's name and its numbers in one line, in the order the data goes through them."""
    leftover = f" ({view.dropped_windows} window(s) left over each epoch, dropped)" if view.dropped_windows else ""
    lowered = (
        f" (lowered from --batch-size {view.requested_batch_size}: the corpus has fewer windows)"
        if view.batch_size < view.requested_batch_size
        else ""
    )
    return [
        ("text", f"{view.corpus}: {view.documents:,} document(s), {view.characters:,} characters"),
        (
            "split",
            f"at character {view.split_at:,} (--val-ratio {view.val_ratio:g}): training text before, validation "
            "after, tokenized apart",
        ),
        ("token ids", f"{view.train_tokens:,} training tokens, {view.val_tokens:,} validation tokens"),
        (
            "windows",
            f"{view.context_length} tokens (context_length) every {view.stride} (stride): {view.windows:,} training "
            f"windows, {view.val_windows:,} validation windows",
        ),
        ("input/target", "a window's targets are its inputs shifted by one: the next token at each place"),
        (
            "batches",
            f"{view.batch_size} shuffled windows a batch{lowered}: {view.batches_per_epoch:,} batches per "
            f"epoch{leftover}",
        ),
    ]


def pipeline_text(view: DataPipeline, tokenizer: Tokenizer | None = None, columns: int = 8) -> str:
    """What `gpt2term inspect data` prints: every stage with its numbers, the first windows, the step's batch."""
    tokenizer = tokenizer or default_tokenizer()
    lines = [f"{name:<13}{text}" for name, text in pipeline_stages(view)]
    lines.append("")
    lines.append(f"text begins {view.text_head[:70]!r}")
    tokens = " ".join(f"{shown_token(t)}={i}" for i, t in view.first_tokens)
    lines.append(f"as token ids: {tokens} …")
    lines.append("")
    first = view.first_windows
    if first:
        lines.append(f"the first {len(first)} windows, in corpus order (window i starts at token i*{view.stride}):")
        lines.append("inputs  = " + id_matrix([w.input_ids for w in first], columns, indent=10))
        lines.append("targets = " + id_matrix([w.target_ids for w in first], columns, indent=10))
        lines.append("")
        lines.append("window 0, input and target aligned: each target is the input one place to the right")
        lines.extend(aligned_pair(tokenizer, first[0], columns))
        lines.append("")
    windows = ", ".join(str(w.window) for w in view.batch)
    lines.append(
        f"step {view.step}: batch {view.position + 1} of {view.batches_per_epoch} in epoch {view.epoch} "
        f"(each epoch shuffled anew from --seed {view.seed}), windows [{windows}], shape {view.shape}"
    )
    lines.append("inputs  = " + id_matrix([w.input_ids for w in view.batch], columns, indent=10))
    lines.append("targets = " + id_matrix([w.target_ids for w in view.batch], columns, indent=10))
    return "\n".join(lines)
