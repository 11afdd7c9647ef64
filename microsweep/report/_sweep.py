"""`open_sweep`: a stored sweep in Python: trials as a DataFrame, the best trial, any trial's
policy, the Optuna study and the report's figures, for notebooks and scripts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from microsweep.errors import UsageError

if TYPE_CHECKING:
    import optuna
    import pandas

    from microsweep.report._page import ReportData
    from microsweep.spaces import Policy

__all__ = ["Sweep", "open_sweep"]


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise UsageError(
            "Sweep.trials() returns a pandas DataFrame; install pandas (pip install "
            "'microsweep[pandas]') or use microsweep.report.trial_rows for plain rows"
        ) from None
    return pandas


class Sweep:
    """A sweep in a store, read on demand (nothing is cached but the sweep's own row)."""

    def __init__(self, name: str, storage: str | None = None) -> None:
        from microsweep.storage import Store

        self._store = Store(storage, must_exist=True)
        self.name = name
        self._row = self._store.get_sweep(name)  # an unknown name lists the sweeps

    def __repr__(self) -> str:
        return f"Sweep({self.name!r}, storage={self._store.display!r})"

    def __enter__(self) -> Sweep:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the database connections."""
        self._store.dispose()

    @property
    def info(self) -> dict[str, Any]:
        """The sweep's row as `microsweep ls` shows it: state, counts, best feasible."""
        from microsweep.report._tables import sweep_row

        return sweep_row(self._store, self.name)

    @property
    def dense(self) -> dict[str, float]:
        """The dense model's perplexity, params, ops per token and score, and the ceiling."""
        from microsweep.report._tables import dense_summary

        return dense_summary(self._row)

    def trials(
        self,
        *,
        state: str | None = None,
        feasible: bool | None = None,
        layers: bool = False,
    ) -> pandas.DataFrame:
        """Finished trials indexed by trial number (filtered by state and by feasibility, as
        `microsweep trials`), with `layers=True` one column per target layer and knob (e.g.
        ``blocks.0.mlp.c_fc.sparsity``)."""
        from microsweep.report._tables import TRIAL_COLUMNS, trial_rows

        pd = _pandas()
        if state is not None and state not in ("COMPLETE", "PRUNED", "FAIL"):
            raise UsageError(f"state {state!r} is not one of COMPLETE, PRUNED, FAIL")
        rows = trial_rows(self._store, self.name, state=state, feasible=feasible)
        frame = pd.DataFrame(rows)
        if frame.empty:
            frame = pd.DataFrame(columns=list(TRIAL_COLUMNS))
        frame = frame.set_index("trial")
        if layers and not frame.empty:
            from microsweep.report._layers import KNOBS, layer_table

            table = layer_table(self._store, self.name)  # from each trial's summary
            picks = [table.choice.get(n) for n in frame.index]
            columns: dict[str, list[Any]] = {}
            for i, layer in enumerate(table.layers):
                for k, knob in enumerate(KNOBS):
                    if knob not in table.allowed[i]:
                        continue
                    values = [option[k] for option in table.options[i]]
                    columns[f"{layer}.{knob}"] = [
                        None if p is None else values[p[i]] for p in picks
                    ]
            frame = frame.join(pd.DataFrame(columns, index=frame.index))
        return frame

    def best(self) -> dict[str, Any] | None:
        """The feasible trial with the lowest score, as `microsweep show` gives it (scores,
        policy and per-layer counts), or None when no trial met the ceiling."""
        from microsweep.report._tables import trial_detail

        best = self.info["best_trial"]
        return None if best is None else trial_detail(self._store, self.name, best)

    def policy(self, number: int) -> Policy:
        """Trial `number`'s policy: what `run_sweep(warm_start=...)` and `count` take."""
        from microsweep.spaces import Policy

        row = self._store.trial(self.name, number)
        if not (row.policy or {}).get("layers") and row.state == "FAIL":
            raise UsageError(f"trial {number} of sweep {self.name!r} failed before it had a policy")
        return Policy.from_json(row.policy)

    @property
    def study(self) -> optuna.Study:
        """The sweep's Optuna study (for Optuna's own analysis and plots)."""
        import optuna

        return optuna.load_study(
            study_name=self._row.study_name, storage=self._store.optuna_storage()
        )

    def report_data(self) -> ReportData:
        """Everything the report shows, as data."""
        from microsweep.report._page import report_data

        return report_data(self._store, self.name)

    def figures(self, trial: int | None = None) -> dict[str, Any]:
        """The report's plotly figures by name (pareto, layers, counts, history, importances,
        and sensitivity when measured); the per-layer pair shows `trial` (default: the best
        feasible)."""
        from microsweep.report._page import figures

        return figures(self.report_data(), trial)

    def report(self, path: str | Path) -> ReportData:
        """Write the report page to `path`, as `microsweep report` does."""
        from microsweep.report._page import write_report

        return write_report(self._store, self.name, path)


def open_sweep(name: str, storage: str | None = None) -> Sweep:
    """Open sweep `name` in `storage` (default: $MICROSWEEP_STORAGE, else
    sqlite:///microsweep.db) for reading."""
    return Sweep(name, storage)
