"""Decoding one token at a time, reporting everything a learner wants to see about each choice.

`generate` yields a `Step` as soon as each token is chosen, so a terminal or the TUI can show it at once; the
consumer stops it between two steps by setting a `threading.Event` (or simply by not asking for more).
Probabilities are always the model's own (softmax of the logits at temperature 1), whatever the sampling settings:
that is what perplexity measures, and what `score` computes for a given text.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from gpt2term.core import metrics
from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import InputError
from gpt2term.core.model import GPTModel, KVCache
from gpt2term.core.tokenizer import Tokenizer


@dataclass(frozen=True)
class Candidate:
    token_id: int
    text: str
    prob: float


@dataclass(frozen=True)
class Step:
    """One generated token and what the model thought when it chose it."""

    index: int  # 0 for the first generated token
    token_id: int
    text: str  # text this token makes visible ("" while a character split over tokens is incomplete)
    token_text: str  # the token on its own, for showing token boundaries
    prob: float
    logprob: float
    rank: int  # 1 when the chosen token was the model's most probable
    top: tuple[Candidate, ...]
    perplexity: float  # running: exp(mean negative log-likelihood of the generated tokens so far)
    elapsed_s: float  # since generation started (the first step's value is the time to first token)


MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; training adds the rank and the step to its seed, so leave room
MAX_BEAMS = 64
MAX_NEW_TOKENS_PER_CONTEXT = 16  # beyond this many contexts' worth, a request is more likely a typo than a wish


def check_max_new_tokens(max_new_tokens: int, context_length: int, no_limit: bool = False) -> None:
    """A bound that follows the model: past the context each token costs a full forward pass, so a huge count
    would run for hours; `no_limit` (the CLI's --no-limit) lifts it for whoever means it."""
    limit = MAX_NEW_TOKENS_PER_CONTEXT * context_length
    if max_new_tokens > limit and not no_limit:
        raise InputError(
            f"max new tokens {max_new_tokens} is more than {MAX_NEW_TOKENS_PER_CONTEXT} times the model's context "
            f"of {context_length}; ask for at most {limit}, or pass --no-limit if you mean it"
        )


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InputError(f"the seed must be between 0 and 2**63-1 ({MAX_SEED}), got {seed}")


@dataclass
class DecodingSettings:
    """The course's `generate()` knobs: temperature 0 means greedy (argmax), as in chapter 5."""

    max_new_tokens: int = 50
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_at_eos: bool = True
    top_n: int = 10
    no_limit: bool = False  # lifts `check_max_new_tokens`
    # The weights' number format while decoding. Whoever owns the model packs it (`prepare_for_inference`) when this
    # changes: generate() never repacks or switches a model's mode for it. None: as prepared.
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise InputError(f"max new tokens must be 0 or more, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # inf would sample uniformly
            raise InputError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        check_seed(self.seed)
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_n < 1:
            raise InputError(f"the number of alternatives shown must be at least 1, got {self.top_n}")
        if self.dtype is not None:
            from gpt2term.core.accel.decode import inference_dtype

            inference_dtype(self.dtype)

    def check_for(self, cfg: GPTConfig) -> None:
        """The limits that depend on the model (checked before any output)."""
        check_max_new_tokens(self.max_new_tokens, cfg.context_length, self.no_limit)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> str:
        if self.greedy:
            how = "greedy"
        else:
            how = f"sample T={self.temperature:g}"
            if self.top_k:
                how += f" top-k={self.top_k}"
            if self.top_p is not None and self.top_p < 1:
                how += f" top-p={self.top_p:g}"
            if self.seed is not None:
                how += f" seed={self.seed}"
        eos = "stop at <|endoftext|>" if self.stop_at_eos else "ignore <|endoftext|>"
        weights = f", {self.dtype} weights" if self.dtype not in (None, "fp32", "float32") else ""
        return f"{how}, {self.max_new_tokens} tokens, {eos}{weights}"


@dataclass
class Summary:
    tokens: int = 0
    tokens_per_second: float = 0.0
    time_to_first_token_s: float | None = None
    perplexity: float | None = None
    mean_prob: float | None = None
    elapsed_s: float = 0.0
    steps: list[Step] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, steps: Sequence[Step]) -> Summary:
        if not steps:
            return cls()
        first, last = steps[0], steps[-1]
        # Decoding speed after the first token: the first one also pays for reading the prompt.
        decode_time = last.elapsed_s - first.elapsed_s
        tps = (len(steps) - 1) / decode_time if len(steps) > 1 and decode_time > 0 else len(steps) / last.elapsed_s
        return cls(
            tokens=len(steps),
            tokens_per_second=tps,
            time_to_first_token_s=first.elapsed_s,
            perplexity=last.perplexity,
            mean_prob=sum(s.prob for s in steps) / len(steps),
            elapsed_s=last.elapsed_s,
            steps=list(steps),
        )

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "tokens_per_second": self.tokens_per_second,
            "time_to_first_token_s": self.time_to_first_token_s,
            "perplexity": self.perplexity,
            "mean_prob": self.mean_prob,
        }


