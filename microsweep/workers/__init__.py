"""Trial execution: a `TrialRunner` per worker, pooled as Ray actors or run in-process."""

from microsweep.workers._pool import (
    InProcessPool,
    RayPool,
    WorkerPool,
    check_resources,
    make_pool,
)
from microsweep.workers._runner import EvalSettings, TrialRunner

__all__ = [
    "EvalSettings",
    "InProcessPool",
    "RayPool",
    "TrialRunner",
    "WorkerPool",
    "check_resources",
    "make_pool",
]
