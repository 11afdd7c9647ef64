"""Samplers by name: Optuna's per-layer samplers and microsweep's planned ones.

Every sampler is an Optuna `BaseSampler`, so each trial's parameters stay the full per-layer
policy whoever proposed it, and a warm start is a plain `study.enqueue_trial`. The planned
samplers propose whole policies from a `Planner` and answer each per-layer `suggest` from that:

- ``uniform``: one setting for every layer, by bisection over the exact score order; a setting
  that compresses at least as much in every knob as one that missed the ceiling is skipped.
- ``allocate``: the knapsack allocation under the perplexity budget with its loss predictor
  refit on every measured trial (per-knob, then per-layer weights), in turn with moves near the
  best feasible trial (a trust region anchored on what that trial measured).
- ``auto``: warm starts (the best predicted uniform policies and allocations), then moves near
  the best feasible trial and refit allocations in turn, and one trial in six from TPE over a
  handful of global quantities (budget spent, per-knob loss weights, allocation temperature,
  plain hyperparameters) that the planner maps to a whole policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.samplers import BaseSampler

from microsweep._optuna import cached_trials, study_storage, trial_id
from microsweep.errors import UsageError

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial

    from microsweep.allocate import Correction, Plan, Planner
    from microsweep.spaces import Space

__all__ = ["PLANNED", "SAMPLERS", "PlannedSampler"]

SAMPLERS = (
    "auto", "allocate", "evo", "evopress", "tpe", "nsga2", "gp", "cmaes", "random", "uniform",
)  # fmt: skip
"""Sampler names `run` accepts; ``auto`` is the default."""
PLANNED = ("auto", "allocate", "evo", "evopress", "uniform")
"""Samplers that plan whole policies (they need a `Planner`)."""

RESCUE_ALONE = 4
"""After this many of a planned sampler's own proposals without a feasible trial, every proposal
is the uniform bisection's until one is feasible."""
MARGIN_FLOOR = 0.02
"""The least share of the NLL budget a steered plan is given: low enough that a predictor which
under-predicts a space 20-fold still reaches feasible plans."""
ORIGIN_ATTR = "origin"
POINT_ATTR = "point"
HYPER = "hyper:"


class _ConstrainedCmaEs(optuna.samplers.CmaEsSampler):
    """CMA-ES (over the float knobs: sparsity, rank fractions; bit-widths are sampled
    independently) that sees the perplexity constraint: a trial over the ceiling, or stopped
    early, ranks behind every feasible one, by how far over it is."""

    def _get_trials(self, study: optuna.Study) -> list[FrozenTrial]:  # see CMAES_TRIALS_HOOK
        """The finished trials CMA-ES learns from, the infeasible ones penalized."""
        import copy

        from optuna.trial import TrialState

        done = [
            t
            for t in cached_trials(study)
            if t.state == TrialState.COMPLETE
            or (t.state == TrialState.PRUNED and "score" in t.user_attrs)
        ]

        def violation(t: FrozenTrial) -> float:
            return max(0.0, float((t.constraints or {}).get("perplexity", 0.0)))

        feasible = [t.value for t in done if t.state == TrialState.COMPLETE and not violation(t)]
        worst = max(feasible, default=0.0)
        out = []
        for t in done:
            over = violation(t)
            if t.state == TrialState.COMPLETE and not over:
                out.append(t)
                continue
            value = t.value if t.state == TrialState.COMPLETE else float(t.user_attrs["score"])
            penalized = copy.deepcopy(t)
            penalized.state = TrialState.COMPLETE
            penalized.value = max(worst, value) + 1.0 + over
            out.append(penalized)
        return out

    def after_trial(self, study, trial, state, values):  # noqa: ANN001, ANN201
        self._independent_sampler.after_trial(study, trial, state, values)


@dataclass(frozen=True)
class _Record:
    """What a finished trial says to a planned sampler."""

    number: int
    origin: str | None
    choice: tuple[int, ...] | None
    feasible: bool
    loss: float | None
    values: tuple[float, ...] | None
    constraint: float | None
    point: dict[str, Any] | None


