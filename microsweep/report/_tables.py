"""The data behind `microsweep ls`, `trials` and `show`: plain rows that the CLI prints as a
table, CSV or JSON and that tests assert on."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microsweep.storage import Store

__all__ = [
    "TRIAL_COLUMNS",
    "dense_summary",
    "format_rows",
    "sweep_row",
    "sweep_rows",
    "sweep_state",
    "sweep_status",
    "trial_detail",
    "trial_rows",
    "trial_seconds",
]


def best_key(sweep: Any) -> Any:
    """How a sweep's feasible trials rank: by score, or in the budget form by perplexity."""
    from microsweep.storage._records import best_by

    if best_by(sweep.objective_json) == "perplexity":
        return lambda r: r.perplexity
    return lambda r: r.score


def sweep_state(sweep: Any, finished: int) -> str:
    """running while a driver holds a live lease; done at the target; stopped otherwise."""
    if sweep.owner and sweep.lease_until and sweep.lease_until > time.time():
        return "running"
    return "done" if finished >= sweep.target_trials else "stopped"


def sweep_row(store: Store, name: str) -> dict[str, Any]:
    """Sweep `name` as `ls` shows it: finished and target trials, feasible count, state
    (`sweep_state`) and best feasible score."""
    sweep = store.get_sweep(name)
    rows = store.trials(name)
    feasible = [r for r in rows if r.state == "COMPLETE" and r.feasible]
    best = min(feasible, key=best_key(sweep), default=None)
    return {
        "name": name,
        "state": sweep_state(sweep, len(rows)),
        "finished": len(rows),
        "target": sweep.target_trials,
        "feasible": len(feasible),
        "best_score": None if best is None else best.score,
        "best_trial": None if best is None else best.number,
        "sampler": sweep.sampler,
        "created": sweep.created_at.isoformat(timespec="seconds"),
    }


def sweep_rows(store: Store) -> list[dict[str, Any]]:
    """One `sweep_row` per sweep in the store."""
    return [sweep_row(store, name) for name in store.sweep_names()]


def dense_summary(sweep: Any) -> dict[str, Any]:
    """The dense model's perplexity, params, ops per token and score, and the ceiling."""
    return {
        "perplexity": sweep.dense_perplexity,
        "params": sweep.dense_params,
        "ops": sweep.dense_ops,
        "score": sweep.dense_score,
        "ceiling": sweep.ceiling,
    }


def trial_seconds(rows: Sequence[Any]) -> float | None:
    """Seconds during which at least one trial ran: the union of the trials' spans (each ends
    at its stored finish and lasted its worker's total time), so start-up, sensitivity pass,
    planning and the pauses between resumes are not counted as trial time."""
    spans = []
    for r in rows:
        total = (r.timings or {}).get("total")
        if r.finished_at is None or not isinstance(total, (int, float)) or not total >= 0:
            continue
        end = r.finished_at.timestamp()
        spans.append((end - total, end))
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered if spans else None


def sweep_status(store: Store, name: str, top: int = 5) -> dict[str, Any]:
    """What `microsweep status` shows: counts by state, feasible and over the ceiling, state,
    wall time and throughput, the dense model and baseline, the best feasible trials, the best
    uniform one, the first failures and, without a feasible trial, why (`infeasible`: the
    nearest trial and the knobs that cost it the most)."""
    from collections import Counter

    sweep = store.get_sweep(name)
    rows = store.trials(name)
    states = dict(Counter(r.state for r in rows))
    complete = states.get("COMPLETE", 0)
    best = sorted((r for r in rows if r.state == "COMPLETE" and r.feasible), key=best_key(sweep))
    wall = (max(r.finished_at for r in rows) - sweep.created_at).total_seconds() if rows else None
    busy = trial_seconds(rows)
    uniform = next((r for r in best if r.origin == "uniform"), None)
    infeasible: list[str] = []
    if not best:  # loads the search package (and torch) only for a sweep that needs it
        from microsweep.search._nearest import explain_infeasible

        infeasible = explain_infeasible(store, sweep, rows)

    def brief(r: Any) -> dict[str, Any]:
        return {"trial": r.number, "score": r.score, "perplexity": r.perplexity,
                "origin": r.origin, "policy": r.summary}  # fmt: skip

    return {
        "name": sweep.name,
        "storage": store.display,
        "finished": len(rows),
        "target": sweep.target_trials,
        "states": states,
        "feasible": len(best),
        "over_ceiling": complete - len(best),
        "state": sweep_state(sweep, len(rows)),
        "wall_seconds": None if wall is None else max(wall, 0.0),
        "trial_seconds": busy,
        "trials_per_minute": len(rows) / busy * 60 if busy else None,
        "dense": dense_summary(sweep),
        "baseline": {
            "name": sweep.baseline_name,
            "params": sweep.baseline_params,
            "ops": sweep.baseline_ops,
        },
        "ceiling": sweep.ceiling,
        "sampler": sweep.sampler,
        "best": [brief(r) for r in best[:top]],
        "best_uniform": None if uniform is None else brief(uniform),
        "failures": [{"trial": r.number, "reason": r.reason} for r in rows if r.state == "FAIL"],
        "infeasible": infeasible,
    }


