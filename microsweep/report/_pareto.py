"""Pareto report: compute the points and front from the store, then draw them with plotly.

`pareto_data` reads only microsweep's tables (no unpickling) and returns a small object the
tests assert on; `write_pareto_html` renders it as one self-contained HTML page.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from microsweep.errors import UsageError
from microsweep.storage import Store

__all__ = ["ParetoData", "Point", "pareto_data", "pareto_front", "write_pareto_html"]


@dataclass(frozen=True)
class Point:
    number: int
    score: float
    perplexity: float
    feasible: bool
    params: float
    ops: float
    summary: str


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


def pareto_front(points: list[Point]) -> list[int]:
    """Numbers of the feasible points no other feasible point beats on both score and
    perplexity, sorted by score."""
    feasible = sorted((p for p in points if p.feasible), key=lambda p: (p.score, p.perplexity))
    front: list[int] = []
    best_ppl = float("inf")
    for p in feasible:
        if p.perplexity < best_ppl:
            front.append(p.number)
            best_ppl = p.perplexity
    return front


def pareto_data(store: Store, name: str) -> ParetoData:
    sweep = store.get_sweep(name)
    rows = store.trials(name)
    points = [
        Point(r.number, r.score, r.perplexity, bool(r.feasible), r.params, r.ops, r.summary)
        for r in rows
        if r.state == "COMPLETE" and r.score is not None and r.perplexity is not None
    ]
    states = dict(Counter(r.state for r in rows))
    dense_score = sweep.dense_score
    history: list[tuple[int, float | None]] = []
    best: float | None = None
    for r in rows:  # in trial order
        if r.state == "COMPLETE" and r.feasible and r.score is not None:
            best = r.score if best is None else min(best, r.score)
        history.append((r.number, best))
    return ParetoData(
        name=name,
        points=points,
        front=pareto_front(points),
        ceiling=sweep.ceiling,
        dense_perplexity=sweep.dense_perplexity,
        dense_score=dense_score,
        baseline=sweep.baseline_name,
        failed=states.get("FAIL", 0),
        states=states,
        history=history,
    )


def _hover(p: Point) -> str:
    summary = p.summary.replace("; ", "<br>")
    return (
        f"trial {p.number}<br>score {p.score:.5g}<br>perplexity {p.perplexity:.4f}<br>"
        f"params {p.params:,.0f} ops {p.ops:,.0f}<br>{summary}"
    )


def figure(data: ParetoData) -> Any:
    """The plotly figure: feasible, infeasible and front traces, the dense model, the ceiling."""
    import plotly.graph_objects as go

    front = set(data.front)
    groups = {
        "feasible": [p for p in data.points if p.feasible and p.number not in front],
        "infeasible": [p for p in data.points if not p.feasible],
        "Pareto front": sorted(
            (p for p in data.points if p.number in front), key=lambda p: p.score
        ),
    }
    styles = {
        "feasible": dict(mode="markers", marker=dict(color="#1f77b4", size=8, opacity=0.8)),
        "infeasible": dict(
            mode="markers", marker=dict(color="#aaaaaa", size=8, symbol="x", opacity=0.7)
        ),
        "Pareto front": dict(
            mode="lines+markers",
            line=dict(color="#d62728", width=2),
            marker=dict(color="#d62728", size=11, symbol="diamond"),
        ),
    }
    fig = go.Figure()
    for label, pts in groups.items():
        fig.add_trace(
            go.Scatter(
                x=[p.perplexity for p in pts],
                y=[p.score for p in pts],
                name=label,
                text=[_hover(p) for p in pts],
                hoverinfo="text",
                customdata=[p.number for p in pts],
                **styles[label],
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[data.dense_perplexity],
            y=[data.dense_score],
            name="dense model",
            mode="markers",
            marker=dict(color="black", size=12, symbol="star"),
            hoverinfo="text",
            text=[
                f"dense model<br>score {data.dense_score:.5g}<br>perplexity "
                f"{data.dense_perplexity:.4f}"
            ],
        )
    )
    if data.ceiling is not None:
        fig.add_vrect(  # everything right of the ceiling is infeasible
            x0=data.ceiling,
            x1=max([data.ceiling, *(p.perplexity for p in data.points)]) * 1.02,
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
    scores = [p.score for p in data.points]
    if scores:  # fit the trials; the dense star may sit above, marked at the top edge
        low, high = min(scores), max(scores)
        pad = 0.08 * (high - low or abs(high) or 1.0)
        fig.update_yaxes(range=[low - pad, high + pad])
        if data.dense_score > high + pad:
            fig.add_annotation(
                x=data.dense_perplexity,
                y=high + pad,
                text=f"dense model: score {data.dense_score:.3g} (above)",
                showarrow=True,
                arrowhead=2,
                ay=20,
            )
    fig.update_layout(
        title=f"microsweep '{data.name}': MicroNet score vs perplexity ({counts})",
        xaxis_title="validation perplexity",
        yaxis_title=f"MicroNet score ({data.baseline} baseline)",
        template="plotly_white",
        hovermode="closest",
        legend=dict(orientation="h", y=-0.15),
    )
    return fig


def history_figure(data: ParetoData) -> Any:
    """Best feasible score against trials, with the dense model's score for scale."""
    import plotly.graph_objects as go

    fig = go.Figure()
    shown = [(n, s) for n, s in data.history if s is not None]
    fig.add_trace(
        go.Scatter(
            x=[n for n, _ in shown],
            y=[s for _, s in shown],
            mode="lines+markers",
            line_shape="hv",
            name="best feasible score",
        )
    )
    fig.update_layout(
        title="best feasible score over trials",
        xaxis_title="trial",
        yaxis_title="best feasible MicroNet score",
        template="plotly_white",
    )
    return fig


def write_pareto_html(store: Store, name: str, path: str | Path) -> ParetoData:
    """Write the sweep's Pareto page to `path` (plotly.js inlined) and return its data."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"folder {path.parent} for the report does not exist; create it first")
    data = pareto_data(store, name)
    front = figure(data).to_html(include_plotlyjs=True, full_html=False)
    history = history_figure(data).to_html(include_plotlyjs=False, full_html=False)
    title = f"microsweep: {escape(data.name)} Pareto front"
    html = (
        f'<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8"><title>{title}</title></head>\n'
        f"<body>\n{front}\n{history}\n</body>\n</html>\n"
    )
    path.write_text(html, encoding="utf-8")
    return data
