"""Sweep preparation shared by search, export, reports and `count`: loading a space file, the
`MicroNet` objective, evaluation tensors, the dense measurement, fingerprints and recipes."""

from microsweep.prepare._levels import level_folder, level_store, reading_layers, with_levels
from microsweep.prepare._objective import (
    PLANNING_FACTOR_WITHOUT_CEILING,
    SELECT_BY,
    Ceiling,
    MicroNet,
)
from microsweep.prepare._prepared import (
    Prepared,
    check_counted,
    check_counts,
    eval_key,
    measure_dense,
    model_fingerprint,
    prepare,
    probe_key,
    recipe_of,
    reopen_space,
    sweep_eval_key,
    table_key,
    versions,
    with_stop_rule,
)
from microsweep.prepare._reference import with_reference
from microsweep.prepare._spacefile import (
    INLINE_PATH,
    SpaceFile,
    load_space_file,
    load_space_source,
    prepare_model,
    space_from_objects,
)

__all__ = [
    "INLINE_PATH",
    "PLANNING_FACTOR_WITHOUT_CEILING",
    "SELECT_BY",
    "Ceiling",
    "MicroNet",
    "Prepared",
    "SpaceFile",
    "check_counted",
    "check_counts",
    "eval_key",
    "load_space_file",
    "level_folder",
    "level_store",
    "load_space_source",
    "measure_dense",
    "model_fingerprint",
    "prepare",
    "prepare_model",
    "reading_layers",
    "recipe_of",
    "reopen_space",
    "space_from_objects",
    "sweep_eval_key",
    "table_key",
    "probe_key",
    "versions",
    "with_levels",
    "with_reference",
    "with_stop_rule",
]
