"""Reports read from the store: the sweep report (Pareto front, per-layer view, history,
importances, sensitivity) as data, plotly figures and one self-contained HTML page, and the
text of ``microsweep count``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from microsweep.report._layers import Importances, LayerTable, importances, layer_table
from microsweep.report._page import ReportData, figures, layer_view, report_data, write_report
from microsweep.report._pareto import ParetoData, Point, pareto_data, pareto_front
from microsweep.report._sensitivity import (
    SensitivityData,
    sensitivity_data,
    write_sensitivity_html,
)
from microsweep.report._sweep import Sweep, open_sweep
from microsweep.report._tables import (
    format_rows,
    sweep_rows,
    sweep_state,
    sweep_status,
    trial_detail,
    trial_rows,
    trial_seconds,
)

if TYPE_CHECKING:
    from microsweep.storage import Store


def count_report(space_path: str, policy_path: str | None = None) -> str:
    """The text of `microsweep count` (imported on use: it needs torch, the report does not)."""
    from microsweep.report._count import count_report as report

    return report(space_path, policy_path)


def write_pareto_html(store: Store, name: str, path: str | Path) -> ParetoData:
    """The report page (`write_report`), returning its Pareto data (the `plot` command)."""
    return write_report(store, name, path).pareto


__all__ = [
    "Importances",
    "LayerTable",
    "ParetoData",
    "Point",
    "ReportData",
    "SensitivityData",
    "Sweep",
    "count_report",
    "figures",
    "format_rows",
    "importances",
    "layer_table",
    "layer_view",
    "open_sweep",
    "pareto_data",
    "pareto_front",
    "report_data",
    "sensitivity_data",
    "sweep_rows",
    "sweep_state",
    "sweep_status",
    "trial_detail",
    "trial_rows",
    "trial_seconds",
    "write_pareto_html",
    "write_report",
    "write_sensitivity_html",
]
