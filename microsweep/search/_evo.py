"""Evolutionary search with staged selection: `evo` (microsweep's) and `evopress` (EvoPress's
search, as a baseline), in both forms of the problem.

A generation takes a parent policy and proposes children that each differ from it by one level
step in one or two units (`mutate`); children are screened on a few windows, the best continue
to more, and the best of those to all of them (`Stage`, run by the loop). Tied rules are one
unit, so they switch together. While a generation waits on results, the workers get the parent
sampler's own proposals (`auto`'s), so none idles.

`evo`, after `auto`'s start (warm starts, refit allocations, the uniform rescue):
- ceiling form (least score under the perplexity ceiling): the parent is the best feasible
  trial; children step one unit more compressed and, half of them, another unit less (a swap:
  the score moves by at most one level step); screens rank first by whether their loss is under
  the NLL budget, then by score among those under it and by loss among the rest, so the
  survivors are the cheapest children that still look feasible; a survivor that ends feasible
  with a lower score is the next parent (elitism otherwise).
- budget form (`MicroNet(score_budget=...)`: least perplexity at most that score): it starts
  from the allocation of least predicted loss within the budget and the best uniform policies
  under it; children swap or relax one step (never past the budget) and rank by loss.
A screen's loss is its excess NLL per token over the dense model on the same windows, or its
KL from the dense model when the objective selects by KL.

`evopress` follows EvoPress (Sieberling et al., ICML 2025): no sensitivity table and no
predictor; start from the uniform setting at the budget; each child switches one level between
two units (one up, one down, within the budget); 64 children, 8 continue, 2 reach the last
stage, on 1/32, 1/4 and all the windows (2k -> 16k -> 64k tokens in the paper), the parent
re-entering at the last stage; ranked by KL from the dense model. In the ceiling form, which
EvoPress does not have, its budget starts under the best feasible uniform policy's score and
falls 2% after each generation whose winner meets the ceiling (half as far after one whose
winner does not).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from microsweep.search._samplers import ORIGIN_ATTR, AutoSampler
from microsweep.search._stages import SCREENED_ATTR, STAGE_ATTR, Stage

__all__ = ["EVO_ATTR", "EvoPressSampler", "EvoSampler", "mutate"]

EVO_ATTR = "evo"
"""User attribute of an evolutionary trial: {"gen": generation, "level": stage index, "parent":
the parent trial's number (or None), "budget": the generation's score budget (or None)}."""


class EvoSampler(AutoSampler):
    """`auto`'s start, then generations of one-step children of the best feasible trial with
    staged selection on growing window counts (see the module docstring)."""

    name = "evo"
    CHILDREN = 12
    """Children screened per generation."""
    SURVIVORS = (4, 2)
    """How many continue past the first and the second stage."""
    SHARES = (8, 2)
    """Stage k reads 1/SHARES[k] of the windows (at least `MIN_SCREEN`), the last all of them."""
    MIN_SCREEN = 16
    ORIGIN = "evo"
    FORCE_KL = False

    def __init__(
        self, space: Any, *, seed: int | None, workers: int = 1, multi: bool = False
    ) -> None:
        super().__init__(space, seed=seed, workers=workers, multi=multi)
        self.n_windows = 0
        self.tokens_per_window = 0
        self.window_dense_nll: list[float] | None = None
        self.select_by = "perplexity"
        self._attrs_next: dict[str, Any] | None = None
        self._generation_budget: float | None = None  # the score budget children keep

    def stage_reads(self) -> list[int]:
        """Windows read at each stage, the last one all of them."""
        n = self.n_windows
        reads = [min(n, max(self.MIN_SCREEN, n // share)) for share in self.SHARES]
        return [*reads, n]

    def staging(self) -> bool:
        """Whether the sweep's windows allow staged selection: every stage reads more windows
        than the one before (a space with its own evaluate() gives none, and a few windows
        too few: then every child is evaluated whole)."""
        reads = self.stage_reads()
        return self.n_windows > 0 and all(a < b for a, b in zip(reads, reads[1:], strict=False))

    # -- warm starts -------------------------------------------------------------------------
    def warm_starts(self):  # noqa: ANN201
        """The ceiling form: `auto`'s. The budget form: the allocation of least predicted loss
        within the score budget, then the uniform policies under it that compress least."""
        if self.score_budget is None:
            return super().warm_starts()
        planner = self._require_planner()
        out, seen = [], set()
        plan = planner.least_loss(self.score_budget)
        if plan is not None:
            seen.add(plan.choice)
            out.append((planner.params(plan.choice), {ORIGIN_ATTR: "allocation"}))
        for plan in self.uniform_under_budget()[:2]:
            if plan.choice not in seen:
                seen.add(plan.choice)
                out.append((planner.params(plan.choice), {ORIGIN_ATTR: "uniform"}))
        return out

    # -- proposals -----------------------------------------------------------------------------
    def _propose(self, study, trial):  # noqa: ANN001, ANN202
        trials = study.get_trials(deepcopy=False)
        parent = self.parent(trials)
        if parent is not None and not self.multi:
            proposal = self._generation_step(trials, parent, trial.number)
            if proposal is not None:
                return proposal
        return self._between(study, trial, trials)

    def parent(self, trials: list) -> Any:
        """The next generation's parent: the best feasible trial (by score, or in the budget
        form by perplexity), or None."""
        return _best_feasible(trials)

    def _between(self, study, trial, trials):  # noqa: ANN001, ANN202
        """A proposal while no generation has one: `auto`'s in the ceiling form; in the budget
        form the next uniform policy under the budget not tried yet (then None: random)."""
        if self.score_budget is None:
            return super()._propose(study, trial)
        planner = self._require_planner()
        seen = {planner.locate(t.params) for t in trials if t.params} | self._planned_choices()
        for plan in self.uniform_under_budget():
            if plan.choice not in seen:
                return planner.params(plan.choice), "uniform", None
        best = _best_feasible(trials)  # the workers wait on no one: a child of the best, whole
        base = planner.locate(best.params) if best is not None else None
        if base is None:
            return None
        rng = np.random.default_rng(_child_seed(self.seed, trial.number))
        self._generation_budget = self.score_budget
        child = self.mutation(base, rng, seen, trial.number)
        if child is None:
            return None
        return planner.params(child), f"{self.ORIGIN}-local", None

    def _planned_choices(self) -> set:
        planner = self._require_planner()
        return {planner.locate(p) for p in self._planned.values()}

    def _generation_step(self, trials: list, parent: Any, number: int):  # noqa: ANN202
        """The next trial of the current generation (a child's screen, a survivor's
        continuation, the parent re-entering), or None while the generation waits on results;
        a generation with nothing left to propose or wait for, or whose parent was beaten
        while nothing of it runs, makes way for the next."""
        evo = [t for t in trials if EVO_ATTR in t.user_attrs]
        gen = max((t.user_attrs[EVO_ATTR]["gen"] for t in evo), default=-1)
        members = [t for t in evo if t.user_attrs[EVO_ATTR]["gen"] == gen]
        stale = members and members[0].user_attrs[EVO_ATTR]["parent"] != parent.number
        if stale and _running(members):
            return None  # a new parent: its generation starts once this one's trials are back
        if not members or stale:
            gen, members = gen + 1, []
        meta = self._meta(trials, gen, parent, members)
        action = self._next(trials, parent, members, meta, number)
        if action is _DONE:
            meta = self._meta(trials, gen + 1, parent, [])
            action = self._next(trials, parent, [], meta, number)
        return None if action in (_DONE, _WAIT) else action

    def _meta(self, trials: list, gen: int, parent: Any, members: list) -> dict[str, Any]:
        """A generation's attribute: its number, parent and score budget."""
        if members:
            return dict(members[0].user_attrs[EVO_ATTR], level=None)
        return {"gen": gen, "parent": parent.number, "budget": self.score_budget}

    def _next(self, trials: list, parent: Any, members: list, meta: dict, number: int) -> Any:
        """A proposal, `_WAIT` (results pending) or `_DONE` (the generation is over)."""
        from optuna.trial import TrialState

        reads = self.stage_reads() if self.staging() else [self.n_windows or 1] * 3
        level = [[t for t in members if t.user_attrs[EVO_ATTR]["level"] == k] for k in range(3)]
        wanted = self.CHILDREN
        if len(level[0]) < wanted:
            child = self._child(trials, parent, meta, reads[0], number)
            if child is not None:
                return child
            wanted = len(level[0])  # every one-step neighbour is taken: go on with these
            if not wanted:
                return _DONE
        if sum(t.state.is_finished() for t in level[0]) < wanted:
            if len(level[0]) < wanted + self.workers:  # keep the workers on screens
                return self._child(trials, parent, meta, reads[0], number) or _WAIT
            return _WAIT
        if not self.staging():
            return _WAIT if _running(members) else _DONE
        for k in (1, 2):
            if _running(level[k - 1]):
                return _WAIT
            screens = [
                t
                for t in level[k - 1]
                if t.state == TrialState.PRUNED and SCREENED_ATTR in t.user_attrs
            ]
            continued = {t.user_attrs.get(STAGE_ATTR, {}).get("continues") for t in level[k]}
            for t in sorted(screens, key=self.rank)[: self.SURVIVORS[k - 1]]:
                if t.number not in continued:
                    stage = Stage(reads[k], continues=t.number, start=t.user_attrs[SCREENED_ATTR])
                    origin = f"{self.ORIGIN}-continue"
                    return self._staged(t.params, stage, {**meta, "level": k}, origin)
        reenter = self._reenter(trials, parent, members, meta)
        if reenter is not None:
            return reenter
        return _WAIT if _running(members) else _DONE

    def _reenter(self, trials: list, parent: Any, members: list, meta: dict) -> Any:
        """The parent's own trial at the last stage when it has no whole evaluation yet
        (EvoPress's parent re-entering); `evo`'s parent always has one."""
        return None

    def _base(self, trials: list, parent: Any, meta: dict) -> tuple[int, ...] | None:
        """The plan children are made from: the parent's."""
        return self._require_planner().locate(parent.params)

    def _child(self, trials: list, parent: Any, meta: dict, read: int, number: int):  # noqa: ANN202
        """A new child of the parent's plan, screened on `read` windows (or evaluated whole
        when the windows allow no stages)."""
        planner = self._require_planner()
        base = self._base(trials, parent, meta)
        if base is None:
            return None
        seen = {planner.locate(t.params) for t in trials if t.params} | self._planned_choices()
        rng = np.random.default_rng(_child_seed(self.seed, number))
        child = self.mutation(base, rng, seen, number)
        if child is None:
            return None
        hyper = {k: parent.params[k] for k in self.space.hyper if k in parent.params}
        params = planner.params(child, hyper)
        stage = Stage(read) if self.staging() else None
        return self._staged(params, stage, {**meta, "level": 0}, self.ORIGIN)

    def mutation(
        self, base: tuple[int, ...], rng: np.random.Generator, seen: set, number: int
    ) -> tuple[int, ...] | None:
        """A child of `base`: ceiling form, one step more compressed in one unit and (every
        other child) one step less in another; budget form, a swap or a single step less
        compressed, within the score budget."""
        planner = self._require_planner()
        if self.score_budget is None:
            swap = bool(number % 2)
            child = mutate(planner, base, rng, swap=swap, seen=seen)
            if child is None and swap:
                child = mutate(planner, base, rng, swap=False, seen=seen)
            return child
        relax = bool(number % 3 == 2)
        child = mutate(planner, base, rng, swap=not relax, seen=seen, up=not relax,
                       budget=self.score_budget)  # fmt: skip
        if child is None:
            child = mutate(planner, base, rng, swap=relax, seen=seen, up=relax,
                           budget=self.score_budget)  # fmt: skip
        return child

    def _staged(self, params: dict, stage: Stage | None, meta: dict, origin: str):  # noqa: ANN202
        """A proposal whose trial carries its stage and generation (set in `before_trial`)."""
        self._attrs_next = {EVO_ATTR: meta}
        if stage is not None:
            self._attrs_next[STAGE_ATTR] = stage.attr()
        return params, origin, None

    def before_trial(self, study, trial) -> None:  # noqa: ANN001
        self._attrs_next = None
        super().before_trial(study, trial)
        if self._attrs_next:
            from microsweep._optuna import study_storage, trial_id

            storage = study_storage(study)
            for key, value in self._attrs_next.items():
                storage.set_trial_user_attr(trial_id(trial), key, value)
            self._attrs_next = None

    # -- selection -----------------------------------------------------------------------------
    def loss(self, t: Any) -> float:
        """A screened (or completed) trial's loss: its KL from the dense model when the sweep
        ranks by KL, else its NLL excess (`excess`)."""
        if self.select_by == "kl" and t.user_attrs.get("kl") is not None:
            return float(t.user_attrs["kl"])
        return self.excess(t)

    def excess(self, t: Any) -> float:
        """Its excess NLL per token over the dense model on the windows it read (else its
        log-perplexity excess): what the ceiling's NLL budget bounds."""
        attrs = t.user_attrs
        nll = attrs.get("window_nll")
        if nll and self.window_dense_nll is not None and self.tokens_per_window:
            from microsweep.score import subset_windows

            read = subset_windows(self.n_windows, len(nll))
            dense = math.fsum(self.window_dense_nll[i] for i in read)
            return (math.fsum(nll) - dense) / (len(nll) * self.tokens_per_window)
        ppl = attrs.get("perplexity", attrs.get("perplexity_estimate"))
        if isinstance(ppl, (int, float)) and ppl > 0 and math.isfinite(ppl):
            return math.log(ppl) - self.dense_nll
        return math.inf

    def rank(self, t: Any) -> tuple[int, float]:
        """Budget form: by loss. Ceiling form: screens that look feasible first, cheapest
        first; the rest by loss."""
        if self.score_budget is not None:
            return (0, self.loss(t))
        score = t.values[0] if t.values else t.user_attrs.get("score")
        if self.excess(t) <= self.budget and score is not None:
            return (0, float(score))
        return (1, self.loss(t))


