"""Why a sweep has no feasible trial: the trial nearest the ceiling, how far over it is, and
which knobs cost it the most.

The costs are the sweep's measured single-knob losses when its evaluation key has a sensitivity
table (each layer's setting alone, as the allocator reads them); without one, how far the policy
pushes each knob toward the most compressed end of its range in the space. Plain reads of the
store: the CLI prints these lines and `SweepResult.infeasible_notes` holds them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microsweep.storage import Store

__all__ = ["KnobCost", "Nearest", "explain_infeasible", "knob_costs", "knob_reach", "nearest"]

KNOBS = ("sparsity", "bits", "act_bits", "rank")
"""The per-layer knobs, in the order policies and tables use."""
SHOWN_KNOBS = 3
"""At most this many knobs are named in a line."""
SHOWN_LAYERS = 2
"""At most this many layers are named per knob."""


@dataclass(frozen=True)
class Nearest:
    """The finished trial closest to the ceiling: the least perplexity among COMPLETE trials,
    else the least projected perplexity among those stopped early."""

    number: int
    state: str
    origin: str | None
    perplexity: float
    score: float | None
    policy: dict[str, Any]


@dataclass(frozen=True)
class KnobCost:
    """One knob's part of a trial's measured single-knob losses (NLL per token, nats)."""

    knob: str
    nll: float
    share: float
    layers: list[tuple[str, str, float]]
    """(layer, level, NLL increase) of the layers this knob costs most, largest first."""


def nearest(rows: Sequence[Any]) -> Nearest | None:
    """The trial nearest the ceiling among stored trial rows (None: nothing measured)."""
    for state in ("COMPLETE", "PRUNED"):
        measured = [
            r for r in rows if r.state == state and r.perplexity is not None and r.perplexity > 0
        ]
        if measured:
            r = min(measured, key=lambda r: (r.perplexity, r.number))
            return Nearest(
                r.number, r.state, r.origin, float(r.perplexity), r.score, dict(r.policy or {})
            )
    return None


_NUMBER = re.compile(r"^(\d+(?:\.\d*)?(?:e[+-]?\d+)?)(.*)$")


def _measured(
    table: Mapping[tuple[str, str, str], float], layer: str, knob: str, key: str
) -> float | None:
    """The stored NLL of `layer` with `knob` at level `key`, or interpolated linearly between
    the two measured levels of the same method that bracket it (a rank or a width off the
    probed grid); None when neither is possible or the measurement failed."""
    value = table.get((layer, knob, key))
    if value is not None:
        return value if math.isfinite(value) else None
    m = _NUMBER.match(key)
    if m is None:
        return None
    x, rest = float(m.group(1)), m.group(2)
    below: tuple[float, float] | None = None
    above: tuple[float, float] | None = None
    for (lay, kn, level), nll in table.items():
        if lay != layer or kn != knob or not math.isfinite(nll):
            continue
        other = _NUMBER.match(level)
        if other is None or other.group(2) != rest:
            continue
        v = float(other.group(1))
        if v <= x and (below is None or v > below[0]):
            below = (v, nll)
        if v >= x and (above is None or v < above[0]):
            above = (v, nll)
    if below is None or above is None:
        return None
    if above[0] == below[0]:
        return below[1]
    t = (x - below[0]) / (above[0] - below[0])
    return below[1] + t * (above[1] - below[1])


def knob_costs(
    policy: Mapping[str, Any],
    table: Mapping[tuple[str, str, str], float],
    dense_nll: float,
) -> tuple[list[KnobCost], int]:
    """Each knob's summed single-knob NLL increase over the policy's layers (increases below
    zero count as zero), largest first with its share of the total, and how many compressed
    layer settings have no measurement to read."""
    from microsweep.allocate._levels import level_key
    from microsweep.policy import LayerPolicy

    per_knob: dict[str, list[tuple[str, str, float]]] = {}
    missing = 0
    for layer, data in (policy.get("layers") or {}).items():
        setting = LayerPolicy.from_json(data)
        for knob in KNOBS:
            key = level_key(knob, setting)
            if key is None:
                continue
            nll = _measured(table, layer, knob, key)
            if nll is None:
                missing += 1
                continue
            per_knob.setdefault(knob, []).append((layer, key, max(0.0, nll - dense_nll)))
    total = sum(c for rows in per_knob.values() for *_, c in rows)
    costs = []
    for knob, rows in per_knob.items():
        nll = sum(c for *_, c in rows)
        rows = sorted(rows, key=lambda r: -r[2])
        costs.append(KnobCost(knob, nll, nll / total if total > 0 else 0.0, rows))
    costs.sort(key=lambda c: (-c.nll, KNOBS.index(c.knob)))
    return costs, missing


def _knob_ranges(space_json: Mapping[str, Any]) -> dict[str, tuple[dict[str, Any], int | None]]:
    """Per layer the knobs its rule searches (the first rule naming a layer holds it) and its
    full rank when the space stored its shape."""
    out: dict[str, tuple[dict[str, Any], int | None]] = {}
    for rule in space_json.get("rules", []):
        names = rule.get("layers", [])
        shapes = rule.get("shapes") or [None] * len(names)
        for name, shape in zip(names, shapes, strict=False):
            if name not in out:
                out[name] = (dict(rule.get("settings") or {}), min(shape) if shape else None)
    return out


def _reach(
    knob: str, spec: Mapping[str, Any], data: Mapping[str, Any], full: int | None
) -> float | None:
    """How far a layer's setting of `knob` goes from the least (0) to the most (1) compressed
    end of the knob's range in the space; None when it cannot be told."""
    if knob == "sparsity":
        low, high = float(spec.get("low", 0.0)), float(spec.get("high", 0.0))
        value = float(data.get("sparsity", 0.0) or 0.0)
        return None if high <= low else min(1.0, max(0.0, (value - low) / (high - low)))
    if knob in ("bits", "act_bits"):
        choices = sorted({int(c) for c in spec.get("choices", [])}, reverse=True)
        if len(choices) < 2:
            return None
        value = int(data.get(knob, 32))
        place = min(range(len(choices)), key=lambda i: abs(choices[i] - value))
        return place / (len(choices) - 1)
    if knob == "rank":
        if not full:
            return None
        if spec.get("values") is not None:
            kept = [v / full if isinstance(v, int) else float(v) for v in spec["values"]]
        else:
            kept = [float(spec.get("low", 1.0)), float(spec.get("high", 1.0))]
        most, least = min(kept), min(1.0, max(kept))
        rank = data.get("rank")
        value = 1.0 if rank is None else min(1.0, rank / full)
        return None if least <= most else min(1.0, max(0.0, (least - value) / (least - most)))
    return None


