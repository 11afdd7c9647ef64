"""The MicroNet score: parameters and ops, each normalized by a baseline, summed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

from microsweep.errors import UsageError
from microsweep.score._counter import Counts

__all__ = ["CHALLENGE_BASELINE", "Baseline", "micronet_score"]


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise UsageError(f"{what} {value!r} must be a number")
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{what} {value!r} must be finite and > 0")
    return float(value)


@dataclass(frozen=True)
class Baseline:
    """The normalizers of the score: `params` (32-bit equivalents) and `ops` per token."""

    params: float
    ops: float
    name: str = "baseline"

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _positive(self.params, "baseline params"))
        object.__setattr__(self, "ops", _positive(self.ops, "baseline ops"))

    @classmethod
    def from_counts(cls, counts: Counts, name: str = "dense") -> Baseline:
        """A baseline from a count, usually of the user's own dense model."""
        return cls(counts.params, counts.ops, name)


CHALLENGE_BASELINE = Baseline(159e6, 318e6, "challenge")
"""The challenge's WikiText-103 LSTM baseline: 159M parameters, 318M ops per token."""


def micronet_score(params: float, ops: float, baseline: Baseline = CHALLENGE_BASELINE) -> float:
    """``params / baseline.params + ops / baseline.ops``; lower is better."""
    if not isinstance(baseline, Baseline):
        raise UsageError(f"baseline must be a Baseline, got {type(baseline).__name__}")
    for value, what in ((params, "params"), (ops, "ops")):
        if isinstance(value, bool) or not isinstance(value, Real) or value < 0:
            raise UsageError(f"{what} {value!r} must be a number >= 0")
    return float(params) / baseline.params + float(ops) / baseline.ops
