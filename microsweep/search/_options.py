"""The options `run_sweep` and `resume_sweep` take alike, typed once (`SweepOptions`) and
resolved with their defaults in one place."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from microsweep.search._loop import LoopSettings
from microsweep.search._workers import WorkerOptions

__all__ = ["SweepOptions", "resolve_options"]


class SweepOptions(TypedDict, total=False):
    """Where and how a sweep's trials run, for `run_sweep` and `resume_sweep` alike.

    - `workers` (1): how many trials run at once (Ray actors, or 1 with `in_process`).
    - `storage` (None: `$MICROSWEEP_STORAGE` or the embedded SQLite file): the database URL.
    - `address` (None: a local Ray instance): an existing Ray cluster.
    - `in_process` (False): no Ray; trials run one by one in this process.
    - `progress` (True): the start-up lines and one line per finished trial on stderr.
    - `storage_wait` (60): how long the driver keeps retrying while the database is
      unreachable before it stops and spools what finished.
    - `cpus_per_worker` (1), `gpus_per_worker` (0): what each Ray worker reserves (its torch
      threads; a worker given a GPU evaluates on it).
    - `timeout` (None): a time budget in seconds after which no new trial starts (those
      running finish and are kept; `resume` continues).
    - `cache_mb` (None: half the worker's free memory split among the workers, at most 2x the
      model's fp32 bytes, at least 64): each worker's variant cache in MiB; 0 copies the model
      per trial.
    - `eval_memory_mb` (None: min(1 GiB, a quarter of the worker's free memory)): the memory
      one evaluation batch of a worker may take, in MiB; the batch size follows from it and
      from the model's vocabulary and window length.
    """

    workers: int
    storage: str | None
    address: str | None
    in_process: bool
    progress: bool
    storage_wait: float
    cpus_per_worker: float
    gpus_per_worker: float
    timeout: float | None
    cache_mb: int | None
    eval_memory_mb: int | None


_DEFAULTS: dict[str, Any] = {
    "workers": 1,
    "storage": None,
    "address": None,
    "in_process": False,
    "progress": True,
    "storage_wait": 60.0,
    "cpus_per_worker": 1.0,
    "gpus_per_worker": 0.0,
    "timeout": None,
    "cache_mb": None,
    "eval_memory_mb": None,
}


@dataclass(frozen=True)
class Resolved:
    """`SweepOptions` with their defaults: the workers' part and the loop's part."""

    workers: WorkerOptions
    storage: str | None
    progress: bool
    storage_wait: float
    timeout: float | None

    def loop(
        self,
        total: int,
        *,
        began: float | None = None,
        on_trial: Callable[[dict[str, Any]], None] | None = None,
    ) -> LoopSettings:
        """The loop's settings for a target of `total` finished trials."""
        return LoopSettings(
            total,
            self.workers.in_process,
            self.progress,
            self.storage_wait,
            self.timeout,
            time.perf_counter() if began is None else began,
            on_trial,
        )


def resolve_options(given: Mapping[str, Any], command: str) -> Resolved:
    """`given` keyword options with their defaults; an unknown name is refused as Python
    refuses an unexpected keyword argument."""
    unknown = sorted(set(given) - set(_DEFAULTS))
    if unknown:
        raise TypeError(
            f"{command}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"the sweep options are {', '.join(_DEFAULTS)}"
        )
    o = {**_DEFAULTS, **given}
    workers = WorkerOptions(
        o["workers"], o["address"], o["in_process"], o["cpus_per_worker"], o["gpus_per_worker"],
        o["cache_mb"], o["eval_memory_mb"],
    )  # fmt: skip
    return Resolved(workers, o["storage"], o["progress"], o["storage_wait"], o["timeout"])
