"""Each trial's counts per target layer in one compact value on its trial row.

The report and `Sweep.trials(layers=True)` need every trial's parameters and operations on each
layer the space targets: summed over that layer's counter rows (its own and, factorized, its
`.first` and `.second`; a frequency band ``"head@1"``: its band row and matrices). Read from
`microsweep_layers` that is ~70 rows per trial; stored when the trial is recorded it is one
value per trial: little-endian float64 (params, ops) pairs in the order of the sweep's
`summary_layers`. The per-layer rows stay the full breakdown.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["FACTORS", "pack_layer_counts", "summary_layers", "unpack_layer_counts"]

FACTORS = (".first", ".second")
"""The suffixes of a factorized layer's rows, counted as the layer's own."""


def summary_layers(space_json: Mapping[str, Any] | None) -> list[str]:
    """The layers the space's rules name, in rule order (each once): the layers whose counts a
    trial's summary holds, in its order."""
    names: dict[str, None] = {}
    for rule in (space_json or {}).get("rules", []):
        for name in rule.get("layers", []):
            names.setdefault(name, None)
    return list(names)


_BAND_ROW = re.compile(r"(?:^|\.)bands\.bands\.([^.]+@\d+)(?:\.|$)")
"""A frequency band's counter rows: ``<table or head>.bands.bands.<key>`` and its matrices, the
key being the band layer's name with dots as colons (``"head@1"``)."""


def _band_layer(row: str) -> str | None:
    """The band layer (``"head@1"``) a counter row belongs to, or None."""
    found = _BAND_ROW.search(row)
    return None if found is None else found.group(1).replace(":", ".")


def _slots(names: Sequence[str]) -> dict[str, int]:
    """Counter row name -> position in `names`: a layer's own row and its factors' (an exact
    name wins over a factor of another layer, as the report has always read them)."""
    slots = {f"{name}{part}": i for i, name in enumerate(names) for part in FACTORS}
    slots.update((name, i) for i, name in enumerate(names))
    return slots


def pack_layer_counts(
    names: Sequence[str], rows: Iterable[tuple[str, float | None, float | None]]
) -> bytes | None:
    """The summary of one trial: each of `names`' (params, ops) summed over its counter rows
    (`rows`: (name, params, ops)), packed; None when no row belongs to any of them (a failed
    trial, or a sweep without target layers)."""
    slots = _slots(names)
    sums = [0.0] * (2 * len(names))
    found = False
    for name, params, ops in rows:
        i = slots.get(name)
        if i is None and "@" in name:  # a band's rows, under whichever tied layer holds it
            i = slots.get(_band_layer(name) or "")
        if i is None:
            continue
        found = True
        sums[2 * i] += params or 0.0
        sums[2 * i + 1] += ops or 0.0
    return struct.pack(f"<{len(sums)}d", *sums) if found else None


def unpack_layer_counts(
    names: Sequence[str], packed: bytes | None
) -> dict[str, tuple[float, float]]:
    """`pack_layer_counts`'s value back as {layer: (params, ops)} ({} for None)."""
    if not packed:
        return {}
    values = struct.unpack(f"<{2 * len(names)}d", bytes(packed))
    return {name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(names)}