def _model_device(model: GPTModel) -> torch.device:
    return next(model.parameters()).device


def check_ids_fit(model: GPTModel, token_ids: Sequence[int]) -> None:
    """A model with a smaller vocabulary than the tokenizer's (a test-sized import) cannot read every text."""
    highest = max(token_ids, default=-1)
    if highest >= model.cfg.vocab_size:
        raise InputError(
            f"the text has token id {highest} but this model's vocabulary has only {model.cfg.vocab_size} entries; "
            "gpt2term's text needs a model with GPT-2's vocabulary (50257 tokens)"
        )


def _choose(logits: torch.Tensor, settings: DecodingSettings, rng: torch.Generator | None) -> int:
    if settings.greedy:
        return int(torch.argmax(logits))
    scaled = logits / settings.temperature
    if not bool(torch.isfinite(scaled).all()):  # a temperature so small it overflows: the limit is greedy
        return int(torch.argmax(logits))
    if settings.top_k is not None and settings.top_k < scaled.numel():
        kth = torch.topk(scaled, settings.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    sample_probs = torch.softmax(scaled, dim=-1)
    if settings.top_p is not None and settings.top_p < 1:
        sorted_probs, order = torch.sort(sample_probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < settings.top_p  # always keeps the first
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs, 1, generator=rng)])
    return int(torch.multinomial(sample_probs, 1, generator=rng))


