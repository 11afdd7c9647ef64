"""The sensitivity pass: each layer alone, each knob at each level, measured on the workers and
kept in SQL under a key of the model, the data and every evaluation setting.

A later sweep (or `microsweep sensitivity`) of the same model on the same windows finds its
measurements stored and runs only what is missing, so a second sweep measures nothing again.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microsweep.allocate import Probe, SensitivityTable
    from microsweep.storage import Store
    from microsweep.workers import TrialResult, WorkerPool

__all__ = ["SensitivityRun", "measure_sensitivity", "run_sensitivity"]

DENSE = ("", "dense", "")
"""The (layer, knob, level) under which the dense model's NLL is stored."""


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
) -> tuple[SensitivityTable, dict[str, Any]]:
    """Measure the probes not stored yet under `key`, store them, and return the whole table
    with a summary (probes measured now, reused, seconds)."""
    from microsweep.allocate import SensitivityTable

    common = {
        "eval_key": key,
        "model_fingerprint": model_fingerprint,
        "data_fingerprint": data_fingerprint,
        "label": label[:256],
    }
    stored = store.sensitivity(key)
    if DENSE not in stored:
        nll = math.log(dense_perplexity)
        dense_row = {"layer": "", "knob": "dense", "level": "", "value": 0.0, "nll": nll}
        store.record_sensitivity([{**common, **dense_row, "perplexity": dense_perplexity}])
        stored[DENSE] = nll
    missing = [p for p in probes if (p.layer, p.knob, p.key) not in stored]
    probing = _Probing(store, pool, missing, common, stored, progress)
    probing.run(reused=len(probes) - len(missing))
    table = SensitivityTable(
        dense_nll=stored[DENSE],
        entries={k: v for k, v in stored.items() if k != DENSE},
    )
    summary = {
        "probes": len(probes),
        "measured": len(missing) - probing.failures,
        "failed": probing.failures,
        "reused": len(probes) - len(missing),
        "seconds": time.perf_counter() - probing.started,
    }
    return table, summary


class _Probing:
    """Runs the missing probes on the pool, each layer alone at one level, and stores their
    rows in batches; `stored` gains every outcome (a failure as inf, so the sweep avoids it)."""

    def __init__(
        self,
        store: Store,
        pool: WorkerPool,
        missing: list[Probe],
        common: dict[str, Any],
        stored: dict[tuple[str, str, str], float],
        progress: bool,
    ) -> None:
        self.store, self.pool, self.common, self.stored = store, pool, common, stored
        self.by_number = {-2 - i: p for i, p in enumerate(missing)}
        self.progress = progress
        self.done = self.failures = 0
        self.pending: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.last_shown = 0.0

    def run(self, *, reused: int) -> None:
        """Submit every probe as workers free, record each result as it comes."""
        from microsweep.spaces import Policy

        queue = list(self.by_number)
        while queue or self.pool.busy:
            while queue and self.pool.free:
                number = queue.pop(0)
                probe = self.by_number[number]
                policy = Policy(layers={probe.layer: probe.setting})
                self.pool.submit(number, policy.to_json(), early_stop=False)
            self._record(self.pool.wait())
            if len(self.pending) >= 16 or not (queue or self.pool.busy):
                self.store.record_sensitivity(self.pending)
                self.pending = []
            self._show(reused)
        self.store.record_sensitivity(self.pending)

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
            )
        finally:
            pool.close()
        bound = sf.objective.bound(dense.perplexity)
        return SensitivityRun(key, name, summary, bound.dense_perplexity, bound.value)
    finally:
        store.dispose()
