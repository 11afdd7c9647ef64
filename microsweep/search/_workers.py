"""Starting the workers of a sweep or a sensitivity pass: one pool factory shared by `run`,
`resume` and `sensitivity`, with the checks that need no Ray done before anything loads."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from microsweep.errors import UsageError
from microsweep.search._progress import say

if TYPE_CHECKING:
    from microsweep.prepare import Prepared, SpaceFile
    from microsweep.workers import WorkerPool

__all__ = [
    "WorkerOptions",
    "cache_settings",
    "check_timeout",
    "largest_ranks",
    "make_pool",
    "start_pool",
]


@dataclass(frozen=True)
class WorkerOptions:
    """Where and how a sweep's trials run, as `run`, `resume` and `sensitivity` take it."""

    workers: int = 1
    address: str | None = None
    in_process: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    cache_mb: int | None = None  # each worker's variant cache (None: sized from its memory)
    eval_memory_mb: int | None = None  # each worker's evaluation batch limit (None: default)

    def check(self, trials: int) -> None:
        """Refuse counts, cache sizes and resources no pool could place, before the space
        loads or the dense model runs."""
        from microsweep.prepare import check_counts
        from microsweep.workers import check_cache_mb, check_eval_memory_mb, check_resources

        check_counts(trials, self.workers)
        check_cache_mb(self.cache_mb)
        check_eval_memory_mb(self.eval_memory_mb)
        check_resources(
            self.workers,
            address=self.address,
            in_process=self.in_process,
            cpus_per_worker=self.cpus_per_worker,
            gpus_per_worker=self.gpus_per_worker,
        )


def check_timeout(timeout: float | None) -> None:
    """A time budget is a number of seconds above 0 (or None)."""
    if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
        raise UsageError(f"--timeout {timeout!r} must be a number of seconds above 0")


def make_pool(sf: SpaceFile, prepared: Prepared, options: WorkerOptions) -> WorkerPool:
    """The workers of a sweep (or a sensitivity pass): the space's model and evaluation."""
    from microsweep.prepare import INLINE_PATH
    from microsweep.score import rules_defined_in
    from microsweep.workers import make_pool as pool_of

    if not options.in_process and options.address is None:
        # token auth, Ray's own default for a local start, chosen here so Ray need not warn
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        # Ray runs workers at nice 15: beside any busy process they get a sliver of a core
        # (the demo's sensitivity probes ran 40x slower beside two), while here they are the work
        os.environ.setdefault("RAY_worker_niceness", "0")
    handler = signal.getsignal(signal.SIGTERM)
    pool = pool_of(
        options.workers,
        model=sf.model,
        windows=prepared.windows,
        settings=cache_settings(prepared.settings, options, sf),
        calib=prepared.calib,
        train_tokens=prepared.train_tokens,
        evaluate=sf.evaluate,
        address=options.address,
        in_process=options.in_process,
        register_by_value=(sf.module,),
        # the file's own counting rules (a script's or notebook's, for objects), on every worker
        rules=rules_defined_in("__main__" if sf.path == INLINE_PATH else sf.module.__name__),
        cpus_per_worker=options.cpus_per_worker,
        gpus_per_worker=options.gpus_per_worker,
        stats=shipped_stats(prepared, options),
        levels=prepared.levels,
        reference=prepared.reference,
    )
    _keep_handler(signal.SIGTERM, handler)
    return pool


def shipped_stats(prepared: Prepared, options: WorkerOptions) -> Any:
    """The input statistics Ray workers get by reference: none when the level folder holds
    every layer's (a worker then reads a layer's file when one of its builds needs it, and
    keeps only those), so a worker need not hold every layer's Gram matrix at once."""
    store, stats = prepared.levels, prepared.stats
    if options.in_process or not stats or store is None:
        return stats
    return None if all(store.has_stats(name) for name in stats) else stats


def cache_settings(settings: Any, options: WorkerOptions, sf: SpaceFile) -> Any:
    """The workers' `EvalSettings` with their variant cache: the size asked for (or None, sized
    by each worker), how many workers share one worker's memory for that automatic size, and
    the largest rank the space can give each layer (what its SVD is kept for); and the memory
    limit of their evaluation batches."""
    from dataclasses import replace

    share = 1
    if not options.in_process:
        share = options.workers
        if options.gpus_per_worker > 0:  # the cache lives on the GPU, shared by its workers
            share = min(share, max(1, int(1 / options.gpus_per_worker)))
    return replace(
        settings,
        cache_mb=options.cache_mb,
        cache_share=share,
        cache_ranks=largest_ranks(sf.space),
        eval_memory_mb=options.eval_memory_mb,
    )


def largest_ranks(space: Any) -> dict[str, int]:
    """Per layer, the largest rank its rules can ask for (below the break-even, from which the
    layer stays dense); layers without a `Rank` knob are left out."""
    from microsweep.spaces import Rank

    out: dict[str, int] = {}
    for unit in space.units():
        knob = unit.knobs.get("rank")
        if not isinstance(knob, Rank):
            continue
        for info in unit.layers:
            full = min(info.out_features, info.in_features)
            top = max(knob.values) if knob.values is not None else max(1, round(knob.high * full))
            below = Rank.break_even(info.out_features, info.in_features) - 1
            out[info.name] = max(1, min(top, below, full))
    return out


def start_pool(
    sf: SpaceFile, prepared: Prepared, options: WorkerOptions, *, progress: bool
) -> WorkerPool:
    """`make_pool`, saying what starts where and how long the workers took."""
    if options.in_process:
        say(progress, "starting 1 in-process worker")
    else:
        address = options.address
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        say(
            progress,
            f"starting {options.workers} Ray worker(s) on {where} (each loads the model; a "
            "local start takes 10-30 s)",
        )
    t0 = time.perf_counter()
    pool = make_pool(sf, prepared, options)
    if not options.in_process:
        say(progress, f"workers ready after {time.perf_counter() - t0:.1f}s")
    return pool


def _keep_handler(signum: int, handler: Any) -> None:
    """Put back a Python signal handler that starting Ray replaced with its own (Ray's prints a
    native stack dump on SIGTERM; the command line turns SIGTERM into a clean stop)."""
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signum, handler)