TRIAL_COLUMNS = (
    "trial", "state", "feasible", "score", "perplexity", "params", "ops", "origin", "policy",
    "reason",
)  # fmt: skip
"""The keys of each `trial_rows` row, in order."""


def trial_rows(
    store: Store,
    name: str,
    *,
    state: str | None = None,
    feasible: bool | None = None,
    full_policy: bool = False,
) -> list[dict[str, Any]]:
    """The finished trials of sweep `name`, filtered by state (COMPLETE, PRUNED, FAIL) and by
    whether they met the ceiling. `policy` is the short notation that tables show, or with
    `full_policy` the whole stored policy (every layer and hyperparameter, what scripts read)
    with the notation under `summary`."""
    store.get_sweep(name)  # an unknown name is an error that lists the sweeps
    out = []
    for r in store.trials(name):
        if state is not None and r.state != state:
            continue
        if feasible is not None and bool(r.feasible) != feasible:
            continue
        values = (r.number, r.state, r.feasible, r.score, r.perplexity, r.params, r.ops)
        policy = (r.policy or {}) if full_policy else r.summary
        row = dict(zip(TRIAL_COLUMNS, (*values, r.origin, policy, r.reason), strict=True))
        if full_policy:
            row["summary"] = r.summary
        out.append(row)
    return out


def trial_detail(store: Store, name: str, number: int) -> dict[str, Any]:
    """Everything stored for one trial: its scores, the full policy and per-layer counts next
    to the dense model's."""
    sweep = store.get_sweep(name)
    row = store.trial(name, number)
    dense = {d["name"]: d for d in sweep.dense_layers or []}
    asked = (row.policy or {}).get("layers") or {}
    layers = []
    for layer in sorted(row.layers, key=lambda x: x.id):
        base = dense.get(layer.layer, {})
        pruned = asked[layer.layer].get("sparsity", 0.0) if layer.layer in asked else None
        zeros = layer.sparsity
        layers.append(
            {
                "layer": layer.layer,
                "kind": layer.kind,
                "sparsity": zeros,  # measured zeros: pruned, and rounded to zero by quantization
                "pruned": pruned,
                "quantized_zeros": None if zeros is None else max(0.0, zeros - (pruned or 0.0)),
                "bits": layer.bits,
                "act_bits": layer.act_bits,
                "rank": layer.rank,
                "params": layer.params,
                "ops": layer.ops,
                "dense_params": base.get("params"),
                "dense_ops": base.get("ops"),
            }
        )
    return {
        "sweep": name,
        "trial": row.number,
        "state": row.state,
        "feasible": row.feasible,
        "score": row.score,
        "perplexity": row.perplexity,
        "ceiling": sweep.ceiling,
        "params": row.params,
        "ops": row.ops,
        "origin": row.origin,
        "reason": row.reason,
        "worker": row.worker,
        "policy": row.policy,
        "layers": layers,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_rows(rows: Sequence[Mapping[str, Any]], fmt: str, columns: Sequence[str]) -> str:
    """`rows` as an aligned text table, CSV or JSON (all columns for CSV and JSON; in CSV a
    nested value such as a whole policy is one cell of compact JSON)."""
    if fmt == "json":
        return json.dumps(list(rows), indent=2, default=str)
    if fmt == "csv":
        buf = io.StringIO()
        keys = list(rows[0]) if rows else list(columns)
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: json.dumps(v, separators=(",", ":"), sort_keys=True)
                    if isinstance(v, (dict, list))
                    else v
                    for k, v in row.items()
                }
            )
        return buf.getvalue().rstrip("\n")
    table = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for t in table:
        lines.append("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip())
    return "\n".join(lines)
