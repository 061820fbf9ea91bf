"""The output head padded to a multiple of 64 rows for training's matmuls; the padding never reaches the loss.

GPU matmul kernels tile the output in blocks of 64 or 128 columns; GPT-2's 50,257 is odd, so the head's three
matmuls (forward, input and weight gradients) run partly in slow edge tiles. Padding the head to 50,304 rows fixes
that (nanoGPT pads its vocabulary for the same reason). Here the parameter keeps its real shape (checkpoints,
state_dict and decoding are unchanged): each training forward pads a copy of the weight with zero rows and slices
the padded columns off the logits before the cross-entropy, so the loss and the gradients of the real rows are
those of the unpadded head, and the padded rows' gradients are dropped by the pad's backward. The token embedding
needs no padding: it is a lookup, not a matmul (the head is untied, as the course builds it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_MULTIPLE = 64


def padded_size(vocab: int, multiple: int) -> int:
    """`vocab` rounded up to a multiple of `multiple` (itself when `multiple` is 0 or 1)."""
    if multiple <= 1:
        return vocab
    return -(-vocab // multiple) * multiple


def padded_head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, multiple: int) -> torch.Tensor:
    """The course's `F.cross_entropy(logits.flatten(0, 1), targets.flatten())`, its head matmul on padded rows."""
    vocab = weight.shape[0]
    padded = F.pad(weight, (0, 0, 0, padded_size(vocab, multiple) - vocab))
    logits = F.linear(x, padded)[..., :vocab]  # the padding's logits stop here
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
