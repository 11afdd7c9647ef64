"""Per-layer data behind the report: every trial's settings and counts for the layers the space
targets, stored compactly, and parameter importances grouped by knob and by layer.

Both read microsweep's tables with two plain SELECTs (no ORM objects, no unpickling), so a
10,000-trial sweep loads in well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microsweep.storage import Store

__all__ = ["Importances", "LayerTable", "importances", "layer_table"]

KNOBS = ("sparsity", "bits", "act_bits", "rank")
"""The per-layer knobs, in the order the heatmap shows them."""


@dataclass
class LayerTable:
    """Settings and counts of the space's target layers in every finished trial.

    Each layer has a list of distinct rows ``(sparsity, bits, act_bits, rank, params, ops)``
    (`options`); a trial is one index into each layer's list (`choice[trial]`), so 10,000
    trials over 50 layers stay a few hundred kilobytes in the page.
    """

    layers: list[str]
    knobs: list[str]
    allowed: list[list[str]]
    """The knobs each layer's rule searches (a heatmap cell outside them stays blank)."""
    full_rank: list[int | None]
    """min(out, in) of each layer (None for a sweep stored before shapes were)."""
    dense: list[tuple[float, float]]
    """(params, ops) of each layer in the dense model."""
    dense_other: tuple[float, float]
    """(params, ops) of everything outside the target layers, dense."""
    options: list[list[tuple[Any, ...]]] = field(default_factory=list)
    choice: dict[int, list[int]] = field(default_factory=dict)
    other: dict[int, tuple[float, float]] = field(default_factory=dict)
    """(params, ops) outside the target layers, per trial."""

    def row(self, trial: int, layer: str) -> dict[str, Any]:
        """One layer of one trial as a dict (the knobs, params and ops)."""
        i = self.layers.index(layer)
        values = self.options[i][self.choice[trial][i]]
        return dict(zip((*KNOBS, "params", "ops"), values, strict=True))


def target_layers(
    space_json: dict[str, Any],
) -> tuple[list[str], list[str], list[list[str]], list[int | None]]:
    """The layers the space's rules name (in rule order), the knobs any rule searches, the
    knobs each layer's rule searches, and each layer's full rank when the space stored it."""
    allowed: dict[str, list[str]] = {}
    full: dict[str, int | None] = {}
    for rule in space_json.get("rules", []):
        settings = [k for k in KNOBS if k in rule.get("settings", {})]
        names = rule.get("layers", [])
        shapes = rule.get("shapes") or [None] * len(names)
        for name, shape in zip(names, shapes, strict=False):
            if name not in allowed:  # the first rule naming a layer holds it
                allowed[name] = settings
                full[name] = min(shape) if shape else None
    knobs = {k for ks in allowed.values() for k in ks}
    return (
        list(allowed),
        [k for k in KNOBS if k in knobs],
        list(allowed.values()),
        [full[n] for n in allowed],
    )


def _owner(name: str, targets: dict[str, int]) -> int | None:
    """The index of the target layer `name` belongs to (itself or a parent, e.g. a
    factorized layer's `.first`/`.second`), or None."""
    probe = name
    while True:
        if probe in targets:
            return targets[probe]
        if "." not in probe:
            return None
        probe = probe.rsplit(".", 1)[0]


def _settings(lp: dict[str, Any]) -> list[Any]:
    """[sparsity, bits, act_bits, rank, params, ops] from a layer's policy JSON (counts to
    be summed)."""
    return [
        float(lp.get("sparsity", 0.0) or 0.0),
        int(lp.get("bits", 32)),
        int(lp.get("act_bits", 32)),
        lp.get("rank"),
        0.0,
        0.0,
    ]


def layer_table(store: Store, name: str) -> LayerTable:
    """Every finished trial's settings and counts on the space's target layers (FAIL trials
    without layer rows are left out)."""
    from sqlalchemy import select

    from microsweep.storage._models import LayerRow, SweepRow, TrialRow

    sweep = store.get_sweep(name)
    layers, knobs, allowed, full_rank = target_layers(sweep.space_json or {})
    index = {n: i for i, n in enumerate(layers)}
    dense = [[0.0, 0.0] for _ in layers]
    dense_other = [0.0, 0.0]
    for d in sweep.dense_layers or []:
        i = _owner(d["name"], index)
        slot = dense_other if i is None else dense[i]
        slot[0] += d["params"]
        slot[1] += d["ops"]
    query = (
        select(TrialRow.number, LayerRow.layer, LayerRow.params, LayerRow.ops)
        .join(TrialRow, LayerRow.trial_id == TrialRow.id)
        .join(SweepRow, TrialRow.sweep_id == SweepRow.id)
        .where(SweepRow.name == name)
        .order_by(TrialRow.number, LayerRow.id)
    )
    policies = (
        select(TrialRow.number, TrialRow.policy)
        .join(SweepRow, TrialRow.sweep_id == SweepRow.id)
        .where(SweepRow.name == name)
    )
    # per trial: each target layer's settings as its policy gives them (a factorized layer's
    # own row holds no bits: its factors do) and its counts summed over its rows
    per: dict[int, list[list[Any]]] = {}
    other: dict[int, list[float]] = {}
    with store.session() as s:
        settings = {
            number: (policy or {}).get("layers") or {} for number, policy in s.execute(policies)
        }
        for number, layer, params, ops in s.execute(query):
            rows = per.get(number)
            if rows is None:
                given = settings.get(number, {})
                rows = per[number] = [_settings(given.get(n) or {}) for n in layers]
                other[number] = [0.0, 0.0]
            i = _owner(layer, index)
            if i is None:
                slot = other[number]
                slot[0] += params
                slot[1] += ops
                continue
            row = rows[i]
            row[4] += params
            row[5] += ops
    table = LayerTable(
        layers=layers,
        knobs=knobs,
        allowed=allowed,
        full_rank=full_rank,
        dense=[(p, o) for p, o in dense],
        dense_other=(dense_other[0], dense_other[1]),
        options=[[] for _ in layers],
    )
    seen: list[dict[tuple[Any, ...], int]] = [{} for _ in layers]
    for number, rows in per.items():
        picks = []
        for i, row in enumerate(rows):
            key = tuple(row)
            k = seen[i].get(key)
            if k is None:
                k = seen[i][key] = len(table.options[i])
                table.options[i].append(key)
            picks.append(k)
        table.choice[number] = picks
        table.other[number] = (other[number][0], other[number][1])
    return table


