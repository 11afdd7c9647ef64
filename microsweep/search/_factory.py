"""`make_sampler`: the Optuna sampler for a name in `SAMPLERS`, whichever module holds it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import optuna
from optuna.samplers import BaseSampler

from microsweep.errors import UsageError
from microsweep.search._evo import EvoPressSampler, EvoSampler
from microsweep.search._samplers import (
    SAMPLERS,
    AllocateSampler,
    AutoSampler,
    UniformSampler,
    _ConstrainedCmaEs,
)

if TYPE_CHECKING:
    from microsweep.spaces import Space

__all__ = ["make_sampler"]


def make_sampler(
    name: str,
    *,
    seed: int | None,
    space: Space,
    workers: int = 1,
    multi: bool = False,
    budgeted: bool = False,
) -> BaseSampler:
    """The Optuna sampler for `name` (see `SAMPLERS`); `budgeted`: the objective's budget form
    (`MicroNet(score_budget=...)`), where `auto` is `evo` and `allocate` is refused."""
    if budgeted and name == "allocate":
        raise UsageError(
            "--sampler allocate finds the least score under the ceiling; with a score_budget "
            "use auto, evo, evopress, uniform, tpe or random"
        )
    if budgeted and name == "auto":
        name = "evo"
    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, constant_liar=workers > 1, seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, deterministic_objective=True)
    if name == "cmaes":
        if multi:
            raise UsageError("--sampler cmaes handles one objective; use tpe, nsga2 or auto")
        return _ConstrainedCmaEs(seed=seed, warn_independent_sampling=False)
    if name == "uniform":
        return UniformSampler(space, seed=seed, multi=multi)
    if name == "allocate":
        return AllocateSampler(space, seed=seed)
    if name == "auto":
        return AutoSampler(space, seed=seed, workers=workers, multi=multi)
    if name == "evo":
        return EvoSampler(space, seed=seed, workers=workers, multi=multi)
    if name == "evopress":
        if multi:
            raise UsageError("--sampler evopress handles one objective; use tpe, nsga2 or auto")
        return EvoPressSampler(space, seed=seed, workers=workers)
    raise UsageError(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}")
