"""`Planner`: from a space, its exact option costs and a sensitivity table, to whole policies.

The planner predicts a policy's loss as the sum over units of the measured single-knob losses
times each option's interaction ratio (see `_options`), split by knob so that per-knob weights
can correct it, and allocates by solving the multiple-choice knapsack once per counting mode:
a policy either keeps every width at 16 bits or more (and is counted with the 16-bit
allowance) or does not, so the allowance cliff is two separate problems, never a surprise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from microsweep.allocate._knapsack import pareto_options, solve
from microsweep.allocate._levels import KNOBS, Probe, plan_levels, probes
from microsweep.allocate._options import (
    MODES,
    MapRunners,
    UnitOptions,
    build_options,
    option_tasks,
)
from microsweep.errors import UsageError
from microsweep.score import Baseline, CountConfig, count
from microsweep.spaces import Policy, Space

__all__ = [
    "PAIRS",
    "Correction",
    "Plan",
    "Planner",
    "SensitivityTable",
    "fit_correction",
    "fit_interactions",
    "fit_weights",
]

PAIRS: tuple[tuple[int, int], ...] = tuple(itertools.combinations(range(len(KNOBS)), 2))
"""Knob pairs (indices into `KNOBS`) whose interaction inside a unit the predictor can learn."""
CENSOR = 4.0
"""A measured loss past this many NLL budgets counts as this many: a model that broke says the
plan cost at least that much, not how much more (so one broken trial cannot swamp a fit)."""


@dataclass
class SensitivityTable:
    """Measured single-knob losses: the dense model's mean NLL per token and, for each
    (layer, knob, level key), the mean NLL per token with that one change."""

    dense_nll: float
    entries: dict[tuple[str, str, str], float] = field(default_factory=dict)

    def loss(self, layer: str, knob: str, key: str | None) -> float:
        """NLL increase of one probe (0 for the identity level; never below 0)."""
        if key is None:
            return 0.0
        try:
            nll = self.entries[(layer, knob, key)]
        except KeyError:
            raise UsageError(
                f"the sensitivity table has no entry for {layer} {knob}={key}; run the "
                "sensitivity pass for this space"
            ) from None
        if not math.isfinite(nll):
            return math.inf
        return max(0.0, nll - self.dense_nll)


@dataclass(frozen=True)
class Plan:
    """One option per unit (`choice`), the counting mode it falls in, its exact score and its
    predicted NLL increase (None without a sensitivity table)."""

    choice: tuple[int, ...]
    mode: str
    score: float
    loss: float | None


@dataclass(frozen=True)
class Correction:
    """What measured trials teach the predictor: per-unit, per-knob multipliers of the measured
    single-knob losses, `unit` (U, K), and one weight per knob pair in `PAIRS`, `pairs` (P,), on
    the interaction feature sqrt(loss_a * loss_b) of each unit where both knobs act, so two
    knobs that hurt more together than apart are charged for it in every later plan."""

    unit: np.ndarray
    pairs: np.ndarray

    @classmethod
    def identity(cls, units: int) -> Correction:
        """The uncorrected predictor: every multiplier 1, no interaction."""
        return cls(np.ones((units, len(KNOBS))), np.zeros(len(PAIRS)))

    def scaled(self, knob_weights: np.ndarray) -> Correction:
        """The same correction with every unit's knob multipliers times `knob_weights` (K,)."""
        return Correction(self.unit * np.asarray(knob_weights)[None, :], self.pairs)


def _censor(measured: np.ndarray, predicted: np.ndarray, budget: float) -> np.ndarray:
    """Rows to keep and their measured losses with the ones past `CENSOR` budgets capped there;
    a row whose uncorrected prediction is already past the cap teaches nothing and is dropped."""
    cap = CENSOR * max(budget, 1e-12)
    y = np.asarray(measured, dtype=np.float64).reshape(-1).copy()
    keep = np.isfinite(predicted) & ~np.isnan(y)
    over = ~(y <= cap)  # inf and NaN included
    keep &= ~(over & (predicted >= cap))
    y[over] = cap
    return keep, y


def _ridge(x: np.ndarray, y: np.ndarray, prior: np.ndarray, strength: float) -> np.ndarray:
    """Least squares of `y` on the columns of `x`, pulled toward `prior` with the weight of
    `strength` rows (each column scaled by its mean square, so the pull is unit-free); the
    prior where the solve is not finite."""
    scale = (x**2).mean(axis=0) if len(x) else np.zeros(x.shape[1])
    scale = np.where(scale > 0, scale, 1.0)
    lhs = x.T @ x + strength * np.diag(scale)
    rhs = x.T @ y + strength * scale * prior
    w = np.linalg.solve(lhs, rhs)
    return np.where(np.isfinite(w), w, prior)