def knob_reach(
    policy: Mapping[str, Any], space_json: Mapping[str, Any]
) -> list[tuple[str, float, int, int]]:
    """Per knob the policy's mean reach into its ranges (`_reach` over the layers whose rule
    searches it), how many of those layers sit at the most compressed end, and how many there
    are: (knob, mean, at the end, layers), hardest pushed first, knobs at zero left out."""
    ranges = _knob_ranges(space_json)
    layers = policy.get("layers") or {}
    reach: dict[str, list[float]] = {}
    for name, (settings, full) in ranges.items():
        data = layers.get(name, {})
        for knob in KNOBS:
            if knob in settings:
                r = _reach(knob, settings[knob], data, full)
                if r is not None:
                    reach.setdefault(knob, []).append(r)
    out = [
        (knob, sum(v) / len(v), sum(1 for x in v if x >= 1 - 1e-9), len(v))
        for knob, v in reach.items()
        if v and sum(v) > 0
    ]
    out.sort(key=lambda t: (-t[1], KNOBS.index(t[0])))
    return out


def _names(knobs: Sequence[str]) -> str:
    words = [k.replace("_", " ") for k in knobs]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _suggestion(knobs: Sequence[str]) -> str:
    if not knobs:
        return "to reach it: raise the ceiling (perplexity_ceiling)"
    ranges = "range" if len(knobs) == 1 else "ranges"
    return (
        f"to reach it: raise the ceiling (perplexity_ceiling), or narrow the {_names(knobs)} "
        f"{ranges} toward less compression"
    )