class EvoPressSampler(EvoSampler):
    """EvoPress's search over microsweep's levels (see the module docstring): the baseline
    `evo` and `auto` are measured against."""

    name = "evopress"
    needs_sensitivity = False
    CHILDREN = 64
    SURVIVORS = (8, 2)
    SHARES = (32, 4)
    MIN_SCREEN = 4
    ORIGIN = "evopress"
    FORCE_KL = True
    """Ranks by KL from the dense model whatever the objective's `select_by` says."""
    STEP = 0.02
    """Ceiling form: how far below the best feasible score each generation's budget starts."""

    def warm_starts(self):  # noqa: ANN201
        """The uniform setting: at the budget in the budget form; none in the ceiling form
        (its uniform bisection finds the best feasible uniform policy first)."""
        if self.score_budget is None:
            return []
        plans = self.uniform_under_budget()[:1]
        planner = self._require_planner()
        return [(planner.params(p.choice), {ORIGIN_ATTR: "uniform"}) for p in plans]

    def _propose(self, study, trial):  # noqa: ANN001, ANN202
        """Ceiling form: the uniform bisection to its end first (the best feasible uniform
        policy is where EvoPress starts), then generations."""
        if self.score_budget is None:
            records, seen = self._records(study)
            plan = self._uniform_next(records, seen, multi=False)
            if plan is not None:
                return self._require_planner().params(plan.choice), "uniform", None
        return super()._propose(study, trial)

    def parent(self, trials: list) -> Any:
        """The last generation's winner by the fitness its whole evaluation measured (the
        parent kept when no child beat it); before any generation, the best feasible trial
        (in the ceiling form the best uniform one, from the bisection)."""
        done = [t for t in trials if EVO_ATTR in t.user_attrs and _whole(t)]
        if not done:
            return _best_feasible(trials)
        gen = max(t.user_attrs[EVO_ATTR]["gen"] for t in done)
        last = [t for t in done if t.user_attrs[EVO_ATTR]["gen"] == gen]
        by_number = {t.number: t for t in trials}
        previous = by_number.get(last[0].user_attrs[EVO_ATTR]["parent"])
        budget = last[0].user_attrs[EVO_ATTR].get("budget")
        pool = list(last)
        if previous is not None and _whole(previous) and _score(previous) <= _slack(budget):
            pool.append(previous)  # at the same budget (the budget form): it may stay
        fit = [t for t in pool if self._fits(t)]
        if fit:
            return min(fit, key=self.fitness)
        # the generation's budget was too low for the ceiling: back to the best feasible
        return _best_feasible(trials) or min(pool, key=self.fitness)

    def fitness(self, t: Any) -> float:
        """KL from the dense model over every window (NLL excess when there is no reference)."""
        return self.loss(t)

    def _fits(self, t: Any) -> bool:
        """Budget form: within the score budget. Ceiling form: meets the ceiling."""
        if not t.constraints:
            return True
        return all(v <= 0 for v in t.constraints.values())

    def _between(self, study, trial, trials):  # noqa: ANN001, ANN202
        """Before a parent exists: the uniform bisection (ceiling form) or the uniform
        policies under the budget."""
        if self.score_budget is not None:
            return super()._between(study, trial, trials)
        records, seen = self._records(study)
        plan = self._uniform_next(records, seen, multi=False)
        if plan is None:
            return None
        return self._require_planner().params(plan.choice), "uniform", None

    def _meta(self, trials: list, gen: int, parent: Any, members: list) -> dict[str, Any]:
        if members:
            return dict(members[0].user_attrs[EVO_ATTR], level=None)
        return {"gen": gen, "parent": parent.number, "budget": self._budget(trials, parent)}

    def _budget(self, trials: list, parent: Any) -> float:
        """The generation's score budget: the objective's; in the ceiling form, `STEP` under
        the best feasible score, halved after each generation in a row whose winner missed."""
        if self.score_budget is not None:
            return self.score_budget
        best = _best_feasible(trials)
        score = best.values[0] if best is not None else parent.values[0]
        step = self.STEP
        gens = {t.user_attrs[EVO_ATTR]["gen"] for t in trials if EVO_ATTR in t.user_attrs}
        for gen in sorted(gens, reverse=True):
            whole = [
                t for t in trials if t.user_attrs.get(EVO_ATTR, {}).get("gen") == gen and _whole(t)
            ]
            if whole and any(self._fits(t) for t in whole):
                break
            step /= 2
        return score * (1 - max(step, 1e-4))

    def _base(self, trials: list, parent: Any, meta: dict) -> tuple[int, ...] | None:
        """The parent's plan, squeezed into the generation's budget by random steps toward more
        compression where it is over it."""
        planner = self._require_planner()
        base = planner.locate(parent.params)
        budget = meta.get("budget")
        if base is None or budget is None:
            return base
        rng = np.random.default_rng(_child_seed(self.seed, meta["gen"]))
        for _ in range(10_000):
            if planner.plan(base).score <= _slack(budget):
                return base
            stepped = mutate(planner, base, rng, swap=False, seen=set(), up=True)
            if stepped is None:
                return None
            base = stepped
        return None

    def mutation(self, base, rng, seen, number):  # noqa: ANN001, ANN201
        """EvoPress's level switch: one unit one level up, another one level down, the score
        within the generation's budget."""
        budget = self._generation_budget
        return mutate(self._require_planner(), base, rng, swap=True, seen=seen, budget=budget)

    def _child(self, trials, parent, meta, read, number):  # noqa: ANN001, ANN202
        self._generation_budget = meta.get("budget")
        return super()._child(trials, parent, meta, read, number)

    def _reenter(self, trials: list, parent: Any, members: list, meta: dict) -> Any:
        """The parent at the generation's budget re-enters at the last stage: evaluated whole
        when that plan has no whole evaluation yet."""
        base = self._base(trials, parent, meta)
        if base is None:
            return None
        planner = self._require_planner()
        origin = f"{self.ORIGIN}-parent"
        if any(t.user_attrs.get(ORIGIN_ATTR) == origin for t in members):
            return None  # re-entered already (or running)
        measured = {planner.locate(t.params) for t in trials if t.params and _whole(t)}
        if base in measured or base in self._planned_choices():
            return None
        hyper = {k: parent.params[k] for k in self.space.hyper if k in parent.params}
        whole = Stage(self.n_windows) if self.staging() else None  # every window, no stop
        return self._staged(planner.params(base, hyper), whole, {**meta, "level": 2}, origin)

    def rank(self, t: Any) -> tuple[int, float]:
        """By KL (NLL excess without a reference), the least first."""
        return (0, self.loss(t))


