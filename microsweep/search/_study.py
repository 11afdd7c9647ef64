"""The driver's Optuna side: the in-memory twin of a sweep's study, the clock of the sampler's
own compute, and who proposed a trial."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = ["SamplerClock", "memory_study", "origin_of"]


def memory_study(study: optuna.Study) -> optuna.Study:
    """An in-memory twin of the sweep's RDB study holding its finished trials: asking,
    suggesting and telling there touch no database, and each finished trial is then written to
    SQL in one transaction (`Store.record_trial`), instead of one commit per parameter."""
    import optuna

    mem = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(),
        sampler=study.sampler,
        directions=study.directions,
    )
    trials = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        if "constraints" in t.system_attrs and any(
            k.startswith("constraints:") for k in t.system_attrs
        ):  # the dashboard's copy of the named constraint: samplers see it once
            t = copy.copy(t)
            t.system_attrs = {k: v for k, v in t.system_attrs.items() if k != "constraints"}
        trials.append(t)
    mem.add_trials(trials)
    return mem


def origin_of(sampler: Any, trial: optuna.Trial | FrozenTrial, default: str) -> str:
    """Who proposed `trial`: a planned sampler's record, else the origin an enqueued trial
    carries (a warm start), else the sampler's name."""
    from microsweep.search._samplers import ORIGIN_ATTR, PlannedSampler

    found = sampler.origin(trial.number) if isinstance(sampler, PlannedSampler) else None
    return found or trial.user_attrs.get(ORIGIN_ATTR) or default


class SamplerClock:
    """Seconds spent inside the sampler's own methods, so the driver's bookkeeping is reported
    apart from the sampler's compute (TPE's fit grows with the trials; bookkeeping must not).
    A method called from inside another timed one is not counted twice, so the sampler's
    seconds never exceed the span that contains them."""

    METHODS = (
        "infer_relative_search_space",
        "sample_relative",
        "sample_independent",
        "before_trial",
        "after_trial",
    )

    def __init__(self, sampler: Any = None) -> None:
        self.seconds = 0.0
        self._depth = 0
        if sampler is None:  # nothing to time yet
            return
        for name in self.METHODS:
            method = getattr(sampler, name, None)
            if method is not None:
                setattr(sampler, name, self._timed(method))

    def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return method(*args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self._depth -= 1

        return timed
