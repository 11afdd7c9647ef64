"""The sensitivity pass: each layer alone, each knob at each level, measured on the workers and
kept in SQL under a key of the model, the data and every evaluation setting.

A later sweep (or `microsweep sensitivity`) of the same model on the same windows finds its
measurements stored and runs only what is missing, so a second sweep measures nothing again.

A sweep's pass is budgeted (`ProbeBudget`): probes read a quarter of the evaluation windows
(the loss is a paired difference against the dense model on the same windows, so few suffice),
run in rounds that give every layer and knob its most compressed level first (knobs in turn,
each knob's layers by the planner's proxy error, largest first), then the middle one, then the
rest by bisection, and no probe starts once their wall time reaches a share of what the sweep's
trials will take (10% by default), first round included. Levels left unmeasured are estimated
(`interpolate_with_priors`; `interpolate` without the planner's proxy errors): between the
measured levels of the same layer and knob, or, where a layer and knob has none, from the
planner's proxy error scaled by what the measured probes of that knob say about it; estimates
are never stored, so a later pass with more budget measures them.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microsweep.allocate import Probe, SensitivityTable
    from microsweep.storage import Store
    from microsweep.workers import TrialResult, WorkerPool

__all__ = [
    "ProbeBudget",
    "SensitivityRun",
    "measure_sensitivity",
    "run_sensitivity",
    "sensitivity_line",
]

DENSE = ("", "dense", "")
"""The (layer, knob, level) under which the dense model's NLL is stored."""
SENSITIVITY_SHARE = 0.1
"""The default share of a sweep's expected trial wall time its sensitivity pass may take."""
PROBE_FLOOR_TRIALS = 5
"""The least a pass may take, in one trial's time on a worker (a few probes per trial: each
reads a quarter of the windows), however short the sweep."""


