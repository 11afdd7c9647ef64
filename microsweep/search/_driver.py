"""The sweep driver: ask Optuna, hand a plain Policy to a free worker, record, tell.

The driver is the only writer to the study and to microsweep's tables, so SQLite works and the
sampler runs in one place. Every trial ends COMPLETE or FAIL with a stored reason; a worker
exception or a non-finite perplexity never stops the sweep.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from microsweep._text import distinct
from microsweep.errors import MicrosweepError, SpaceError, StorageError, UsageError
from microsweep.prepare import (
    INLINE_PATH,
    MicroNet,
    Prepared,
    SpaceFile,
    check_counts,
    load_space_file,
    measure_dense,
    model_fingerprint,
    prepare,
    recipe_of,
    reopen_space,
    space_from_objects,
    sweep_eval_key,
    versions,
    with_stop_rule,
)
from microsweep.search._guard import Lease
from microsweep.spaces import Policy, Space
from microsweep.storage import Store

if TYPE_CHECKING:
    import optuna

__all__ = ["SweepResult", "resume_sweep", "run_sweep"]


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
    eval_seconds: float = 0.0
    eval_seconds_saved: float = 0.0
    sensitivity: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timed_out: bool = False  # the time budget ended the run before its target
    already_done: bool = False  # a resume that found the target reached: nothing ran

    def consider(self, number: int, state: str, origin: str | None, score: Any, row: Any) -> None:
        """Fold one finished trial into the best feasible (and best uniform) figures."""
        if state != "COMPLETE" or not row.get("feasible"):
            return
        if self.best_score is None or score < self.best_score:
            self.best_number, self.best_score = number, score
            self.best_perplexity = row.get("perplexity")
        if origin == "uniform" and (
            self.best_uniform_score is None or score < self.best_uniform_score
        ):
            self.best_uniform_number, self.best_uniform_score = number, score


def _tally_best(result: SweepResult, rows: Sequence[Any]) -> None:
    """Fold stored trial rows into `result`'s best feasible and best uniform figures."""
    for row in rows:
        row_d = {"feasible": row.feasible, "perplexity": row.perplexity}
        result.consider(row.number, row.state, row.origin, row.score, row_d)


class _Progress:
    """One line per finished trial (or a rewritten line on a terminal), with the time spent on
    trials and an estimate of the time left from their pace. The clock starts when the first
    trial is dispatched (`start`), so the start-up (dense model, workers, sensitivity pass,
    planning) is reported on its own line and never counted as trial time."""

    def __init__(
        self, total: int, stream: Any = None, enabled: bool = True, first: int = 0
    ) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.first = first  # trials finished before this run (a resume)
        self.started = time.perf_counter()
        self._begun = False

    def start(self, startup: float) -> None:
        """Trials begin now; `startup` seconds went before them (said on one line)."""
        if self._begun:
            return
        self._begun = True
        self.started = time.perf_counter()
        if self.enabled:
            self.stream.write(
                f"start-up took {_clock(startup)} (space, dense model, workers, planning); "
                f"{self.total - self.first} trials to run, timed from here\n"
            )
            self.stream.flush()

    def update(self, done: int, states: dict[str, int], best: float | None, last: str) -> None:
        if not self.enabled:
            return
        parts = " ".join(f"{k}={v}" for k, v in sorted(states.items()))
        best_s = f"{best:.5g}" if best is not None else "-"
        clock = _trial_clock(self.started, done - self.first, self.total - done)
        line = f"[{done}/{self.total}] {clock} | {parts} | best feasible score {best_s} | {last}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            if done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _trial_clock(started: float, ran: int, left: int) -> str:
    """The time since the first trial was dispatched ("m:ss elapsed") and the time left at the
    pace of the `ran` trials finished since then (", ETA m:ss")."""
    elapsed = max(0.0, time.perf_counter() - started)
    eta = elapsed / ran * max(left, 0) if ran > 0 else None
    return f"{_clock(elapsed)} elapsed" + (f", ETA {_clock(eta)}" if eta is not None else "")


