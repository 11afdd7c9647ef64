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
    from microsweep.workers import WorkerPool

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
    from microsweep.spaces import Policy

    started = time.perf_counter()
    common = {
        "eval_key": key,
        "model_fingerprint": model_fingerprint,
        "data_fingerprint": data_fingerprint,
        "label": label[:256],
    }
    stored = store.sensitivity(key)
    if DENSE not in stored:
        nll = math.log(dense_perplexity)
        store.record_sensitivity(
            [
                {
                    **common,
                    "layer": "",
                    "knob": "dense",
                    "level": "",
                    "value": 0.0,
                    "nll": nll,
                    "perplexity": dense_perplexity,
                }
            ]
        )
        stored[DENSE] = nll
    missing = [p for p in probes if (p.layer, p.knob, p.key) not in stored]
    by_number = {-2 - i: p for i, p in enumerate(missing)}
    queue = list(by_number)
    pending: list[dict[str, Any]] = []
    done = failures = 0
    out = sys.stderr
    last_shown = 0.0
    while queue or pool.busy:
        while queue and pool.free:
            number = queue.pop(0)
            probe = by_number[number]
            policy = Policy(layers={probe.layer: probe.setting})
            pool.submit(number, policy.to_json(), early_stop=False)
        res = pool.wait()
        probe = by_number[res["number"]]
        ppl = res.get("perplexity") if res.get("status") == "ok" else None
        ok = isinstance(ppl, float) and math.isfinite(ppl) and ppl > 0
        nll = math.log(ppl) if ok else math.inf
        stored[(probe.layer, probe.knob, probe.key)] = nll  # this sweep avoids the level
        # a model that breaks (non-finite perplexity) is a measurement worth keeping; a worker
        # that failed (died, raised) is not: a later pass measures the probe again
        if not ok and not str(res.get("error", "")).startswith("perplexity is"):
            done += 1
            failures += 1
            continue
        pending.append(
            {
                **common,
                "layer": probe.layer,
                "knob": probe.knob,
                "level": probe.key,
                "value": probe.value,
                "nll": nll,
                "perplexity": ppl if ok else math.inf,
                "params": res.get("params"),
                "ops": res.get("ops"),
                "seconds": float(res.get("timings", {}).get("total", 0.0)),
            }
        )
        done += 1
        if len(pending) >= 16 or not (queue or pool.busy):
            store.record_sensitivity(pending)
            pending = []
        now = time.perf_counter()
        if progress and (now - last_shown > 2.0 or done == len(missing)):
            last_shown = now
            out.write(
                f"sensitivity: {done}/{len(missing)} probes measured "
                f"({len(probes) - len(missing)} reused), {now - started:.0f}s\n"
            )
            out.flush()
    store.record_sensitivity(pending)
    table = SensitivityTable(
        dense_nll=stored[DENSE],
        entries={k: v for k, v in stored.items() if k != DENSE},
    )
    summary = {
        "probes": len(probes),
        "measured": len(missing) - failures,
        "failed": failures,
        "reused": len(probes) - len(missing),
        "seconds": time.perf_counter() - started,
    }
    return table, summary


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
    )
    from microsweep.search._driver import _make_pool
    from microsweep.storage import Store

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
        pool = _make_pool(
            sf,
            prepared,
            workers=workers,
            address=address,
            in_process=in_process,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
        )
        try:
            _, summary = measure_sensitivity(
                store,
                pool,
                wanted,
                key=key,
                label=name,
                model_fingerprint=model_fp,
                data_fingerprint=prepared.data_fingerprint,
                dense_perplexity=dense["perplexity"],
                progress=progress,
            )
        finally:
            pool.close()
        ceiling = sf.objective.ceiling(dense["perplexity"])
        return SensitivityRun(key, name, summary, dense["perplexity"], ceiling)
    finally:
        store.dispose()
