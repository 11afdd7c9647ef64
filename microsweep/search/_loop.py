"""The trial loop: ask the in-memory study, dispatch to a free worker, conclude the result into
a `TrialRecord`, persist it with Optuna's rows in one transaction, and spool it when the
database is away.

The loop is the only writer to the study and to microsweep's tables, so SQLite works and the
sampler runs in one place. Every trial ends COMPLETE, PRUNED or FAIL with a stored reason; a
worker exception or a non-finite perplexity never stops the sweep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from microsweep._text import distinct
from microsweep.errors import MicrosweepError, StorageError
from microsweep.search._planning import plan_sampler, refuses
from microsweep.search._progress import Progress, say
from microsweep.search._result import SweepResult, best_by, tally_best
from microsweep.search._stages import SCREENED_ATTR, Stage
from microsweep.search._study import SamplerClock, memory_study, origin_of
from microsweep.storage._records import TrialRecord

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from microsweep.prepare import Ceiling, Prepared, SpaceFile
    from microsweep.search._guard import Lease, StorageOutage
    from microsweep.spaces import Policy
    from microsweep.storage import Store
    from microsweep.workers import TrialResult, WorkerPool

__all__ = ["FULL_EVALUATION", "SweepLoop"]

START_ORIGINS = frozenset({"opening", "warm start"})
"""Origins of the trials a sweep runs before its planned sampler proposes any."""
FULL_EVALUATION = frozenset({"nsga2", "gp"})
"""Samplers whose trials are evaluated in full: they learn nothing from a PRUNED trial."""


@dataclass
class _Asked:
    """A trial asked of the in-memory study: its policy, its reserved Optuna row (trial id,
    number) once it has one, the finished trial once told, and the bookkeeping and sampler
    seconds spent on it so far (sums of spans that belong to this trial alone)."""

    trial: optuna.Trial
    policy: Policy
    row: tuple[int, int] | None = None
    frozen: FrozenTrial | None = None
    driver_s: float = 0.0
    sampler_s: float = 0.0
    stage: Stage | None = None
    early: bool = False  # dispatched during start-up (the opening trial)


class _TrialFailed(Exception):
    """A worker reported an error for the trial (its message is the reason stored)."""


@dataclass
class LoopSettings:
    """How the loop runs: target count, time budget, storage patience, reporting."""

    total: int
    in_process: bool
    progress: bool = True
    storage_wait: float = 60.0
    timeout: float | None = None
    began: float = field(default_factory=time.perf_counter)  # when the command started
    on_trial: Callable[[dict[str, Any]], None] | None = None


class SweepLoop:
    """Runs trials until the study has `settings.total` finished ones, or until the time
    budget is spent (no new trial starts after it; those running finish and are kept).

    A trial's Optuna row is reserved RUNNING when it is dispatched to a Ray worker (in-process:
    when it is written), and when it finishes its parameters, values and attributes go into
    that row together with microsweep's rows in one transaction, which also reserves the row of
    the trial asked ahead. With Ray, the next policy is asked before a worker frees, and a freed
    worker gets it before the finished trial's bookkeeping starts. Writes are retried while the
    database is away for up to `storage_wait` seconds; past that the sweep stops and spools
    what finished."""

    def __init__(
        self,
        store: Store,
        sweep: Any,
        sf: SpaceFile,
        prepared: Prepared,
        study: optuna.Study,
        study_id: int,
        pool: WorkerPool,
        ceiling: Ceiling,
        settings: LoopSettings,
        lease: Lease | None = None,
    ) -> None:
        from microsweep.search._guard import StorageGuard
        from microsweep.search._result import SweepResult

        self.store, self.sweep, self.sf, self.prepared = store, sweep, sf, prepared
        self.study, self.study_id, self.pool, self.lease = study, study_id, pool, lease
        self.ceiling, self.settings = ceiling, settings
        self.mem = memory_study(study)
        self.done = self.first = len(self.mem.get_trials(deepcopy=False))
        self.asked = self.done
        self.result = SweepResult(name=sweep.name, by=best_by(sf.objective))
        self.guard = StorageGuard(settings.storage_wait, lambda line: say(settings.progress, line))
        self.in_flight: dict[int, _Asked] = {}  # by in-memory trial number
        self.ready: list[_Asked] = []  # asked ahead, waiting for a free worker
        self.unwritten: list[tuple[_Asked, TrialRecord]] = []  # told, write under way or failed
        self.ahead = 0 if settings.in_process else 1  # a Ray worker never waits for the sampler
        # NSGA-II and GP learn only from completed trials: a stopped one would be lost to them
        self.early_stop = sweep.sampler not in FULL_EVALUATION
        self.clock = SamplerClock()
        self.started = time.perf_counter()
        self.driver_time = self.sampler_time = 0.0
        self.cache_uses: list[Any] = []  # each result's `CacheUse`, for the end-of-run line
        self._setting_up = False  # the opening trial runs before the sampler is planned

    # -- the loop -------------------------------------------------------------------------------
    def run(self, warm: Sequence[dict[str, Any]] = ()) -> SweepResult:
        """Run the trials still to do (after `warm` starts on a new study); the tally of what
        ran and the best feasible trial."""
        from microsweep.search._guard import StorageOutage

        for t in self.mem.get_trials(deepcopy=False):
            self._count_state(t.state.name)
        tally_best(self.result, self.store.trials(self.sweep.name))
        if self.done >= self.settings.total:
            return self._explained()
        bar = Progress(self.settings.total, enabled=self.settings.progress, first=self.done)
        try:
            self._set_up(warm, bar)
            bar.start(time.perf_counter() - self.settings.began)
            while self.done < self.settings.total:
                if not self._step(bar):
                    break
        except StorageOutage as exc:
            raise self._spool(exc) from None
        finally:
            self._stop_unfinished()
        ran = max(self.done - self.first, 1)
        self.result.wall = time.perf_counter() - self.started
        self.result.driver_ms_per_trial = 1000 * self.driver_time / ran
        self.result.sampler_ms_per_trial = 1000 * self.sampler_time / ran
        self._cache_summary()
        return self._explained()

    def _cache_summary(self) -> None:
        """How much the workers' variant caches served this run: kept on the result, said in
        one line and stored as the study's user attribute ``cache`` (the latest run's)."""
        from microsweep.search._guard import StorageOutage
        from microsweep.search._result import cache_line, cache_summary

        self.result.cache = cache_summary(self.cache_uses)
        if not self.result.cache:
            return
        say(self.settings.progress, cache_line(self.result.cache))
        try:
            self.guard.call(self.study.set_user_attr, "cache", self.result.cache)
        except StorageOutage:
            pass  # the trials are stored; this figure is the run's alone

    def _explained(self) -> SweepResult:
        """The result, with why nothing met the ceiling when nothing did (the nearest trial and
        its measured costs; see `SweepResult.explain_infeasible`)."""
        if self.result.best_number is None and self.ceiling.value is not None:
            self.result.explain_infeasible(self.store)
        return self.result

    def _set_up(self, warm: Sequence[dict[str, Any]], bar: Progress) -> None:
        """The user's warm starts on a new study, then the planned sampler's set-up; the
        sampler clock starts after it (planning is start-up, not a trial's). A planned sampler
        on a new study first dispatches one opening trial (`_open`) that runs while the planner
        works on the other workers, so the first result never waits for the planner."""
        from microsweep.search._samplers import ORIGIN_ATTR

        total = self.settings.total
        trials = self.mem.get_trials(deepcopy=False)
        fresh = not trials
        if fresh:
            for params in warm[:total]:
                self.mem.enqueue_trial(params, user_attrs={ORIGIN_ATTR: "warm start"})
        self._setting_up = True  # no policy is asked of the sampler until it is planned
        self.pool.on_finished = lambda res: self._record_early(res, bar)
        try:
            opened = self._open(warm) if fresh else 0
            slots = None  # the sampler's own warm starts: on a new study, or one whose start-up
            if fresh:  # was interrupted before the planner gave any (only start-up trials in it)
                slots = total - min(len(warm) + opened, total)
            elif all(t.user_attrs.get(ORIGIN_ATTR) in START_ORIGINS for t in trials):
                slots = max(0, total - len(trials))
            plan_sampler(
                self.store, self.sweep, self.sf, self.prepared, self.mem, self.pool, self.result,
                ceiling=self.ceiling, warm_slots=slots, progress=self.settings.progress,
                timeout=self.settings.timeout, settle=lambda: self._settle(bar),
            )  # fmt: skip
        finally:
            self._setting_up = False
            self.pool.on_finished = None
        self.clock = SamplerClock(self.mem.sampler)
        self.started = time.perf_counter()

    def _open(self, warm: Sequence[dict[str, Any]]) -> int:
        """Dispatch the opening trial of a planned sampler's new study before its planner
        exists: the user's first warm start, else the planner-free choice of `_opening` (the
        mildest uniform quantization that counts below the dense model). Returns how many
        trials this added to the queue (0 when the trial is the user's own warm start, or there
        is none to open with)."""
        from microsweep.score import CountConfig, micronet_score
        from microsweep.search._opening import opening_choices
        from microsweep.search._samplers import ORIGIN_ATTR, PlannedSampler

        sampler = self.mem.sampler
        if not isinstance(sampler, PlannedSampler) or not sampler.opens:
            return 0
        if self.settings.total < 2 or self.settings.in_process:  # nothing to overlap with
            return 0
        if refuses(self.ceiling, sampler):
            return 0  # the planning refuses this sweep in one line: nothing runs before it
        added = 0
        if not warm:
            if not self.sf.space.units():
                return 0
            t0 = time.perf_counter()
            baseline = self._baseline()
            try:
                choices, score = opening_choices(
                    self.sf.space,
                    self.sf.model,
                    context=self.prepared.settings.context,
                    config=CountConfig(**self.prepared.settings.count),
                    baseline=baseline,
                    dense_score=micronet_score(
                        self.sweep.dense_params, self.sweep.dense_ops, baseline
                    ),
                    calib=self.prepared.calib,
                )
            except Exception as exc:  # only a head start: the planner's trials follow anyway
                text = str(exc).strip().splitlines()
                say(
                    self.settings.progress,
                    f"note: no opening trial ({type(exc).__name__}: {text[0] if text else ''})",
                )
                return 0
            params = self.sf.space.params_for(choices)
            self.mem.enqueue_trial(params, user_attrs={ORIGIN_ATTR: "opening"})
            added = 1
            counted = "" if score is None else f", counted score {score:.4g}"
            say(
                self.settings.progress,
                f"opening trial: {_describe(choices)}{counted}, chosen in "
                f"{time.perf_counter() - t0:.1f}s; it runs while the planner works",
            )
        item = self._ask()
        item.early = True
        self._submit(item)
        return added

    def _settle(self, bar: Progress) -> None:
        """Wait for the trials dispatched during start-up and record them (before the
        sensitivity pass shares the workers, and before the timed loop begins)."""
        while self.in_flight:
            res = self.pool.wait()
            if res is None:
                break
            self._record_early(res, bar)

    def _record_early(self, res: TrialResult, bar: Progress) -> None:
        """Record a trial that finished during start-up (said without a pace: the timed loop
        has not begun)."""
        if self.lease is not None:
            self.lease.check()  # another driver took the sweep: write nothing more
        number, record = self._finish(self.in_flight.pop(res.number), res)
        line = self._line(number, record)
        say(self.settings.progress, f"[{self.done}/{self.settings.total}] start-up | {line}")
        if self.settings.on_trial is not None:
            self.settings.on_trial({"number": number, **record.columns(), "layers": record.layers})
        bar.first = self.done  # trials finished in start-up are not the timed loop's pace

    def _step(self, bar: Progress) -> bool:
        """Fill the free workers, wait for one result and record it; False once the time
        budget is spent and nothing runs."""
        while (
            self.pool.free
            and self.asked < self.settings.total
            and (self.ready or not self._expired())
        ):
            self._submit(self.ready.pop(0) if self.ready else self._ask())
        self._refill()
        if not self.in_flight:
            self.result.timed_out = True
            return False
        res = self.pool.wait()
        if self.lease is not None:
            self.lease.check()  # another driver took the sweep: write nothing more
        if self.pool.free and self.ready and self.asked < self.settings.total:
            self._submit(self.ready.pop(0))  # dispatch first, then this result's bookkeeping
        item = self.in_flight.pop(res.number)
        number, record = self._finish(item, res)
        if item.early:  # dispatched before the timed loop began: not its pace
            bar.first += 1
        bar.update(
            self.done, self.result.states, self.result.best_score, self._line(number, record)
        )
        if self.settings.on_trial is not None:
            self.settings.on_trial({"number": number, **record.columns(), "layers": record.layers})
        return True

    def _expired(self) -> bool:
        timeout = self.settings.timeout
        return timeout is not None and time.perf_counter() - self.started >= timeout

    def _count_state(self, state: str) -> None:
        self.result.states[state] = self.result.states.get(state, 0) + 1

    # -- one trial ------------------------------------------------------------------------------
    def _ask(self) -> _Asked:
        """A new trial and its policy from the in-memory study; the sampler's seconds apart."""
        t0, s0 = time.perf_counter(), self.clock.seconds
        trial = self.mem.ask()
        policy = self.sf.space.suggest(trial)
        sampler_s = self.clock.seconds - s0
        driver_s = max(0.0, time.perf_counter() - t0 - sampler_s)
        return _Asked(trial, policy, driver_s=driver_s, sampler_s=sampler_s)

    def _refill(self) -> None:
        """Ask the next policy ahead, so a freed Ray worker never waits for the sampler."""
        total = self.settings.total
        if self._setting_up:  # the sampler has no planner yet: ask once it has
            return
        if len(self.ready) < self.ahead and self.asked + len(self.ready) < total:
            if not self._expired():
                self.ready.append(self._ask())

    def _submit(self, item: _Asked) -> None:
        """Hand `item` to a free worker (in-process: run it), its row RUNNING while it runs."""
        t0 = time.perf_counter()
        if item.row is None and not self.settings.in_process:
            item.row = self.guard.call(self.store.reserve_trials, self.study_id, 1)[0]
        self.in_flight[item.trial.number] = item
        policy_json = item.policy.to_json()
        windows = self._stage_windows(item)
        item.driver_s += time.perf_counter() - t0
        if windows is None:
            self.pool.submit(item.trial.number, policy_json, early_stop=self.early_stop)
        else:
            self.pool.submit(item.trial.number, policy_json, early_stop=False, windows=windows)
        self.asked += 1

    def _stage_windows(self, item: _Asked) -> list[int] | None:
        """The windows a staged trial reads (see `Stage`): None for a whole evaluation."""
        from microsweep._optuna import study_storage, trial_id

        # the sampler sets the stage in `before_trial`, after Optuna cached the trial's view
        attrs = study_storage(self.mem).get_trial_user_attrs(trial_id(item.trial))
        stage = Stage.of(attrs, self._n_windows())
        if stage is None:
            return None
        if stage.continues is not None:
            try:
                stage.prior = self._prior(stage.continues)
            except (MicrosweepError, IndexError):
                return None  # nothing to continue from: evaluated whole instead
            if len(stage.prior["window_nll"]) != stage.start:
                return None
        item.stage = stage
        return stage.windows(self._n_windows())

    def _n_windows(self) -> int:
        return int(self.prepared.windows.shape[0])

    def _prior(self, number: int) -> dict[str, Any]:
        """What the trial a staged trial continues read: its per-window NLL (and KL) sums."""
        t = self.mem.get_trials(deepcopy=False)[number]
        attrs = t.user_attrs
        if "window_nll" not in attrs:
            raise MicrosweepError(f"trial {number} has no screened windows to continue from")
        return {"window_nll": attrs["window_nll"], "window_kl": attrs.get("window_kl")}

    def _finish(self, item: _Asked, res: TrialResult) -> tuple[int, TrialRecord]:
        """Conclude, time and persist one result; fold it into the tally."""
        t0, s0 = time.perf_counter(), self.clock.seconds
        self.result.eval_seconds += res.timings.get("evaluate", 0.0)
        self.cache_uses.append(res.cache)
        record = self._conclude(item, res)
        # this trial's own spans: its ask and dispatch, then its telling and writing (the next
        # trial's ask in between is that trial's); sampler time inside them apart
        sampler_s = self.clock.seconds - s0
        item.sampler_s += sampler_s
        item.driver_s += max(0.0, time.perf_counter() - t0 - sampler_s)
        self._refill()  # asked after this result is told, reserved in its transaction
        self.result.eval_seconds_saved += record.timings.get("evaluate_saved", 0.0)
        record.timings["sampler"] = item.sampler_s
        t1 = time.perf_counter()
        record.timings["driver"] = item.driver_s  # stored with the write's own time below
        number = self._persist(item, record)
        record.timings["driver"] = item.driver_s + (time.perf_counter() - t1)
        self.driver_time += record.timings["driver"]
        self.sampler_time += item.sampler_s
        self.done += 1
        self._count_state(record.state)
        self.result.consider(number, record.state, record.origin, record.score, record)
        return number, record

    def _conclude(self, item: _Asked, res: TrialResult) -> TrialRecord:
        """Score a worker's result and tell it to the in-memory study; the record to write (a
        FAIL with its reason when the worker or the scoring failed)."""
        trial, policy = item.trial, item.policy
        ranks = {n: lp.rank for n, lp in policy.layers.items() if lp.rank is not None}
        if ranks:  # the ranks applied, as `status` shows them (a rank param may be a fraction)
            trial.set_user_attr("ranks", ranks)
        record = TrialRecord.failed(
            None,
            policy=policy.to_json(),
            summary=policy.summary(),
            origin=origin_of(self.mem.sampler, trial, self.sweep.sampler),
            worker=res.worker,
            timings=res.timings,
        )
        try:
            if res.status not in ("ok", "pruned"):
                raise _TrialFailed(res.error or "worker gave no reason")
            self._judge(item, res, record)
        except (_TrialFailed, MicrosweepError) as exc:  # a bad result: keep the cause
            if item.frozen is not None:
                raise
            record.reason = str(exc) if isinstance(exc, _TrialFailed) else f"driver: {exc}"
            trial.set_user_attr("fail_reason", record.reason)
            item.frozen = self._tell_state(trial, "FAIL")
        return record

    def _judge(self, item: _Asked, res: TrialResult, record: TrialRecord) -> None:
        """Fill `record` from a measured (or stopped, or screened) result and tell the study."""
        from microsweep.score import micronet_score

        trial, ceiling = item.trial, self.ceiling
        score = micronet_score(res.params, res.ops, self._baseline())
        if item.stage is not None and res.evaluated is not None:
            self._staged(item, res)  # a screen, or the continuation that completes one
        pruned = res.status == "pruned"
        ppl = res.measured_perplexity
        if pruned and item.stage is not None:
            record.reason = item.stage.reason(ppl, res.kl, self._n_windows())
        elif pruned:
            record.reason = self._stop_reason(res, ppl)
            seen, n = res.windows_seen or 1, res.windows or 1
            record.timings["evaluate_saved"] = record.timings.get("evaluate", 0.0) * (n / seen - 1)
        if res.finetune_curve:  # [step, subset perplexity] during fine-tuning
            trial.set_user_attr("finetune_curve", res.finetune_curve)
        if res.kl is not None:  # select_by="kl": mean KL from the dense model per token read
            trial.set_user_attr("kl", res.kl)
        if not self.sf.objective.multi:
            for step, value in enumerate(res.intermediate):
                trial.report(value, step)
        trial.set_constraint("perplexity", ceiling.constraint(ppl))
        objective = self.sf.objective
        trial.set_user_attr("score", score)
        if objective.budgeted:
            trial.set_constraint("score", objective.score_constraint(score))
        if pruned and item.stage is not None:
            trial.set_user_attr(SCREENED_ATTR, item.stage.read)
        if pruned:
            trial.set_user_attr("perplexity_estimate", ppl)
            trial.set_user_attr("score", score)
            item.frozen = self._tell_state(trial, "PRUNED")
        else:
            trial.set_user_attr("perplexity", ppl)
            values = [score, ppl] if objective.multi else objective.value(score, ppl)
            item.frozen = self.mem.tell(trial, values)
        record.state = "PRUNED" if pruned else "COMPLETE"
        record.score, record.perplexity = score, ppl
        record.params, record.ops, record.freebie = res.params, res.ops, res.freebie
        record.feasible = ceiling.feasible(ppl) and objective.within_budget(score) and not pruned
        record.count_config, record.layers = res.count_config, list(res.layers)

    def _staged(self, item: _Asked, res: TrialResult) -> None:
        """Fold a staged result into what the trial has read in all (the windows of the trial it
        continues, then its own): a whole evaluation ends COMPLETE with the perplexity of every
        window; a partial one is a screen, PRUNED with its perplexity (and KL) on the windows
        read, which keep their per-window sums so a survivor can continue from them."""
        import math

        stage = item.stage
        assert stage is not None and res.window_nll is not None
        prior = stage.prior or {}
        nll = list(prior.get("window_nll") or []) + list(res.window_nll)
        tokens = len(nll) * (int(self.prepared.windows.shape[1]) - 1)
        ppl = math.exp(min(math.fsum(nll) / tokens, 700.0))
        kl_sums = None
        if res.window_kl is not None:
            kl_sums = list(prior.get("window_kl") or []) + list(res.window_kl)
            if len(kl_sums) == len(nll):
                res.kl = math.fsum(kl_sums) / tokens
        res.windows_seen, res.windows = len(nll), self._n_windows()
        if stage.read >= self._n_windows():
            res.status, res.perplexity = "ok", ppl
            return
        res.status, res.perplexity_estimate, res.perplexity = "pruned", ppl, None
        item.trial.set_user_attr("window_nll", nll)
        if kl_sums is not None:
            item.trial.set_user_attr("window_kl", kl_sums)

    def _stop_reason(self, res: TrialResult, ppl: float) -> str:
        """Why a trial stopped early, with enough digits to tell it from the ceiling."""
        where = f"after {res.windows_seen}/{res.windows} windows"
        if res.finetune_stopped_at is not None:
            where = f"fine-tuning at step {res.finetune_stopped_at} ({res.windows_seen} windows)"
        value = self.ceiling.value
        best = res.optimistic_perplexity if res.optimistic_perplexity is not None else ppl
        if value is None:  # a stop rule needs a ceiling; said plainly if one ever runs without
            return f"stopped {where}: perplexity heading for {ppl:.4g}"
        best_s, ceiling_s = distinct(best, value)
        return (
            f"stopped {where}: perplexity heading for {distinct(ppl, value)[0]} "
            f"(at best {best_s}), ceiling {ceiling_s}"
        )

    def _baseline(self) -> Any:
        from microsweep.score import Baseline

        sweep = self.sweep
        return Baseline(sweep.baseline_params, sweep.baseline_ops, sweep.baseline_name)

    def _tell_state(self, trial: optuna.Trial, state: str) -> FrozenTrial:
        from optuna.trial import TrialState

        return self.mem.tell(trial, None, state=TrialState[state])

    def _line(self, number: int, record: TrialRecord) -> str:
        """The progress line's account of one finished trial."""
        origin = record.origin
        if record.state == "COMPLETE":
            ppl, ceiling = record.perplexity, self.ceiling.value
            if ceiling is None:
                ppl_s = f"ppl {ppl:.4g}"
            else:
                ppl_s, ceiling_s = distinct(ppl, ceiling)
                over = "meets the ceiling" if ppl <= ceiling else "OVER the ceiling"
                ppl_s = f"ppl {ppl_s}, {over} {ceiling_s}"
            if not self.sf.objective.within_budget(record.score):
                ppl_s += f"; OVER the score budget {self.sf.objective.score_budget:.4g}"
            return f"trial {number} ({origin}) score {record.score:.4g} {ppl_s}"
        if record.state == "PRUNED":
            return f"trial {number} ({origin}) stopped early: {record.reason}"
        return f"trial {number} FAIL ({record.reason})"

    # -- writing --------------------------------------------------------------------------------
    def _persist(self, item: _Asked, record: TrialRecord, *, wait: bool = True) -> int:
        """Write the told trial to Optuna's tables and microsweep's in one transaction,
        reserving the rows of trials asked ahead in it too; returns its number. While the write
        is under way the trial is in `unwritten`, so an outage can spool it."""
        entry = (item, record)
        self.unwritten.append(entry)
        ahead = [a for a in self.ready if a.row is None]
        write = self.guard.call if wait else (lambda fn, *a, **k: fn(*a, **k))
        rows = write(
            self.store.record_trial,
            self.sweep.id,
            record,
            optuna_trial=(self.study_id, item.row, item.frozen),
            reserve=len(ahead),
        )
        self.unwritten.remove(entry)
        item.row = rows[0]
        for a, row in zip(ahead, rows[1:], strict=True):
            a.row = row
        return item.row[1]

    def _spool(self, exc: StorageOutage) -> StorageError:
        """Keep every finished, unwritten trial on local disk (draining results the workers
        already finished) and say how to get them in."""
        from microsweep.search._guard import spool_path, trial_to_json, write_spool

        while (res := self.pool.wait(timeout=0)) is not None:
            item = self.in_flight.pop(res.number)
            self.unwritten.append((item, self._conclude(item, res)))
        name = self.sweep.name
        path = spool_path(self.store.display, name)
        entries = [
            {
                "study_id": self.study_id,
                "row": item.row,
                "record": record.to_json(),
                "trial": trial_to_json(item.frozen),
            }
            for item, record in self.unwritten
        ]
        write_spool(path, entries)
        return StorageError(
            f"{exc}; the sweep stopped and {len(self.unwritten)} finished trial(s) are kept in "
            f"{path}: run 'microsweep resume --name {name}' once the database is back"
        )

    def _stop_unfinished(self) -> None:
        """Interrupted: a trial that ran, or whose row was reserved, is kept as a FAIL with its
        policy (one attempt each: the store may be what failed, and resume ends the rows)."""
        stopped = [(i, "finished") for i in self.in_flight.values()]
        stopped += [(i, "started") for i in self.ready if i.row is not None]
        for item, what in stopped:
            try:
                reason = f"sweep stopped before the trial {what}"
                item.trial.set_user_attr("fail_reason", reason)
                item.frozen = self._tell_state(item.trial, "FAIL")
                record = TrialRecord.failed(
                    reason,
                    policy=item.policy.to_json(),
                    summary=item.policy.summary(),
                    origin=origin_of(self.mem.sampler, item.trial, self.sweep.sampler),
                )
                self._persist(item, record, wait=False)
            except Exception:
                pass


def _describe(choices: dict[str, dict[str, Any]]) -> str:
    """Knob values of a policy by knob, e.g. "bits 8, act_bits 16" ("bits 8/16" when units
    differ)."""
    values: dict[str, list[Any]] = {}
    for knobs in choices.values():
        for knob, value in knobs.items():
            if value not in values.setdefault(knob, []):
                values[knob].append(value)
    parts = [f"{knob} {'/'.join(_value(v) for v in vs)}" for knob, vs in values.items()]
    return ", ".join(parts) or "no knob"


def _value(value: Any) -> str:
    if value is None:
        return "full"
    return format(value, "g") if isinstance(value, (int, float)) else str(value)