def _clock(seconds: float) -> str:
    """h:mm:ss or m:ss (never negative)."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


FULL_EVALUATION = frozenset({"nsga2", "gp"})
"""Samplers whose trials are evaluated in full: they learn nothing from a PRUNED trial."""


def _plan(
    store: Store,
    sweep: Any,
    sf: SpaceFile,
    prepared: Prepared,
    study: optuna.Study,
    pool: Any,
    result: SweepResult,
    *,
    total: int,
    progress: bool,
    fresh: bool = False,
    queued: int = 0,
) -> None:
    """Give a planned sampler its planner (and sensitivity table), enqueue its warm starts on a
    `fresh` study after the `queued` ones given by the user (no more than the sweep's `total`
    trials in all, so none is left waiting), and note what the planner drops."""

    from microsweep.allocate import Planner
    from microsweep.score import Baseline, CountConfig
    from microsweep.search._samplers import _PlanSampler
    from microsweep.search._sensitivity import measure_sensitivity

    sampler = study.sampler
    if not isinstance(sampler, _PlanSampler):
        return
    started = time.perf_counter()
    planner = Planner(
        sf.space,
        sf.model,
        context=prepared.settings.context,
        config=CountConfig(**prepared.settings.count),
        baseline=Baseline(sweep.baseline_params, sweep.baseline_ops, sweep.baseline_name),
        calib=prepared.calib,
    )
    n_options = sum(len(o) for o in planner.options)
    _say(
        progress,
        f"planning: {n_options:,} options over {len(planner.units)} units counted exactly "
        f"in {time.perf_counter() - started:.1f}s",
    )
    dense_nll = math.log(sweep.dense_perplexity)
    ceiling = sweep.ceiling if sweep.ceiling is not None else 1.05 * sweep.dense_perplexity
    budget = math.log(ceiling) - dense_nll
    if budget <= 0 and sampler.needs_sensitivity:
        raise UsageError(
            f"the perplexity ceiling {ceiling:.6g} is not above the dense model's "
            f"{sweep.dense_perplexity:.6g}: no compression can meet it, so there is nothing to "
            "allocate; raise perplexity_ceiling or use --sampler uniform or tpe"
        )
    if sampler.needs_sensitivity:
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
        )
        planner.set_sensitivity(table)
        result.sensitivity = summary
        result.notes.extend(planner.notes())
    sampler.attach(planner, budget=budget, dense_nll=dense_nll)
    if fresh:  # after the user's own warm starts, within the sweep's trials
        for params, attrs in sampler.warm_starts()[: max(0, total - queued)]:
            study.enqueue_trial(params, user_attrs=attrs)
    for note in result.notes:
        _say(progress, f"note: {note}")


def _make_pool(
    sf: SpaceFile,
    prepared: Prepared,
    *,
    workers: int,
    address: str | None,
    in_process: bool,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
) -> Any:
    """The workers of a sweep (or a sensitivity pass): the space's model and evaluation."""
    from microsweep.score import rules_defined_in
    from microsweep.workers import make_pool

    if not in_process and address is None:
        # token auth, Ray's own default for a local start, chosen here so Ray need not warn
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        # Ray runs workers at nice 15: beside any busy process they get a sliver of a core
        # (the demo's sensitivity probes ran 40x slower beside two), while here they are the work
        os.environ.setdefault("RAY_worker_niceness", "0")
    handler = signal.getsignal(signal.SIGTERM)
    pool = make_pool(
        workers,
        model=sf.model,
        windows=prepared.windows,
        settings=prepared.settings,
        calib=prepared.calib,
        train_tokens=prepared.train_tokens,
        evaluate=sf.evaluate,
        address=address,
        in_process=in_process,
        register_by_value=(sf.module,),
        # the file's own counting rules (a script's or notebook's, for objects), on every worker
        rules=rules_defined_in("__main__" if sf.path == INLINE_PATH else sf.module.__name__),
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
    )
    _keep_handler(signal.SIGTERM, handler)
    return pool


def _say(enabled: bool, line: str) -> None:
    if enabled:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _origin(study: optuna.Study, trial: Any, default: str) -> str:
    """Who proposed `trial`: the planned sampler's record, else the origin an enqueued trial
    carries (a warm start), else the sampler's name."""
    from microsweep.search._samplers import ORIGIN_ATTR

    origin = getattr(study.sampler, "origin", None)
    found = origin(trial.number) if callable(origin) else None
    return found or trial.user_attrs.get(ORIGIN_ATTR) or default


class _SamplerClock:
    """Time spent inside the sampler's own methods, so driver bookkeeping is reported apart from
    the sampler's compute (TPE's fit grows with the trials; bookkeeping must not)."""

    METHODS = (
        "infer_relative_search_space",
        "sample_relative",
        "sample_independent",
        "before_trial",
        "after_trial",
    )

    def __init__(self, sampler: Any) -> None:
        self.seconds = 0.0
        if sampler is None:  # nothing to time yet
            return
        for name in self.METHODS:
            method = getattr(sampler, name, None)
            if method is not None:
                setattr(sampler, name, self._timed(method))

    def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


