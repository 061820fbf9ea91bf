"""The course's cross-entropy, computed step by step on a real text, so every number can be checked by hand.

The course computes the loss in six steps: logits, softmax, the probability of each target token (the input
shifted by one), its log, the mean, the negation; then perplexity = exp(loss). `loss_steps` keeps each step's
numbers for every predicted position. It runs the plain `GPTModel.forward` (the course's computation, in float32),
not the sliced training loss of `core.accel`, so what it shows is the definition, not an optimisation of it.

The log is taken as `log_softmax` rather than `log(softmax(...))`: the same number where the probability is
representable, and a finite one where float32's softmax rounds a very unlikely target to 0. It is the very kernel
`F.cross_entropy` runs, so each token's number is the training loss's own; only the mean is summed in float64, which
makes it the exact mean of those numbers (a float32 sum, such as cross_entropy's, may differ in its last bits).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gpt2term.core import metrics
from gpt2term.core.errors import InputError
from gpt2term.core.generation import check_ids_fit
from gpt2term.core.model import GPTModel
from gpt2term.core.tokenizer import Tokenizer

COURSE_TEXT = "every effort moves you"  # the course's example: inputs "every effort moves", targets "effort moves you"


@dataclass(frozen=True)
class TableRow:
    """One line of the course's loss-to-perplexity table (the perplexity as the course prints it)."""

    loss: float
    perplexity: float
    meaning: str


# The course's table, in one place for the CLI, the app and the tests. Only "random guessing" is the course's
# wording; the other meanings are ours.
LOSS_TABLE: tuple[TableRow, ...] = (
    TableRow(10.79, 48_725, "random guessing"),
    TableRow(5.0, 148, "learning: unsure among ~150 tokens"),
    TableRow(2.0, 7.4, "good: a handful of candidates"),
    TableRow(0.5, 1.65, "very sure (memorised?)"),
)


def table_position(loss: float) -> str:
    """Where `loss` falls on the course's table, in words."""
    rows = LOSS_TABLE
    if loss >= rows[0].loss:
        return f"at or above {rows[0].loss:g} ({rows[0].meaning}): no better than a uniform guess"
    for upper, lower in zip(rows, rows[1:], strict=False):
        if loss >= lower.loss:
            return f"between {upper.loss:g} ({upper.meaning}) and {lower.loss:g} ({lower.meaning})"
    return f"below {rows[-1].loss:g} ({rows[-1].meaning})"


def table_index(loss: float) -> int:
    """How many rows of `LOSS_TABLE` lie above `loss` (0: above the first; len(LOSS_TABLE): below the last)."""
    return sum(1 for row in LOSS_TABLE if loss < row.loss)


@dataclass(frozen=True)
class TokenLoss:
    """One predicted position: the model reads `token_id` (and everything before it) and should give `target_id`."""

    position: int
    token_id: int
    target_id: int
    token_text: str
    target_text: str
    target_logit: float  # step 1: the logit of the target token
    top_id: int  # the model's own favourite at this position, for comparison
    top_text: str
    top_prob: float
    prob: float  # step 3: softmax(logits)[target]
    logprob: float  # step 4: its log
    contribution: float  # -logprob / number of positions: this token's share of the loss (they sum to it)

    @property
    def nll(self) -> float:
        return -self.logprob


@dataclass(frozen=True)
class LossSteps:
    """The six steps' numbers for one text, plus perplexity and the uniform baseline."""

    shape: tuple[int, int, int]  # step 1: logits (batch, seq_len, vocab_size)
    tokens: tuple[TokenLoss, ...]
    softmax_max_error: float  # step 2: the largest |sum of a softmax row - 1|
    mean_logprob: float  # step 5
    loss: float  # step 6: -mean_logprob
    train_mode: bool  # dropout was on (model.train())
    drop_rate: float

    @property
    def perplexity(self) -> float:
        return metrics.perplexity(self.loss)

    @property
    def vocab_size(self) -> int:
        return self.shape[2]

    @property
    def baseline(self) -> float:
        """The loss of a uniform guess over the vocabulary: ln(vocab_size), what an untrained model starts near."""
        return math.log(self.vocab_size)

    @property
    def table_position(self) -> str:
        return table_position(self.loss)

    def worst(self, n: int = 5) -> list[TokenLoss]:
        """The `n` positions that cost the most (largest -log p), worst first."""
        return sorted(self.tokens, key=lambda t: (-t.nll, t.position))[:n]

    def to_dict(self, worst: int = 5) -> dict:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "mean_logprob": self.mean_logprob,
            "shape": list(self.shape),
            "vocab_size": self.vocab_size,
            "baseline": self.baseline,
            "softmax_max_error": self.softmax_max_error,
            "train_mode": self.train_mode,
            "drop_rate": self.drop_rate,
            "table_position": self.table_position,
            "table": [{"loss": r.loss, "perplexity": r.perplexity, "meaning": r.meaning} for r in LOSS_TABLE],
            "tokens": [_token_dict(t) for t in self.tokens],
            "worst": [t.position for t in self.worst(worst)],
        }


