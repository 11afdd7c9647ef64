"""`TrialResult`: what a worker returns for one trial, typed, built only by the runner.

The pool hands it to the driver unchanged (Ray pickles it), and the driver turns it into the
`TrialRecord` the store writes. A trial's own failure is a result with ``status="error"``, never
an exception, so one bad policy cannot stop a sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["CacheUse", "TrialResult"]

Status = Literal["ok", "pruned", "error"]


@dataclass(frozen=True)
class CacheUse:
    """A trial's use of its worker's variant cache: the layer variants it found there (`hits`)
    and those it built or read from the level store (`misses`), then the bytes the cache holds
    and its budget."""

    hits: int
    misses: int
    nbytes: int
    max_bytes: int


@dataclass
class TrialResult:
    """One evaluated policy: status, perplexity (or, stopped early, its projection), counts,
    per-layer rows and timings. Fields that do not apply to the status stay None or empty."""

    number: int
    status: Status
    error: str | None = None  # why, for status "error"
    perplexity: float | None = None  # status "ok"
    # status "pruned": the projection the stop rule acted on, the best it could still reach,
    # and how far evaluation got
    perplexity_estimate: float | None = None
    optimistic_perplexity: float | None = None
    windows_seen: int | None = None
    windows: int | None = None
    intermediate: list[float] = field(default_factory=list)  # chunk projections, in order
    finetune_curve: list[list[float]] | None = None  # [step, subset perplexity]
    finetune_stopped_at: int | None = None  # fine-tuning ended early at this step
    params: float | None = None  # counted, when the model got as far as counting
    ops: float | None = None
    freebie: bool | None = None
    count_config: dict[str, Any] | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)  # LayerCount.to_json() rows
    window_nll: list[float] | None = None  # per-window NLL sums, when the caller asked
    # the window indices a subset evaluation read (perplexity and window_nll are theirs, in
    # this order); None for an evaluation of every window
    evaluated: list[int] | None = None
    # with a KL reference: mean KL(dense || trial) per token over the windows evaluated (those
    # read, for a trial stopped early), and per-window KL sums beside `window_nll`
    kl: float | None = None
    window_kl: list[float] | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, >= 0
    worker: str | None = None  # node, process and threads
    cache: CacheUse | None = None  # when the trial's model came from the worker's variant cache

    @property
    def ok(self) -> bool:
        """Evaluated in full (not stopped early, not failed)."""
        return self.status == "ok"

    @property
    def measured_perplexity(self) -> float | None:
        """The perplexity a trial is judged by: measured, or projected when stopped early."""
        return self.perplexity_estimate if self.status == "pruned" else self.perplexity
