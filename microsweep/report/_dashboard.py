"""`microsweep dashboard`: optuna-dashboard over a sweep store, naming the best *feasible*
trial best.

optuna-dashboard 0.21 asks its storage for `get_best_trial`, which Optuna's RDBStorage answers
with the lowest value among COMPLETE trials, constraints ignored: a trial over the perplexity
ceiling would be shown as best. The storage served here answers as `Study.best_trial` does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from microsweep.errors import UsageError

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

__all__ = ["constraint_values", "feasible_best_storage", "serve_dashboard"]


def constraint_values(trial: FrozenTrial) -> list[float]:
    """The trial's constraint values: Optuna 5's named ones, else the legacy list; a value
    above 0 is a violation."""
    attrs = trial.system_attrs
    named = [v for k, v in sorted(attrs.items()) if k.startswith("constraints:")]
    values = named or list(attrs.get("constraints") or [])
    return [float(v) if v is not None else math.inf for v in values]


def _violation(trial: FrozenTrial) -> float:
    values = constraint_values(trial)
    worst = max(values, default=0.0)
    return math.inf if math.isnan(worst) else max(worst, 0.0)


def feasible_best_storage(storage: str | None = None) -> Any:
    """An Optuna RDB storage on `storage` whose `get_best_trial` is the best trial among those
    meeting every constraint; with none feasible, the one nearest to meeting them (so the
    dashboard still opens)."""
    import optuna
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    from microsweep.storage import Store

    class FeasibleBest(optuna.storages.RDBStorage):
        def get_best_trial(self, study_id: int) -> FrozenTrial:
            directions = self.get_study_directions(study_id)
            if len(directions) > 1:
                raise RuntimeError("a best trial exists only for one objective")
            trials = [
                t
                for t in self.get_all_trials(
                    study_id, deepcopy=False, states=(TrialState.COMPLETE,)
                )
                if t.values and math.isfinite(t.values[0])
            ]
            if not trials:
                raise ValueError("no trial is complete yet")
            sign = -1.0 if directions[0] == StudyDirection.MAXIMIZE else 1.0
            feasible = [t for t in trials if _violation(t) == 0.0]
            if feasible:
                return min(feasible, key=lambda t: (sign * t.values[0], t.number))
            return min(trials, key=lambda t: (_violation(t), sign * t.values[0], t.number))

    store = Store(storage, must_exist=True)
    store.sweep_names()  # a database without sweeps is refused here, in one line
    return store.optuna_storage(FeasibleBest)


def serve_dashboard(
    storage: str | None, host: str = "127.0.0.1", port: int = 8080, *, announce: bool = True
) -> None:
    """Serve optuna-dashboard over `storage` until interrupted (blocks); `announce` prints
    where, once the storage is open."""
    try:
        import optuna_dashboard
    except ImportError:
        raise UsageError(
            "optuna-dashboard is not installed; pip install optuna-dashboard (the dev extra has it)"
        ) from None
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} must be in 1..65535")
    served = feasible_best_storage(storage)
    if announce:
        print(
            f"optuna-dashboard at http://{host}:{port}/ (best trial: the best one meeting the "
            "perplexity ceiling); Ctrl-C stops it",
            flush=True,
        )
    optuna_dashboard.run_server(served, host=host, port=port)
