"""`evo`: evolutionary refinement of the best feasible policy, with staged selection.

After `auto`'s start (warm starts, refit allocations, the uniform rescue) has a feasible trial,
each generation takes the best feasible trial as its parent and proposes children that each
differ from it by one level step in one unit and, for half of them, the opposite step in another
unit (a swap: the score stays within one level step of the parent's, as EvoPress's level
switches keep its budget). Children are screened on the first eighth of the windows, the best
quarter continue to half of them, and the best two to all of them (`Stage`): a screen reads a
child's loss as its excess NLL over the dense model on the same windows (or its KL divergence
when the sweep keeps a KL reference). Screens rank first by whether that loss is under the
budget, then by score (least first) among those under it and by loss among the rest, so the
survivors are the cheapest children that still look feasible. A survivor that ends feasible with
a lower score becomes the next parent (the parent is kept otherwise: elitism). Tied rules are
one unit, so they switch together. While a generation waits on results, the workers get `auto`'s
own proposals.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from microsweep.search._samplers import AutoSampler
from microsweep.search._stages import SCREENED_ATTR, STAGE_ATTR, Stage

__all__ = ["EvoSampler"]

EVO_ATTR = "evo"
"""User attribute of an evolutionary trial: {"gen": generation, "level": stage index, "parent":
the parent trial's number}."""


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

    def __init__(
        self, space: Any, *, seed: int | None, workers: int = 1, multi: bool = False
    ) -> None:
        super().__init__(space, seed=seed, workers=workers, multi=multi)
        self.n_windows = 0
        self.tokens_per_window = 0
        self.window_dense_nll: list[float] | None = None

    def stage_reads(self) -> list[int]:
        """Windows read at each stage, the last one all of them."""
        n = self.n_windows
        reads = [min(n, max(self.MIN_SCREEN, n // share)) for share in self.SHARES]
        return [*reads, n]

    # -- proposals -----------------------------------------------------------------------------
    def _propose(self, study, trial):  # noqa: ANN001, ANN202
        if self.multi or self.n_windows < 2 * self.MIN_SCREEN:
            return super()._propose(study, trial)
        trials = study.get_trials(deepcopy=False)
        parent = _best_feasible(trials)
        if parent is None:
            return super()._propose(study, trial)
        proposal = self._generation_step(trials, parent, trial.number)
        if proposal is None:
            return super()._propose(study, trial)
        return proposal

    def _generation_step(self, trials: list, parent: Any, number: int):  # noqa: ANN202
        """The next trial of the current generation (a child's screen or a survivor's
        continuation), or None while the generation waits on results; a generation with
        nothing left to propose or wait for, or whose parent was beaten while nothing of it
        runs, makes way for the next."""
        evo = [t for t in trials if EVO_ATTR in t.user_attrs]
        gen = max((t.user_attrs[EVO_ATTR]["gen"] for t in evo), default=-1)
        members = [t for t in evo if t.user_attrs[EVO_ATTR]["gen"] == gen]
        stale = members and members[0].user_attrs[EVO_ATTR]["parent"] != parent.number
        if not members or (stale and not _running(members)):
            gen, members = gen + 1, []
        meta = {"gen": gen, "parent": parent.number}
        action = self._next(trials, parent, members, meta, number)
        if action is _DONE:
            action = self._next(trials, parent, [], {**meta, "gen": gen + 1}, number)
        return None if action in (_DONE, _WAIT) else action

    def _next(self, trials: list, parent: Any, members: list, meta: dict, number: int) -> Any:
        """A proposal, `_WAIT` (results pending) or `_DONE` (the generation is over)."""
        from optuna.trial import TrialState

        reads = self.stage_reads()
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
        for k in (1, 2):
            if _running(level[k - 1]):
                return _WAIT
            screens = [
                t
                for t in level[k - 1]
                if t.state == TrialState.PRUNED and SCREENED_ATTR in t.user_attrs
            ]
            continued = {t.user_attrs[STAGE_ATTR].get("continues") for t in level[k]}
            for t in sorted(screens, key=self._rank)[: self.SURVIVORS[k - 1]]:
                if t.number not in continued:
                    stage = Stage(reads[k], continues=t.number, start=t.user_attrs[SCREENED_ATTR])
                    return self._staged(t.params, stage, {**meta, "level": k}, "evo-continue")
        return _WAIT if _running(members) else _DONE

    def _child(self, trials: list, parent: Any, meta: dict, read: int, number: int):  # noqa: ANN202
        """A new child of `parent`: one step more compressed in one unit and, every other child,
        one step less in another; screened on `read` windows."""
        planner = self._require_planner()
        base = planner.locate(parent.params)
        if base is None:
            return None
        seen = {planner.locate(t.params) for t in trials if t.params}
        seen |= {planner.locate(p) for p in self._planned.values()}
        rng = np.random.default_rng(_child_seed(self.seed, number))
        swap = bool(number % 2)
        child = mutate(planner, base, rng, swap=swap, seen=seen)
        if child is None and swap:
            child = mutate(planner, base, rng, swap=False, seen=seen)
        if child is None:
            return None
        params = planner.params(
            child, {k: parent.params[k] for k in self.space.hyper if k in parent.params}
        )
        return self._staged(params, Stage(read), {**meta, "level": 0}, "evo")

    def _staged(self, params: dict, stage: Stage, meta: dict, origin: str):  # noqa: ANN202
        """A proposal whose trial carries its stage and generation (set in `before_trial`)."""
        self._attrs_next = {STAGE_ATTR: stage.attr(), EVO_ATTR: meta}
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
    def screen_loss(self, t: Any) -> float:
        """A screened (or completed) trial's loss: its excess NLL per token over the dense
        model on the windows it read, else its KL there, else its log-perplexity excess."""
        attrs = t.user_attrs
        nll = attrs.get("window_nll")
        if nll and self.window_dense_nll is not None and self.tokens_per_window:
            from microsweep.score import subset_windows

            read = subset_windows(self.n_windows, len(nll))
            dense = math.fsum(self.window_dense_nll[i] for i in read)
            return (math.fsum(nll) - dense) / (len(nll) * self.tokens_per_window)
        if attrs.get("kl") is not None:
            return float(attrs["kl"])
        ppl = attrs.get("perplexity", attrs.get("perplexity_estimate"))
        if isinstance(ppl, (int, float)) and ppl > 0 and math.isfinite(ppl):
            return math.log(ppl) - self.dense_nll
        return math.inf

    def _rank(self, t: Any) -> tuple[int, float]:
        """Screens that look feasible first, cheapest first; the rest by loss."""
        loss = self.screen_loss(t)
        score = t.user_attrs.get("score")
        if t.values:
            score = t.values[0]
        if loss <= self.budget and score is not None:
            return (0, float(score))
        return (1, loss)


def mutate(
    planner: Any,
    choice: tuple[int, ...],
    rng: np.random.Generator,
    *,
    swap: bool,
    seen: set,
    tries: int = 64,
) -> tuple[int, ...] | None:
    """`choice` with one unit one level step more compressed in one knob and, with `swap`,
    another unit one step less compressed in one knob (so the score moves by at most one level
    step either way); None when every try lands on a plan in `seen`."""
    options = planner.options
    for _ in range(tries):
        c = list(choice)
        a = int(rng.integers(len(options)))
        up = _steps(options[a], c[a], +1)
        if not up:
            continue
        c[a] = up[int(rng.integers(len(up)))]
        if swap:
            down = [
                (b, o) for b in range(len(options)) if b != a for o in _steps(options[b], c[b], -1)
            ]
            if not down:
                continue
            b, o = down[int(rng.integers(len(down)))]
            c[b] = o
        out = tuple(c)
        if out not in seen:
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


def _best_feasible(trials: list) -> Any:
    """The COMPLETE trial of least score that meets the ceiling, or None."""
    from optuna.trial import TrialState

    feasible = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and t.values
        and (not t.constraints or all(c <= 0 for c in t.constraints.values()))
    ]
    return min(feasible, key=lambda t: t.values[0], default=None)


def _child_seed(seed: int | None, number: int) -> int:
    return ((seed or 0) * 7_919 + number * 104_729) % 2**32
