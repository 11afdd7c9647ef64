"""Trial execution: a `TrialRunner` per worker, pooled as Ray actors or run in-process; each
trial comes back as a `TrialResult`."""

from microsweep.workers._pool import (
    InProcessPool,
    RayPool,
    WorkerPool,
    check_resources,
    make_pool,
)
from microsweep.workers._result import CacheUse, TrialResult
from microsweep.workers._runner import (
    EvalSettings,
    TrialRunner,
    auto_cache_mb,
    check_cache_mb,
    check_eval_memory_mb,
)

__all__ = [
    "CacheUse",
    "EvalSettings",
    "InProcessPool",
    "RayPool",
    "TrialResult",
    "TrialRunner",
    "WorkerPool",
    "auto_cache_mb",
    "check_cache_mb",
    "check_eval_memory_mb",
    "check_resources",
    "make_pool",
]