def fit_weights(
    features: np.ndarray, measured: np.ndarray, budget: float, *, strength: float = 1.0
) -> np.ndarray:
    """Per-knob multipliers of the predicted loss that best explain measured losses.

    Ridge regression of measured NLL increases on the per-knob predicted parts, pulled toward 1
    (the uncorrected prediction) with the weight of `strength` trials; a measured loss past
    `CENSOR` budgets counts as that many (see `_censor`).
    """
    features = np.asarray(features, dtype=np.float64).reshape(-1, len(KNOBS))
    keep, measured = _censor(measured, features.sum(axis=1), budget)
    keep &= np.isfinite(features).all(axis=1) & (features.sum(axis=1) > 0)
    weights = _ridge(features[keep], measured[keep], np.ones(len(KNOBS)), strength)
    return np.clip(weights, 0.1, 10.0)


def fit_correction(
    features: np.ndarray,
    measured: np.ndarray,
    budget: float,
    *,
    strength: float = 1.0,
    unit_strength: float = 4.0,
) -> np.ndarray:
    """Per-unit, per-knob multipliers (U, K) of the predicted loss, fit in two stages: per-knob
    weights over all units (`fit_weights`), then each unit's deviation from them, pulled back
    with the weight of `unit_strength` trials, so that a unit the predictor misjudges is
    corrected once trials show it and the rest keep the shared weights.

    `features` is (n, U, K): each trial's predicted loss split by unit and knob.
    """
    features = np.asarray(features, dtype=np.float64)
    n, units, knobs = features.shape
    shared = fit_weights(features.sum(axis=1), measured, budget, strength=strength)
    prior = np.tile(shared, units)
    keep, measured = _censor(measured, features.sum(axis=(1, 2)), budget)
    keep &= np.isfinite(features).reshape(n, units * knobs).all(axis=1)
    x = features.reshape(n, units * knobs)[keep]
    y = measured[keep]
    if len(y) == 0:
        return prior.reshape(units, knobs)
    weights = _ridge(x, y, prior, unit_strength)
    return np.clip(weights, 0.1, 10.0).reshape(units, knobs)


def fit_interactions(
    features: np.ndarray,
    pair_features: np.ndarray,
    measured: np.ndarray,
    budget: float,
    *,
    strength: float = 1.0,
    unit_strength: float = 4.0,
) -> Correction:
    """Per-knob weights and knob-pair interaction weights fit jointly on every measured trial,
    then each unit's deviation from the knob weights on what the pairs leave (as
    `fit_correction`): a plan that measured far over its additive prediction raises the weight
    of the pairs it combined (and of its knobs), so the next plans avoid the combination.

    `features` is (n, U, K) as for `fit_correction`, `pair_features` (n, P): each trial's
    summed sqrt(loss_a * loss_b) over its units, per pair in `PAIRS`. Knob weights are pulled
    toward 1 and pair weights toward 0 with the weight of `strength` trials; pair weights are
    never negative (a pair that helps is left to the per-knob weights)."""
    features = np.asarray(features, dtype=np.float64)
    pair_features = np.asarray(pair_features, dtype=np.float64).reshape(-1, len(PAIRS))
    n, units, knobs = features.shape
    if n == 0:
        return Correction.identity(units)
    keep, y = _censor(measured, features.sum(axis=(1, 2)), budget)
    keep &= np.isfinite(features).reshape(n, -1).all(axis=1)
    keep &= np.isfinite(pair_features).all(axis=1)
    x = np.concatenate([features.sum(axis=1), pair_features], axis=1)[keep]
    y = y[keep]
    prior = np.concatenate([np.ones(knobs), np.zeros(len(PAIRS))])
    if len(y) == 0:
        return Correction.identity(units)
    w = _ridge(x, y, prior, strength)
    pairs = np.clip(w[knobs:], 0.0, 20.0)
    # the knob weights again on what the pairs leave, over the same rows
    rest = y - pair_features[keep] @ pairs
    unit = fit_correction(
        features[keep], rest, budget, strength=strength, unit_strength=unit_strength
    )
    return Correction(unit, pairs)