class PlannedSampler(BaseSampler):
    """The contract of a sampler that plans whole policies (`uniform`, `allocate`, `auto`; a
    new planned sampler subclasses this and implements `_propose`).

    The driver calls, in this order (after dispatching a new study's opening trial when the
    sampler `opens`): `attach` once the pool has started (with the `Planner`,
    whose option costs are exact, and the NLL budget the ceiling allows; the sensitivity
    table is set on the planner first when `needs_sensitivity`), then `warm_starts` on a new
    study (each enqueued once, after the user's own), then Optuna's hooks for every trial, and
    `origin` when it records a finished trial. `before_trial` asks `_propose` for the whole
    policy and answers each per-layer `suggest` from it, so a trial's parameters stay the full
    per-layer policy; what it does not plan (plain hyperparameters, a trial before `attach`,
    a proposal of None) goes to an independent random sampler."""

    needs_sensitivity: bool = False
    """Whether the planner must hold measured single-layer losses before `attach`."""
    opens: bool = True
    """Whether a new study's first trial may run before `attach` (the loop's opening trial,
    measured while the planner works; enqueued, so it needs nothing of the sampler)."""
    name = "planned"

    def __init__(self, space: Space, *, seed: int | None) -> None:
        self.space = space
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._fallback = optuna.samplers.RandomSampler(seed=seed)
        self._planned: dict[int, dict[str, Any]] = {}
        self.origins: dict[int, str] = {}
        self.planner: Planner | None = None
        self.budget = 0.0
        self.dense_nll = 0.0
        self.say: Callable[[str], None] | None = None
        self.score_budget: float | None = None  # the budget form (`MicroNet.score_budget`)
        self._order: list[tuple[tuple[int, ...], Plan]] | None = None
        self._rescues = 0

    # -- set-up by the driver ------------------------------------------------------------------
    def attach(self, planner: Planner, *, budget: float, dense_nll: float) -> None:
        """Give the sampler its planner and the NLL budget (log ceiling - log dense)."""
        self.planner, self.budget, self.dense_nll = planner, budget, dense_nll

    def warm_starts(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(params, user attrs) of the trials to enqueue at the start of a new sweep."""
        return []

    def origin(self, number: int) -> str | None:
        """Who proposed trial `number` ("uniform", "local", "refit", ...; None if unknown)."""
        return self.origins.get(number)

    # -- Optuna's sampler interface -------------------------------------------------------------
    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        return {}

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.system_attrs.get("fixed_params"):
            self.origins[trial.number] = trial.user_attrs.get(ORIGIN_ATTR, "enqueued")
            return
        if self.planner is None:
            self.origins[trial.number] = "random"
            return
        proposal = self._propose(study, trial)
        if proposal is None:
            self.origins[trial.number] = "random"
            return
        params, origin, point = proposal
        self._planned[trial.number] = params
        self.origins[trial.number] = origin
        storage = study_storage(study)
        storage.set_trial_user_attr(trial_id(trial), ORIGIN_ATTR, origin)
        if point:
            storage.set_trial_user_attr(trial_id(trial), POINT_ATTR, point)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        params = self._planned.get(trial.number)
        if params is not None and param_name in params:
            return params[param_name]
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: Any,
        values: Sequence[float] | None,
    ) -> None:
        self._planned.pop(trial.number, None)

    def reseed_rng(self) -> None:
        self._fallback.reseed_rng()
        self._rng = np.random.default_rng()

    # -- helpers -------------------------------------------------------------------------------
    def _propose(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> tuple[dict[str, Any], str, dict[str, Any] | None] | None:
        """The whole policy for `trial` as Optuna parameters, with its origin and the
        low-dimensional point it came from (or None), or None to leave the trial random."""
        raise NotImplementedError

    def _records(self, study: optuna.Study) -> tuple[list[_Record], set[tuple[int, ...]]]:
        """Finished trials as records, and the plans of every trial (running ones too)."""
        from optuna.trial import TrialState

        planner = self._require_planner()
        records, seen = [], set()
        for t in study.get_trials(deepcopy=False):
            choice = planner.locate(t.params) if t.params else None
            planned = self._planned.get(t.number)
            if choice is None and planned is not None:
                choice = planner.locate(planned)
            if choice is not None:
                seen.add(choice)
            if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
                continue
            if "screened_windows" in t.user_attrs:
                continue  # a screen read a few windows: no measure of the whole loss
            ppl = t.user_attrs.get("perplexity", t.user_attrs.get("perplexity_estimate"))
            loss = None
            if isinstance(ppl, (int, float)) and ppl > 0 and math.isfinite(ppl):
                loss = math.log(ppl) - self.dense_nll
            constraint = t.constraints.get("perplexity") if t.constraints else None
            feasible = t.state == TrialState.COMPLETE and (constraint is None or constraint <= 0)
            values = tuple(t.values) if t.values is not None else None
            if t.state == TrialState.PRUNED:
                score = t.user_attrs.get("score")
                values = None if score is None else (float(score), float(ppl or math.inf))
            point = t.user_attrs.get(POINT_ATTR)
            if point is not None:  # the hyperparameters the trial really ran with
                point = {k: v for k, v in point.items() if not k.startswith(HYPER)}
                point.update({HYPER + k: t.params[k] for k in self.space.hyper if k in t.params})
            records.append(
                _Record(
                    t.number,
                    t.user_attrs.get(ORIGIN_ATTR),
                    choice,
                    feasible,
                    loss,
                    values,
                    constraint,
                    point,
                )
            )
        return records, seen

    def _correction(self, records: list[_Record]) -> Correction:
        """Per-unit, per-knob loss weights and knob-pair interaction weights refit on every
        measured trial on the planner's grid (the identity before any): a plan that measured
        over its prediction teaches the predictor what it missed."""
        from microsweep.allocate import Correction, fit_interactions

        planner = self._require_planner()
        rows = [r for r in records if r.choice is not None and r.loss is not None]
        if not rows:
            return Correction.identity(len(planner.options))
        features = np.stack([planner.features(r.choice) for r in rows])
        pairs = np.stack([planner.pair_features(r.choice) for r in rows])
        measured = np.array([r.loss for r in rows])
        return fit_interactions(features, pairs, measured, self.budget)

    def _margin(self, records: list[_Record], origin: str) -> float:
        """Budget factor of the plans from `origin`, steered by their outcomes in trial order:
        after one over the ceiling, down in proportion to how far over it measured (8% at
        least, half at most); after one under it, up 3% (15% at most while it measured well
        under the budget). Between 2% and 150% of the budget."""
        margin = 1.0
        budget = max(self.budget, 1e-12)
        for r in sorted(records, key=lambda r: r.number):
            if r.origin != origin:
                continue
            loss = r.loss if r.loss is not None and math.isfinite(r.loss) else math.inf
            if r.feasible:
                margin *= float(np.clip(budget / max(loss, 1e-12), 1.03, 1.15))
            else:
                margin *= float(np.clip(budget / max(loss, 1e-12), 0.5, 0.92))
        return float(np.clip(margin, MARGIN_FLOOR, 1.5))

    def _allocate_new(
        self,
        seen: set[tuple[int, ...]],
        budget: float,
        weights: np.ndarray | Correction,
        temperature: float,
        seed: int,
    ) -> tuple[Plan | None, float, float]:
        """An allocation not proposed before, with the temperature and budget it took: a repeat
        raises the temperature (a few tries, then None); a budget no plan fits doubles, up to
        64x the NLL budget."""
        planner = self._require_planner()
        rng = np.random.default_rng(seed)
        top = 64 * self.budget
        for attempt in range(8):
            plan = planner.allocate(budget, weights=weights, temperature=temperature, rng=rng)
            while plan is None and 0 < budget < top:
                budget *= 2
                plan = planner.allocate(budget, weights=weights, temperature=temperature, rng=rng)
            if plan is None or plan.choice not in seen:
                return plan, temperature, budget
            temperature = max(0.05, temperature) * (1.6 if attempt else 1.0) + 0.05
        return None, temperature, budget

    def _say(self, line: str) -> None:
        """One line for the sweep's progress output (set by the driver; silent otherwise)."""
        if self.say is not None:
            self.say(line)

    def _uniform_order(self) -> list[tuple[tuple[int, ...], Plan]]:
        """Every uniform plan with its per-knob compression index, by exact score."""
        if self._order is None:
            planner = self._require_planner()
            self._order = sorted(planner.uniform(), key=lambda item: item[1].score)
        return self._order

    def uniform_under_budget(self) -> list[Plan]:
        """The uniform plans within the score budget that no other one within it compresses
        less than in every knob (the least compressed ones it allows), highest score first."""
        from microsweep.prepare._objective import SCORE_TOLERANCE

        budget = math.inf if self.score_budget is None else self.score_budget
        fits = [
            (idx, p)
            for idx, p in self._uniform_order()
            if p.score <= budget * (1 + SCORE_TOLERANCE)
        ]
        top = [
            p
            for idx, p in fits
            if not any(
                other != idx and all(a <= b for a, b in zip(other, idx, strict=True))
                for other, _ in fits
            )
        ]
        return sorted(top, key=lambda p: -p.score)

    def _uniform_next(
        self, records: list[_Record], seen: set[tuple[int, ...]], *, multi: bool
    ) -> Plan | None:
        """The bisection's next uniform plan: the middle of the uniform plans still open (not
        proposed yet, compressing less in some knob than every one that missed the ceiling,
        and, for one objective, scoring below the best feasible uniform one); None when none is
        open."""
        order = self._uniform_order()
        index_of = {plan.choice: idx for idx, plan in order}
        failed = [index_of[r.choice] for r in records if r.choice in index_of and not r.feasible]
        best = min(
            (r.values[0] for r in records if r.feasible and r.choice in index_of and r.values),
            default=math.inf,
        )
        open_ = [
            plan
            for idx, plan in order
            if plan.choice not in seen
            and (multi or plan.score < best)
            and not any(all(a >= b for a, b in zip(idx, bad, strict=True)) for bad in failed)
        ]
        return open_[len(open_) // 2] if open_ else None

    def _rescue(
        self, records: list[_Record], seen: set[tuple[int, ...]], *, multi: bool
    ) -> tuple[dict[str, Any], str, None] | None:
        """While no trial has met the ceiling, every other proposal is the uniform bisection's
        next plan, and every proposal once `RESCUE_ALONE` of the sampler's own have missed, so
        a planned sampler finds a feasible policy wherever the `uniform` sampler does, in about
        as many trials past those, however wrong its predictor starts."""
        if any(r.feasible for r in records):
            return None
        own = ("uniform", "warm start", "enqueued", None)
        misses = sum(1 for r in records if r.origin not in own)  # none is feasible yet
        self._rescues += 1
        if self._rescues % 2 and misses < RESCUE_ALONE:
            return None
        plan = self._uniform_next(records, seen, multi=multi)
        if plan is None:
            return None
        return self._require_planner().params(plan.choice), "uniform", None

    def _require_planner(self) -> Planner:
        if self.planner is None:
            raise UsageError(
                f"the {self.name} sampler has no planner yet: call attach(planner, ...) first"
            )
        return self.planner

    def _local(
        self,
        records: list[_Record],
        seen: set[tuple[int, ...]],
        correction: Correction,
        move_cost: float,
        seed: int,
    ) -> tuple[Plan | None, float]:
        """A plan near the best feasible trial: its measured loss anchors the prediction (the
        budget is the ceiling less the incumbent's prediction error) and each unit moved off it
        costs `move_cost` of score while solving, a trust region; steered by earlier local
        plans' outcomes like the refit ones."""
        planner = self._require_planner()
        feasible = [
            r
            for r in records
            if r.feasible and r.choice is not None and r.loss is not None and r.values
        ]
        if not feasible:
            return None, 0.0
        best = min(feasible, key=lambda r: r.values[0])
        residual = best.loss - (planner.plan(best.choice, correction).loss or 0.0)
        budget = self._margin(records, "local") * self.budget - residual
        rng = np.random.default_rng(seed)
        temperature = 0.0
        for attempt in range(6):
            plan = planner.allocate(
                max(budget, 0.0),
                weights=correction,
                temperature=temperature,
                rng=rng,
                anchor=best.choice,
                move_cost=move_cost,
            )
            if plan is not None and plan.choice not in seen:
                return plan, temperature
            move_cost *= 0.5
            temperature = 0.05 * (attempt + 1)
        return None, temperature


class UniformSampler(PlannedSampler):
    """One setting for every layer, found by bisection over the exact score order: each trial
    takes the middle of the settings still open. One over the ceiling closes every setting that
    compresses at least as much in every knob; a feasible one (single objective) closes every
    setting that scores no better. In the budget form, the settings within the score budget
    that compress least (no other within it compresses less in every knob), highest score
    first."""

    name = "uniform"
    opens = False  # every trial a uniform setting in bisection order, the first one too

    def __init__(self, space: Space, *, seed: int | None, multi: bool = False) -> None:
        super().__init__(space, seed=seed)
        self.multi = multi
        self.exhausted_at: int | None = None

    def _propose(self, study, trial):  # noqa: ANN001, ANN202
        records, seen = self._records(study)
        if self.score_budget is None:
            plan = self._uniform_next(records, seen, multi=self.multi)
        else:  # the budget form: the least compressed uniform plans it allows, in turn
            plan = next((p for p in self.uniform_under_budget() if p.choice not in seen), None)
        if plan is None:
            if self.exhausted_at is None:
                self.exhausted_at = trial.number
                what = f"the {len(self._uniform_order())} uniform settings are decided"
                if self.score_budget is not None:
                    what = (
                        f"the {len(self.uniform_under_budget())} least compressed uniform "
                        "settings within the score budget are measured"
                    )
                self._say(
                    f"uniform: {what} after {trial.number} trials; the remaining trials sample "
                    "at random (origin 'random')"
                )
            return None
        return self._require_planner().params(plan.choice), "uniform", None


class AllocateSampler(PlannedSampler):
    """Allocation alone: the knapsack at the perplexity budget with a predictor refit on every
    measured trial, in turn with moves near the best feasible trial; budgets vary around the
    ceiling and repeats raise the temperature."""

    needs_sensitivity = True
    name = "allocate"
    SCHEDULE = (1.0, 0.95, 1.05)
    MOVE_COSTS = (0.005, 0.002, 0.01)
    """Score a unit's move off the incumbent costs in local plans (dense scores are ~2)."""

    def __init__(self, space: Space, *, seed: int | None) -> None:
        super().__init__(space, seed=seed)
        self._count = 0

    def _propose(self, study, trial):  # noqa: ANN001, ANN202
        records, seen = self._records(study)
        rescue = self._rescue(records, seen, multi=False)
        if rescue is not None:
            return rescue
        correction = self._correction(records)
        step = self._count
        self._count += 1
        seed = _seed(self.seed, trial.number)
        if step % 2:  # every other trial: a move near the best feasible plan
            move_cost = self.MOVE_COSTS[(step // 2) % len(self.MOVE_COSTS)]
            plan, _ = self._local(records, seen, correction, move_cost, seed)
            if plan is not None:
                return self._require_planner().params(plan.choice), "local", None
        factor = self._margin(records, "allocation")
        factor *= self.SCHEDULE[(step // 2) % len(self.SCHEDULE)]
        plan, temperature, used = self._allocate_new(
            seen, factor * self.budget, correction, 0.0, seed
        )
        if plan is None:
            return None
        point = _point(used / self.budget, np.ones(len(_knobs())), temperature)
        return self._require_planner().params(plan.choice), "allocation", point


class AutoSampler(PlannedSampler):
    """Warm starts, then moves near the best feasible trial and refit allocations in turn, with
    one trial in six from TPE over a few global quantities mapped to policies by the planner."""

    needs_sensitivity = True
    name = "auto"
    SCHEDULE = (1.0, 0.97, 1.03)
    CYCLE = ("local", "refit", "local", "refit", "local", "tpe")
    """After the warm starts: moves near the best feasible trial and refit allocations in turn
    (the benchmark's best performers), with one trial in six exploring by TPE."""
    WARM_UNIFORM = (1.0, 0.7, 1.4)
    WARM_ALLOCATION = (1.0, 0.7, 0.5, 0.25, 0.1)
    """Budget factors of the warm-start allocations: below 1 because an optimized plan's loss
    is under-predicted more often than not, and down to 0.1 so the front has its low-perplexity
    end from the start."""

    def __init__(
        self, space: Space, *, seed: int | None, workers: int = 1, multi: bool = False
    ) -> None:
        super().__init__(space, seed=seed)
        self.workers = workers
        self.multi = multi
        self._inner: optuna.Study | None = None
        self._told: set[int] = set()
        self._pending: dict[int, Any] = {}
        self._count = 0

    # -- the low-dimensional space ----------------------------------------------------------
    def _distributions(self) -> dict[str, BaseDistribution]:
        from optuna.distributions import FloatDistribution

        from microsweep.allocate import KNOBS

        planner = self._require_planner()
        present = {kn for o in planner.options for kn in o.knobs}
        dists: dict[str, BaseDistribution] = {
            "budget": FloatDistribution(0.25, 4.0, log=True),
            "temperature": FloatDistribution(0.0, 0.5),
        }
        for kn in KNOBS:
            if kn in present:
                dists[f"w_{kn}"] = FloatDistribution(0.25, 4.0, log=True)
        return dists

    def _inner_study(self) -> optuna.Study:
        if self._inner is None:
            sampler = optuna.samplers.TPESampler(
                multivariate=True,
                constant_liar=True,
                n_startup_trials=4,
                seed=self.seed,
            )
            directions = ["minimize", "minimize"] if self.multi else ["minimize"]
            self._inner = optuna.create_study(sampler=sampler, directions=directions)
        return self._inner

    def _tell_inner(self, point: dict[str, Any], record: _Record | None) -> Any:
        """Add `point` to the inner study; told at once when `record` is finished."""
        study = self._inner_study()
        dists = self._distributions()
        params = {
            k: float(np.clip(point[k], d.low, d.high)) for k, d in dists.items() if k in point
        }
        if len(params) != len(dists):
            return None
        hyper = {k: v for k, v in point.items() if k.startswith(HYPER)}
        study.enqueue_trial({**params, **hyper}, skip_if_exists=False)
        inner = study.ask(dists)
        self._suggest_hyper(inner)
        if record is not None:
            self._finish_inner(inner, record)
        return inner

    def _finish_inner(self, inner: Any, record: _Record) -> None:
        from optuna.trial import TrialState

        study = self._inner_study()
        if record.values is None:
            study.tell(inner, state=TrialState.FAIL)
            return
        if record.constraint is not None:
            inner.set_constraint("perplexity", record.constraint)
        values = list(record.values) if self.multi else [record.values[0]]
        study.tell(inner, values)

    def _sync(self, records: list[_Record]) -> None:
        """Tell the inner study every finished outer trial that carries a point."""
        for r in records:
            if r.number in self._told or r.point is None:
                continue
            self._told.add(r.number)
            inner = self._pending.pop(r.number, None)
            if inner is None:
                self._tell_inner(r.point, r)
            else:
                self._finish_inner(inner, r)

    # -- proposals ---------------------------------------------------------------------------
    def warm_starts(self):  # noqa: ANN201
        """The best predicted uniform policies and the allocations at budgets around the
        ceiling (uncorrected predictor), each enqueued once."""
        from microsweep.allocate import KNOBS

        planner = self._require_planner()
        out, seen = [], set()
        uniform = sorted(planner.uniform(), key=lambda item: item[1].score)
        for factor in self.WARM_UNIFORM:
            fits = [p for _, p in uniform if p.loss is not None and p.loss <= factor * self.budget]
            if fits and fits[0].choice not in seen:
                seen.add(fits[0].choice)
                out.append((planner.params(fits[0].choice), {ORIGIN_ATTR: "uniform"}))
        weights = np.ones(len(KNOBS))
        for factor in self.WARM_ALLOCATION:
            plan = planner.allocate(factor * self.budget, weights=weights)
            if plan is not None and plan.choice not in seen:
                seen.add(plan.choice)
                attrs = {ORIGIN_ATTR: "allocation", POINT_ATTR: _point(factor, weights, 0.0)}
                out.append((planner.params(plan.choice), attrs))
        return out

    def _propose(self, study, trial):  # noqa: ANN001, ANN202
        records, seen = self._records(study)
        self._sync(records)
        rescue = self._rescue(records, seen, multi=self.multi)
        if rescue is not None:
            return rescue
        step = self._count
        self._count += 1
        seed = _seed(self.seed, trial.number)
        correction = self._correction(records)
        kind = self.CYCLE[step % len(self.CYCLE)]
        rounds = step // len(self.CYCLE)
        plan = None
        if kind == "local":  # a move near the best feasible plan
            move_cost = AllocateSampler.MOVE_COSTS[(step + rounds) % 3]
            plan, _ = self._local(records, seen, correction, move_cost, seed)
            origin, inner = "local", None
            point = {}  # anchored on a trial, not a point of the low-dimensional space
            if plan is None:  # no feasible trial yet: allocate at the ceiling instead
                kind = "refit"
        if kind == "refit":  # the refit allocation at the ceiling
            factor = self._margin(records, "refit")
            factor *= self.SCHEDULE[(step + rounds) % len(self.SCHEDULE)]
            plan, temperature, used = self._allocate_new(
                seen, factor * self.budget, correction, 0.0, seed
            )
            origin = "refit"
            point = _point(used / self.budget, np.ones(len(_knobs())), temperature)
            inner = None
        if kind == "tpe":  # the inner TPE explores the low-dimensional space
            inner = self._inner_study().ask(self._distributions())
            self._suggest_hyper(inner)
            point = dict(inner.params)
            plan, temperature, used = self._map_point(point, correction, seen, seed)
            origin = "tpe-allocation"
            budget = used / self.budget
            if temperature != point["temperature"] or budget != point["budget"]:
                # the plan came from another point than TPE asked for: tell TPE that one fails,
                # and record the point that made the plan
                self._inner_study().tell(inner, state=_fail_state())
                point = {**point, "temperature": temperature, "budget": budget}
                inner = None
        if plan is None:
            if inner is not None:
                self._inner_study().tell(inner, state=_fail_state())
            return None
        if inner is not None:
            self._pending[trial.number] = inner
        hyper = {k[len(HYPER) :]: v for k, v in point.items() if k.startswith(HYPER)}
        return self._require_planner().params(plan.choice, hyper), origin, point

    def plan_for(
        self,
        point: dict[str, float],
        correction: Correction | None = None,
        seed: int = 0,
    ) -> Plan | None:
        """The policy a point of the low-dimensional space maps to, as the TPE proposals map
        it (`_map_point`, with no plan seen before)."""
        return self._map_point(point, correction, set(), seed)[0]

    def _map_point(
        self,
        point: dict[str, float],
        correction: Correction | None,
        seen: set[tuple[int, ...]],
        seed: int,
    ) -> tuple[Plan | None, float, float]:
        """The allocation at ``budget`` x the NLL budget, with the per-knob weights ``w_*`` on
        top of the per-unit `correction`, each unit's loss jittered by ``temperature``; a plan
        in `seen` raises the temperature. Returns the plan, the temperature and the budget it
        took (see `_allocate_new`)."""
        weights: np.ndarray | Correction = _weights_of(point)
        if correction is not None:
            weights = correction.scaled(weights)
        return self._allocate_new(
            seen, point["budget"] * self.budget, weights, point.get("temperature", 0.0), seed
        )

    def _suggest_hyper(self, inner: Any) -> dict[str, Any]:
        """The space's plain hyperparameters, searched by the inner TPE with the rest (under
        prefixed names, apart from the point's own quantities)."""
        return {k: knob.suggest(inner, HYPER + k) for k, knob in self.space.hyper.items()}


def _fail_state() -> Any:
    from optuna.trial import TrialState

    return TrialState.FAIL


def _knobs() -> tuple[str, ...]:
    from microsweep.allocate import KNOBS

    return KNOBS


def _point(budget: float, weights: np.ndarray, temperature: float) -> dict[str, float]:
    from microsweep.allocate import KNOBS

    point = {"budget": float(budget), "temperature": float(temperature)}
    point.update({f"w_{kn}": float(w) for kn, w in zip(KNOBS, weights, strict=True)})
    return point


def _weights_of(point: dict[str, Any]) -> np.ndarray:
    from microsweep.allocate import KNOBS

    return np.array([float(point.get(f"w_{kn}", 1.0)) for kn in KNOBS])


def _seed(seed: int | None, number: int) -> int:
    return ((seed or 0) * 1_000_003 + number) % 2**32
