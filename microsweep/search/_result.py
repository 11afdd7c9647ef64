"""`SweepResult`: what a run or resume did, and the fold of finished trials into its best
feasible and best uniform figures (and, when there is none, why)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microsweep.storage import Store

from microsweep.storage._records import best_by

__all__ = ["SweepResult", "best_by", "cache_line", "cache_summary", "tally_best"]


@dataclass
class SweepResult:
    """What a run or resume did: trial counts by state and the best feasible trial."""

    name: str
    states: dict[str, int] = field(default_factory=dict)
    best_number: int | None = None
    best_score: float | None = None
    best_perplexity: float | None = None
    wall: float = 0.0
    driver_ms_per_trial: float = 0.0
    sampler_ms_per_trial: float = 0.0
    best_uniform_number: int | None = None
    best_uniform_score: float | None = None
    best_uniform_perplexity: float = float("inf")
    eval_seconds: float = 0.0
    eval_seconds_saved: float = 0.0
    sensitivity: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timed_out: bool = False  # the time budget ended the run before its target
    already_done: bool = False  # a resume that found the target reached: nothing ran
    infeasible_notes: list[str] = field(default_factory=list)
    """Without a feasible trial, why: the nearest trial against the ceiling and the knobs that
    cost it the most (`explain_infeasible`); empty otherwise."""
    by: str = "score"
    """What the best feasible trial has least of (`best_by`): "score" or "perplexity"."""
    cache: dict[str, Any] = field(default_factory=dict)
    """The workers' variant caches over this run's trials (`cache_summary`): layer variants
    found (`hits`) and built (`misses`), `reused` (hits over both, None without any), the most
    bytes a cache held (`peak_bytes`) and the largest budget (`max_bytes`); empty when no trial
    used one."""

    def consider(self, number: int, state: str, origin: str | None, score: Any, row: Any) -> None:
        """Fold one finished trial into the best feasible (and best uniform) figures; `row` is
        a `TrialRecord` or a stored trial row (both have `feasible` and `perplexity`)."""
        if state != "COMPLETE" or not row.feasible:
            return
        if self.by == "perplexity":
            better = self.best_perplexity is None or row.perplexity < self.best_perplexity
        else:
            better = self.best_score is None or score < self.best_score
        if better:
            self.best_number, self.best_score = number, score
            self.best_perplexity = row.perplexity
        if origin == "uniform" and (
            self.best_uniform_score is None
            or (
                row.perplexity < self.best_uniform_perplexity
                if self.by == "perplexity"
                else score < self.best_uniform_score
            )
        ):
            self.best_uniform_number, self.best_uniform_score = number, score
            self.best_uniform_perplexity = row.perplexity

    def explain_infeasible(self, store: Store) -> list[str]:
        """Fill `infeasible_notes` from the sweep's stored trials when it has no feasible trial
        (left empty otherwise) and return them."""
        from microsweep.search._nearest import explain_infeasible

        self.infeasible_notes = (
            [] if self.best_number is not None else (explain_infeasible(store, self.name))
        )
        return self.infeasible_notes


def tally_best(result: SweepResult, rows: Sequence[Any]) -> None:
    """Fold stored trial rows into `result`'s best feasible and best uniform figures."""
    for row in rows:
        result.consider(row.number, row.state, row.origin, row.score, row)


def cache_summary(uses: Sequence[Any]) -> dict[str, Any]:
    """The sum of trials' `CacheUse`s (None entries skipped) as `SweepResult.cache` keeps it;
    empty when no trial used a cache."""
    uses = [u for u in uses if u is not None]
    if not uses:
        return {}
    hits = sum(u.hits for u in uses)
    misses = sum(u.misses for u in uses)
    return {
        "hits": hits,
        "misses": misses,
        "reused": hits / (hits + misses) if hits + misses else None,
        "trials": len(uses),
        "peak_bytes": max(u.nbytes for u in uses),
        "max_bytes": max(u.max_bytes for u in uses),
    }


def cache_line(cache: dict[str, Any]) -> str:
    """One line for `cache_summary`: the share of layer variants reused and the memory held,
    as 'cache: 93% of layer variants reused (1,234 of 1,327), 412 MiB of 2,048 MiB per
    worker'."""
    hits, looked = cache["hits"], cache["hits"] + cache["misses"]
    share = f"{100 * cache['reused']:.0f}%" if cache["reused"] is not None else "none"
    peak, budget = cache["peak_bytes"] / 2**20, cache["max_bytes"] / 2**20
    return (
        f"cache: {share} of layer variants reused ({hits:,} of {looked:,}), {peak:,.0f} MiB "
        f"of {budget:,.0f} MiB per worker"
    )