def _memory_study(study: optuna.Study) -> optuna.Study:
    """An in-memory twin of the sweep's RDB study holding its finished trials: asking,
    suggesting and telling there touch no database, and each finished trial is then written to
    SQL in one transaction (`Store.record_trial`), instead of one commit per parameter."""
    import optuna

    mem = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(),
        sampler=study.sampler,
        directions=study.directions,
    )
    trials = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        if "constraints" in t.system_attrs and any(
            k.startswith("constraints:") for k in t.system_attrs
        ):  # the dashboard's copy of the named constraint: samplers see it once
            t = copy.copy(t)
            t.system_attrs = {k: v for k, v in t.system_attrs.items() if k != "constraints"}
        trials.append(t)
    mem.add_trials(trials)
    return mem


@dataclass
class _Asked:
    """A trial asked of the in-memory study: its policy, its reserved Optuna row (trial id,
    number) once it has one, and the bookkeeping and sampler seconds spent on it so far."""

    trial: Any
    policy: Any
    row: tuple[int, int] | None = None
    driver_s: float = 0.0
    sampler_s: float = 0.0


def _drive(
    store: Store,
    sweep: Any,
    sf: SpaceFile,
    prepared: Prepared,
    study: optuna.Study,
    pool: Any,
    *,
    total: int,
    in_process: bool,
    progress: bool,
    lease: Any = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    storage_wait: float = 60.0,
    timeout: float | None = None,
    warm: Sequence[dict[str, Any]] = (),
    began: float | None = None,
) -> SweepResult:
    """Run trials until `study` has `total` finished ones, or until `timeout` seconds have
    passed (no new trial starts after it; those running finish and are kept).

    Sampling happens on an in-memory twin of the study. A trial's Optuna row is reserved RUNNING
    when it is dispatched to a Ray worker (in-process: when it is written), and when it
    finishes its parameters, values and attributes go into that row together with microsweep's
    rows in one transaction, which also reserves the row of the trial asked ahead. With Ray, the
    next policy is asked before a worker frees, and a freed worker gets it before the finished
    trial's bookkeeping starts. Writes are retried while the database is away, for up to
    `storage_wait` seconds; past that the sweep stops and spools what finished. `began` is
    when the command started (perf_counter), so the start-up is reported apart from trial time.
    """
    from optuna.trial import TrialState

    from microsweep.score import Baseline, micronet_score
    from microsweep.search._guard import (
        StorageGuard,
        StorageOutage,
        spool_path,
        trial_to_json,
        write_spool,
    )
    from microsweep.search._samplers import ORIGIN_ATTR

    ceiling = sweep.ceiling
    baseline = Baseline(sweep.baseline_params, sweep.baseline_ops, sweep.baseline_name)
    multi = sf.objective.objectives == "score+perplexity"
    study_id = study._study_id
    mem = _memory_study(study)
    done = first = len(mem.get_trials(deepcopy=False))
    result = SweepResult(name=sweep.name)
    for t in mem.get_trials(deepcopy=False):
        result.states[t.state.name] = result.states.get(t.state.name, 0) + 1
    _tally_best(result, store.trials(sweep.name))
    if done >= total:
        return result
    bar = _Progress(total, enabled=progress, first=done)
    began = time.perf_counter() if began is None else began
    started = time.perf_counter()
    driver_time = sampler_time = 0.0
    guard = StorageGuard(storage_wait, lambda line: _say(progress, line))
    in_flight: dict[int, _Asked] = {}  # by in-memory trial number
    ready: list[_Asked] = []  # asked ahead, waiting for a free worker
    ahead = 0 if in_process else 1  # a Ray worker never waits for the sampler
    asked = done
    # NSGA-II and GP learn only from completed trials: a stopped one would be lost to them
    early_stop = sweep.sampler not in FULL_EVALUATION
    default_origin = sweep.sampler
    clock = _SamplerClock(None)
    unwritten: list[tuple[_Asked, dict[str, Any]]] = []  # told, write under way or failed

    def ask() -> _Asked:
        t0, s0 = time.perf_counter(), clock.seconds
        trial = mem.ask()
        policy = sf.space.suggest(trial)
        sampler_s = clock.seconds - s0
        return _Asked(trial, policy, None, time.perf_counter() - t0 - sampler_s, sampler_s)

    def submit(item: _Asked) -> None:
        nonlocal asked
        t0 = time.perf_counter()
        if item.row is None and not in_process:  # visible as RUNNING while a worker has it
            item.row = guard.call(store.reserve_trials, study_id, 1)[0]
        in_flight[item.trial.number] = item
        policy_json = item.policy.to_json()
        item.driver_s += time.perf_counter() - t0
        pool.submit(item.trial.number, policy_json, early_stop=early_stop)  # in-process: runs it
        asked += 1

    def conclude(item: _Asked, res: dict[str, Any]) -> dict[str, Any]:
        """Score a worker's result and tell it to the in-memory study; returns the row to
        write (a FAIL with its reason when the worker or the scoring failed)."""
        trial, policy = item.trial, item.policy
        origin = _origin(mem, trial, default_origin)
        ranks = {n: lp.rank for n, lp in policy.layers.items() if lp.rank is not None}
        if ranks:  # the ranks applied, as `status` shows them (a rank param may be a fraction)
            trial.set_user_attr("ranks", ranks)
        timings = dict(res.get("timings", {}))
        base = {
            "origin": origin,
            "policy": policy.to_json(),
            "summary": policy.summary(),
            "worker": res.get("worker"),
        }
        try:
            if res["status"] not in ("ok", "pruned"):
                raise _TrialFailed(res.get("error") or "worker gave no reason")
            score = micronet_score(res["params"], res["ops"], baseline)
            pruned = res["status"] == "pruned"
            ppl = res["perplexity_estimate"] if pruned else res["perplexity"]
            reason = None
            if pruned:
                seen, n = res["windows_seen"], res["windows"]
                where = f"after {seen}/{n} windows"
                if res.get("finetune_stopped_at") is not None:
                    where = f"fine-tuning at step {res['finetune_stopped_at']} ({seen} windows)"
                best_s, ceiling_s = distinct(res["optimistic_perplexity"], ceiling)
                reason = (
                    f"stopped {where}: perplexity heading for {distinct(ppl, ceiling)[0]} "
                    f"(at best {best_s}), ceiling {ceiling_s}"
                )
                timings["evaluate_saved"] = timings.get("evaluate", 0.0) * (n / seen - 1)
            if res.get("finetune_curve"):  # [step, subset perplexity] during fine-tuning
                trial.set_user_attr("finetune_curve", res["finetune_curve"])
            if not multi:
                for step, value in enumerate(res.get("intermediate", ())):
                    trial.report(value, step)
            trial.set_constraint("perplexity", 0.0 if ceiling is None else ppl - ceiling)
            if pruned:
                trial.set_user_attr("perplexity_estimate", ppl)
                trial.set_user_attr("score", score)
                mem.tell(trial, None, state=TrialState.PRUNED)
            else:
                trial.set_user_attr("perplexity", ppl)
                mem.tell(trial, [score, ppl] if multi else score)
            return base | {
                "state": "PRUNED" if pruned else "COMPLETE",
                "reason": reason,
                "score": score,
                "perplexity": ppl,
                "params": res["params"],
                "ops": res["ops"],
                "feasible": (ceiling is None or ppl <= ceiling) and not pruned,
                "freebie": res.get("freebie"),
                "count_config": res.get("count_config"),
                "layers": res.get("layers", ()),
                "timings": timings,
            }
        except (_TrialFailed, MicrosweepError) as exc:  # a bad result: keep the cause
            if mem._storage.get_trial(trial._trial_id).state.is_finished():
                raise
            reason = str(exc) if isinstance(exc, _TrialFailed) else f"driver: {exc}"
            trial.set_user_attr("fail_reason", reason)
            mem.tell(trial, None, state=TrialState.FAIL)
            return base | {"state": "FAIL", "reason": reason, "timings": timings}

    def persist(item: _Asked, record: dict[str, Any], *, wait: bool = True) -> int:
        """Write the told trial to Optuna's tables and microsweep's in one transaction,
        reserving the rows of trials asked ahead in it too; returns its number. While the write
        is under way the trial is in `unwritten`, so an outage can spool it."""
        frozen = mem._storage.get_trial(item.trial._trial_id)
        entry = (item, record)
        unwritten.append(entry)
        ahead_items = [a for a in ready if a.row is None]
        write = guard.call if wait else (lambda fn, *a, **k: fn(*a, **k))
        rows = write(
            store.record_trial,
            sweep.id,
            optuna_trial=(study_id, item.row, frozen),
            reserve=len(ahead_items),
            **record,
        )
        unwritten.remove(entry)
        item.row = rows[0]
        for a, row in zip(ahead_items, rows[1:], strict=True):
            a.row = row
        return item.row[1]

    def expired() -> bool:
        return timeout is not None and time.perf_counter() - started >= timeout

    def refill() -> None:
        if len(ready) < ahead and asked + len(ready) < total and not expired():
            ready.append(ask())  # the next policy is ready before a worker frees

    def spool(exc: StorageOutage) -> StorageError:
        """Keep every finished, unwritten trial on local disk (draining results the workers
        already finished) and say how to get them in."""
        while (res := pool.wait(timeout=0)) is not None:
            item = in_flight.pop(res["number"])
            unwritten.append((item, conclude(item, res)))
        path = spool_path(store.display, sweep.name)
        write_spool(
            path,
            [
                {
                    "study_id": study_id,
                    "row": item.row,
                    "record": record,
                    "trial": trial_to_json(mem._storage.get_trial(item.trial._trial_id)),
                }
                for item, record in unwritten
            ],
        )
        return StorageError(
            f"{exc}; the sweep stopped and {len(unwritten)} finished trial(s) are kept in "
            f"{path}: run 'microsweep resume --name {sweep.name}' once the database is back"
        )

    try:
        fresh = not mem.get_trials(deepcopy=False)
        if fresh:
            for params in warm[:total]:
                mem.enqueue_trial(params, user_attrs={ORIGIN_ATTR: "warm start"})
        _plan(
            store, sweep, sf, prepared, mem, pool, result, total=total, progress=progress,
            fresh=fresh, queued=min(len(warm), total) if fresh else 0,
        )  # fmt: skip
        clock = _SamplerClock(mem.sampler)
        bar.start(time.perf_counter() - began)
        while done < total:
            while pool.free and asked < total and (ready or not expired()):
                submit(ready.pop(0) if ready else ask())  # an asked-ahead trial still runs
            refill()
            if not in_flight:  # the time budget is spent and nothing runs
                result.timed_out = True
                break
            res = pool.wait()
            if lease is not None:
                lease.check()  # another driver took the sweep: write nothing more
            if pool.free and ready and asked < total:
                submit(ready.pop(0))  # dispatch first, then the bookkeeping of this result
            t0, s0 = time.perf_counter(), clock.seconds
            item = in_flight.pop(res["number"])
            result.eval_seconds += res.get("timings", {}).get("evaluate", 0.0)
            record = conclude(item, res)
            # this trial's own spans: its ask and dispatch, then its telling and writing (the
            # next trial's ask in between is that trial's); sampler time inside them apart
            item.sampler_s += clock.seconds - s0
            item.driver_s += max(0.0, time.perf_counter() - t0 - (clock.seconds - s0))
            refill()  # asked after this result is told, reserved in its transaction
            timings = record["timings"]
            result.eval_seconds_saved += timings.get("evaluate_saved", 0.0)
            timings["sampler"] = item.sampler_s
            timings["driver"] = item.driver_s  # the write's own time is added below
            t1 = time.perf_counter()
            number = persist(item, record)
            timings["driver"] = item.driver_s + (time.perf_counter() - t1)
            driver_time += timings["driver"]
            sampler_time += item.sampler_s
            done += 1
            state, origin = record["state"], record["origin"]
            result.states[state] = result.states.get(state, 0) + 1
            result.consider(number, state, origin, record.get("score"), record)
            if state == "COMPLETE":
                ppl = record["perplexity"]
                if ceiling is None:
                    ppl_s = f"ppl {ppl:.4g}"
                else:
                    ppl_s, ceiling_s = distinct(ppl, ceiling)
                    over = "meets the ceiling" if record["feasible"] else "OVER the ceiling"
                    ppl_s = f"ppl {ppl_s}, {over} {ceiling_s}"
                last = f"trial {number} ({origin}) score {record['score']:.4g} {ppl_s}"
            elif state == "PRUNED":
                last = f"trial {number} ({origin}) stopped early: {record['reason']}"
            else:
                last = f"trial {number} FAIL ({record['reason']})"
            bar.update(done, result.states, result.best_score, last)
            if on_trial is not None:
                on_trial({"number": number, **record})
    except StorageOutage as exc:
        raise spool(exc) from None
    finally:
        # interrupted: a trial that ran, or whose row was reserved, is kept as a FAIL with its
        # policy (one attempt each: the store may be what failed, and resume ends the rows)
        stopped = [(i, "finished") for i in in_flight.values()]
        stopped += [(i, "started") for i in ready if i.row is not None]
        for item, what in stopped:
            try:
                reason = f"sweep stopped before the trial {what}"
                item.trial.set_user_attr("fail_reason", reason)
                mem.tell(item.trial, None, state=TrialState.FAIL)
                base = {"origin": _origin(mem, item.trial, default_origin)}
                persist(
                    item,
                    base
                    | {
                        "state": "FAIL",
                        "reason": reason,
                        "policy": item.policy.to_json(),
                        "summary": item.policy.summary(),
                        "timings": {},
                    },
                    wait=False,
                )
            except Exception:
                pass
    ran = done - first
    result.wall = time.perf_counter() - started
    result.driver_ms_per_trial = 1000 * driver_time / max(ran, 1)
    result.sampler_ms_per_trial = 1000 * sampler_time / max(ran, 1)
    return result


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


