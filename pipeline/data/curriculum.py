"""The mask-rate curriculum: how many tokens to mask at a given point of an epoch.

ALUM masks few tokens early in each epoch and more later: 5% at the start of every epoch,
5 points more after every 20% of it, capped at 25%. The paper gives no code, so the
schedule is a config (`masking.schedule`) rather than a constant:

- ``stepwise``: ``start + increment * floor(fraction / every)``, capped at ``end``.
- ``linear``:   ``start`` rising linearly to ``end`` over the epoch.
- ``constant``: always ``start`` (the usual 15% BERT baseline is
  ``MaskSchedule.constant(0.15)``); ``end``, ``increment`` and ``every`` are ignored.

The rate depends only on the position within the current epoch, so it restarts at
``start`` every epoch and a resumed run gets the same rate as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.core import checks

KINDS = ("stepwise", "linear", "constant")
# Fractions such as 0.4 / 0.2 come out as 1.9999999999999998; this slack counts them as 2.
_FLOOR_SLACK = 1e-9
_RATE_DIGITS = 9


@dataclass(frozen=True)
class MaskSchedule:
    """Mask rate as a function of the position within the current epoch (paper defaults)."""

    kind: str = "stepwise"
    start: float = 0.05
    end: float = 0.25
    increment: float = 0.05
    every: float = 0.2

    @classmethod
    def constant(cls, rate: float) -> MaskSchedule:
        """A fixed rate, e.g. ``MaskSchedule.constant(0.15)`` for standard BERT masking."""
        return cls(kind="constant", start=rate, end=rate)

    def __post_init__(self) -> None:
        """A bad schedule fails where it is built; only the keys ``kind`` uses are checked (see above)."""
        checks.choice("kind", self.kind, KINDS)
        checks.fraction("start", self.start, one=True)
        if self.kind == "constant":
            return
        checks.fraction("end", self.end, one=True)
        if self.start > self.end:
            raise ValueError(f"start: must be <= end ({self.end}), got {self.start}")
        if self.kind == "stepwise":
            checks.number("increment", self.increment, positive=True)
            checks.fraction("every", self.every, one=True)

    def rate(self, epoch_fraction: float) -> float:
        """The mask rate at ``epoch_fraction`` in [0, 1), the position within the current epoch."""
        if not 0 <= epoch_fraction <= 1:
            raise ValueError(f"epoch_fraction must be in [0, 1], got {epoch_fraction}")
        if self.kind == "constant":
            return round(self.start, _RATE_DIGITS)
        if self.kind == "linear":
            value = self.start + (self.end - self.start) * epoch_fraction
        else:
            steps = math.floor(epoch_fraction / self.every + _FLOOR_SLACK)
            value = self.start + self.increment * steps
        return round(min(value, self.end), _RATE_DIGITS)
