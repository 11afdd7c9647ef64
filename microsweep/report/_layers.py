"""Per-layer data behind the report: every trial's settings and counts for the layers the space
targets, stored compactly, and parameter importances grouped by knob and by layer.

The table reads each trial's row once (its policy, totals and packed counts per target layer,
`layer_counts`), never the per-layer rows, so a 10,000-trial sweep loads in well under a
second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

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
    lost_allowance: set[int] = field(default_factory=set)
    """Trials counted without the 16-bit allowance (something below 16 bits) whose "other" count
    exceeds dense's: the parts they leave alone count at 32 bits where dense's counted at 16."""

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


def _settings_array(settings: list[dict[str, Any]], layers: list[str]) -> np.ndarray:
    """(sparsity, bits, act_bits, rank) of each of `layers` in each trial's policy layers
    (`settings`), shaped (trials, layers, 4); a knob a layer's policy leaves out (or sets to
    None) takes its default, an unset rank is -1. One pass over what the policies hold, not
    over trials x layers x knobs."""
    start = {name: 4 * i for i, name in enumerate(layers)}
    slot = {knob: k for k, knob in enumerate(KNOBS)}
    width = 4 * len(layers)
    values: list[float] = [0.0, 32, 32, -1] * (len(settings) * len(layers))
    base = 0
    for given in settings:
        for name, lp in given.items():
            i = start.get(name)
            if i is None:
                continue
            for knob, value in lp.items():
                k = slot.get(knob)
                if k is not None and value is not None:
                    values[base + i + k] = value
        base += width
    return np.array(values, dtype=float).reshape(len(settings), len(layers), 4)


def _distinct_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`values`' distinct rows in sorted order and each row's index among them (what
    ``np.unique(values, axis=0, return_inverse=True)`` gives, by one lexsort)."""
    n = len(values)
    if n == 0:
        return values[:0], np.zeros(0, dtype=np.int64)
    order = np.lexsort(values.T[::-1])
    ordered = values[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], inverse


def layer_table(store: Store, name: str, records: list[Any] | None = None) -> LayerTable:
    """Every finished trial's settings and counts on the space's target layers (trials without
    counted target layers, as a failed one, are left out); `records` are the sweep's
    `Store.trial_rows_for_report` rows when the caller has read them.

    Counts come from each trial's stored summary (`layer_counts`, the target layers' rows
    summed when the trial was recorded), settings from its policy: no per-layer row is read."""
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
    if records is None:
        records = store.trial_rows_for_report(name)
    counted = sorted((r for r in records if r.layer_counts), key=lambda r: r.number)
    n_trials = len(counted)
    trial_numbers = [r.number for r in counted]
    # each trial's summary: (params, ops) per summary layer, in the sweep's order
    stored = list(sweep.summary_layers or layers)
    position = {n: i for i, n in enumerate(stored)}
    packed = b"".join(bytes(r.layer_counts) for r in counted)
    summary = np.frombuffer(packed, dtype="<f8").reshape(n_trials, len(stored), 2)
    sums = np.zeros((n_trials, len(layers), 2))
    for i, layer in enumerate(layers):
        if layer in position:
            sums[:, i] = summary[:, position[layer]]
    settings = [(r.policy or {}).get("layers") or {} for r in counted]
    table = LayerTable(
        layers=layers,
        knobs=knobs,
        allowed=allowed,
        full_rank=full_rank,
        dense=[(p, o) for p, o in dense],
        dense_other=(dense_other[0], dense_other[1]),
        options=[],
    )
    picks = np.zeros((n_trials, len(layers)), dtype=np.int64)
    knob_values = _settings_array(settings, layers)
    grid = np.zeros((n_trials, 6))
    for i in range(len(layers)):  # the distinct rows of each layer, and which each trial took
        grid[:, :4] = knob_values[:, i]
        grid[:, 4:] = sums[:, i]
        unique, picks[:, i] = _distinct_rows(grid)
        table.options.append(
            [
                (sp, int(bits), int(act), None if rank < 0 else int(rank), p, o)
                for sp, bits, act, rank, p, o in unique.tolist()
            ]
        )
    table.choice = dict(zip(trial_numbers, picks.tolist(), strict=True))
    targets = sums.sum(axis=1).tolist()
    table.other = {
        r.number: ((r.params or 0.0) - p, (r.ops or 0.0) - o)
        for r, (p, o) in zip(counted, targets, strict=True)
    }
    grew = (1 + 1e-9) * dense_other[0] + 1e-9, (1 + 1e-9) * dense_other[1] + 1e-9  # not noise
    table.lost_allowance = {
        r.number
        for r in counted
        if getattr(r, "freebie", None) is False
        and (table.other[r.number][0] > grew[0] or table.other[r.number][1] > grew[1])
    }
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


