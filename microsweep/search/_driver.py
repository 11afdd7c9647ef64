"""`run_sweep` and `resume_sweep`: check what was asked, prepare the space, start the workers,
take the sweep's lease, then hand the study to the trial loop (`SweepLoop`).

Both commands share one set-up path (`_Session`: the store, the lease, the pool and their
release, the sampler, the loop); what differs is only how the sweep and its study come to be.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Unpack

from microsweep.errors import SpaceError, StorageError, UsageError
from microsweep.prepare import (
    Ceiling,
    MicroNet,
    Prepared,
    SpaceFile,
    load_space_file,
    measure_dense,
    model_fingerprint,
    prepare,
    recipe_of,
    reopen_space,
    space_from_objects,
    sweep_eval_key,
    versions,
    with_levels,
    with_reference,
    with_stop_rule,
)
from microsweep.search._guard import Lease
from microsweep.search._loop import LoopSettings, SweepLoop
from microsweep.search._options import SweepOptions, resolve_options
from microsweep.search._progress import say
from microsweep.search._result import SweepResult, best_by, tally_best
from microsweep.search._workers import WorkerOptions, check_timeout, start_pool
from microsweep.spaces import Policy, Space
from microsweep.storage import Store
from microsweep.storage._records import TrialRecord

if TYPE_CHECKING:
    import optuna

    from microsweep.workers import TrialResult, WorkerPool

__all__ = ["SweepResult", "resume_sweep", "run_sweep"]

KL_SAMPLERS = ("evopress",)
"""Samplers that rank candidates by KL from the dense model whatever `select_by` says: the sweep
keeps the dense model's next-token distributions for them."""


@dataclass
class _Session:
    """What `run` and `resume` share once the store is open: the lease, the pool, the sampler
    and the loop, and releasing all of them (and the store) however the command ends."""

    store: Store
    options: WorkerOptions
    progress: bool
    lease: Lease | None = None
    pool: WorkerPool | None = None

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.lease is not None:
                self.lease.release()
            if self.pool is not None:
                self.pool.close()
        finally:
            self.store.dispose()

    def take_lease(self, name: str) -> None:
        """Become the sweep's one driver (refused with the holder's name while another runs)."""
        self.lease = Lease(self.store, name)
        self.lease.acquire()

    def start_pool(self, sf: SpaceFile, prepared: Prepared) -> None:
        self.pool = start_pool(sf, prepared, self.options, progress=self.progress)

    def sampler(self, name: str, seed: int | None, sf: SpaceFile) -> optuna.samplers.BaseSampler:
        from microsweep.search._factory import make_sampler

        return make_sampler(
            name,
            seed=seed,
            space=sf.space,
            workers=self.options.workers,
            multi=sf.objective.multi,
            budgeted=sf.objective.budgeted,
        )

    def drive(
        self,
        sweep: Any,
        sf: SpaceFile,
        prepared: Prepared,
        study: optuna.Study,
        ceiling: Ceiling,
        settings: LoopSettings,
        warm: Sequence[dict[str, Any]] = (),
    ) -> SweepResult:
        """Run the sweep's remaining trials through the loop."""
        study_id = self.store.optuna_storage().get_study_id_from_name(sweep.study_name)
        loop = SweepLoop(
            self.store, sweep, sf, prepared, study, study_id, self.pool, ceiling, settings,
            self.lease,
        )  # fmt: skip
        return loop.run(warm)