class _TrialFailed(Exception):
    """A worker reported an error for the trial (its message is the reason stored)."""


def run_sweep(
    space: str | os.PathLike[str] | Space,
    *,
    name: str,
    trials: int,
    workers: int = 1,
    storage: str | None = None,
    sampler: str = "auto",
    seed: int | None = None,
    address: str | None = None,
    in_process: bool = False,
    progress: bool = True,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    storage_wait: float = 60.0,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    timeout: float | None = None,
    objective: MicroNet | None = None,
    corpus: Any | None = None,
    evaluate: Callable[[Any], float] | None = None,
    calib: Any | None = None,
    train_tokens: Any | None = None,
    warm_start: Sequence[Policy | str | os.PathLike[str]] = (),
) -> SweepResult:
    """Start a new sweep named `name` over `space`: the path of a space file, or a `Space`
    built in Python with `objective`, `corpus` (or `evaluate`), `calib` and `train_tokens` as a
    file would define them. `warm_start` policies (or policy files, as 'microsweep show
    --json' writes) run first. `storage_wait` is how long the driver keeps retrying while the
    database is unreachable before it stops; `timeout` is a time budget in seconds after which
    no new trial starts (resume continues); each Ray worker reserves `cpus_per_worker` CPUs
    (its torch threads) and `gpus_per_worker` GPUs (a worker given a GPU evaluates on it)."""
    import optuna

    began = time.perf_counter()
    check_counts(trials, workers)
    _check_timeout(timeout)
    if seed is not None and not 0 <= seed < 2**32:
        raise UsageError(f"--seed {seed} must be in 0..{2**32 - 1}")
    from microsweep.search._samplers import SAMPLERS, make_sampler

    if sampler not in SAMPLERS:
        raise UsageError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    _check_name(name)
    _check_resources(workers, address, in_process, cpus_per_worker, gpus_per_worker)
    store = Store(storage)
    if name in store.sweep_names():
        raise StorageError(
            f"a sweep named {name!r} already exists in {store.display}; "
            "use 'microsweep resume' or another --name"
        )
    objects = dict(
        objective=objective, corpus=corpus, evaluate=evaluate, calib=calib,
        train_tokens=train_tokens,
    )  # fmt: skip
    if isinstance(space, Space):
        sf = space_from_objects(space, **objects)
    elif not isinstance(space, (str, os.PathLike)):
        raise UsageError(
            f"space must be a Space(model, rules=...) or the path of a space file, not "
            f"{type(space).__name__}"
        )
    else:
        given = [k for k, v in objects.items() if v is not None]
        if given:
            raise UsageError(
                f"{', '.join(given)} given beside a space file; the file defines them (pass a "
                "Space object to give them in Python)"
            )
        sf = load_space_file(space)  # silent: an error in the file is the only line
    warm = _warm_params(sf.space, warm_start)
    if sampler == "cmaes" and sf.objective.objectives != "score":
        raise UsageError("--sampler cmaes handles one objective; use tpe, nsga2 or auto")
    prepared = prepare(sf, seed or 0)
    t0 = time.perf_counter()
    where = "with the space's evaluate()" if sf.evaluate else f"on {len(prepared.windows)} windows"
    _say(progress, f"measuring the dense model {where}")
    dense = measure_dense(sf, prepared)
    ceiling = sf.objective.ceiling(dense["perplexity"])
    _say(
        progress,
        f"dense model: perplexity {dense['perplexity']:.4f}, ceiling "
        + ("none" if ceiling is None else f"{ceiling:.4f}")
        + f" ({time.perf_counter() - t0:.1f}s)",
    )
    prepared = with_stop_rule(sf, prepared, dense, ceiling)
    model_fp = model_fingerprint(sf.model)
    if sf.objective.baseline == "dense":
        b_name, b_params, b_ops = "dense", dense["params"], dense["ops"]
    else:
        b_name, b_params, b_ops = "challenge", 159e6, 318e6
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # workers first: a cluster that is not there or cannot place them leaves nothing stored
    pool = _start_pool(
        sf, prepared, workers, address, in_process, progress, (cpus_per_worker, gpus_per_worker)
    )
    lease = None
    try:
        sweep = store.create_sweep(
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
            dense_perplexity=dense["perplexity"],
            dense_params=dense["params"],
            dense_ops=dense["ops"],
            dense_layers=dense["layers"],
            baseline_name=b_name,
            baseline_params=b_params,
            baseline_ops=b_ops,
            ceiling=ceiling,
            sampler=sampler,
            seed=seed,
            target_trials=trials,
            versions=versions(),
        )
        try:
            lease = Lease(store, name)
            lease.acquire()
            multi = sf.objective.objectives != "score"
            study = optuna.create_study(
                study_name=name,
                storage=store.optuna_storage(),
                sampler=make_sampler(
                    sampler, seed=seed, space=sf.space, workers=workers, multi=multi
                ),
                directions=sf.objective.directions,
            )
            with warnings.catch_warnings():  # experimental in Optuna 5, and used on purpose
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # what optuna-dashboard labels its axes with, instead of "Objective 0"
                study.set_metric_names(["score", "perplexity"] if multi else ["score"])
        except optuna.exceptions.DuplicatedStudyError:
            store.delete_sweep(name)
            raise StorageError(
                f"an Optuna study named {name!r} already exists in {store.display} without a "
                "microsweep sweep; choose another --name"
            ) from None
        except BaseException:
            store.delete_sweep(name)
            raise
        return _drive(
            store,
            sweep,
            sf,
            prepared,
            study,
            pool,
            total=trials,
            in_process=in_process,
            progress=progress,
            lease=lease,
            on_trial=on_trial,
            storage_wait=storage_wait,
            timeout=timeout,
            warm=warm,
            began=began,
        )
    finally:
        if lease is not None:
            lease.release()
        pool.close()
        store.dispose()