def generate(
    model: GPTModel,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    settings: DecodingSettings | None = None,
    cancel: threading.Event | None = None,
    use_cache: bool = True,
) -> Iterator[Step]:
    """Yield one `Step` per new token. A prompt longer than the context is cropped from the left, as the course does.

    With the KV cache each new token costs one position; once the sequence fills the context, every step crops to
    the last `context_length` tokens and recomputes, which is exactly the course's loop.
    """
    settings = settings or DecodingSettings()
    if not prompt_ids:
        raise InputError("the prompt is empty; type some text to continue")
    settings.check_for(model.cfg)
    check_ids_fit(model, prompt_ids)
    ctx = model.cfg.context_length
    device = _model_device(model)
    dtype = next(model.parameters()).dtype
    ids = list(prompt_ids)
    rng = None
    if not settings.greedy:
        rng = torch.Generator(device="cpu")
        # Generator.seed(), not torch.seed(): that one would reseed the global RNG a training run draws dropout from.
        rng.manual_seed(settings.seed) if settings.seed is not None else rng.seed()
    decoder = tokenizer.stream_decoder()
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    nll_sum = 0.0
    try:
        with torch.inference_mode():
            cache = KVCache(model.cfg, 1, device, dtype) if use_cache else None
            window = torch.tensor([ids[-ctx:]], device=device)
            logits = model(window, cache, last_only=True)[0, -1]
            for index in range(settings.max_new_tokens):
                if cancel is not None and cancel.is_set():
                    return
                # Two passes over the vocabulary per greedy token, both single-row kernels that stay on one
                # thread (a multi-threaded pass over 50k numbers costs more in wake-ups than it saves, and far
                # more on a busy machine): log-softmax, then the top-N, whose first entry is the argmax.
                logits32 = logits.float().cpu()
                logprobs = torch.log_softmax(logits32, dim=-1)
                top_lp, top_i = torch.topk(logprobs, min(max(settings.top_n, 2), logprobs.numel()))
                if settings.greedy:
                    token = int(top_i[0])
                    if top_lp.numel() > 1 and bool(top_lp[1] == top_lp[0]):
                        token = int(torch.argmax(logits32))  # a tie: argmax's rule (the first index) decides
                    rank = 1
                else:
                    token = _choose(logits32, settings, rng)
                    rank = int((logprobs > logprobs[token]).sum()) + 1
                logprob = float(logprobs[token])
                nll_sum -= logprob
                top_p, top_i = top_lp[: settings.top_n].exp(), top_i[: settings.top_n]
                is_last = index == settings.max_new_tokens - 1 or (settings.stop_at_eos and token == tokenizer.eot_id)
                text = decoder.push(token) + (decoder.flush() if is_last else "")
                yield Step(
                    index=index,
                    token_id=token,
                    text=text,
                    token_text=tokenizer.token_text(token),
                    prob=math.exp(logprob),
                    logprob=logprob,
                    rank=rank,
                    top=tuple(
                        Candidate(int(i), tokenizer.token_text(int(i)), float(p))
                        for p, i in zip(top_p.tolist(), top_i.tolist(), strict=True)
                    ),
                    perplexity=metrics.perplexity(nll_sum / (index + 1)),
                    elapsed_s=time.perf_counter() - started,
                )
                ids.append(token)
                if is_last:
                    return
                if cancel is not None and cancel.is_set():
                    return
                if cache is not None and cache.length < ctx:
                    logits = model(torch.tensor([[token]], device=device), cache, last_only=True)[0, -1]
                else:
                    logits = model(torch.tensor([ids[-ctx:]], device=device), last_only=True)[0, -1]
    finally:
        model.train(was_training)


@dataclass
class Score:
    """Teacher-forced log-probabilities of a text's tokens (from the second token on) and their perplexity."""

    token_ids: list[int]
    logprobs: list[float]

    @property
    def perplexity(self) -> float | None:
        if not self.logprobs:
            return None
        return metrics.perplexity(-sum(self.logprobs) / len(self.logprobs))

    @property
    def loss(self) -> float | None:
        return -sum(self.logprobs) / len(self.logprobs) if self.logprobs else None


