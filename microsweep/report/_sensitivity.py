"""Sensitivity curves: perplexity of each layer alone at each level of each knob.

`sensitivity_data` reads one stored table (by evaluation key) into a small object the tests
assert on; `write_sensitivity_html` draws it as one panel per knob, one curve per layer, with
the dense model and the ceiling as horizontal lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microsweep.errors import UsageError
from microsweep.storage import Store

__all__ = ["SensitivityData", "sensitivity_data", "write_sensitivity_html"]

_HEIGHT = 420
"""Height of the sensitivity figure without its legend (px)."""
_ROW_HEIGHT = 24
"""Height of one row of legend entries (px)."""
_ENTRY_WIDTH = 230
"""Width of one legend entry (px): room for a name like blocks.11.attn.c_proj."""
_PER_ROW = 4
"""Legend entries per row at the page's usual width (about 1,300 px)."""

_KNOB_TITLES = {
    "sparsity": "sparsity (fraction pruned)",
    "bits": "weight bits",
    "act_bits": "activation bits",
    "rank": "rank",
}


@dataclass
class SensitivityData:
    """Curves by knob then layer: lists of (level value, perplexity), sorted by value."""

    eval_key: str
    label: str
    dense_perplexity: float | None
    ceiling: float | None
    curves: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)

    @property
    def probes(self) -> int:
        return sum(len(points) for layers in self.curves.values() for points in layers.values())


def sensitivity_data(
    store: Store, eval_key: str, *, ceiling: float | None = None
) -> SensitivityData:
    """The stored table under `eval_key` as curves; a key with no rows is an error."""
    rows = store.sensitivity_rows(eval_key)
    if not rows:
        raise UsageError(f"no sensitivity measurements under key {eval_key} in {store.display}")
    data = SensitivityData(eval_key, rows[0].label, None, ceiling)
    for row in rows:
        if row.knob == "dense":
            data.dense_perplexity = row.perplexity
            continue
        layer = data.curves.setdefault(row.knob, {}).setdefault(row.layer, [])
        layer.append((row.value, row.perplexity))
    for layers in data.curves.values():
        for points in layers.values():
            points.sort()
    return data


def figure(data: SensitivityData) -> Any:
    """One panel per knob; each layer's perplexity against the knob's level; every layer once in
    a legend laid out in rows below the panels, so dozens of layers stay readable."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    knobs = [k for k in _KNOB_TITLES if k in data.curves]
    fig = make_subplots(
        rows=1,
        cols=max(1, len(knobs)),
        shared_yaxes=True,
        subplot_titles=[_KNOB_TITLES[k] for k in knobs],
    )
    from plotly.colors import qualitative

    palette = qualitative.Dark24 + qualitative.Light24
    layers = sorted({layer for k in knobs for layer in data.curves[k]})
    colour = {layer: palette[i % len(palette)] for i, layer in enumerate(layers)}
    finite = [
        p for k in knobs for pts in data.curves[k].values() for _, p in pts if math.isfinite(p)
    ]
    listed: set[str] = set()  # each layer once in the legend, from the first panel it is in
    lines: list[dict[str, Any]] = []
    labels: list[dict[str, Any]] = []
    for col, knob in enumerate(knobs, start=1):
        for layer, points in data.curves[knob].items():
            xs = [v for v, _ in points]
            ys = [p if math.isfinite(p) else None for _, p in points]
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines+markers",
                    name=layer,
                    legendgroup=layer,
                    showlegend=layer not in listed,
                    line=dict(color=colour[layer]),
                    hovertemplate=(
                        f"{layer}<br>{knob} %{{x}}<br>perplexity %{{y:.4f}}<extra></extra>"
                    ),
                ),
                row=1,
                col=col,
            )
            listed.add(layer)
        # the dense and ceiling lines across each panel: what add_hline draws, set in one
        # layout update below (add_hline re-reads the whole figure on every call)
        axis = "" if col == 1 else str(col)
        for value, name, dash in (
            (data.dense_perplexity, "dense", "dot"),
            (data.ceiling, "ceiling", "dash"),
        ):
            if value is None:
                continue
            lines.append(
                dict(
                    type="line", x0=0, x1=1, xref=f"x{axis} domain", y0=value, y1=value,
                    yref=f"y{axis}", line=dict(color="#444", dash=dash),
                )
            )  # fmt: skip
            if col == len(knobs):  # named right of the last panel, clear of every curve
                labels.append(
                    dict(
                        text=name, showarrow=False, x=1, xanchor="left", xref=f"x{axis} domain",
                        y=value, yanchor="middle", yref=f"y{axis}",
                    )
                )  # fmt: skip
        if knob in ("bits", "act_bits", "rank"):
            fig.update_xaxes(autorange="reversed", row=1, col=col)  # more compression rightward
    fig.update_layout(shapes=lines, annotations=[*fig.layout.annotations, *labels])
    if finite:
        top = max(finite)
        if data.ceiling is not None:
            top = min(top, data.ceiling + 2 * (data.ceiling - (data.dense_perplexity or 0)))
        low = min(finite + ([data.dense_perplexity] if data.dense_perplexity else []))
        fig.update_yaxes(range=[low - 0.02 * (top - low + 1e-9), top], row=1, col=1)
    # every layer in a grid below the panels (a legend at the side scrolls past ~9 layers); the
    # figure grows by a row of entries per `_PER_ROW` layers so the panels keep their height
    rows = math.ceil(len(layers) / _PER_ROW)
    fig.update_layout(
        title=f"microsweep sensitivity '{data.label}': each layer alone at each level "
        f"({data.probes} measurements)",
        yaxis_title="validation perplexity",
        template="plotly_white",
        height=_HEIGHT + _ROW_HEIGHT * rows,
        legend=dict(
            orientation="h",
            x=0,
            xanchor="left",
            y=-_ROW_HEIGHT / (_HEIGHT - 100),  # just below the tick labels
            yanchor="top",
            entrywidth=_ENTRY_WIDTH,
            title_text="layer",
        ),
    )
    return fig


def write_sensitivity_html(data: SensitivityData, path: str | Path) -> None:
    """Write the curves as a self-contained HTML page (plotly.js inlined)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"folder {path.parent} for the plot does not exist; create it first")
    figure(data).write_html(str(path), include_plotlyjs=True, full_html=True)
