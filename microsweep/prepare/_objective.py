"""`MicroNet`: the objective — MicroNet score under a perplexity ceiling, one or two objectives."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from microsweep.errors import SpaceError

__all__ = ["Ceiling", "MicroNet", "PLANNING_FACTOR_WITHOUT_CEILING", "SELECT_BY"]

SELECT_BY = ("perplexity", "kl")
"""What `MicroNet.select_by` may name: the measure trials are ranked by besides their cost."""

SCORE_TOLERANCE = 1e-9
"""Relative slack of every comparison against a score budget: a policy's score summed from its
layers' counts and counted on the whole model can differ in the last bits."""

PLANNING_FACTOR_WITHOUT_CEILING = 1.05
"""Without a perplexity ceiling every trial is feasible, but a planned sampler still needs a loss
budget to allocate: it plans for at most this factor over the dense model's perplexity (and says
so when the sweep starts)."""


@dataclass(frozen=True)
class Ceiling:
    """A sweep's perplexity ceiling resolved against its dense model: every form the search needs
    (Optuna's constraint value, feasibility, the early-stop ceiling, the planner's NLL budget) is
    derived here and nowhere else. `value` None: no ceiling, every trial feasible."""

    value: float | None
    dense_perplexity: float

    def constraint(self, perplexity: float) -> float:
        """Optuna's constraint value for a trial of `perplexity`: feasible when <= 0."""
        return 0.0 if self.value is None else perplexity - self.value

    def feasible(self, perplexity: float) -> bool:
        """Whether a fully evaluated trial of `perplexity` meets the ceiling."""
        return self.value is None or perplexity <= self.value

    @property
    def planning_ceiling(self) -> float:
        """The perplexity a planned sampler allocates against (see
        `PLANNING_FACTOR_WITHOUT_CEILING` when there is no ceiling)."""
        if self.value is not None:
            return self.value
        return PLANNING_FACTOR_WITHOUT_CEILING * self.dense_perplexity

    @property
    def dense_nll(self) -> float:
        """The dense model's mean NLL per token (log of its perplexity)."""
        return math.log(self.dense_perplexity)

    def nll_budget(self) -> float:
        """The mean NLL per token a policy may add to the dense model's and still plan under
        the ceiling: log(ceiling) - log(dense perplexity); <= 0 when no compression fits."""
        return math.log(self.planning_ceiling) - self.dense_nll