@dataclass(frozen=True)
class ProbeBudget:
    """How much a sweep's sensitivity pass may spend: `share` of the wall time its `trials`
    trials take on `workers` workers (each trial's time estimated from the probes' own: their
    compression plus their evaluation scaled to all the windows), probes reading `windows` of
    the `n_windows` evaluation windows (None: all, as when the space evaluates itself)."""

    trials: int
    workers: int
    n_windows: int
    windows: list[int] | None
    share: float = SENSITIVITY_SHARE
    timeout: float | None = None
    """The sweep's time budget, when it has one: the trials take no longer than it."""

    @classmethod
    def for_sweep(
        cls,
        trials: int,
        workers: int,
        n_windows: int,
        *,
        subset: bool = True,
        timeout: float | None = None,
    ) -> ProbeBudget:
        """A quarter of the windows (at least 32) when the windows can be subset."""
        from microsweep.score import subset_windows

        windows = None
        if subset and n_windows > 32:
            windows = subset_windows(n_windows, max(32, n_windows // 4))
        return cls(trials, max(1, workers), n_windows, windows, timeout=timeout)

    def key(self, eval_key: str) -> str:
        """The key the probes are stored under: `eval_key` itself when they read every window,
        else its probe-window key (`prepare.probe_key`)."""
        from microsweep.prepare import probe_key

        return eval_key if self.windows is None else probe_key(eval_key)

    def seconds(self, trial_seconds: float) -> float:
        """The wall time the pass may take when one trial takes `trial_seconds` on a worker:
        `share` of the trials' wall time (or of the sweep's time budget when that is shorter),
        and at least `PROBE_FLOOR_TRIALS` trials' time, so a short sweep still measures the
        layers whose estimates matter most."""
        trials_wall = _trials_wall(self, trial_seconds)
        return max(self.share * trials_wall, PROBE_FLOOR_TRIALS * trial_seconds)


def measure_sensitivity(
    store: Store,
    pool: WorkerPool,
    probes: Sequence[Probe],
    *,
    key: str,
    label: str,
    model_fingerprint: str,
    data_fingerprint: str,
    dense_perplexity: float,
    progress: bool = True,
    budget: ProbeBudget | None = None,
    priors: dict[tuple[str, str, str], float] | None = None,
) -> tuple[SensitivityTable, dict[str, Any]]:
    """Measure the probes not stored yet under `key`, store them, and return the whole table
    with a summary (probes measured now, reused, estimated, seconds). With a `budget`, probes
    read its windows (stored under their own key) in priority rounds until its time is spent,
    and the levels left unmeasured are estimated (`interpolate`, from `priors`: each probe's
    proxy output error, `Planner.probe_priors`, when given)."""
    from microsweep.allocate import SensitivityTable

    windows = budget.windows if budget is not None else None
    key = budget.key(key) if budget is not None else key
    common = {
        "eval_key": key,
        "model_fingerprint": model_fingerprint,
        "data_fingerprint": data_fingerprint,
        "label": label[:256],
    }
    stored = store.sensitivity(key)
    missing = [p for p in probes if (p.layer, p.knob, p.key) not in stored]
    if budget is not None:
        missing = priority_order(missing, priors)
    probing = _Probing(store, pool, missing, common, stored, progress, windows=windows)
    if DENSE not in stored and windows is None:
        nll = math.log(dense_perplexity)
        dense_row = {"layer": "", "knob": "dense", "level": "", "value": 0.0, "nll": nll}
        store.record_sensitivity([{**common, **dense_row, "perplexity": dense_perplexity}])
        stored[DENSE] = nll
    # without it, the dense model on the probes' own windows goes first, beside the first probes
    probing.run(reused=len(probes) - len(missing), budget=budget, dense=DENSE not in stored)
    measured = {k: v for k, v in stored.items() if k != DENSE}
    entries, estimated, from_proxy = _estimate(probes, measured, stored[DENSE], priors)
    table = SensitivityTable(dense_nll=stored[DENSE], entries=entries)
    summary = {
        "probes": len(probes),
        "measured": probing.done - probing.failures,
        "failed": probing.failures,
        "reused": len(probes) - len(missing),
        "estimated": estimated,
        "from_proxy": from_proxy,
        "seconds": time.perf_counter() - probing.started,
        "windows": len(windows) if windows is not None else None,
        "of_windows": budget.n_windows if budget is not None else None,
        "budget_seconds": probing.budget_s,
        "round_one_seconds": probing.round_one_s,
        "trial_seconds": probing.trial_seconds(),
    }
    return table, summary


def _trials_wall(budget: ProbeBudget, trial_seconds: float) -> float:
    """The wall time the sweep's trials take on its workers, or its time budget if shorter."""
    wall = budget.trials * trial_seconds / budget.workers
    return wall if budget.timeout is None else min(wall, budget.timeout)


def sensitivity_line(summary: dict[str, Any], budget: ProbeBudget) -> str:
    """The pass in one line: what it measured, on which windows, in what time against which
    budget, and what it reused or interpolated."""
    windows = summary.get("windows")
    read = f"on {windows} of {budget.n_windows} windows " if windows else ""
    line = (
        f"sensitivity: {summary['measured']} of {summary['probes']} probes measured {read}in "
        f"{summary['seconds']:.1f}s"
    )
    spent, trial = summary.get("budget_seconds"), summary.get("trial_seconds")
    if spent is not None and trial is not None and math.isfinite(budget.share):
        line += (
            f" (budget {spent:.1f}s: {budget.share:.0%} of {budget.trials} trials at ~{trial:.1f}s "
            f"on {budget.workers} worker{'s' if budget.workers > 1 else ''}"
            + (f", or of the {budget.timeout:g}s time budget" if budget.timeout else "")
            + (
                f"; at least {PROBE_FLOOR_TRIALS} trials' time"
                if spent > budget.share * _trials_wall(budget, trial) * (1 + 1e-9)
                else ""
            )
            + ")"
        )
    extra = []
    if summary.get("reused"):
        extra.append(f"{summary['reused']} reused")
    proxied = summary.get("from_proxy") or 0
    if summary.get("estimated", 0) - proxied:
        extra.append(f"{summary['estimated'] - proxied} interpolated between measured levels")
    if proxied:
        extra.append(f"{proxied} from the planner's proxy errors scaled to the measured probes")
    if summary.get("failed"):
        extra.append(f"{summary['failed']} failed")
    return line + ("; " + ", ".join(extra) if extra else "")


def priority_order(
    probes: Sequence[Probe], priors: dict[tuple[str, str, str], float] | None = None
) -> list[Probe]:
    """Probes in rounds: every (layer, knob)'s most compressed level, then its middle one,
    then the levels halfway between measured ones, so a pass cut short anywhere has measured
    each layer's knobs where they cost most and can estimate the rest. Inside a round the
    knobs take turns (a pass cut short early still has each knob's scale), and each knob's
    layers go by the proxy error of their most compressed level in `priors`, largest first
    (the layers whose estimate would matter most), else in model order."""
    groups: dict[tuple[str, str], list[Probe]] = {}
    for p in probes:
        groups.setdefault((p.layer, p.knob), []).append(p)
    priors = priors or {}

    def worst(members: list[Probe]) -> float:
        value = priors.get((members[-1].layer, members[-1].knob, members[-1].key), 0.0)
        return -value if math.isfinite(value) else -math.inf

    turn: dict[tuple[str, str], int] = {}  # a group's place among its knob's groups
    for knob in dict.fromkeys(k for _, k in groups):
        mine = [g for g in groups if g[1] == knob]
        for place, g in enumerate(sorted(mine, key=lambda g: worst(groups[g]))):
            turn[g] = place
    ranked: list[tuple[int, int, int, Probe]] = []
    for g, (key, members) in enumerate(groups.items()):
        for rank, index in enumerate(_bisection(len(members))):
            ranked.append((rank, turn[key], g, members[index]))
    return [p for *_, p in sorted(ranked, key=lambda item: item[:3])]


def _bisection(n: int) -> list[int]:
    """0..n-1 (least to most compressed) in measuring order: the last, then each time the level
    farthest from every one chosen and from no compression (index -1), the less compressed on
    a tie: the middle, then the midpoints of the widest gaps."""
    order: list[int] = []
    for _ in range(n):
        rest = [i for i in range(n) if i not in order]
        if not order:
            order.append(n - 1)
            continue
        chosen = [-1, *order]
        order.append(max(rest, key=lambda i: (min(abs(i - c) for c in chosen), -i)))
    return order


def interpolate(
    probes: Sequence[Probe], measured: dict[tuple[str, str, str], float], *, dense: float
) -> tuple[dict[tuple[str, str, str], float], int]:
    """Every probe's NLL: measured where it was, else read off the same layer and knob's
    measured levels, linear in the level's distance from no compression (sparsity: the
    fraction; bits: 4^-bits, the quantization noise power; rank: the level's place in the
    grid), from 0 at no compression; with nothing measured for that layer and knob, the
    median over layers at the same knob and level. Returns the entries and how many were
    estimated."""
    entries = dict(measured)
    groups: dict[tuple[str, str], list[Probe]] = {}
    for p in probes:
        groups.setdefault((p.layer, p.knob), []).append(p)
    estimated = 0
    pending: list[Probe] = []
    for (_, knob), members in groups.items():
        xs = [_distance(knob, p, i, len(members)) for i, p in enumerate(members)]
        known = [
            (x, measured[(p.layer, p.knob, p.key)])
            for x, p in zip(xs, members, strict=True)
            if (p.layer, p.knob, p.key) in measured
        ]
        for x, p in zip(xs, members, strict=True):
            k = (p.layer, p.knob, p.key)
            if k in entries:
                continue
            if not known:
                pending.append(p)
                continue
            entries[k] = _read_off(x, known, base=dense)
            estimated += 1
    for p in pending:  # a layer and knob with nothing measured: what other layers measured
        same = [v for (_, kn, key), v in measured.items() if kn == p.knob and key == p.key]
        if same:
            entries[(p.layer, p.knob, p.key)] = sorted(same)[len(same) // 2]
        else:
            entries[(p.layer, p.knob, p.key)] = math.inf  # unknown: allocation avoids it
        estimated += 1
    entries.pop(DENSE, None)
    return entries, estimated


def _estimate(
    probes: Sequence[Probe],
    measured: dict[tuple[str, str, str], float],
    dense: float,
    priors: dict[tuple[str, str, str], float] | None,
) -> tuple[dict[tuple[str, str, str], float], int, int]:
    """`interpolate` with `priors` when given; also how many came from the proxy alone."""
    if priors:
        return interpolate_with_priors(probes, measured, dense=dense, priors=priors)
    entries, estimated = interpolate(probes, measured, dense=dense)
    return entries, estimated, 0


def interpolate_with_priors(
    probes: Sequence[Probe],
    measured: dict[tuple[str, str, str], float],
    *,
    dense: float,
    priors: dict[tuple[str, str, str], float],
) -> tuple[dict[tuple[str, str, str], float], int, int]:
    """Every probe's NLL: measured where it was; else read off the same layer and knob's
    measured levels with the level's proxy output error (`priors`) as its distance from no
    compression (linear between them, from the dense NLL at 0, in proportion past the last);
    else, with nothing measured for that layer and knob, the dense NLL plus the proxy error
    times the knob's scale: the largest NLL increase per unit of proxy error over its layers,
    each at its most compressed finite measured level (of every knob's when the knob has none),
    so an estimate errs towards more loss and a plan built on it towards feasible. A probe
    without a finite prior falls back to `interpolate`. Returns the entries, how many were
    estimated, and how many of those from a scale alone."""
    strongest: dict[tuple[str, str], tuple[float, float]] = {}  # (layer, knob) -> (prior, nll)
    for (layer, knob, key), nll in measured.items():
        prior = priors.get((layer, knob, key))
        usable = prior is not None and math.isfinite(prior) and prior > 0 and math.isfinite(nll)
        if usable and prior > strongest.get((layer, knob), (0.0, 0.0))[0]:
            strongest[(layer, knob)] = (prior, nll)
    ratios: dict[str, list[float]] = {}  # from each layer's most compressed measured level:
    for (_, knob), (prior, nll) in strongest.items():  # a mild level's ratio is mostly noise
        ratios.setdefault(knob, []).append((nll - dense) / prior)
    pooled = [r for rs in ratios.values() for r in rs]

    def scale(knob: str) -> float | None:  # the largest: a plan errs towards feasible
        values = ratios.get(knob) or pooled
        return max(0.0, max(values)) if values else None

    groups: dict[tuple[str, str], list[Probe]] = {}
    for p in probes:
        groups.setdefault((p.layer, p.knob), []).append(p)
    entries = {k: v for k, v in measured.items() if k != DENSE}
    rest: list[Probe] = []
    estimated = from_proxy = 0
    for (_, knob), members in groups.items():
        xs = [priors.get((p.layer, p.knob, p.key)) for p in members]
        if not all(x is not None and math.isfinite(x) for x in xs):
            rest.extend(members)
            continue
        known = [
            (x, measured[(p.layer, p.knob, p.key)])
            for x, p in zip(xs, members, strict=True)
            if (p.layer, p.knob, p.key) in measured
        ]
        c = None if known else scale(knob)
        for x, p in zip(xs, members, strict=True):
            k = (p.layer, p.knob, p.key)
            if k in entries:
                continue
            if known:
                entries[k] = _read_off(float(x), known, base=dense)
            elif c is not None:
                entries[k] = dense + (c * float(x) if c > 0 and x > 0 else 0.0)
                from_proxy += 1
            else:
                rest.append(p)
                continue
            estimated += 1
    if rest:  # no usable prior: read off the old way (the measured ones pass through)
        more, n = interpolate(rest, measured, dense=dense)
        for p in rest:
            entries[(p.layer, p.knob, p.key)] = more[(p.layer, p.knob, p.key)]
        estimated += n
    return entries, estimated, from_proxy


def _distance(knob: str, probe: Probe, index: int, n: int) -> float:
    """How far a level is from no compression, on a scale the loss grows about linearly in."""
    if knob == "sparsity":
        return float(probe.value)
    if knob in ("bits", "act_bits"):
        return 4.0 ** -float(probe.value)
    return (index + 1) / n


def _read_off(x: float, known: list[tuple[float, float]], *, base: float) -> float:
    """NLL at `x` from measured (x, NLL) points: linear between the finite ones, from the dense
    NLL at x = 0 below the first, proportional past the last; at or past a level that broke
    (inf), inf."""
    broken = [px for px, v in known if not math.isfinite(v)]
    if broken and x >= min(broken):
        return math.inf
    points = [(0.0, base), *sorted((px, v) for px, v in known if math.isfinite(v))]
    lo = [pt for pt in points if pt[0] <= x]
    hi = [pt for pt in points if pt[0] >= x]
    if lo and hi:
        (x0, y0), (x1, y1) = lo[-1], hi[0]
        if x1 == x0:
            return y0
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    x1, y1 = points[-1]
    if x1 <= 0:
        return y1
    return base + (y1 - base) * x / x1


class _Probing:
    """Runs the missing probes on the pool, each layer alone at one level, and stores their
    rows in batches; `stored` gains every outcome (a failure as inf, so the sweep avoids it).
    With `windows`, each probe (and the dense model first) reads only those windows."""

    def __init__(
        self,
        store: Store,
        pool: WorkerPool,
        missing: list[Probe],
        common: dict[str, Any],
        stored: dict[tuple[str, str, str], float],
        progress: bool,
        *,
        windows: list[int] | None = None,
    ) -> None:
        self.store, self.pool, self.common, self.stored = store, pool, common, stored
        self.by_number = {-2 - i: p for i, p in enumerate(missing)}
        self.progress = progress
        self.windows = windows
        self.done = self.failures = 0
        self.pending: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.last_shown = 0.0
        self.budget_s: float | None = None
        self.round_one_s: float | None = None  # when every layer and knob had one probe back
        self._trial_s: list[float] = []

    def _dense(self, res: TrialResult | None) -> None:
        """The dense model on the probes' windows, stored as the key's dense row."""
        ppl = res.perplexity if res is not None and res.ok else None
        if not (isinstance(ppl, float) and math.isfinite(ppl) and ppl > 0):
            why = res.error if res is not None else "no result"
            raise RuntimeError(f"the dense model failed on the probe windows: {why}")
        nll = math.log(ppl)
        row = {"layer": "", "knob": "dense", "level": "", "value": 0.0, "nll": nll}
        self.store.record_sensitivity([{**self.common, **row, "perplexity": ppl}])
        self.stored[DENSE] = nll

    def trial_seconds(self) -> float | None:
        """A whole trial's seconds on one worker as the probes measured it (their compression
        plus their evaluation scaled to every window; the median), None before any."""
        if not self._trial_s:
            return None
        return sorted(self._trial_s)[len(self._trial_s) // 2]

    def run(self, *, reused: int, budget: ProbeBudget | None = None, dense: bool = False) -> None:
        """Submit every probe as workers free (the `dense` model on the probes' windows first,
        when asked), record each result as it comes; with a `budget`, submit no new probe
        once its time is spent, except each knob's first (its scale for the estimates: the
        queue gives each knob's costliest layer first)."""
        from microsweep.spaces import Policy

        queue = ([-1] if dense else []) + list(self.by_number)
        first_round = {(p.layer, p.knob) for p in self.by_number.values()}
        started: set[str] = set()  # knobs with a probe submitted: each gets one, budget or not
        returned: set[tuple[str, str]] = set()
        try:  # what was measured is kept, even when the dense read or a worker fails
            while queue or self.pool.busy:
                while queue and self.pool.free:
                    if budget is not None and queue[0] != -1 and self._spent(budget):
                        queue = [n for n in queue if self.by_number[n].knob not in started]
                        if not queue:
                            break
                    number = queue.pop(0)
                    if number == -1:
                        policy = Policy(layers={})
                    else:
                        probe = self.by_number[number]
                        started.add(probe.knob)
                        policy = Policy(layers={probe.layer: probe.setting})
                    self.pool.submit(
                        number, policy.to_json(), early_stop=False, windows=self.windows
                    )
                if not self.pool.busy:
                    break
                res = self.pool.wait()
                if res is not None and res.number == -1:
                    self._dense(res)
                    continue
                self._time(res, budget)
                self._record(res)
                probe = self.by_number[res.number]
                returned.add((probe.layer, probe.knob))
                if self.round_one_s is None and returned >= first_round:
                    self.round_one_s = time.perf_counter() - self.started
                if len(self.pending) >= 16 or not (queue or self.pool.busy):
                    self.store.record_sensitivity(self.pending)
                    self.pending = []
                self._show(reused)
        finally:
            self.store.record_sensitivity(self.pending)
            self.pending = []

    def _time(self, res: TrialResult, budget: ProbeBudget | None) -> None:
        """Fold one probe's timings into the trial-time estimate."""
        if budget is None:
            return
        t = res.timings
        evaluate = float(t.get("evaluate", 0.0))
        total = float(t.get("total", evaluate))
        read = len(res.evaluated) if res.evaluated else budget.n_windows
        if total > 0 and read > 0:
            self._trial_s.append(total - evaluate + evaluate * budget.n_windows / read)
        self.budget_s = budget.seconds(self.trial_seconds() or 0.0)

    def _spent(self, budget: ProbeBudget) -> bool:
        """Whether the pass has used its share of the sweep's expected wall time."""
        if self.budget_s is None:
            return False
        return time.perf_counter() - self.started >= self.budget_s

    def _record(self, res: TrialResult) -> None:
        """One probe's outcome: a model that breaks (non-finite perplexity) is a measurement
        worth keeping; a worker that failed (died, raised) is not: a later pass measures the
        probe again."""
        probe = self.by_number[res.number]
        ppl = res.perplexity if res.ok else None
        ok = isinstance(ppl, float) and math.isfinite(ppl) and ppl > 0
        nll = math.log(ppl) if ok else math.inf
        self.stored[(probe.layer, probe.knob, probe.key)] = nll  # this sweep avoids the level
        self.done += 1
        if not ok and not (res.error or "").startswith("perplexity is"):
            self.failures += 1
            return
        self.pending.append(
            {
                **self.common,
                "layer": probe.layer,
                "knob": probe.knob,
                "level": probe.key,
                "value": probe.value,
                "nll": nll,
                "perplexity": ppl if ok else math.inf,
                "params": res.params,
                "ops": res.ops,
                "seconds": float(res.timings.get("total", 0.0)),
            }
        )

    def _show(self, reused: int) -> None:
        """A progress line at most every 2 s, and at the end."""
        now, total = time.perf_counter(), len(self.by_number)
        if self.progress and (now - self.last_shown > 2.0 or self.done == total):
            self.last_shown = now
            sys.stderr.write(
                f"sensitivity: {self.done}/{total} probes measured ({reused} reused), "
                f"{now - self.started:.0f}s\n"
            )
            sys.stderr.flush()


@dataclass
class SensitivityRun:
    """What `run_sensitivity` measured: the key the table is stored under, counts and timing,
    and the sweep-equivalent ceiling (for plots)."""

    eval_key: str
    label: str
    summary: dict[str, Any]
    dense_perplexity: float
    ceiling: float | None


def run_sensitivity(
    space_path: str,
    *,
    name: str,
    storage: str | None = None,
    workers: int = 1,
    address: str | None = None,
    in_process: bool = False,
    progress: bool = True,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
) -> SensitivityRun:
    """Measure (or complete) the sensitivity table of a space file's model into `storage`,
    labelled `name`; sweeps of the same model and evaluation settings reuse it."""
    from microsweep.allocate import plan_levels, probes
    from microsweep.errors import UsageError
    from microsweep.prepare import (
        check_counts,
        load_space_file,
        measure_dense,
        model_fingerprint,
        prepare,
        sweep_eval_key,
        with_levels,
    )
    from microsweep.search._workers import WorkerOptions, make_pool
    from microsweep.storage import Store

    options = WorkerOptions(workers, address, in_process, cpus_per_worker, gpus_per_worker)
    check_counts(1, workers)
    if not name or len(name) > 200:
        raise UsageError("--name must be 1..200 characters")
    store = Store(storage)
    try:
        sf = load_space_file(space_path)
        prepared = prepare(sf, 0)
        dense = measure_dense(sf, prepared)
        model_fp = model_fingerprint(sf.model)
        key = sweep_eval_key(sf, prepared, model_fp)
        units = sf.space.units()
        wanted = probes(units, {u.key: plan_levels(u) for u in units})
        prepared = with_levels(sf, prepared, store.url, model_fp)  # the sweep's later read them
        n_windows = int(prepared.windows.shape[0])
        budget = ProbeBudget.for_sweep(1, workers, n_windows, subset=sf.evaluate is None)
        budget = replace(budget, share=math.inf)  # every probe, on the windows sweeps read
        pool = make_pool(sf, prepared, options)
        try:
            _, summary = measure_sensitivity(
                store,
                pool,
                wanted,
                key=key,
                label=name,
                model_fingerprint=model_fp,
                data_fingerprint=prepared.data_fingerprint,
                dense_perplexity=dense.perplexity,
                progress=progress,
                budget=budget,
            )
        finally:
            pool.close()
        bound = sf.objective.bound(dense.perplexity)
        return SensitivityRun(key, name, summary, bound.dense_perplexity, bound.value)
    finally:
        store.dispose()