def explain_infeasible(store: Store, sweep: Any, rows: Sequence[Any] | None = None) -> list[str]:
    """Lines that say why sweep `sweep` (a name or its stored row) has no feasible trial: the
    nearest trial and its perplexity against the ceiling, the knobs that cost it the most
    and what to change; [] when the sweep has a feasible trial. `rows` are its stored trials
    when the caller has read them."""
    if isinstance(sweep, str):
        sweep = store.get_sweep(sweep)
    if rows is None:
        rows = store.trials(sweep.name)
    if any(r.state == "COMPLETE" and r.feasible for r in rows):
        return []
    from collections import Counter

    states = Counter(r.state for r in rows)
    near = nearest(rows)
    if near is None:
        if not rows:
            return ["no feasible trial: no trial has finished yet"]
        return [
            f"no feasible trial: none of the {len(rows)} finished trials measured a perplexity "
            f"({states.get('FAIL', 0)} failed; 'microsweep status' shows why)"
        ]
    return [
        _headline(states, sweep.ceiling),
        _nearest_line(near, sweep.ceiling),
        *_cost_lines(store, sweep, near),
    ]


def _headline(states: Mapping[str, int], ceiling: float | None) -> str:
    parts = []
    if states.get("COMPLETE"):
        parts.append(f"{states['COMPLETE']} complete")
    if states.get("PRUNED"):
        parts.append(f"{states['PRUNED']} stopped early")
    if states.get("FAIL"):
        parts.append(f"{states['FAIL']} failed")
    over = "" if ceiling is None else f" over the perplexity ceiling {ceiling:.4g}"
    return f"no feasible trial: every measured trial is{over} ({', '.join(parts)})"


def _nearest_line(near: Nearest, ceiling: float | None) -> str:
    from microsweep._text import distinct

    origin = f" ({near.origin})" if near.origin else ""
    kind = "perplexity" if near.state == "COMPLETE" else "projected perplexity"
    if ceiling is None:
        against = f"{near.perplexity:.4g} (no ceiling)"
    else:
        ppl, ceil = distinct(near.perplexity, ceiling)
        against = f"{ppl} against the ceiling {ceil} ({near.perplexity / ceiling - 1:+.0%})"
    stopped = "" if near.state == "COMPLETE" else ", stopped early"
    score = "" if near.score is None else f", score {near.score:.4g}"
    return f"nearest: trial {near.number}{origin} {kind} {against}{score}{stopped}"


def _cost_lines(store: Store, sweep: Any, near: Nearest) -> list[str]:
    """The measured costs of the nearest trial's knobs, or without a sensitivity table (or no
    measurement of its settings) how hard it pushes each knob; then what to change."""
    from microsweep.prepare import table_key

    table = dict(store.sensitivity(table_key(store, sweep.eval_key))) if sweep.eval_key else {}
    dense = table.pop(("", "dense", ""), None)
    dense_nll = dense if dense is not None else math.log(sweep.dense_perplexity)
    if table:
        costs, missing = knob_costs(near.policy, table, dense_nll)
        costs = [c for c in costs if c.nll > 0]
        if costs:
            shown = [c for c in costs[:SHOWN_KNOBS] if c.share >= 0.01] or costs[:1]
            parts = []
            for c in shown:
                part = f"{c.knob.replace('_', ' ')} {c.share:.0%}"
                if c.share >= 0.1:  # the layers behind a knob that matters
                    layers = ", ".join(
                        f"{layer} at {level}" for layer, level, _ in c.layers[:SHOWN_LAYERS]
                    )
                    more = " ..." if len(c.layers) > SHOWN_LAYERS else ""
                    part += f" ({layers}{more})"
                parts.append(part)
            alone = math.exp(dense_nll + sum(c.nll for c in costs))
            dense_ppl = math.exp(dense_nll)
            unmeasured = f"; {missing} of its settings unmeasured" if missing else ""
            return [
                f"largest measured costs in it: {', '.join(parts)}",
                f"measured one at a time, its layers' settings add up to perplexity "
                f"{alone:.4g} (dense {dense_ppl:.4g}, the trial {near.perplexity:.4g})"
                f"{unmeasured}",
                _suggestion([c.knob for c in shown if c.share >= 0.2] or [shown[0].knob]),
            ]
    reach = knob_reach(near.policy, sweep.space_json or {})
    why = "no sensitivity table measured its settings"
    if not reach:
        return [f"{why}; it compresses with no searched knob", _suggestion([])]
    parts = [
        f"{knob.replace('_', ' ')} ({mean:.0%} of the way into its range on average, at its "
        f"most compressed on {at_end} of {n} layers)"
        for knob, mean, at_end, n in reach[:SHOWN_KNOBS]
    ]
    hardest = [k for k, mean, *_ in reach[:SHOWN_KNOBS] if mean >= 0.5] or [reach[0][0]]
    return [f"{why}; it compresses hardest with {', '.join(parts)}", _suggestion(hardest)]