@dataclass(frozen=True)
class MicroNet:
    """Minimize P/P_base + O/O_base subject to perplexity <= ceiling.

    - `perplexity_ceiling`: absolute, or a factor of the dense model's perplexity when
      ``relative_to="dense"`` (1.05 = at most 5% worse); None for no ceiling.
    - `baseline`: ``"challenge"`` (159M parameters, 318M ops) or ``"dense"`` (the user's model).
    - `objectives`: ``"score"`` (one objective, ceiling as an Optuna constraint) or
      ``"score+perplexity"`` (two objectives, the ceiling still marks feasibility).
    - `eval_tokens`, `window`: perplexity is measured on the first `eval_tokens` tokens of the
      validation split in non-overlapping windows of `window` (default: the model's block size).
    - `count`: options of the MicroNet counter (`microsweep.score.CountConfig` fields).
    - `early_stop`: read the evaluation windows in chunks and end a trial PRUNED once its
      perplexity cannot plausibly meet the ceiling (see `microsweep.score.StopRule`); needs a
      ceiling and the built-in perplexity.
    - `uncounted_tolerance`: math the forward pass executes in modules no counting rule covers
      (checked once on the dense model) is an error by default; a fraction such as 0.01 accepts
      that much of the counted operations with a warning instead.
    - `select_by`: the measure of a trial's quality samplers may rank by: ``"perplexity"``,
      or ``"kl"``, the mean KL divergence per token of the
      trial's next-token distributions from the dense model's on the same windows, then
      measured and recorded for every trial (its ``kl`` attribute; needs the built-in
      perplexity). The ceiling is judged on perplexity either way.
    - `score_budget`: the other form of the problem (EvoPress's): least perplexity among
      policies whose MicroNet score is at most this, the ceiling (if any) still a constraint.
      The study's objective is then the perplexity, a trial over the budget is infeasible, and
      samplers that rank candidates (`evo`, `evopress`) rank them by `select_by`.
    """

    perplexity_ceiling: float | None = None
    relative_to: Literal["dense"] | None = None
    baseline: Literal["challenge", "dense"] = "challenge"
    objectives: Literal["score", "score+perplexity"] = "score"
    eval_tokens: int = 8192
    window: int | None = None
    calib_tokens: int = 2048
    count: dict[str, Any] = field(default_factory=dict)
    early_stop: bool = True
    uncounted_tolerance: float = 0.0
    select_by: Literal["perplexity", "kl"] = "perplexity"
    score_budget: float | None = None

    def __post_init__(self) -> None:
        c = self.perplexity_ceiling
        if c is not None and (not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0):
            raise SpaceError(
                f"MicroNet: perplexity_ceiling {c!r} must be a positive number or None"
            )
        if self.relative_to not in (None, "dense"):
            raise SpaceError(f"MicroNet: relative_to {self.relative_to!r} must be 'dense' or None")
        if self.relative_to == "dense" and c is not None and c < 1.0:
            raise SpaceError(f"MicroNet: a relative ceiling {c} below 1.0 excludes the dense model")
        if self.relative_to == "dense" and c is None:
            raise SpaceError("MicroNet: relative_to='dense' needs a perplexity_ceiling factor")
        if self.baseline not in ("challenge", "dense"):
            raise SpaceError(f"MicroNet: baseline {self.baseline!r} must be 'challenge' or 'dense'")
        if self.objectives not in ("score", "score+perplexity"):
            raise SpaceError(
                f"MicroNet: objectives {self.objectives!r} must be 'score' or 'score+perplexity'"
            )
        if not isinstance(self.eval_tokens, int) or self.eval_tokens < 16:
            raise SpaceError(f"MicroNet: eval_tokens {self.eval_tokens!r} must be an int >= 16")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 2):
            raise SpaceError(f"MicroNet: window {self.window!r} must be an int >= 2")
        t = self.uncounted_tolerance
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
            raise SpaceError(
                f"MicroNet: uncounted_tolerance {t!r} must be a fraction in [0, 1) of the "
                "counted operations"
            )
        if self.select_by not in SELECT_BY:
            raise SpaceError(f"MicroNet: select_by {self.select_by!r} must be 'perplexity' or 'kl'")
        b = self.score_budget
        if b is not None and (
            isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0
        ):
            raise SpaceError(f"MicroNet: score_budget {b!r} must be a positive number or None")
        if b is not None and self.objectives != "score":
            raise SpaceError(
                "MicroNet: score_budget fixes the score, so the objective is the perplexity "
                "alone; leave objectives='score'"
            )
        if not isinstance(self.early_stop, bool):
            raise SpaceError(f"MicroNet: early_stop {self.early_stop!r} must be True or False")
        from microsweep.score import CountConfig

        try:
            CountConfig(**self.count)
        except TypeError as exc:
            raise SpaceError(f"MicroNet: count options are wrong ({exc})") from None

    @property
    def wants_kl(self) -> bool:
        """Whether a sweep measures every trial's KL from the dense model (`select_by="kl"`)."""
        return self.select_by == "kl"

    @property
    def budgeted(self) -> bool:
        """The EvoPress form: least perplexity at a score of at most `score_budget`."""
        return self.score_budget is not None

    def value(self, score: float, perplexity: float) -> float:
        """The single objective a trial is told with: its score, or in the budget form its
        perplexity."""
        return perplexity if self.budgeted else score

    def within_budget(self, score: float) -> bool:
        """Whether a trial's score meets the score budget (always, without one)."""
        return self.score_constraint(score) <= 0

    def score_constraint(self, score: float) -> float:
        """Optuna's constraint value of a trial's score against the budget: <= 0 within it
        (with `SCORE_TOLERANCE`); 0 without a budget."""
        if self.score_budget is None:
            return 0.0
        return score - self.score_budget * (1 + SCORE_TOLERANCE)

    @property
    def multi(self) -> bool:
        """Two objectives (score and perplexity) rather than the score alone."""
        return self.objectives == "score+perplexity"

    def bound(self, dense_perplexity: float) -> Ceiling:
        """The sweep's `Ceiling` for a dense model of `dense_perplexity`."""
        return Ceiling(self.ceiling(dense_perplexity), float(dense_perplexity))

    def baseline_for(self, dense_params: float, dense_ops: float) -> tuple[str, float, float]:
        """(name, parameters, operations) the score normalizes by: the challenge's fixed
        baseline, or the dense model's own counts."""
        if self.baseline == "dense":
            return "dense", float(dense_params), float(dense_ops)
        from microsweep.score import CHALLENGE_BASELINE as base

        return base.name, float(base.params), float(base.ops)

    def ceiling(self, dense_perplexity: float) -> float | None:
        """The absolute perplexity ceiling for a dense model of `dense_perplexity`."""
        if self.perplexity_ceiling is None:
            return None
        if self.relative_to == "dense":
            return float(self.perplexity_ceiling) * dense_perplexity
        return float(self.perplexity_ceiling)

    @property
    def directions(self) -> list[str]:
        return ["minimize", "minimize"] if self.multi else ["minimize"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MicroNet:
        """The objective stored with a sweep (older sweeps lack later fields: defaults, so an
        objective stored before `select_by` selects by perplexity)."""
        return cls(**data)
