"""The discrete levels an allocation chooses among, and the single-knob probes that measure them.

Levels are in the units Optuna sees (sparsity fractions, bit-widths, rank fractions or explicit
ranks), ordered from the least to the most compressed, so a level's index is how far it
compresses. A probe is one layer with one knob at one level and everything else dense: the
sensitivity pass measures each probe once per model, data and evaluation setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from microsweep.spaces import Bits, Knob, LayerInfo, LayerPolicy, Rank, Sparsity, Unit, layer_policy

__all__ = [
    "KNOBS",
    "Probe",
    "identity_level",
    "level_key",
    "plan_levels",
    "probes",
    "unit_levels",
]

KNOBS = ("sparsity", "bits", "act_bits", "rank")
"""Layer knobs in the order tables and weights use."""


def identity_level(knob: str) -> Any:
    """The value of `knob` that leaves a layer unchanged (rank: None, a dense layer)."""
    return {"sparsity": 0.0, "bits": 32, "act_bits": 32, "rank": None}[knob]


def _rank_levels(knob: Rank, unit: Unit, levels: int) -> list[Any]:
    """Rank levels of a unit, dense first then falling ranks; deduplicated on the ranks they
    resolve to in every layer of the unit."""
    if knob.values is not None:
        candidates: list[Any] = sorted(set(knob.values), reverse=True)
    elif knob.low == knob.high:  # a constant fraction: exactly what `suggest` returns
        candidates = [knob.low]
    else:
        if len(unit.layers) == 1:
            info = unit.layers[0]
            full = info.full_rank
            even = Rank.break_even(info.out_features, info.in_features)
            low = max(1, math.ceil(knob.low * full - 1e-9))
            high = min(math.floor(knob.high * full + 1e-9), even - 1)
            ranks = set()
            if high >= low:
                steps = max(1, levels - 1)
                ranks = {round(low + (high - low) * i / steps) for i in range(levels)}
            candidates = [r / full for r in sorted(ranks, reverse=True)]
            if Rank.resolve(knob.high, info.out_features, info.in_features) is None:
                candidates.insert(0, knob.high)
        else:
            steps = max(1, levels - 1)
            candidates = [knob.high - (knob.high - knob.low) * i / steps for i in range(levels)]
    out: list[Any] = []
    seen: set[tuple[int | None, ...]] = set()
    for value in candidates:
        resolved = tuple(Rank.resolve(value, i.out_features, i.in_features) for i in unit.layers)
        if resolved not in seen:
            seen.add(resolved)
            out.append(value)
    dense = [v for v in out if all(r is None for r in _resolve_all(v, unit.layers))]
    return dense + [v for v in out if v not in dense]


def _resolve_all(value: Any, layers: tuple[LayerInfo, ...]) -> list[int | None]:
    return [Rank.resolve(value, i.out_features, i.in_features) for i in layers]


def _knob_levels(name: str, knob: Knob, unit: Unit, sparsity_levels: int, rank_levels: int) -> list:
    if isinstance(knob, Sparsity):
        return knob.grid(sparsity_levels)
    if isinstance(knob, Bits):
        return sorted(set(knob.choices), reverse=True)
    if isinstance(knob, Rank):
        return _rank_levels(knob, unit, rank_levels)
    raise TypeError(f"knob {name!r} of type {type(knob).__name__} is not a layer knob")


def unit_levels(
    unit: Unit, *, sparsity_levels: int = 11, rank_levels: int = 10
) -> dict[str, list[Any]]:
    """Per knob of `unit` (in `KNOBS` order), its levels from least to most compressed.

    A stepped `Sparsity` keeps its step grid, a continuous one gets `sparsity_levels` values;
    fractional `Rank`s get up to `rank_levels` ranks below the break-even plus the dense level
    when the range reaches it.
    """
    return {
        name: _knob_levels(name, unit.knobs[name], unit, sparsity_levels, rank_levels)
        for name in KNOBS
        if name in unit.knobs
    }


def plan_levels(
    unit: Unit, *, sparsity_levels: int = 11, rank_levels: int = 10, max_options: int = 4000
) -> dict[str, list[Any]]:
    """`unit_levels`, thinned until the unit has at most `max_options` combinations: the
    longest sparsity or rank grid keeps about half its levels, evenly spread, ends kept."""
    levels = unit_levels(unit, sparsity_levels=sparsity_levels, rank_levels=rank_levels)
    while math.prod(len(v) for v in levels.values()) > max_options:
        longest = max(
            (k for k in ("sparsity", "rank") if k in levels and len(levels[k]) > 2),
            key=lambda k: len(levels[k]),
            default=None,
        )
        if longest is None:
            break
        values = levels[longest]
        keep = max(2, math.ceil(len(values) / 2))
        picks = sorted({round(i * (len(values) - 1) / (keep - 1)) for i in range(keep)})
        levels[longest] = [values[i] for i in picks]
    return levels


def layer_setting(
    info: LayerInfo, knobs: dict[str, Knob], values: dict[str, Any], group: str | None = None
) -> LayerPolicy:
    """The `LayerPolicy` of one layer for knob values in Optuna units (others left alone), as
    the space's `suggest` makes it; `group` is the unit's key (the layer's name by default)."""
    return layer_policy(info, knobs, values, group or info.name)


def level_key(knob: str, setting: LayerPolicy) -> str | None:
    """How the sensitivity table names `knob`'s level in a layer setting; None at identity."""
    if knob == "sparsity":
        if setting.sparsity == 0:
            return None
        block = "" if setting.block is None else f"@{setting.block[0]}x{setting.block[1]}"
        method = "" if setting.prune_method == "magnitude" else f"/{setting.prune_method}"
        return f"{setting.sparsity:.6g}{block}{method}"  # another method: another measurement
    if knob == "bits":
        if setting.bits == 32:
            return None
        method = "" if setting.quant_method == "rtn" else f"/{setting.quant_method}"
        order = "+ao" if setting.act_order else ""
        group = "" if setting.quant_group is None else f"/g{setting.quant_group}"
        return f"{setting.bits}{method}{order}{group}"
    if knob == "act_bits":
        return None if setting.act_bits == 32 else str(setting.act_bits)
    if knob == "rank":
        if setting.rank is None:
            return None
        method = "" if setting.rank_method == "plain" else f"/{setting.rank_method}"
        return f"{setting.rank}{method}"  # another method is another measurement
    raise ValueError(f"unknown knob {knob!r}")


@dataclass(frozen=True)
class Probe:
    """One layer, one knob at one level, everything else dense: one sensitivity measurement."""

    layer: str
    knob: str
    key: str
    value: float
    setting: LayerPolicy


def probes(units: list[Unit], levels: dict[str, dict[str, list[Any]]]) -> list[Probe]:
    """Every distinct single-knob, single-layer probe the units' levels need, in model order."""
    out: dict[tuple[str, str, str], Probe] = {}
    for unit in units:
        for knob, values in levels[unit.key].items():
            for value in values:
                for info in unit.layers:
                    setting = layer_setting(info, dict(unit.knobs), {knob: value}, unit.key)
                    key = level_key(knob, setting)
                    if key is None:
                        continue
                    number = {
                        "sparsity": setting.sparsity,
                        "bits": setting.bits,
                        "act_bits": setting.act_bits,
                        "rank": setting.rank or 0,
                    }[knob]
                    out.setdefault(
                        (info.name, knob, key),
                        Probe(info.name, knob, key, float(number), setting),
                    )
    return list(out.values())