def _token_dict(t: TokenLoss) -> dict:
    return {
        "position": t.position,
        "token_id": t.token_id,
        "target_id": t.target_id,
        "token": t.token_text,
        "target": t.target_text,
        "target_logit": t.target_logit,
        "prob": t.prob,
        "logprob": t.logprob,
        "contribution": t.contribution,
        "top_id": t.top_id,
        "top": t.top_text,
        "top_prob": t.top_prob,
    }


def check_loss_ids(model: GPTModel, token_ids: Sequence[int]) -> list[int]:
    """Ids a loss can be computed on: at least two (one input, one target), at most a context of inputs plus one."""
    ids = list(token_ids)
    if len(ids) < 2:
        raise InputError(
            f"the text has {len(ids)} token{'s' if len(ids) != 1 else ''}: nothing to predict; give at least two "
            "tokens (the targets are the inputs shifted by one)"
        )
    ctx = model.cfg.context_length
    if len(ids) > ctx + 1:
        raise InputError(
            f"the text has {len(ids)} tokens, more than the model's context of {ctx} inputs plus one target; "
            f"shorten it to at most {ctx + 1} tokens"
        )
    check_ids_fit(model, ids)
    return ids


def _float32(model: GPTModel) -> GPTModel:
    """The model itself when its weights are float32 (the usual case), else a float32 copy: the course's numbers."""
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).float()


def _set_mode(model: GPTModel, train: bool) -> None:
    # nn.Module.train, not the model's own: an accelerated model drops its packed decoding weights on train(), and
    # nothing here changes a weight.
    nn.Module.train(model, train)


def loss_steps(
    model: GPTModel, token_ids: Sequence[int], tokenizer: Tokenizer | None = None, *, train_mode: bool = False
) -> LossSteps:
    """The course's six steps on `token_ids` (inputs: all but the last; targets: all but the first), in eval mode
    unless `train_mode` (dropout on); the model's previous mode is restored."""
    ids = check_loss_ids(model, token_ids)
    net = _float32(model)
    device = next(net.parameters()).device
    inputs = torch.tensor([ids[:-1]], device=device)
    targets = torch.tensor([ids[1:]], device=device)
    was_training = net.training
    _set_mode(net, train_mode)
    try:
        with torch.no_grad():
            logits = GPTModel.forward(net, inputs).float()  # step 1, by the plain model's forward
    finally:
        _set_mode(net, was_training)
    probas = torch.softmax(logits, dim=-1)  # step 2
    softmax_error = float((probas.sum(dim=-1) - 1).abs().max())
    index = targets.unsqueeze(-1)
    target_probas = probas.gather(-1, index).squeeze(-1)[0]  # step 3
    log_probas = torch.log_softmax(logits, dim=-1).gather(-1, index).squeeze(-1)[0]  # step 4
    avg_log_probas = log_probas.double().mean()  # step 5 (summed in float64: the exact mean of those numbers)
    neg_avg_log_probas = -avg_log_probas  # step 6: the loss
    target_logits = logits.gather(-1, index).squeeze(-1)[0]
    top_probs, top_ids = probas[0].max(dim=-1)
    n = len(ids) - 1
    text = tokenizer.token_text if tokenizer is not None else (lambda i: "")
    tokens = tuple(
        TokenLoss(
            position=i,
            token_id=ids[i],
            target_id=ids[i + 1],
            token_text=text(ids[i]),
            target_text=text(ids[i + 1]),
            target_logit=float(target_logits[i]),
            top_id=int(top_ids[i]),
            top_text=text(int(top_ids[i])),
            top_prob=float(top_probs[i]),
            prob=float(target_probas[i]),
            logprob=float(log_probas[i]),
            contribution=-float(log_probas[i]) / n,
        )
        for i in range(n)
    )
    return LossSteps(
        shape=tuple(logits.shape),  # type: ignore[arg-type]
        tokens=tokens,
        softmax_max_error=softmax_error,
        mean_logprob=float(avg_log_probas),
        loss=float(neg_avg_log_probas),
        train_mode=train_mode,
        drop_rate=float(model.cfg.drop_rate),
    )


@dataclass(frozen=True)
class DropoutCheck:
    """The course's "eval() disables dropout", measured: the same text's loss twice in each mode."""

    drop_rate: float
    train_losses: tuple[float, ...]
    eval_losses: tuple[float, ...]

    @property
    def has_dropout(self) -> bool:
        return self.drop_rate > 0

    @property
    def note(self) -> str:
        if not self.has_dropout:
            return "this model's drop_rate is 0: train mode computes what eval mode does"
        return (
            f"drop_rate {self.drop_rate:g}: in train mode dropout zeroes a random {self.drop_rate:.0%} of activations "
            "on every pass, so the loss changes; model.eval() turns it off, so the loss is the same every time"
        )

    def to_dict(self) -> dict:
        return {
            "drop_rate": self.drop_rate,
            "train_losses": list(self.train_losses),
            "eval_losses": list(self.eval_losses),
            "note": self.note,
        }


def dropout_check(model: GPTModel, token_ids: Sequence[int], runs: int = 2) -> DropoutCheck:
    """The loss of the same ids `runs` times in train mode and `runs` times in eval mode (the mode is restored)."""
    train = tuple(loss_steps(model, token_ids, train_mode=True).loss for _ in range(runs))
    evals = tuple(loss_steps(model, token_ids).loss for _ in range(runs))
    return DropoutCheck(float(model.cfg.drop_rate), train, evals)