def run_sweep(
    space: str | os.PathLike[str] | Space,
    *,
    name: str,
    trials: int,
    sampler: str = "auto",
    seed: int | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    objective: MicroNet | None = None,
    corpus: Any | None = None,
    evaluate: Callable[[Any], float] | None = None,
    calib: Any | None = None,
    train_tokens: Any | None = None,
    warm_start: Sequence[Policy | str | os.PathLike[str]] = (),
    **options: Unpack[SweepOptions],
) -> SweepResult:
    """Start a new sweep named `name` over `space`: the path of a space file, or a `Space`
    built in Python with `objective`, `corpus` (or `evaluate`), `calib` and `train_tokens` as a
    file would define them. `warm_start` policies (or policy files, as 'microsweep show
    --json' writes) run first; `on_trial` is called with each finished trial's record. Where
    and how the trials run (`workers`, `storage`, `address`, `in_process`, `progress`,
    `storage_wait`, `cpus_per_worker`, `gpus_per_worker`, `timeout`): see `SweepOptions`."""
    opts = resolve_options(options, "run_sweep")
    settings = opts.loop(trials, on_trial=on_trial)
    _check_run(trials, opts.workers, opts.timeout, seed, sampler, name)
    objects = dict(
        objective=objective, corpus=corpus, evaluate=evaluate, calib=calib,
        train_tokens=train_tokens,
    )  # fmt: skip
    store = Store(opts.storage)
    with _Session(store, opts.workers, opts.progress) as session:
        if name in store.sweep_names():
            raise StorageError(
                f"a sweep named {name!r} already exists in {store.display}; "
                "use 'microsweep resume' or another --name"
            )
        sf = _space_file(space, objects)
        warm = _warm_params(sf.space, warm_start)
        if sampler == "cmaes" and sf.objective.multi:
            raise UsageError("--sampler cmaes handles one objective; use tpe, nsga2 or auto")
        prepared = prepare(sf, seed or 0)
        dense, ceiling = _measure_dense(sf, prepared, opts.progress)
        prepared = with_stop_rule(sf, prepared, dense, ceiling.value)
        prepared = with_reference(sf, prepared, wanted=sampler in KL_SAMPLERS)
        prepared = with_levels(sf, prepared, store.url, model_fingerprint(sf.model))
        session.start_pool(sf, prepared)  # a cluster that cannot place them leaves nothing
        sweep = _new_sweep(store, name, space, sf, prepared, dense, ceiling, sampler, seed, trials)
        study = _new_study(session, sweep, sf, sampler, seed)
        return session.drive(sweep, sf, prepared, study, ceiling, settings, warm)


def _check_run(
    trials: int,
    options: WorkerOptions,
    timeout: float | None,
    seed: int | None,
    sampler: str,
    name: str,
) -> None:
    """Everything `run` can refuse before the store opens or the space loads."""
    from microsweep.prepare import check_counts
    from microsweep.search._samplers import SAMPLERS

    check_counts(trials, options.workers)
    check_timeout(timeout)
    if seed is not None and not 0 <= seed < 2**32:
        raise UsageError(f"--seed {seed} must be in 0..{2**32 - 1}")
    if sampler not in SAMPLERS:
        raise UsageError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    _check_name(name)
    options.check(trials)


def _space_file(space: Any, objects: dict[str, Any]) -> SpaceFile:
    """The space file at a path, or a `Space` built in Python with its objects."""
    if isinstance(space, Space):
        return space_from_objects(space, **objects)
    if not isinstance(space, (str, os.PathLike)):
        raise UsageError(
            f"space must be a Space(model, rules=...) or the path of a space file, not "
            f"{type(space).__name__}"
        )
    given = [k for k, v in objects.items() if v is not None]
    if given:
        raise UsageError(
            f"{', '.join(given)} given beside a space file; the file defines them (pass a "
            "Space object to give them in Python)"
        )
    return load_space_file(space)  # silent: an error in the file is the only line


def _measure_dense(
    sf: SpaceFile, prepared: Prepared, progress: bool
) -> tuple[TrialResult, Ceiling]:
    """The dense model measured like a trial, and the sweep's ceiling resolved against it."""
    t0 = time.perf_counter()
    where = "with the space's evaluate()" if sf.evaluate else f"on {len(prepared.windows)} windows"
    say(progress, f"measuring the dense model {where}")
    dense = measure_dense(sf, prepared)
    ceiling = sf.objective.bound(dense.perplexity)
    value = "none" if ceiling.value is None else f"{ceiling.value:.4f}"
    say(
        progress,
        f"dense model: perplexity {dense.perplexity:.4f}, ceiling {value} "
        f"({time.perf_counter() - t0:.1f}s)",
    )
    return dense, ceiling


def _new_sweep(
    store: Store,
    name: str,
    space: Any,
    sf: SpaceFile,
    prepared: Prepared,
    dense: TrialResult,
    ceiling: Ceiling,
    sampler: str,
    seed: int | None,
    trials: int,
) -> Any:
    """The sweep's row: its space, objective, fingerprints, dense figures and baseline."""
    model_fp = model_fingerprint(sf.model)
    b_name, b_params, b_ops = sf.objective.baseline_for(dense.params, dense.ops)
    return store.create_sweep(
        name=name,
        study_name=name,
        space_path=sf.path if isinstance(space, Space) else str(space),
        space_source=sf.source,
        space_json=sf.space.to_json(),
        objective_json=sf.objective.to_json(),
        model_fingerprint=model_fp,
        data_fingerprint=prepared.data_fingerprint,
        eval_key=sweep_eval_key(sf, prepared, model_fp),
        model_recipe=recipe_of(sf.model),
        dense_perplexity=dense.perplexity,
        dense_params=dense.params,
        dense_ops=dense.ops,
        dense_layers=dense.layers,
        baseline_name=b_name,
        baseline_params=b_params,
        baseline_ops=b_ops,
        ceiling=ceiling.value,
        sampler=sampler,
        seed=seed,
        target_trials=trials,
        versions=versions(),
    )


