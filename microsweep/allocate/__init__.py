"""Budget allocation: exact option costs per layer, a sensitivity-based loss predictor, and the
knapsack that turns a perplexity budget into a whole per-layer policy.

`Planner(space, model, ...)` compresses and counts every level combination of every unit (a
layer, or a tied rule's layers), here or one unit per call on the workers (`map_runners=`,
`unit_options_on`), `Planner.probes()` lists the single-knob measurements the
sensitivity pass makes, and with their results (`SensitivityTable`) `Planner.allocate(budget)`
returns the lowest-score plan whose predicted loss fits the budget.
"""

from microsweep.allocate._knapsack import pareto_options, solve
from microsweep.allocate._levels import (
    KNOBS,
    Probe,
    level_key,
    plan_levels,
    probes,
    unit_levels,
)
from microsweep.allocate._options import (
    MODES,
    OptionTask,
    UnitOptions,
    build_options,
    build_unit_options,
    option_tasks,
    unit_options_on,
)
from microsweep.allocate._planner import (
    PAIRS,
    Correction,
    Plan,
    Planner,
    SensitivityTable,
    fit_correction,
    fit_interactions,
    fit_weights,
)

__all__ = [
    "KNOBS",
    "MODES",
    "PAIRS",
    "Correction",
    "OptionTask",
    "Plan",
    "Planner",
    "Probe",
    "SensitivityTable",
    "UnitOptions",
    "build_options",
    "build_unit_options",
    "fit_correction",
    "fit_interactions",
    "fit_weights",
    "level_key",
    "option_tasks",
    "pareto_options",
    "plan_levels",
    "probes",
    "solve",
    "unit_levels",
    "unit_options_on",
]