def mutate(
    planner: Any,
    choice: tuple[int, ...],
    rng: np.random.Generator,
    *,
    swap: bool,
    seen: set,
    up: bool = True,
    budget: float | None = None,
    tries: int = 64,
) -> tuple[int, ...] | None:
    """`choice` with one unit one level step more compressed in one knob (`up`; else less)
    and, with `swap`, another unit one step the other way (so the score moves by at most one
    level step either way), within the score `budget` when one is given; None when every try
    lands on a plan in `seen` or over the budget."""
    options = planner.options
    sign = 1 if up else -1
    for _ in range(tries):
        c = list(choice)
        a = int(rng.integers(len(options)))
        first = _steps(options[a], c[a], sign)
        if not first:
            continue
        c[a] = first[int(rng.integers(len(first)))]
        if swap:
            other = [
                (b, o)
                for b in range(len(options))
                if b != a
                for o in _steps(options[b], c[b], -sign)
            ]
            if not other:
                continue
            b, o = other[int(rng.integers(len(other)))]
            c[b] = o
        out = tuple(c)
        if out in seen:
            continue
        if budget is not None and planner.plan(out).score > _slack(budget):
            continue
        return out
    return None


def _steps(opts: Any, option: int, delta: int) -> list[int]:
    """The options one level step from `option` in one knob (`delta` +1: more compressed)."""
    row = [int(v) for v in opts.combos[option]]
    out = []
    for k in range(len(row)):
        moved = list(row)
        moved[k] += delta
        found = opts.index_of(tuple(moved))
        if found is not None:
            out.append(found)
    return out