def _new_study(
    session: _Session, sweep: Any, sf: SpaceFile, sampler: str, seed: int | None
) -> optuna.Study:
    """The sweep's lease and Optuna study; the sweep row is removed again if either fails."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store, name = session.store, sweep.name
    try:
        session.take_lease(name)
        study = optuna.create_study(
            study_name=name,
            storage=store.optuna_storage(),
            sampler=session.sampler(sampler, seed, sf),
            directions=sf.objective.directions,
        )
        with warnings.catch_warnings():  # experimental in Optuna 5, and used on purpose
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # what optuna-dashboard labels its axes with, instead of "Objective 0"
            study.set_metric_names(["score", "perplexity"] if sf.objective.multi else ["score"])
        return study
    except optuna.exceptions.DuplicatedStudyError:
        store.delete_sweep(name)
        raise StorageError(
            f"an Optuna study named {name!r} already exists in {store.display} without a "
            "microsweep sweep; choose another --name"
        ) from None
    except BaseException:
        store.delete_sweep(name)
        raise


def _warm_params(
    space: Space, warm_start: Sequence[Policy | str | os.PathLike[str]]
) -> list[dict[str, Any]]:
    """The Optuna parameters of each warm-start policy (a Policy or a policy file), refused
    in one line when a file cannot be read or a policy does not fit the space."""
    if isinstance(warm_start, (str, os.PathLike, Policy)):
        warm_start = [warm_start]
    out = []
    for item in warm_start:
        where = "warm start policy"
        if isinstance(item, Policy):
            policy = item
        else:
            where = f"warm start {os.fspath(item)}"
            policy = Policy.read(item, label=where)  # bounded: a device or FIFO is refused
        try:
            out.append(space.params_from_policy(policy))
        except SpaceError as exc:
            raise UsageError(f"{where}: {exc}") from None
    return out


def _check_name(name: str) -> None:
    """A sweep name is 1..200 printable characters (it is a table cell and a file name)."""
    if not isinstance(name, str) or not name or len(name) > 200:
        raise UsageError("sweep name must be 1..200 characters")
    if not name.isprintable() or name != name.strip():
        raise UsageError(
            f"sweep name {name!r} has a control character or leading/trailing space; use "
            "letters, digits and punctuation"
        )


def resume_sweep(
    name: str,
    *,
    trials: int | None = None,
    space: Space | None = None,
    objective: MicroNet | None = None,
    corpus: Any | None = None,
    evaluate: Callable[[Any], float] | None = None,
    calib: Any | None = None,
    train_tokens: Any | None = None,
    **options: Unpack[SweepOptions],
) -> SweepResult:
    """Continue sweep `name` until it has `trials` finished trials in total (default: its
    original target). Refused while another driver runs the sweep. Trials an earlier driver
    spooled during a database outage are written first; trials it left RUNNING are then
    marked FAIL. A sweep started from Python objects needs the same `space` (and `corpus` or
    `evaluate`, `calib`, `train_tokens`) again; its objective defaults to the stored one. Where
    and how the trials run: see `SweepOptions` (as for `run_sweep`)."""
    began = time.perf_counter()
    opts = resolve_options(options, "resume_sweep")
    objects = dict(corpus=corpus, evaluate=evaluate, calib=calib, train_tokens=train_tokens)
    if space is None and (objective is not None or any(v is not None for v in objects.values())):
        raise UsageError("objective, corpus, evaluate, calib and train_tokens need space= too")
    store = Store(opts.storage, must_exist=True, upgrade=True)
    with _Session(store, opts.workers, opts.progress) as session:
        sweep = store.get_sweep(name)
        done = _finished_already(store, sweep, trials)
        if done is not None:
            return done
        given = None
        if space is not None:
            stored = MicroNet.from_json(sweep.objective_json)
            given = space_from_objects(space, objective=objective or stored, **objects)
        total = trials if trials is not None else sweep.target_trials
        opts.workers.check(total)
        check_timeout(opts.timeout)
        session.take_lease(name)  # before anything is touched: a live driver's trials stay
        sf, prepared = reopen_space(sweep, given)
        study = _reopen_study(session, sweep, sf)
        ceiling = Ceiling(sweep.ceiling, sweep.dense_perplexity)  # as the sweep began
        if sf.objective.early_stop and ceiling.value is not None and sf.evaluate is None:
            dense = measure_dense(sf, prepared)
            prepared = with_stop_rule(sf, prepared, dense, ceiling.value)
        if not sweep.eval_key:
            sweep.eval_key = sweep_eval_key(sf, prepared, sweep.model_fingerprint)
            store.update_sweep(name, eval_key=sweep.eval_key)
        finished = _end_unfinished(store, sweep, study)
        _retarget(store, sweep, trials, finished)
        if finished < total:
            prepared = with_reference(sf, prepared, wanted=sweep.sampler in KL_SAMPLERS)
            prepared = with_levels(sf, prepared, store.url, sweep.model_fingerprint)
            session.start_pool(sf, prepared)
        return session.drive(sweep, sf, prepared, study, ceiling, opts.loop(total, began=began))


def _reopen_study(session: _Session, sweep: Any, sf: SpaceFile) -> optuna.Study:
    """The sweep's Optuna study with a fresh sampler, after writing what an earlier driver
    spooled (the same seed again would repeat the first policies: the stream moves on)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = session.store
    storage = store.optuna_storage()
    try:
        study_id = storage.get_study_id_from_name(sweep.study_name)
    except KeyError:
        raise StorageError(f"sweep {sweep.name!r} has no Optuna study in {store.display}") from None
    _replay_spool(store, sweep, progress=session.progress)
    n_before = len(storage.get_all_trials(study_id, deepcopy=False))
    seed = None if sweep.seed is None else (sweep.seed + n_before) % 2**32
    sampler = session.sampler(sweep.sampler, seed, sf)
    return optuna.load_study(study_name=sweep.study_name, storage=storage, sampler=sampler)


