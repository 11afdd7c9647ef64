"""`TrialRecord`: one finished trial as the store writes it (its columns and its layer rows).

The driver builds it in one place from a worker's result; `Store.record_trial` writes it and the
spool keeps it as JSON while the database is away, so its fields are the table's columns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["TrialRecord", "best_by"]


@dataclass
class TrialRecord:
    """The columns of one `microsweep_trials` row (less its ids and finish time) and its
    per-layer rows (`layers`: the counter's rows, one `microsweep_layers` row each)."""

    state: str  # COMPLETE, PRUNED or FAIL
    policy: dict[str, Any]
    summary: str = ""
    origin: str | None = None
    reason: str | None = None
    worker: str | None = None
    score: float | None = None
    perplexity: float | None = None  # the projection, for a PRUNED trial
    params: float | None = None
    ops: float | None = None
    feasible: bool | None = None
    freebie: bool | None = None
    count_config: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def failed(
        cls,
        reason: str | None,
        *,
        policy: dict[str, Any] | None = None,
        summary: str = "",
        origin: str | None = None,
        worker: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> TrialRecord:
        """A FAIL with its reason: every record starts here (a measured trial is then judged
        into COMPLETE or PRUNED by the driver), so one constructor makes them all."""
        return cls(
            state="FAIL",
            policy=policy if policy is not None else {},
            summary=summary,
            origin=origin,
            reason=reason,
            worker=worker,
            timings=dict(timings or {}),
        )

    def columns(self) -> dict[str, Any]:
        """The trial row's columns (everything but `layers`), by reference: no copy of the
        policy or timings on the driver's path."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layers"}

    def to_json(self) -> dict[str, Any]:
        """Every field as plain JSON values (a copy), for the spool file."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialRecord:
        """A record from `to_json`'s output; keys it does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def best_by(objective: Any) -> str:
    """What a sweep's best feasible trial has least of: its score, or in the budget form
    (`MicroNet(score_budget=...)`) its perplexity. Takes a `MicroNet` or its stored JSON."""
    if isinstance(objective, dict):
        budget = objective.get("score_budget")
    else:
        budget = getattr(objective, "score_budget", None)
    return "perplexity" if budget is not None else "score"