def score(model: GPTModel, token_ids: Sequence[int]) -> Score:
    """How surprised the model is by each token of a given text, with at least half a context of history each."""
    ids = list(token_ids)
    check_ids_fit(model, ids)
    n, ctx = len(ids), model.cfg.context_length
    device = _model_device(model)
    stride = max(1, ctx // 2)
    logprobs: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            pos = 1
            while pos < n:
                end = min(n, pos + (ctx if pos == 1 else stride))
                start = max(0, end - 1 - ctx)
                inputs = torch.tensor([ids[start : end - 1]], device=device)
                lp = torch.log_softmax(model(inputs)[0].float(), dim=-1)
                targets = torch.tensor(ids[pos:end], device=device)
                rows = torch.arange(pos - 1 - start, end - 1 - start, device=device)
                logprobs.extend(lp[rows, targets].tolist())
                pos = end
    finally:
        model.train(was_training)
    return Score(ids, logprobs)


@dataclass(frozen=True)
class Continuation:
    """A whole continuation and how probable the model finds it (for comparing greedy, sampling and beams)."""

    token_ids: tuple[int, ...]
    text: str
    logprob: float  # total log-probability of the continuation given the prompt

    @property
    def perplexity(self) -> float | None:
        return metrics.perplexity(-self.logprob / len(self.token_ids)) if self.token_ids else None


def beam_search(
    model: GPTModel,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    beams: int = 4,
    max_new_tokens: int = 50,
    stop_at_eos: bool = True,
    no_limit: bool = False,
) -> list[Continuation]:
    """Keep the `beams` most probable continuations at every step; return the finished ones, most probable first.

    Ranked by total log-probability (no length normalisation), so the answer is "the most probable text the
    search found", the quantity greedy decoding only approximates. Uses the KV cache, one row per beam, until the
    context is full; then crops and recomputes, like `generate`.
    """
    if not 1 <= beams <= MAX_BEAMS:  # each beam is a row of the KV cache: a million of them exhaust memory
        raise InputError(f"the number of beams must be between 1 and {MAX_BEAMS}, got {beams}")
    if not prompt_ids:
        raise InputError("the prompt is empty; type some text to continue")
    check_max_new_tokens(max_new_tokens, model.cfg.context_length, no_limit)
    ctx = model.cfg.context_length
    device = _model_device(model)
    dtype = next(model.parameters()).dtype
    eos = tokenizer.eot_id
    was_training = model.training
    model.eval()
    alive: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    try:
        with torch.inference_mode():
            cache = KVCache(model.cfg, beams, device, dtype)
            prompt = list(prompt_ids)[-ctx:]
            logits = model(torch.tensor([prompt], device=device), cache, last_only=True)[:, -1]
            for step in range(max_new_tokens):
                logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
                totals = torch.tensor([lp for _, lp in alive]).unsqueeze(1) + logprobs
                # Twice the width, so that beams ending in <|endoftext|> do not leave fewer than `beams` alive.
                best, flat = torch.topk(totals.flatten(), min(2 * beams, totals.numel()))
                vocab = logprobs.shape[-1]
                next_alive, rows = [], []
                for rank, (total, i) in enumerate(zip(best.tolist(), flat.tolist(), strict=True)):
                    row, token = divmod(int(i), vocab)
                    ids = alive[row][0] + [token]
                    if stop_at_eos and token == eos:
                        if rank < beams:
                            finished.append((ids, float(total)))
                    elif len(next_alive) < beams:
                        next_alive.append((ids, float(total)))
                        rows.append(row)
                if not next_alive or step == max_new_tokens - 1:
                    finished.extend(next_alive)
                    break
                # Stop early when no live beam can still beat the best finished one (log-probs only fall).
                if finished and max(t for _, t in finished) >= max(t for _, t in next_alive):
                    break
                alive = next_alive
                if cache.length < ctx:
                    index = torch.tensor(rows, device=device)
                    cache.keys = cache.keys[:, index]
                    cache.values = cache.values[:, index]
                    last = torch.tensor([[ids[-1]] for ids, _ in alive], device=device)
                    logits = model(last, cache, last_only=True)[:, -1]
                else:
                    window = torch.tensor([(prompt + ids)[-ctx:] for ids, _ in alive], device=device)
                    logits = model(window, last_only=True)[:, -1]
    finally:
        model.train(was_training)
    if max_new_tokens == 0:
        return []
    finished.sort(key=lambda item: item[1], reverse=True)
    return [Continuation(tuple(ids), tokenizer.decode(ids), total) for ids, total in finished[:beams]]


def sequence_logprob(model: GPTModel, prompt_ids: Sequence[int], continuation: Sequence[int]) -> float:
    """Total log-probability of `continuation` after `prompt_ids`, each token seen through the window the generator
    used for it (the last `context_length` tokens), so greedy, sampled and beam results compare like with like."""
    if not continuation:
        return 0.0
    full = list(prompt_ids) + list(continuation)
    ctx = model.cfg.context_length
    device = _model_device(model)
    first = len(prompt_ids)
    total = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # Tokens whose window starts at 0 share one forward pass; each later one has its own cropped window.
            in_first = [j for j in range(first, len(full)) if j <= ctx]
            if in_first:
                lp = torch.log_softmax(model(torch.tensor([full[: in_first[-1]]], device=device))[0].float(), -1)
                total += sum(float(lp[j - 1, full[j]]) for j in in_first)
            later = [j for j in range(first, len(full)) if j > ctx]
            if later:
                windows = torch.tensor([full[j - ctx : j] for j in later], device=device)
                lp = torch.log_softmax(model(windows, last_only=True)[:, -1].float(), -1)
                total += sum(float(lp[row, full[j]]) for row, j in enumerate(later))
    finally:
        model.train(was_training)
    return total