def _retarget(store: Store, sweep: Any, trials: int | None, finished: int) -> None:
    """A new target of finished trials, refused below what the sweep already has."""
    if trials is None:
        return
    if trials < finished:
        raise UsageError(
            f"sweep {sweep.name!r} already has {finished} finished trials; pass --trials above "
            f"{finished}"
        )
    if trials != sweep.target_trials:
        store.update_sweep(sweep.name, target_trials=trials)


def _end_unfinished(store: Store, sweep: Any, study: optuna.Study) -> int:
    """Mark FAIL the trials an earlier driver left RUNNING, record in microsweep's table the
    finished ones it lacks, and return how many trials are finished."""
    from optuna.trial import TrialState

    from microsweep._optuna import trial_id

    storage = store.optuna_storage()
    reason = "driver stopped before the trial finished"
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial_id(t), "fail_reason", reason)
        study.tell(t.number, None, state=TrialState.FAIL)
    recorded = {row.number for row in store.trials(sweep.name)}
    for t in study.get_trials(deepcopy=False):  # finished in Optuna, missing from our table
        if t.state.is_finished() and t.number not in recorded:
            why = reason
            if t.state == TrialState.FAIL:
                why = t.user_attrs.get("fail_reason", reason)
            record = TrialRecord.failed(why)
            store.record_trial(sweep.id, record, number=t.number)
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())


def _finished_already(store: Store, sweep: Any, trials: int | None) -> SweepResult | None:
    """The result of a sweep that already has its target of finished trials and nothing
    spooled or running (so resume has nothing to do and loads no model), else None."""
    from microsweep.search._guard import spool_path

    rows = store.trials(sweep.name)
    target = trials if trials is not None else sweep.target_trials
    if len(rows) < target or spool_path(store.display, sweep.name).exists():
        return None
    if trials is not None and trials < len(rows):
        return None  # refused below, with the count
    from optuna.trial import TrialState

    storage_ = store.optuna_storage()
    try:
        study_id = storage_.get_study_id_from_name(sweep.study_name)
    except KeyError:
        return None
    if storage_.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        return None  # a stopped driver's trials: resume ends them
    result = SweepResult(name=sweep.name, already_done=True, by=best_by(sweep.objective_json))
    for row in rows:
        result.states[row.state] = result.states.get(row.state, 0) + 1
    tally_best(result, rows)
    if result.best_number is None and sweep.ceiling is not None:
        result.explain_infeasible(store)
    return result


def _replay_spool(store: Store, sweep: Any, *, progress: bool) -> None:
    """Write the finished trials an earlier driver spooled while the database was away (before
    RUNNING rows are ended), then remove the spool."""
    from microsweep.search._guard import read_spool, spool_path, trial_from_json

    path = spool_path(store.display, sweep.name)
    entries = read_spool(path)
    for entry in entries:
        row = tuple(entry["row"]) if entry["row"] else None
        store.record_trial(
            sweep.id,
            TrialRecord.from_json(entry["record"]),
            optuna_trial=(entry["study_id"], row, trial_from_json(entry["trial"])),
        )
    if entries:
        path.unlink()
        say(progress, f"wrote {len(entries)} finished trial(s) kept in {path} during an outage")
