"""The sweep driver: Optuna ask/tell over a pool of workers, with constraints and resume."""

from microsweep.search._driver import SAMPLERS, SweepResult, resume_sweep, run_sweep
from microsweep.search._objective import MicroNet
from microsweep.search._samplers import (
    AllocateSampler,
    AutoSampler,
    UniformSampler,
    make_sampler,
)
from microsweep.search._sensitivity import SensitivityRun, eval_key, run_sensitivity
from microsweep.search._spacefile import SpaceFile, load_space_file

__all__ = [
    "SAMPLERS",
    "AllocateSampler",
    "AutoSampler",
    "SensitivityRun",
    "UniformSampler",
    "eval_key",
    "make_sampler",
    "run_sensitivity",
    "MicroNet",
    "SpaceFile",
    "SweepResult",
    "load_space_file",
    "resume_sweep",
    "run_sweep",
]