def _check_name(name: str) -> None:
    """A sweep name is 1..200 printable characters (it is a table cell and a file name)."""
    if not isinstance(name, str) or not name or len(name) > 200:
        raise UsageError("sweep name must be 1..200 characters")
    if not name.isprintable() or name != name.strip():
        raise UsageError(
            f"sweep name {name!r} has a control character or leading/trailing space; use "
            "letters, digits and punctuation"
        )


def _check_resources(
    workers: int, address: str | None, in_process: bool, cpus: float, gpus: float
) -> None:
    """What no pool could place, refused before the space loads or the dense model runs."""
    from microsweep.workers import check_resources

    check_resources(
        workers, address=address, in_process=in_process, cpus_per_worker=cpus,
        gpus_per_worker=gpus,
    )  # fmt: skip


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
        raise UsageError(f"--timeout {timeout!r} must be a number of seconds above 0")


def _start_pool(
    sf: SpaceFile,
    prepared: Prepared,
    workers: int,
    address: str | None,
    in_process: bool,
    progress: bool,
    resources: tuple[float, float] = (1.0, 0.0),
) -> Any:
    if in_process:
        _say(progress, "starting 1 in-process worker")
    else:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        _say(
            progress,
            f"starting {workers} Ray worker(s) on {where} (each loads the model; a local start "
            "takes 10-30 s)",
        )
    cpus, gpus = resources
    t0 = time.perf_counter()
    pool = _make_pool(
        sf,
        prepared,
        workers=workers,
        address=address,
        in_process=in_process,
        cpus_per_worker=cpus,
        gpus_per_worker=gpus,
    )
    if not in_process:
        _say(progress, f"workers ready after {time.perf_counter() - t0:.1f}s")
    return pool


