"""Before the first trial of a planned sampler: count every option exactly, measure what the
sensitivity table lacks, give the sampler its planner and budget, and enqueue its warm starts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from microsweep.errors import UsageError
from microsweep.prepare import PLANNING_FACTOR_WITHOUT_CEILING
from microsweep.search._progress import say
from microsweep.search._sensitivity import ProbeBudget, sensitivity_line

if TYPE_CHECKING:
    import optuna

    from microsweep.allocate import Planner
    from microsweep.prepare import Ceiling, Prepared, SpaceFile
    from microsweep.search._result import SweepResult
    from microsweep.storage import Store
    from microsweep.workers import WorkerPool

__all__ = ["plan_sampler", "refuses"]


def refuses(ceiling: Ceiling, sampler: Any) -> bool:
    """Whether planning refuses the sweep: a sampler that needs the sensitivity table, under a
    ceiling not above the dense model (no compression can meet it)."""
    return ceiling.value is not None and ceiling.nll_budget() <= 0 and sampler.needs_sensitivity


def plan_sampler(
    store: Store,
    sweep: Any,
    sf: SpaceFile,
    prepared: Prepared,
    study: optuna.Study,
    pool: WorkerPool,
    result: SweepResult,
    *,
    ceiling: Ceiling,
    warm_slots: int | None,
    progress: bool,
    timeout: float | None = None,
    settle: Callable[[], None] | None = None,
) -> None:
    """Give a planned sampler its planner (and sensitivity table) and, on a new study
    (`warm_slots` not None), enqueue up to `warm_slots` of its warm starts that no trial has
    run yet; note what the planner drops. `settle` is called between the planner and the
    sensitivity pass (the caller records trials dispatched during start-up, so the probes
    have the workers to themselves). Other samplers need nothing."""
    from microsweep.search._samplers import PlannedSampler

    sampler = study.sampler
    if not isinstance(sampler, PlannedSampler):
        return
    sampler.say = lambda line: say(progress, line)
    planner = _planner(sweep, sf, prepared, pool, progress)
    budget = ceiling.nll_budget()
    if ceiling.value is None:
        say(
            progress,
            f"note: no perplexity ceiling; the {sweep.sampler} sampler plans for at most "
            f"{PLANNING_FACTOR_WITHOUT_CEILING:g}x the dense perplexity",
        )
    elif refuses(ceiling, sampler):
        raise UsageError(
            f"the perplexity ceiling {ceiling.value:.6g} is not above the dense model's "
            f"{ceiling.dense_perplexity:.6g}: no compression can meet it, so there is nothing to "
            "allocate; raise perplexity_ceiling or use --sampler uniform or tpe"
        )
    if sampler.needs_sensitivity:
        if settle is not None:  # the probes' numbers are not trial numbers: none may overlap
            settle()
        probe_budget = ProbeBudget.for_sweep(
            sweep.target_trials,
            pool.size,
            int(prepared.windows.shape[0]),
            subset=sf.evaluate is None,
            timeout=timeout,
        )
        _measure(store, sweep, pool, planner, result, progress, probe_budget)
    sampler.attach(planner, budget=budget, dense_nll=ceiling.dense_nll)
    sampler.score_budget = sf.objective.score_budget
    if hasattr(sampler, "FORCE_KL"):  # the evolutionary samplers: ranking and stages
        sampler.select_by = "kl" if sampler.FORCE_KL else sf.objective.select_by
    if hasattr(sampler, "window_dense_nll") and sf.evaluate is None:
        stop = prepared.settings.stop
        sampler.n_windows = int(prepared.windows.shape[0])
        sampler.tokens_per_window = int(prepared.windows.shape[1]) - 1
        if stop is not None and stop.n_windows == sampler.n_windows:
            sampler.window_dense_nll = list(stop.dense_nll)
    if warm_slots is not None:  # after the user's own warm starts, within the sweep's trials
        ran = {planner.locate(t.params) for t in study.get_trials(deepcopy=False) if t.params}
        fresh = [(p, a) for p, a in sampler.warm_starts() if planner.locate(p) not in ran]
        for params, attrs in fresh[: max(0, warm_slots)]:
            study.enqueue_trial(params, user_attrs=attrs)
    for note in result.notes:
        say(progress, f"note: {note}")


def _planner(
    sweep: Any, sf: SpaceFile, prepared: Prepared, pool: WorkerPool, progress: bool
) -> Planner:
    """Every level combination of every unit, compressed and counted alone, in both counting
    modes, against the sweep's own baseline: one unit per call on the pool's workers."""
    from microsweep.allocate import Planner
    from microsweep.score import Baseline, CountConfig

    started = time.perf_counter()
    planner = Planner(
        sf.space,
        sf.model,
        context=prepared.settings.context,
        config=CountConfig(**prepared.settings.count),
        baseline=Baseline(sweep.baseline_params, sweep.baseline_ops, sweep.baseline_name),
        calib=prepared.calib,
        map_runners=pool.map_runners,
    )
    n_options = sum(len(o) for o in planner.options)
    say(
        progress,
        f"planning: {n_options:,} options over {len(planner.units)} units counted exactly "
        f"in {time.perf_counter() - started:.1f}s on {pool.size} worker"
        f"{'' if pool.size == 1 else 's'}",
    )
    return planner


def _measure(
    store: Store,
    sweep: Any,
    pool: WorkerPool,
    planner: Planner,
    result: SweepResult,
    progress: bool,
    budget: ProbeBudget,
) -> None:
    """The sensitivity pass on the sweep's pool (only probes not stored under its key), within
    its share of the sweep's time, said in one line."""
    from microsweep.search._sensitivity import measure_sensitivity

    table, summary = measure_sensitivity(
        store,
        pool,
        planner.probes(),
        key=sweep.eval_key or "",
        label=sweep.name,
        model_fingerprint=sweep.model_fingerprint,
        data_fingerprint=sweep.data_fingerprint,
        dense_perplexity=sweep.dense_perplexity,
        progress=progress,
        budget=budget,
        priors=planner.probe_priors(),
    )
    say(progress, sensitivity_line(summary, budget))
    planner.set_sensitivity(table)
    result.sensitivity = summary
    result.notes.extend(planner.notes())
