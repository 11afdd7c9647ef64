"""Early stopping: evaluate a trial's windows in chunks and stop once its perplexity cannot
plausibly meet the ceiling.

The rule compares each window's NLL with the dense model's on the same window, so that how hard a
window's text is cancels out and only the compression's excess remains. Chunks take every k-th
window (a systematic sample across the split), so a stop never rests on one stretch of text. With
E the total excess the ceiling allows, a trial stops after a chunk when

    observed excess + n_rest * (mean excess - z * sd * sqrt(1/n_seen + 1/n_rest)) > E

that is, when even a z-standard-error optimistic guess for the unseen windows cannot bring it
under the ceiling. z = 4 keeps false stops of trials that end feasible out of reach in practice;
`tests/test_early_stop.py` replays the rule on recorded trials to check it.

`subset_windows` gives the first k windows in the same chunk order, for evaluations that read a
subset of the windows (a trial screened on a few, then continued on the rest).

`FineTuneCurve` applies the same ceiling, through `StopRule.log_ceiling`, to recovery
fine-tuning: it measures a fixed subset of the windows at chosen steps and cuts a fine-tune that
cannot recover.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from microsweep.errors import UsageError
from microsweep.score._perplexity import nll_to_perplexity, window_nll

__all__ = [
    "FT_EVAL_WINDOWS",
    "MIN_WINDOWS",
    "ChunkVerdict",
    "EarlyStop",
    "FineTuneCurve",
    "StopRule",
    "subset_windows",
]

MIN_WINDOWS = 16
"""Windows read before any stop: the spread of the excess needs a sample to rest on."""


@dataclass(frozen=True)
class ChunkVerdict:
    """The rule's reading after a chunk: the projected final perplexity (observed excess per
    window carried to the unseen ones), an optimistic bound on it, and whether to stop."""

    seen: int
    projected: float
    optimistic: float
    stop: bool


@dataclass(frozen=True)
class StopRule:
    """Chunked evaluation against a perplexity ceiling.

    - `dense_nll`: the dense model's summed NLL per evaluation window, in window order;
    - `tokens_per_window`: predicted tokens per window;
    - `ceiling`: the perplexity a trial must not exceed;
    - `chunks`: how many chunks the windows are read in (chunk c holds windows c, c+k, ...);
    - `z`: how many standard errors of optimism the unseen windows get before a stop;
    - `min_fraction`: the share of windows read before any stop (and never fewer than
      `MIN_WINDOWS`).
    """

    dense_nll: tuple[float, ...]
    tokens_per_window: int
    ceiling: float
    chunks: int = 8
    z: float = 4.0
    min_fraction: float = 0.25

    def __post_init__(self) -> None:
        if not self.dense_nll:
            raise UsageError("StopRule: dense_nll is empty; it needs one value per window")
        if not (isinstance(self.chunks, int) and self.chunks >= 1):
            raise UsageError(f"StopRule: chunks={self.chunks!r} must be an int >= 1")
        if not (math.isfinite(self.ceiling) and self.ceiling > 0):
            raise UsageError(f"StopRule: ceiling {self.ceiling!r} must be a positive number")
        if not self.z >= 0:
            raise UsageError(f"StopRule: z={self.z!r} must be >= 0")
        if not 0.0 <= self.min_fraction <= 1.0:
            raise UsageError(f"StopRule: min_fraction={self.min_fraction!r} must be in [0, 1]")

    @property
    def n_windows(self) -> int:
        """Evaluation windows the rule was measured on."""
        return len(self.dense_nll)

    @property
    def log_ceiling(self) -> float:
        """log(ceiling): the mean NLL per token a trial must not exceed. The rule and the
        fine-tuning curve both compare against it."""
        return math.log(self.ceiling)

    def chunk_indices(self) -> list[list[int]]:
        """Window indices of each chunk: chunk c holds windows c, c + k, c + 2k, ..."""
        return _chunks(self.n_windows, self.chunks)

    def allowed_excess(self) -> float:
        """The total NLL above the dense model's that still meets the ceiling."""
        tokens = self.n_windows * self.tokens_per_window
        return tokens * self.log_ceiling - math.fsum(self.dense_nll)

    def verdict(self, indices: Sequence[int], nll: Sequence[float] | torch.Tensor) -> ChunkVerdict:
        """Read the windows seen so far (`indices` with their summed `nll`) and decide."""
        n = self.n_windows
        seen = len(indices)
        values = torch.as_tensor(nll, dtype=torch.float64).reshape(-1)
        if values.numel() != seen or seen == 0:
            raise UsageError("StopRule.verdict needs one NLL per seen window, and at least one")
        dense = torch.tensor([self.dense_nll[i] for i in indices], dtype=torch.float64)
        excess = values - dense
        tokens = n * self.tokens_per_window
        dense_total = math.fsum(self.dense_nll)
        rest = n - seen
        observed = float(excess.sum())
        if not math.isfinite(observed):  # NaN or inf never recovers: stop at once
            return ChunkVerdict(seen, math.inf, math.inf, True)
        mean = observed / seen
        projected = math.exp(min((dense_total + observed + rest * mean) / tokens, 700.0))
        if rest == 0:
            return ChunkVerdict(seen, projected, projected, False)
        sd = float(excess.std(unbiased=True)) if seen > 1 else math.inf
        optimistic_rest = rest * (mean - self.z * sd * math.sqrt(1 / seen + 1 / rest))
        bound = observed + optimistic_rest
        optimistic = math.exp(min((dense_total + bound) / tokens, 700.0))
        enough = seen >= max(self.min_fraction * n, MIN_WINDOWS)
        stop = enough and bound > self.allowed_excess()
        return ChunkVerdict(seen, projected, optimistic, stop)


