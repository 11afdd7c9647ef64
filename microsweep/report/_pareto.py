"""Pareto front and history: compute the points and front from the store, then draw them.

`pareto_data` reads only microsweep's tables (no unpickling) and returns a small object the
tests assert on; `figure` and `history_figure` draw it with plotly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from microsweep.storage import Store

__all__ = [
    "ParetoData",
    "Point",
    "figure",
    "history_figure",
    "is_uniform",
    "legend_names",
    "pareto_data",
    "pareto_front",
]


@dataclass(frozen=True)
class Point:
    """One trial (or the dense model, number -1) in score-perplexity space."""

    number: int
    score: float
    perplexity: float
    feasible: bool
    params: float
    ops: float
    summary: str
    origin: str | None = None
    state: str = "COMPLETE"


@dataclass
class ParetoData:
    """Completed trials as points, the numbers of those on the feasible front, and context."""

    name: str
    points: list[Point]
    front: list[int]
    ceiling: float | None
    dense_perplexity: float
    dense_score: float
    baseline: str
    failed: int = 0
    states: dict[str, int] = field(default_factory=dict)
    history: list[tuple[int, float | None]] = field(default_factory=list)
    """(trial number, best feasible score among trials up to it), in trial order."""
    stopped: list[Point] = field(default_factory=list)
    """PRUNED trials at their projected perplexity (stopped early, never feasible)."""
    failures: list[tuple[int, str]] = field(default_factory=list)
    """(trial number, reason) of the FAIL trials: they have no perplexity to plot."""
    best_uniform: int | None = None
    """The best feasible trial with one setting for every layer, if any."""
    best_feasible: int | None = None
    """The feasible trial with the lowest score (the first on a tie): the one the report marks
    and opens its per-layer view on."""

    @property
    def uniform(self) -> list[Point]:
        """The measured trials the uniform sampler proposed (origin ``uniform``: one setting for
        every layer), completed or stopped early, in trial order: the plot marks them apart."""
        return sorted(
            (p for p in (*self.points, *self.stopped) if p.origin == "uniform"),
            key=lambda p: p.number,
        )

    @property
    def feasible(self) -> int:
        """How many completed trials met the ceiling (what the page's header counts)."""
        return sum(1 for p in self.points if p.feasible)

    @property
    def front_trials(self) -> int:
        """How many trials are on the front (the dense model, number -1, is not a trial)."""
        return sum(1 for n in self.front if n >= 0)


def pareto_front(points: list[Point]) -> list[int]:
    """Numbers of the feasible points no other feasible point beats on both score and
    perplexity, sorted by score (the dense model, number -1, takes part when given)."""
    feasible = sorted((p for p in points if p.feasible), key=lambda p: (p.score, p.perplexity))
    front: list[int] = []
    best_ppl = float("inf")
    for p in feasible:
        if p.perplexity < best_ppl:
            front.append(p.number)
            best_ppl = p.perplexity
    return front


def is_uniform(policy: dict[str, Any]) -> bool:
    """One setting for every layer the policy touches: the same sparsity, block, bits and
    activation bits everywhere, and a rank on all of them or none."""
    layers = list((policy.get("layers") or {}).values())  # a layer left dense counts too
    if len(layers) < 2:
        return False
    keys = {
        (
            lp.get("sparsity", 0.0) or 0.0,
            tuple(lp.get("block") or ()),
            lp.get("bits", 32),
            lp.get("act_bits", 32),
            lp.get("rank") is None,
        )
        for lp in layers
    }
    return len(keys) == 1


def _point(r: Any) -> Point:
    return Point(
        r.number, r.score, r.perplexity, bool(r.feasible), r.params, r.ops, r.summary,
        r.origin, r.state,
    )  # fmt: skip


def trial_records(store: Store, name: str) -> list[Any]:
    """The sweep's finished trials in trial order as plain rows (attribute access, no ORM
    objects): what the report reads, in one SELECT."""
    return store.trial_rows_for_report(name)


def pareto_data(store: Store, name: str, rows: list[Any] | None = None) -> ParetoData:
    """The sweep's trials as points: completed, stopped early and failed; the feasible front
    with the dense model in it; the best uniform policy; the running best score. `rows` are
    the sweep's `trial_records` when the caller has read them already."""
    sweep = store.get_sweep(name)
    if rows is None:
        rows = trial_records(store, name)
    measured = [r for r in rows if r.score is not None and r.perplexity is not None]
    points = [_point(r) for r in measured if r.state == "COMPLETE"]
    stopped = [_point(r) for r in measured if r.state == "PRUNED"]
    failures = [(r.number, r.reason or "no reason stored") for r in rows if r.state == "FAIL"]
    uniform = [
        p
        for p, r in zip(points, (r for r in measured if r.state == "COMPLETE"), strict=True)
        if p.feasible and (r.origin == "uniform" or is_uniform(r.policy or {}))
    ]
    states = dict(Counter(r.state for r in rows))
    feasible = [p for p in points if p.feasible]
    dense_score = sweep.dense_score
    history: list[tuple[int, float | None]] = []
    best: float | None = None
    for r in rows:  # in trial order
        if r.state == "COMPLETE" and r.feasible and r.score is not None:
            best = r.score if best is None else min(best, r.score)
        history.append((r.number, best))
    from microsweep.storage._records import best_by

    budgeted = best_by(sweep.objective_json) == "perplexity"  # least perplexity at the budget

    def rank(p: Point) -> float:
        return p.perplexity if budgeted else p.score

    dense = Point(
        -1, dense_score, sweep.dense_perplexity, True, sweep.dense_params, sweep.dense_ops,
        "dense", "dense",
    )  # fmt: skip
    return ParetoData(
        name=name,
        points=points,
        front=pareto_front([*points, dense]),
        ceiling=sweep.ceiling,
        dense_perplexity=sweep.dense_perplexity,
        dense_score=dense_score,
        baseline=sweep.baseline_name,
        failed=states.get("FAIL", 0),
        states=states,
        history=history,
        stopped=stopped,
        failures=failures,
        best_uniform=min(uniform, key=rank).number if uniform else None,
        best_feasible=min(feasible, key=rank).number if feasible else None,
    )


_HOVER = (
    "trial %{customdata[0]} (%{text})<br>score %{y:.5g}<br>perplexity %{x:.4f}"
    "<br>params %{customdata[1]:,.0f}  ops/token %{customdata[2]:,.0f}<extra>%{fullData.name}"
    "</extra>"
)


def _columns(points: list[Point], *fields: str) -> Any:
    """The points' numeric `fields` as a float array, one column each (numpy arrays keep
    plotly from copying and checking 10,000 Python lists)."""
    import numpy as np

    return np.array([[getattr(p, f) for f in fields] for p in points], dtype=float).reshape(
        len(points), len(fields)
    )


def _scatter(points: list[Point], name: str, **style: Any) -> Any:
    """One trace of `points` named `name` as the legend shows it; hover shows the trial, its
    origin and counts (the full policy is in the per-layer view), so a 10,000-trial page stays
    small."""
    import numpy as np
    import plotly.graph_objects as go

    xy = _columns(points, "perplexity", "score")
    return go.Scatter(
        x=xy[:, 0],
        y=xy[:, 1],
        name=name,
        customdata=_columns(points, "number", "params", "ops"),
        text=np.array([p.origin or "-" for p in points], dtype=object),
        hovertemplate=_HOVER,
        **style,
    )


def legend_names(data: ParetoData) -> dict[str, str]:
    """The Pareto legend's labels by trace role, each with the count the page's header uses:
    the front counts its trials out of all feasible ones, the rest count their own points."""
    front = set(data.front)
    off_front = sum(1 for p in data.points if p.feasible and p.number not in front)
    over = sum(1 for p in data.points if not p.feasible)
    on = f"{data.front_trials} of {data.feasible} feasible trials"
    if -1 in front:
        on += " and the dense model"
    return {
        "feasible": f"feasible, off the front ({off_front})",
        "over": f"over the ceiling ({over})",
        "stopped": f"stopped early ({len(data.stopped)})",
        "failed": f"failed ({len(data.failures)}): no perplexity, see history",
        "front": f"Pareto front ({on})",
        "best": f"best feasible (trial {data.best_feasible})",
        "uniform": f"best uniform policy (trial {data.best_uniform})",
        "uniform_trials": f"uniform sampler's trials ({len(data.uniform)})",
    }


def figure(data: ParetoData) -> Any:
    """Score against perplexity: feasible, over-the-ceiling, stopped-early and failed trials,
    the front (the dense model on it when nothing beats it), the uniform sampler's trials
    ringed, the best feasible trial, the best uniform policy, the ceiling and the infeasible
    region; the y axis fits the trials (a dense model above them is noted in the legend and
    marked at the top edge, no label to collide with the front)."""
    import plotly.graph_objects as go

    front = set(data.front)
    names = legend_names(data)
    dense = Point(
        -1, data.dense_score, data.dense_perplexity, True, float("nan"), float("nan"),
        "dense", "dense",
    )  # fmt: skip
    by_number = {p.number: p for p in data.points}
    by_number[-1] = dense
    measured = [*data.points, *data.stopped]
    scores = [p.score for p in measured]
    top: float | None = None  # the y axis' upper end when it fits the trials
    if scores:
        low, high = min(scores), max(scores)
        pad = 0.08 * (high - low or abs(high) or 1.0)
        top = high + pad
    above = top is not None and data.dense_score > top
    thin = dict(line=dict(color="white", width=0.5))  # overlapping markers stay apart
    fig = go.Figure()
    fig.add_trace(
        _scatter(
            [p for p in data.points if p.feasible and p.number not in front],
            names["feasible"],
            mode="markers",
            marker=dict(color="#1f77b4", size=6, opacity=0.6, **thin),
        )
    )
    fig.add_trace(
        _scatter(
            [p for p in data.points if not p.feasible],
            names["over"],
            mode="markers",
            marker=dict(color="#999999", size=6, symbol="x", opacity=0.55),
        )
    )
    fig.add_trace(
        _scatter(
            data.stopped,
            names["stopped"],
            mode="markers",
            marker=dict(color="#ff7f0e", size=6, symbol="triangle-right-open", opacity=0.7),
        )
    )
    fig.add_trace(  # a FAIL trial has no perplexity: listed here, drawn in the history
        go.Scatter(
            x=[None],
            y=[None],
            name=names["failed"],
            mode="markers",
            marker=dict(color="#8c564b", size=8, symbol="x-thin-open"),
        )
    )
    fig.add_trace(
        _scatter(
            sorted((by_number[n] for n in front), key=lambda p: p.score),
            names["front"],
            mode="lines+markers",
            line=dict(color="#d62728", width=2),
            marker=dict(color="#d62728", size=9, symbol="diamond", **thin),
        )
    )
    note = f" (score {data.dense_score:.3g}: above the plot, ▲ at the top edge)"
    fig.add_trace(
        _scatter(
            [dense],
            "dense model" + (note if above else ""),
            mode="markers",
            marker=dict(color="black", size=13, symbol="star"),
            legendgroup="dense",
        )
    )
    if above and top is not None:  # where the dense model is, on the edge it is beyond
        fig.add_trace(
            go.Scatter(
                x=[data.dense_perplexity],
                y=[top],
                mode="markers",
                marker=dict(color="black", size=11, symbol="triangle-up"),
                cliponaxis=False,
                legendgroup="dense",
                showlegend=False,
                name="dense model",
                hovertemplate=f"dense model: score {data.dense_score:.5g}, above the plot"
                "<br>perplexity %{x:.4f}<extra></extra>",
            )
        )
    if data.uniform:  # a ring around each, whatever its outcome; a legend click hides them
        fig.add_trace(
            _scatter(
                data.uniform,
                names["uniform_trials"],
                mode="markers",
                marker=dict(size=12, symbol="square-open", color="#2ca02c", line=dict(width=1.5)),
            )
        )
    if data.best_uniform is not None:
        fig.add_trace(
            _scatter(
                [by_number[data.best_uniform]],
                names["uniform"],
                mode="markers",
                marker=dict(size=18, symbol="circle-open", color="#2ca02c", line=dict(width=3)),
            )
        )
    if data.best_feasible is not None:  # drawn last: around its front marker
        fig.add_trace(
            _scatter(
                [by_number[data.best_feasible]],
                names["best"],
                mode="markers",
                marker=dict(  # a ring: the front's diamond and close neighbours show through
                    size=21, symbol="diamond-open", color="#e6a100", line=dict(width=3)
                ),
            )
        )
    if data.ceiling is not None:
        fig.add_vrect(  # everything right of the ceiling is infeasible
            x0=data.ceiling,
            x1=max([data.ceiling, *(p.perplexity for p in measured)]) * 1.02,
            fillcolor="#d62728",
            opacity=0.06,
            line_width=0,
            layer="below",
        )
        fig.add_vline(
            x=data.ceiling,
            line_dash="dash",
            line_color="#2ca02c",
            annotation_text=f"ceiling {data.ceiling:.4g}",
            annotation_position="top",
        )
    counts = ", ".join(f"{k} {v}" for k, v in sorted(data.states.items()))
    if scores and top is not None:  # fit the trials; the dense star may sit above
        fig.update_yaxes(range=[min(scores) - (top - max(scores)), top])
    fig.update_layout(
        title=f"microsweep '{data.name}': MicroNet score vs perplexity ({counts}; "
        f"{data.feasible} feasible)",
        xaxis_title="validation perplexity",
        yaxis_title=f"MicroNet score ({data.baseline} baseline)",
        template="plotly_white",
        hovermode="closest",
        legend=dict(orientation="h", y=-0.18),
        margin=dict(t=60),
    )
    return fig


def history_figure(data: ParetoData) -> Any:
    """Every trial's score in trial order (by outcome; failed trials on the bottom edge) and
    the best feasible score so far."""
    import plotly.graph_objects as go

    fig = go.Figure()
    groups = (
        ("feasible", [p for p in data.points if p.feasible], dict(color="#1f77b4")),
        ("over the ceiling", [p for p in data.points if not p.feasible], dict(color="#999999")),
        ("stopped early", data.stopped, dict(color="#ff7f0e", symbol="triangle-right-open")),
    )
    for label, pts, marker in groups:
        xy = _columns(pts, "number", "score")
        fig.add_trace(
            go.Scatter(
                x=xy[:, 0],
                y=xy[:, 1],
                name=f"{label} ({len(pts)})",
                mode="markers",
                marker=dict(size=5, opacity=0.6, **marker),
                customdata=xy[:, :1],
                hovertemplate="trial %{x}<br>score %{y:.5g}<extra></extra>",
            )
        )
    scores = [p.score for p in (*data.points, *data.stopped)]
    bottom = min(scores) if scores else 0.0
    fig.add_trace(
        go.Scatter(
            x=[n for n, _ in data.failures],
            y=[bottom] * len(data.failures),
            name=f"failed ({len(data.failures)})",
            mode="markers",
            marker=dict(color="#8c564b", size=9, symbol="x-thin-open", line=dict(width=2)),
            text=[reason[:200] for _, reason in data.failures],
            hovertemplate="trial %{x} FAIL<br>%{text}<extra></extra>",
        )
    )
    shown = [(n, s) for n, s in data.history if s is not None]
    shown = [  # only where the best changes (and the last trial): the same step line
        (n, s)
        for k, (n, s) in enumerate(shown)
        if k == 0 or k == len(shown) - 1 or s != shown[k - 1][1]
    ]
    fig.add_trace(
        go.Scatter(
            x=[n for n, _ in shown],
            y=[s for _, s in shown],
            mode="lines",
            line_shape="hv",
            line=dict(color="#d62728", width=2),
            name="best feasible score",
        )
    )
    fig.update_layout(
        title="best feasible score over trials",
        xaxis_title="trial",
        yaxis_title="MicroNet score",
        template="plotly_white",
        legend=dict(orientation="h", y=-0.25),
    )
    return fig