def _keep_handler(signum: int, handler: Any) -> None:
    """Put back a Python signal handler that starting Ray replaced with its own (Ray's prints a
    native stack dump on SIGTERM; the command line turns SIGTERM into a clean stop)."""
    import threading

    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signum, handler)


def resume_sweep(
    name: str,
    *,
    trials: int | None = None,
    workers: int = 1,
    storage: str | None = None,
    address: str | None = None,
    in_process: bool = False,
    progress: bool = True,
    storage_wait: float = 60.0,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    timeout: float | None = None,
    space: Space | None = None,
    objective: MicroNet | None = None,
    corpus: Any | None = None,
    evaluate: Callable[[Any], float] | None = None,
    calib: Any | None = None,
    train_tokens: Any | None = None,
) -> SweepResult:
    """Continue sweep `name` until it has `trials` finished trials in total (default: its
    original target). Refused while another driver runs the sweep. Trials an earlier driver
    spooled during a database outage are written first; trials it left RUNNING are then
    marked FAIL. A sweep started from Python objects needs the same `space` (and `corpus` or
    `evaluate`, `calib`, `train_tokens`) again; its objective defaults to the stored one."""
    import optuna
    from optuna.trial import TrialState

    began = time.perf_counter()
    objects = dict(corpus=corpus, evaluate=evaluate, calib=calib, train_tokens=train_tokens)
    if space is None and (objective is not None or any(v is not None for v in objects.values())):
        raise UsageError("objective, corpus, evaluate, calib and train_tokens need space= too")
    store = Store(storage, must_exist=True, upgrade=True)
    sweep = store.get_sweep(name)
    done = _finished_already(store, sweep, trials)
    if done is not None:
        store.dispose()
        return done
    given = None
    if space is not None:
        stored = MicroNet.from_json(sweep.objective_json)
        given = space_from_objects(space, objective=objective or stored, **objects)
    total = trials if trials is not None else sweep.target_trials
    check_counts(total, workers)
    _check_timeout(timeout)
    _check_resources(workers, address, in_process, cpus_per_worker, gpus_per_worker)
    lease = Lease(store, name)
    lease.acquire()  # before anything is touched: a live driver's trials stay its own
    pool = None
    try:
        sf, prepared = reopen_space(sweep, given)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage_ = store.optuna_storage()
        try:
            study_id = storage_.get_study_id_from_name(sweep.study_name)
        except KeyError:
            raise StorageError(f"sweep {name!r} has no Optuna study in {store.display}") from None
        _replay_spool(store, sweep, progress=progress)
        n_before = len(storage_.get_all_trials(study_id, deepcopy=False))
        from microsweep.search._samplers import make_sampler

        # a fresh seed stream: the same seed again would repeat the first policies
        seed = None if sweep.seed is None else (sweep.seed + n_before) % 2**32
        sampler = make_sampler(
            sweep.sampler,
            seed=seed,
            space=sf.space,
            workers=workers,
            multi=sf.objective.objectives != "score",
        )
        study = optuna.load_study(study_name=sweep.study_name, storage=storage_, sampler=sampler)
        if sf.objective.early_stop and sweep.ceiling is not None and sf.evaluate is None:
            prepared = with_stop_rule(sf, prepared, measure_dense(sf, prepared), sweep.ceiling)
        if not sweep.eval_key:
            sweep.eval_key = sweep_eval_key(sf, prepared, sweep.model_fingerprint)
            store.update_sweep(name, eval_key=sweep.eval_key)
        reason = "driver stopped before the trial finished"
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            storage_.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            study.tell(t.number, None, state=TrialState.FAIL)
        recorded = {row.number for row in store.trials(name)}
        for t in study.get_trials(deepcopy=False):  # finished in Optuna, missing from our table
            if t.state.is_finished() and t.number not in recorded:
                why = (
                    t.user_attrs.get("fail_reason", reason)
                    if t.state == TrialState.FAIL
                    else reason
                )
                store.record_trial(
                    sweep.id, t.number, state="FAIL", reason=why, policy={}, summary=""
                )
        finished = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())
        if trials is not None and trials < finished:
            raise UsageError(
                f"sweep {name!r} already has {finished} finished trials; pass --trials above "
                f"{finished}"
            )
        if trials is not None and trials != sweep.target_trials:
            store.update_sweep(name, target_trials=total)
        if finished < total:
            pool = _start_pool(
                sf,
                prepared,
                workers,
                address,
                in_process,
                progress,
                (cpus_per_worker, gpus_per_worker),
            )
        return _drive(
            store,
            sweep,
            sf,
            prepared,
            study,
            pool,
            total=total,
            in_process=in_process,
            progress=progress,
            lease=lease,
            storage_wait=storage_wait,
            timeout=timeout,
            began=began,
        )
    finally:
        lease.release()
        if pool is not None:
            pool.close()
        store.dispose()


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
    result = SweepResult(name=sweep.name, already_done=True)
    for row in rows:
        result.states[row.state] = result.states.get(row.state, 0) + 1
    _tally_best(result, rows)
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
            optuna_trial=(entry["study_id"], row, trial_from_json(entry["trial"])),
            **entry["record"],
        )
    if entries:
        path.unlink()
        _say(progress, f"wrote {len(entries)} finished trial(s) kept in {path} during an outage")