def _chunks(n_windows: int, chunks: int) -> list[list[int]]:
    """The stop rule's chunks of `n_windows` windows: chunk c holds windows c, c + k, ... with
    k = min(chunks, n_windows)."""
    k = min(chunks, n_windows)
    return [list(range(c, n_windows, k)) for c in range(k)]


def subset_windows(n_windows: int, k: int, chunks: int = 8) -> list[int]:
    """The first `k` windows (all of them when `k` >= `n_windows`) in the stop rule's reading
    order: chunk 0 (windows 0, c, 2c, ...), then chunk 1, ..., for c = `chunks`. A prefix of
    that order is a systematic sample across the split, so every caller that evaluates "the
    first k windows" of a trial reads the same ones, and a later prefix extends an earlier."""
    for value, what in ((n_windows, "n_windows"), (k, "k"), (chunks, "chunks")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"subset_windows: {what}={value!r} must be an int >= 1")
    order = [i for chunk in _chunks(n_windows, chunks) for i in chunk]
    return order[:k]


FT_EVAL_WINDOWS = 32
"""Evaluation windows in the fine-tuning curve's subset (`finetune_eval_every`): every m-th
window, m = n // 32 (all of them when there are fewer), so it samples the whole split. A point
costs 32 window forwards without gradients, about one training step of 8 windows (forward and
backward), so k = 10 adds roughly a tenth to fine-tuning time."""


@dataclass(frozen=True)
class EarlyStop:
    """Where a trial's reading ended early: the projected final perplexity, the optimistic
    bound the decision rested on, the windows read of all, and the fine-tuning step when it was
    the fine-tune that was cut (None when evaluation stopped)."""

    projected: float
    optimistic: float
    windows_seen: int
    windows: int
    step: int | None = None


class FineTuneCurve:
    """The fine-tuning curve: perplexity on a fixed subset of the evaluation windows at chosen
    steps, and the decision to cut a fine-tune that cannot recover.

    The cut reuses the stop rule's ceiling and its optimistic bound. At a point after at least
    half the steps and with two earlier points, take the rule's optimistic estimate of the
    full-split perplexity from the subset (z standard errors of luck on the unseen windows),
    and lower it further by the recent rate of improvement (the drop in log perplexity per step
    since two points back) carried over every remaining step. If even that stays above the
    ceiling, the fine-tune is cut. Fine-tuning gains shrink as it goes, so carrying the recent
    rate forward overstates what is left to gain: the rule errs towards letting a trial finish.
    A non-finite subset perplexity (the training diverged) cuts at once, at any step.
    """

    def __init__(
        self,
        windows: torch.Tensor,
        batch_size: int | None,
        rule: StopRule | None,
        steps: int,
        early_stop: bool,
        *,
        memory_bytes: int | None = None,
    ) -> None:
        n = windows.shape[0]
        size = min(n, FT_EVAL_WINDOWS)
        every = n // size
        self.indices = list(range(0, every * size, every))
        self.windows = windows[self.indices]
        self.tokens = size * (windows.shape[1] - 1)
        self.batch_size = batch_size  # None: chosen from `memory_bytes` (see `window_nll`)
        self.memory_bytes = memory_bytes
        self.rule = rule
        self.steps = steps
        self.may_cut = early_stop and rule is not None
        self.points: list[list[float]] = []  # [step, subset perplexity]
        self.projected: list[float] = []  # the rule's full-split estimate at each point
        self.stopped: EarlyStop | None = None

    def add(self, model: nn.Module, step: int) -> bool:
        """Measure the model at `step`; True when fine-tuning should end here."""
        nll = window_nll(
            model, self.windows, batch_size=self.batch_size, memory_bytes=self.memory_bytes
        )
        ppl = nll_to_perplexity(float(nll.sum()), self.tokens)
        self.points.append([step, ppl])
        if self.rule is None:
            return False
        verdict = self.rule.verdict(self.indices, nll)
        self.projected.append(verdict.projected)
        if not self.may_cut or step >= self.steps:
            return False
        if not math.isfinite(ppl):  # diverged (NaN, or a mean NLL past float range): no way back
            return self._cut(step, math.inf, math.inf)
        if 2 * step < self.steps or len(self.points) < 3 or verdict.optimistic <= 0:
            return False
        back = self.points[-3][0]
        rate = max(0.0, math.log(self.projected[-3] / verdict.projected) / (step - back))
        best = math.log(verdict.optimistic) - rate * (self.steps - step)
        if best <= self.rule.log_ceiling:
            return False
        return self._cut(step, verdict.projected, math.exp(best))

    def _cut(self, step: int, projected: float, optimistic: float) -> bool:
        """Record the cut at `step` and say so."""
        windows = self.rule.n_windows if self.rule is not None else len(self.indices)
        self.stopped = EarlyStop(projected, optimistic, len(self.indices), windows, step)
        return True