class Planner:
    """Exact option costs for every unit of `space`; with a sensitivity table, predicted losses
    and allocations. `baseline` normalizes the score; `config` and `context` count it."""

    def __init__(
        self,
        space: Space,
        model: nn.Module,
        *,
        context: float,
        config: CountConfig,
        baseline: Baseline,
        calib: torch.Tensor | None = None,
        sparsity_levels: int = 11,
        rank_levels: int = 10,
        max_options: int = 4000,
        map_runners: MapRunners | None = None,
    ) -> None:
        """Levels per unit, then every unit's options (see `build_options`): in this process,
        or with `map_runners` (`WorkerPool.map_runners`) on the workers, one unit per call."""
        self.space = space
        self.units = space.units()
        self.config = config
        self.levels = {
            u.key: plan_levels(
                u,
                sparsity_levels=sparsity_levels,
                rank_levels=rank_levels,
                max_options=max_options,
            )
            for u in self.units
        }
        tasks = option_tasks(
            self.units,
            self.levels,
            model,
            context=context,
            config=config,
            baseline=baseline,
            calib=calib,
        )
        self.options: list[UnitOptions] = build_options(tasks, model, map_runners)
        self.totals = {}
        for mode in MODES:
            if mode == "freebie" and not config.freebie:
                continue
            counted = count(
                model, context=context, config=replace(config, freebie=mode == "freebie")
            )
            self.totals[mode] = counted.params / baseline.params + counted.ops / baseline.ops
        self.table: SensitivityTable | None = None
        self.parts: list[np.ndarray] | None = None
        self.pair_parts: list[np.ndarray] | None = None

    # -- sensitivity ---------------------------------------------------------------------------
    def probes(self) -> list[Probe]:
        """The single-knob measurements the predictor needs."""
        return probes(self.units, self.levels)

    def probe_priors(self) -> dict[tuple[str, str, str], float]:
        """Each probe's proxy error, (layer, knob, level key) -> the layer's relative output
        error with that knob alone at that level (where calibration inputs were given): what
        the sensitivity pass scales into a loss for the probes its budget leaves unmeasured."""
        out: dict[tuple[str, str, str], float] = {}
        for opts in self.options:
            for (mi, kn, i), err in opts.proxy.items():
                key = opts.keys.get((mi, kn, i))
                if key is not None:
                    out.setdefault((opts.unit.layers[mi].name, kn, key), float(err))
        return out

    def set_sensitivity(self, table: SensitivityTable) -> None:
        """Predicted per-knob losses of every option from measured single-knob losses."""
        parts = []
        for opts in self.options:
            part = np.zeros((len(opts), len(KNOBS)))
            for mi, info in enumerate(opts.unit.layers):
                for ki, kn in enumerate(opts.knobs):
                    j = KNOBS.index(kn)
                    per_level = np.array(
                        [
                            table.loss(info.name, kn, opts.keys[(mi, kn, i)])
                            for i in range(len(opts.levels[kn]))
                        ]
                    )
                    part[:, j] += opts.rho[:, mi] * per_level[opts.combos[:, ki]]
            parts.append(part)
        self.table, self.parts = table, parts
        self.pair_parts = [
            np.stack([np.sqrt(part[:, a] * part[:, b]) for a, b in PAIRS], axis=1) for part in parts
        ]

    # -- plans ---------------------------------------------------------------------------------
    def plan(self, choice: tuple[int, ...], weights: np.ndarray | Correction | None = None) -> Plan:
        """Score (exact) and predicted loss (per-knob or per-unit `weights`, or a `Correction`
        with its pair interactions) of one option per unit."""
        freebie = "freebie" in self.totals and all(
            np.isfinite(o.cost[c, 1]) for o, c in zip(self.options, choice, strict=True)
        )
        mode = "freebie" if freebie else "quantized"
        col = MODES.index(mode)
        score = self.totals[mode] + sum(
            float(o.cost[c, col]) for o, c in zip(self.options, choice, strict=True)
        )
        loss = None
        if self.parts is not None:
            losses = self._losses(weights)
            loss = float(sum(lo[c] for lo, c in zip(losses, choice, strict=True)))
        return Plan(tuple(int(c) for c in choice), mode, score, loss)

    def _losses(self, weights: np.ndarray | Correction | None) -> list[np.ndarray]:
        """Each unit's predicted loss per option under `weights` (see `plan`)."""
        if self.parts is None or self.pair_parts is None:
            raise UsageError("the planner has no sensitivity table yet")
        w = self._unit_weights(weights)
        losses = [p @ wu for p, wu in zip(self.parts, w, strict=True)]
        if isinstance(weights, Correction) and np.any(weights.pairs):
            losses = [lo + q @ weights.pairs for lo, q in zip(losses, self.pair_parts, strict=True)]
        return losses

    def _unit_weights(self, weights: np.ndarray | Correction | None) -> np.ndarray:
        """(units, knobs) weights from None (all 1), per-knob (K,), per-unit (U, K) or a
        `Correction`'s."""
        units = len(self.options)
        if isinstance(weights, Correction):
            weights = weights.unit
        if weights is None:
            return np.ones((units, len(KNOBS)))
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim == 1:
            return np.tile(w, (units, 1))
        if w.shape != (units, len(KNOBS)):
            raise UsageError(
                f"weights of shape {w.shape} fit neither ({len(KNOBS)},) nor "
                f"({units}, {len(KNOBS)})"
            )
        return w

    def features(self, choice: tuple[int, ...]) -> np.ndarray:
        """Predicted loss of a plan split by unit and knob: (units, `KNOBS`)."""
        if self.parts is None:
            raise UsageError("the planner has no sensitivity table yet")
        return np.stack([p[c] for p, c in zip(self.parts, choice, strict=True)])

    def pair_features(self, choice: tuple[int, ...]) -> np.ndarray:
        """A plan's interaction features: per pair in `PAIRS`, the sum over units of
        sqrt(loss_a * loss_b) of the unit's option (0 where a unit uses one knob of the pair)."""
        if self.pair_parts is None:
            raise UsageError("the planner has no sensitivity table yet")
        return np.sum([q[c] for q, c in zip(self.pair_parts, choice, strict=True)], axis=0)

    def allocate(
        self,
        budget: float,
        *,
        weights: np.ndarray | Correction | None = None,
        temperature: float = 0.0,
        rng: np.random.Generator | None = None,
        resolution: int = 2000,
        anchor: tuple[int, ...] | None = None,
        move_cost: float = 0.0,
    ) -> Plan | None:
        """The lowest-score plan whose predicted loss (per-knob or per-unit `weights`, each
        unit's loss scaled by exp(temperature * N(0, 1)) for variety) is within `budget`.

        With an `anchor` plan, moving a unit off the anchor's option costs `move_cost` more
        score while solving (not in the returned score): a trust region, so a plan near a
        measured one changes only the units where a move pays."""
        if self.parts is None:
            raise UsageError("allocation needs a sensitivity table; run the sensitivity pass")
        losses = self._losses(weights)
        if temperature > 0:
            rng = rng or np.random.default_rng()
            noise = np.exp(temperature * rng.standard_normal(len(losses)))
            losses = [loss * z for loss, z in zip(losses, noise, strict=True)]
        best: Plan | None = None
        best_key = math.inf
        for mode in self.totals:
            col = MODES.index(mode)
            costs = [o.cost[:, col] for o in self.options]
            if anchor is not None and move_cost > 0:
                costs = [c + move_cost for c in costs]
                for c, k in zip(costs, anchor, strict=True):
                    c[k] -= move_cost
            # each unit rounds its loss up by under one step: keep that well under the budget
            steps = max(resolution, 50 * len(costs))
            choice = solve(costs, losses, budget, resolution=steps)
            if choice is None:
                continue
            plan = self.plan(tuple(choice), weights)
            key = plan.score
            if anchor is not None:
                key += move_cost * sum(c != a for c, a in zip(plan.choice, anchor, strict=True))
            if best is None or key < best_key:
                best, best_key = plan, key
        return best

    def least_loss(
        self,
        score_budget: float,
        *,
        weights: np.ndarray | Correction | None = None,
        steps: int = 24,
    ) -> Plan | None:
        """The plan of least predicted loss whose score is at most `score_budget` (the dual of
        `allocate`): bisection on the loss budget, since a larger loss budget never costs more
        score. None when no plan fits the score budget."""
        if self.parts is None:
            raise UsageError("allocation needs a sensitivity table; run the sensitivity pass")
        losses = self._losses(weights)
        top = max(float(sum(np.max(lo[np.isfinite(lo)], initial=0.0) for lo in losses)), 1e-9)
        worst = self.allocate(top * 1.000001, weights=weights)
        if worst is None or worst.score > score_budget:
            return None
        lo, hi, best = 0.0, top * 1.000001, worst
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            plan = self.allocate(mid, weights=weights)
            if plan is not None and plan.score <= score_budget:
                hi, best = mid, plan
            else:
                lo = mid
        return best

    def uniform(self) -> list[tuple[tuple[int, ...], Plan]]:
        """Every one-setting-for-all-layers plan: one value per knob for every unit that has the
        knob (the unit's nearest level), with its compression index per knob; deduplicated."""
        values: dict[str, list[Any]] = {}
        for opts in self.options:
            for kn in opts.knobs:
                values.setdefault(kn, [])
                for v in opts.levels[kn]:
                    if not any(_same(v, old) for old in values[kn]):
                        values[kn].append(v)
        knobs = [k for k in KNOBS if k in values]
        for kn in knobs:
            values[kn].sort(key=lambda v, kn=kn: _compression(kn, v))
        out: dict[tuple[int, ...], tuple[tuple[int, ...], Plan]] = {}
        for index in itertools.product(*(range(len(values[k])) for k in knobs)):
            chosen = {k: values[k][i] for k, i in zip(knobs, index, strict=True)}
            choice = []
            for opts in self.options:
                levels = tuple(opts.nearest(kn, chosen[kn]) for kn in opts.knobs)
                c = opts.index_of(levels)
                assert c is not None  # every level combination is an option
                choice.append(c)
            key = tuple(choice)
            if key not in out:
                out[key] = (tuple(index), self.plan(key))
        return list(out.values())

    # -- between plans and Optuna --------------------------------------------------------------
    def choices(self, choice: tuple[int, ...]) -> dict[str, dict[str, Any]]:
        """Unit key -> knob values (Optuna units) of a plan."""
        return {o.unit.key: o.values(c) for o, c in zip(self.options, choice, strict=True)}

    def params(self, choice: tuple[int, ...], hyper: Mapping[str, Any] | None = None) -> dict:
        """Optuna parameter values that reproduce the plan (for `study.enqueue_trial`)."""
        return self.space.params_for(self.choices(choice), hyper)

    def policy(self, choice: tuple[int, ...], hyper: Mapping[str, Any] | None = None) -> Policy:
        return self.space.policy_for(self.choices(choice), hyper)

    def locate(self, params: Mapping[str, Any]) -> tuple[int, ...] | None:
        """The plan whose every knob value equals a trial's parameters, if all are on the grid."""
        choice = []
        for opts in self.options:
            values = {}
            for kn in opts.knobs:
                name = opts.unit.params.get(kn)
                if name is None:  # constant knob: its single level
                    values[kn] = opts.levels[kn][0]
                elif name in params:
                    values[kn] = params[name]
                else:
                    return None
            c = opts.locate(values)
            if c is None:
                return None
            choice.append(c)
        return tuple(choice)

    def notes(self) -> list[str]:
        """Levels no unit would ever choose: off every unit's cost/loss Pareto set."""
        if self.parts is None:
            return []
        used: dict[tuple[str, Any], bool] = {}
        for opts, part in zip(self.options, self.parts, strict=True):
            loss = part.sum(axis=1)
            on_front = set()
            for col in range(len(MODES)):
                on_front.update(int(i) for i in pareto_options(opts.cost[:, col], loss))
            for ki, kn in enumerate(opts.knobs):
                for i, v in enumerate(opts.levels[kn]):
                    hit = any(int(opts.combos[k, ki]) == i for k in on_front)
                    key = (kn, _label(v))
                    used[key] = used.get(key, False) or hit
        dropped = [f"{kn}={v}" for (kn, v), hit in used.items() if not hit]
        if not dropped:
            return []
        return [
            "the sensitivity table shows these levels never pay in any layer (another level "
            "costs less for no more predicted loss), so allocation skips them: "
            + ", ".join(dropped)
        ]


def _label(v: Any) -> str:
    return "dense" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, int) != isinstance(b, int):  # rank 1 is not the fraction 1.0
        return False
    return abs(float(a) - float(b)) < 1e-9


def _compression(knob: str, value: Any) -> tuple[int, float]:
    """Sort key: larger compresses more (explicit ranks and rank fractions apart)."""
    if knob == "sparsity":
        return (0, float(value))
    if knob == "rank":
        return (int(isinstance(value, int)), -float(value))
    return (0, -float(value))  # bits and act_bits: fewer bits compress more