def _bins(values: Sequence[Any] | np.ndarray, most: int = 8) -> np.ndarray:
    """Group labels as numbers: the values themselves when few are distinct (a category per
    distinct value when they are not numbers; None is -1), else quantile bins (so a continuous
    knob is not credited for fitting noise one trial per value)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":
        numeric = values.astype(float)
    elif not all(v is None or isinstance(v, (int, float)) for v in values):
        codes: dict[str, int] = {}
        return np.array([codes.setdefault(repr(v), len(codes)) for v in values], dtype=float)
    else:
        numeric = np.array([-1.0 if v is None else float(v) for v in values])
    if len(np.unique(numeric)) <= most:
        return numeric
    ordered = np.sort(numeric)
    edges = ordered[np.minimum(len(ordered) - 1, (len(ordered) * np.arange(1, most)) // most)]
    return (numeric[:, None] > edges[None, :]).sum(axis=1).astype(float)


def _omega_squared(groups: np.ndarray, target: np.ndarray) -> float:
    """How much of `target`'s variance the grouping explains, corrected for chance: omega
    squared, (SS_between - (k - 1) MS_within) / (SS_total + MS_within), at least 0. (The plain
    correlation ratio credits every parameter with about (k - 1) / (n - 1) of noise, which over
    dozens of layers would bury the one that matters.)"""
    n = len(target)
    _, label = np.unique(groups, return_inverse=True)
    k = int(label.max()) + 1 if n else 0
    total = float(((target - target.mean()) ** 2).sum()) if n else 0.0
    if total <= 0 or n <= k:
        return 0.0
    count = np.bincount(label, minlength=k)
    means = np.bincount(label, weights=target, minlength=k) / count
    between = float((count * (means - target.mean()) ** 2).sum())
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
        "score": np.array([scores[n] for n in numbers], dtype=float),
        "perplexity": np.log(np.maximum([perplexities[n] for n in numbers], 1e-300)),
    }
    raw: dict[str, dict[str, float]] = {}
    groups_of: dict[str, tuple[str, list[str]]] = {}
    seen: dict[tuple[str, bytes], str] = {}  # (knob, values) -> parameter name
    picks = np.array([table.choice[n] for n in numbers], dtype=np.int64)
    for i, layer in enumerate(table.layers):
        # each option's knob values as numbers (an unset rank is -1), then each trial's
        options = np.array(
            [[-1.0 if v is None else float(v) for v in o[:4]] for o in table.options[i]]
        ).reshape(-1, 4)
        chosen = options[picks[:, i]]
        for k, knob in enumerate(KNOBS):
            if knob not in table.allowed[i]:
                continue
            values = np.ascontiguousarray(chosen[:, k])
            if (values == values[0]).all():
                continue
            key = (knob, values.tobytes())
            tied = seen.get(key)
            if tied is not None:  # the same values as an earlier layer: one parameter
                groups_of[tied][1].append(layer)
                continue
            name = seen[key] = f"{layer}.{knob}"
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
