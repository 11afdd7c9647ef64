"""Staged evaluation: a trial read on the first windows only (a screen), and a survivor continued
on the rest from where its screen stopped.

A sampler asks for a stage by giving the trial the user attribute ``stage`` (`Stage.attr`); the
loop then evaluates only those windows, in the stop rule's reading order (a systematic sample
across the split, so a longer prefix extends a shorter one), and records a screen as PRUNED with
its perplexity (and KL) on the windows read and their per-window sums. A continuation names the
trial it continues and reads the windows after it; once every window is read the trial is
COMPLETE with the perplexity of all of them, exactly the whole evaluation's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SCREENED_ATTR", "STAGE_ATTR", "Stage"]

STAGE_ATTR = "stage"
"""The user attribute a sampler sets to stage a trial: {"read": k, "continues": m, "start": j}."""
SCREENED_ATTR = "screened_windows"
"""The user attribute of a screened trial: how many windows it read (never a complete trial)."""


@dataclass
class Stage:
    """Read the first `read` windows of the reading order; a continuation of trial `continues`
    (which read the first `start`) reads only the ones after. `prior` is filled by the loop with
    the continued trial's per-window sums."""

    read: int
    continues: int | None = None
    start: int = 0
    prior: dict[str, Any] | None = None

    @classmethod
    def of(cls, attrs: Mapping[str, Any], n_windows: int) -> Stage | None:
        """The stage a trial's user attributes ask for (None: a whole evaluation as usual)."""
        raw = attrs.get(STAGE_ATTR)
        if not raw or n_windows < 1:
            return None
        read = max(1, min(int(raw["read"]), n_windows))
        start = int(raw.get("start", 0)) if raw.get("continues") is not None else 0
        if not 0 <= start < read:
            return None  # nothing left to read: evaluated whole instead
        return cls(read, raw.get("continues"), start)

    def attr(self) -> dict[str, Any]:
        """The user attribute that asks for this stage."""
        out: dict[str, Any] = {"read": self.read}
        if self.continues is not None:
            out.update(continues=self.continues, start=self.start)
        return out

    def windows(self, n_windows: int) -> list[int]:
        """The window indices this stage evaluates itself."""
        from microsweep.score import subset_windows

        return subset_windows(n_windows, self.read)[self.start :]

    def reason(self, perplexity: float, kl: float | None, n_windows: int) -> str:
        """The stored reason of a screen: what it read and measured there."""
        kl_s = f", KL {kl:.4g} nats/token" if kl is not None else ""
        return (
            f"screened on {self.read} of {n_windows} windows: perplexity {perplexity:.4g}"
            f"{kl_s} there"
        )
