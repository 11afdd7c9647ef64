"""The sweep driver: Optuna ask/tell over a pool of workers, with constraints and resume; the
samplers by name and the sensitivity pass.

The samplers load Optuna when first used, so importing this package (as every space file does
for `MicroNet`) stays as light as the driver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from microsweep.prepare import MicroNet, SpaceFile, eval_key, load_space_file
from microsweep.search._driver import SweepResult, resume_sweep, run_sweep
from microsweep.search._options import SweepOptions
from microsweep.search._sensitivity import SensitivityRun, run_sensitivity

if TYPE_CHECKING:
    from microsweep.search._evo import EvoPressSampler, EvoSampler
    from microsweep.search._factory import make_sampler
    from microsweep.search._samplers import (
        SAMPLERS,
        AllocateSampler,
        AutoSampler,
        UniformSampler,
    )

_SAMPLER_NAMES = {"SAMPLERS", "AllocateSampler", "AutoSampler", "UniformSampler"}
_EVO_NAMES = {"EvoSampler", "EvoPressSampler"}

__all__ = [
    "SAMPLERS",
    "AllocateSampler",
    "AutoSampler",
    "EvoPressSampler",
    "EvoSampler",
    "MicroNet",
    "SensitivityRun",
    "SpaceFile",
    "SweepOptions",
    "SweepResult",
    "UniformSampler",
    "eval_key",
    "load_space_file",
    "make_sampler",
    "resume_sweep",
    "run_sensitivity",
    "run_sweep",
]


def __getattr__(name: str) -> Any:
    if name in _SAMPLER_NAMES:
        from microsweep.search import _samplers

        return getattr(_samplers, name)
    if name in _EVO_NAMES:
        from microsweep.search import _evo

        return getattr(_evo, name)
    if name == "make_sampler":
        from microsweep.search._factory import make_sampler

        return make_sampler
    raise AttributeError(f"module 'microsweep.search' has no attribute {name!r}")