@dataclass
class Importances:
    """How much of the spread in score and in log-perplexity each parameter explains alone
    (chance-corrected), as shares that sum to 1 per target, and the same summed by knob and by
    layer."""

    trials: int
    params: dict[str, dict[str, float]] = field(default_factory=dict)
    """parameter -> {"score": share, "perplexity": share}"""
    by_knob: dict[str, dict[str, float]] = field(default_factory=dict)
    by_layer: dict[str, dict[str, float]] = field(default_factory=dict)


def _bins(values: Sequence[Any], most: int = 8) -> list[Any]:
    """Group labels: the values themselves when few are distinct, else quantile bins (so a
    continuous knob is not credited for fitting noise one trial per value)."""
    distinct = sorted({v for v in values}, key=lambda v: (v is None, v if v is not None else 0))
    if len(distinct) <= most:
        return list(values)
    numeric = [(-1.0 if v is None else float(v)) for v in values]
    ordered = sorted(numeric)
    edges = [ordered[min(len(ordered) - 1, (len(ordered) * k) // most)] for k in range(1, most)]
    return [sum(x > e for e in edges) for x in numeric]


def _omega_squared(groups: Sequence[Any], target: Sequence[float]) -> float:
    """How much of `target`'s variance the grouping explains, corrected for chance: omega
    squared, (SS_between - (k - 1) MS_within) / (SS_total + MS_within), at least 0. (The plain
    correlation ratio credits every parameter with about (k - 1) / (n - 1) of noise, which over
    dozens of layers would bury the one that matters.)"""
    n = len(target)
    mean = sum(target) / n if n else 0.0
    total = sum((t - mean) ** 2 for t in target)
    sums: dict[Any, list[float]] = {}
    for g, t in zip(groups, target, strict=True):
        acc = sums.setdefault(g, [0.0, 0.0])
        acc[0] += t
        acc[1] += 1
    k = len(sums)
    if total <= 0 or n <= k:
        return 0.0
    between = sum(c * (s / c - mean) ** 2 for s, c in sums.values())
    within = (total - between) / (n - k)
    return max(0.0, (between - (k - 1) * within) / (total + within))


def importances(
    table: LayerTable,
    scores: dict[int, float],
    perplexities: dict[int, float],
    hyper: dict[int, dict[str, Any]] | None = None,
) -> Importances:
    """How much each searched parameter, one layer knob or one hyperparameter, explains of the
    score and of log-perplexity alone (omega squared, see `_omega_squared`), as shares that sum
    to 1 per target. Layers that always take the same value (a tied rule) are one parameter,
    its share split evenly among them by layer; parameters that never vary get nothing."""
    numbers = [n for n in scores if n in table.choice and n in perplexities]
    out = Importances(trials=len(numbers))
    if len(numbers) < 3:
        return out
    targets = {
        "score": [scores[n] for n in numbers],
        "perplexity": [math.log(max(perplexities[n], 1e-300)) for n in numbers],
    }
    raw: dict[str, dict[str, float]] = {}
    groups_of: dict[str, tuple[str, list[str]]] = {}
    seen: dict[tuple[str, tuple[Any, ...]], str] = {}  # (knob, values) -> parameter name
    for i, layer in enumerate(table.layers):
        for k, knob in enumerate(KNOBS):
            if knob not in table.allowed[i]:
                continue
            values = tuple(table.options[i][table.choice[n][i]][k] for n in numbers)
            if len(set(values)) < 2:
                continue
            tied = seen.get((knob, values))
            if tied is not None:  # the same values as an earlier layer: one parameter
                groups_of[tied][1].append(layer)
                continue
            name = seen[(knob, values)] = f"{layer}.{knob}"
            groups = _bins(values)
            raw[name] = {t: _omega_squared(groups, v) for t, v in targets.items()}
            groups_of[name] = (knob, [layer])
    for key in sorted({k for h in (hyper or {}).values() for k in h}):
        values = [(hyper or {}).get(n, {}).get(key) for n in numbers]
        if len({repr(v) for v in values}) < 2:
            continue
        groups = _bins(values)
        raw[key] = {t: _omega_squared(groups, v) for t, v in targets.items()}
        groups_of[key] = (key, ["(hyperparameters)"])
    for target in targets:
        total = sum(r[target] for r in raw.values())
        for name, r in raw.items():
            share = r[target] / total if total > 0 else 0.0
            out.params.setdefault(name, {})[target] = share
            knob, layers = groups_of[name]
            slot = out.by_knob.setdefault(knob, {"score": 0.0, "perplexity": 0.0})
            slot[target] += share
            for layer in layers:
                slot = out.by_layer.setdefault(layer, {"score": 0.0, "perplexity": 0.0})
                slot[target] += share / len(layers)
    return out
