"""The masked-LM score of a set of predictions, summed batch by batch: loss, perplexity,
accuracy, and the accuracy of always guessing the commonest masked token of the set (the
level a model reaches by learning token frequencies alone, which an accuracy must beat to
show that the model uses context).

Training-time validation and `alum eval` both score this way, so their figures mean the same.
The sums are float64 on the predictions' device: no host sync until the figures are read,
and a sum over ranks is one all-reduce of what each rank added.

The loss sum is the one place the two callers differ, and each keeps the numbers that runs
and tests have recorded: with weights (validation, whose padding repeats weigh 0), each
token's float32 cross-entropy is widened to float64 and weighted; without (`alum eval`), the
batch's float32 sum is widened once. The two agree to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


class MlmScore:
    """Running sums of masked-token predictions, and the figures they give."""

    def __init__(self, vocab_size: int, device: torch.device | str):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, tokens
        self.label_counts = torch.zeros(vocab_size, dtype=torch.float64, device=device)

    def add(self, logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> None:
        """Adds a batch's predictions (logits [N, C], labels [N]), each token weighted by ``weights``
        [N] (float64) or by 1."""
        if weights is None:
            loss = F.cross_entropy(logits.float(), labels, reduction="sum").double()
            weights = torch.ones(labels.shape, dtype=torch.float64, device=labels.device)
        else:
            loss = (F.cross_entropy(logits.float(), labels, reduction="none").double() * weights).sum()
        correct = ((logits.argmax(-1) == labels).double() * weights).sum()
        self.sums += torch.stack([loss, correct, weights.sum()])
        self.label_counts += torch.bincount(labels, weights=weights, minlength=len(self.label_counts))

    def all_reduce(self, all_reduce: Callable[[Tensor], object]) -> None:
        """Sums the ranks' sums in place with the collective given (this layer knows no process group)."""
        all_reduce(self.sums)
        all_reduce(self.label_counts)

    @property
    def tokens(self) -> int:
        return int(self.sums[2].item())

    def metrics(self) -> dict:
        """Mean cross-entropy, its perplexity (capped at e^50, short of math.exp's overflow) and
        the accuracy, over the tokens scored."""
        loss, accuracy = (self.sums[:2] / self.sums[2]).tolist()
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "accuracy": accuracy}

    def commonest_token_accuracy(self) -> float:
        return (self.label_counts.max() / self.sums[2]).item()
