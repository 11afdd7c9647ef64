"""The one place microsweep reaches into Optuna's private names, each with the reason.

Everything else talks to Optuna through its public API. `PRIVATE_USES` lists what this module
relies on, and `missing_private_uses` reports which of them the installed Optuna no longer has
(`tests/test_optuna_adapter.py` fails on any), so an Optuna upgrade that moves one is caught at
once rather than deep inside a sweep. Optuna itself is imported only inside the functions, so
importing this module stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

__all__ = [
    "CMAES_TRIALS_HOOK",
    "PRIVATE_USES",
    "cached_trials",
    "missing_private_uses",
    "rdb_models",
    "study_storage",
    "trial_id",
]

CMAES_TRIALS_HOOK = "_get_trials"
"""The method `CmaEsSampler` reads the finished trials through. The constrained CMA-ES sampler
overrides it so a trial over the perplexity ceiling (or stopped early) ranks behind every
feasible one: CMA-ES has no constraints argument, and this is the only hook it reads from."""

PRIVATE_USES: dict[str, str] = {
    "optuna.storages._rdb.models": (
        "the SQLAlchemy models of Optuna's tables: a finished trial's rows are written with "
        "microsweep's in one transaction, where RDBStorage commits once per parameter"
    ),
    "FrozenTrial._trial_id": (
        "storage methods (set_trial_user_attr) take the trial id, which FrozenTrial exposes "
        "only privately"
    ),
    "Study._storage": (
        "a planned sampler's before_trial stores the trial's origin as a user attribute; "
        "BaseSampler hooks receive the study and a FrozenTrial, not a Trial"
    ),
    "Study._get_trials(use_cache=True)": (
        "the constrained CMA-ES reads trials the way CmaEsSampler does, with its cache"
    ),
    "CmaEsSampler._get_trials": CMAES_TRIALS_HOOK.join(("the hook `", "` (see CMAES_TRIALS_HOOK)")),
}
"""Each private name used, and why no public API does the job."""


def rdb_models() -> ModuleType:
    """`optuna.storages._rdb.models` (see `PRIVATE_USES`)."""
    from optuna.storages._rdb import models

    return models


def trial_id(trial: FrozenTrial) -> int:
    """The storage id of `trial` (a FrozenTrial or a live Trial)."""
    return int(trial._trial_id)


def study_storage(study: optuna.Study) -> BaseStorage:
    """The storage behind `study`, for setting attributes from inside a sampler hook."""
    return study._storage


def cached_trials(study: optuna.Study) -> list[FrozenTrial]:
    """`study`'s trials without copies, through the same cache CmaEsSampler reads."""
    return study._get_trials(deepcopy=False, use_cache=True)


def _checks() -> dict[str, Callable[[], Any]]:
    import optuna

    def rdb() -> Any:
        models = rdb_models()
        return models.TrialModel.__table__, models.StudyModel.study_id

    def frozen_id() -> Any:
        study = optuna.create_study()
        return trial_id(study.ask())

    def storage() -> Any:
        study = optuna.create_study()
        if not isinstance(study_storage(study), optuna.storages.BaseStorage):
            raise AttributeError("Study._storage is no BaseStorage")

    def cached() -> Any:
        study = optuna.create_study()
        study.enqueue_trial({})
        study.ask()
        if len(cached_trials(study)) != 1:
            raise AttributeError("Study._get_trials returned another number of trials")

    def cmaes_hook() -> Any:
        method = getattr(optuna.samplers.CmaEsSampler, CMAES_TRIALS_HOOK)
        if not callable(method):
            raise AttributeError(f"CmaEsSampler.{CMAES_TRIALS_HOOK} is not a method")

    return {
        "optuna.storages._rdb.models": rdb,
        "FrozenTrial._trial_id": frozen_id,
        "Study._storage": storage,
        "Study._get_trials(use_cache=True)": cached,
        "CmaEsSampler._get_trials": cmaes_hook,
    }


def missing_private_uses() -> dict[str, str]:
    """The private uses the installed Optuna no longer supports: name -> the error seen."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    missing = {}
    for name, check in _checks().items():
        try:
            check()
        except (AttributeError, ImportError, TypeError) as exc:
            missing[name] = f"{type(exc).__name__}: {exc}"
    return missing
