"""Reports read from the store: Pareto data and self-contained plotly HTML, and the text of
``microsweep count``."""

from microsweep.report._count import count_report
from microsweep.report._pareto import (
    ParetoData,
    Point,
    pareto_data,
    pareto_front,
    write_pareto_html,
)
from microsweep.report._sensitivity import (
    SensitivityData,
    sensitivity_data,
    write_sensitivity_html,
)
from microsweep.report._tables import (
    format_rows,
    sweep_rows,
    sweep_state,
    trial_detail,
    trial_rows,
)

__all__ = [
    "ParetoData",
    "Point",
    "count_report",
    "format_rows",
    "SensitivityData",
    "pareto_data",
    "pareto_front",
    "sensitivity_data",
    "sweep_rows",
    "sweep_state",
    "trial_detail",
    "trial_rows",
    "write_pareto_html",
    "write_sensitivity_html",
]