_WAIT = object()
_DONE = object()


def _running(members: list) -> bool:
    return any(not t.state.is_finished() for t in members)


def _whole(t: Any) -> bool:
    """A COMPLETE trial: every window read."""
    from optuna.trial import TrialState

    return t.state == TrialState.COMPLETE


def _score(t: Any) -> float:
    """A trial's MicroNet score (its value, or in the budget form its user attribute)."""
    score = t.user_attrs.get("score")
    if score is None and t.values:
        score = t.values[0]
    return math.inf if score is None else float(score)


def _slack(budget: float | None) -> float:
    """A score budget with the tolerance every comparison against it uses."""
    from microsweep.prepare._objective import SCORE_TOLERANCE

    return math.inf if budget is None else budget * (1 + SCORE_TOLERANCE)


def _best_feasible(trials: list) -> Any:
    """The COMPLETE trial of least objective value (score; perplexity in the budget form)
    that meets its constraints, or None."""
    feasible = [
        t
        for t in trials
        if _whole(t)
        and t.values
        and (not t.constraints or all(c <= 0 for c in t.constraints.values()))
    ]
    return min(feasible, key=lambda t: t.values[0], default=None)


def _child_seed(seed: int | None, number: int) -> int:
    return ((seed or 0) * 7_919 + number * 104_729) % 2**32
