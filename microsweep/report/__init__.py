"""Reports read from the store: Pareto data and self-contained plotly HTML."""

from microsweep.report._pareto import (
    ParetoData,
    Point,
    pareto_data,
    pareto_front,
    write_pareto_html,
)

__all__ = ["ParetoData", "Point", "pareto_data", "pareto_front", "write_pareto_html"]
