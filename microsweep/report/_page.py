"""The sweep report: one self-contained HTML page (plotly.js inlined, opens offline).

`report_data` gathers everything the page shows from the store (tests assert on it);
`figures` draws it as plotly figures (also what a notebook shows); `write_report` writes the
page, whose small script redraws the per-layer view when a trial is clicked.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microsweep.errors import UsageError
from microsweep.report._layers import (
    KNOBS,
    Importances,
    LayerTable,
    importances,
    layer_table,
)
from microsweep.report._pareto import (
    ParetoData,
    figure,
    history_figure,
    pareto_data,
    trial_records,
)

if TYPE_CHECKING:
    from microsweep.report._sensitivity import SensitivityData
    from microsweep.storage import Store

__all__ = [
    "ReportData",
    "figures",
    "heat_cells",
    "layer_view",
    "page_payload",
    "report_data",
    "write_report",
]

_KNOB_LABELS = {"sparsity": "sparsity", "bits": "bits", "act_bits": "act bits", "rank": "rank"}
BEST_NOTE = " — best feasible"
"""What the per-layer view's titles add after the best feasible trial's name."""
ALLOWANCE_NOTE = (
    "<br>counted at 32 bits, hence above dense: this trial quantizes"
    "<br>something below 16 bits, so the 16-bit allowance (values and"
    "<br>multiplies counted as 16-bit while nothing is narrower) no longer"
    "<br>applies to the parts it leaves alone"
)
"""The hover text of a trial's "other" bar when it lost the 16-bit allowance."""


def view_label(number: int | None, best: int | None = None) -> str:
    """How the per-layer view names trial `number` (None: the dense model); the best feasible
    trial says so."""
    if number is None:
        return "dense model"
    return f"trial {number}{BEST_NOTE if number == best else ''}"


@dataclass
class ReportData:
    """Everything the report shows, read from the store."""

    pareto: ParetoData
    layers: LayerTable
    importances: Importances
    sensitivity: SensitivityData | None
    front: list[dict[str, Any]] = field(default_factory=list)
    """The front's trials (best score first) with the command that exports each."""
    selected: int | None = None
    """The trial the per-layer view opens on: the best feasible, else the first finished."""


def export_command(name: str, number: int, storage: str) -> str:
    """The shell command that writes trial `number` of sweep `name` as a .msz file."""
    return (
        f"microsweep export --name {shlex.quote(name)} --trial {number} "
        f"--storage {shlex.quote(storage)} -o {shlex.quote(f'{name}-trial{number}.msz')}"
    )


def report_data(store: Store, name: str) -> ReportData:
    """Read sweep `name`: its points and front, every trial's per-layer settings and counts,
    the parameter importances over completed trials, and its sensitivity table if measured."""
    from microsweep.report._sensitivity import sensitivity_data

    rows = trial_records(store, name)
    pareto = pareto_data(store, name, rows)
    table = layer_table(store, name, rows)
    complete = [r for r in rows if r.state == "COMPLETE" and r.score is not None]
    imp = importances(
        table,
        {r.number: r.score for r in complete},
        {r.number: r.perplexity for r in complete if r.perplexity is not None},
        {r.number: dict((r.policy or {}).get("hyper") or {}) for r in complete},
    )
    sweep = store.get_sweep(name)
    sensitivity = None
    if sweep.eval_key:
        from microsweep.prepare import table_key

        try:  # one read: a key without rows is an error there
            key = table_key(store, sweep.eval_key)
            sensitivity = sensitivity_data(store, key, ceiling=sweep.ceiling)
        except UsageError:
            pass
    points = {p.number: p for p in pareto.points}
    front = []
    for number in pareto.front:
        if number < 0:
            front.append(
                {
                    "trial": "dense",
                    "score": pareto.dense_score,
                    "perplexity": pareto.dense_perplexity,
                    "origin": "dense",
                    "policy": "no compression",
                    "export": "",
                }
            )
            continue
        p = points[number]
        front.append(
            {
                "trial": number,
                "score": p.score,
                "perplexity": p.perplexity,
                "params": p.params,
                "ops": p.ops,
                "origin": p.origin,
                "policy": p.summary,
                "export": export_command(name, number, store.display),
            }
        )
    selected = pareto.best_feasible
    if selected is None:
        selected = next(iter(table.choice), None)
    return ReportData(pareto, table, imp, sensitivity, front, selected)


def _rank_scale(table: LayerTable, i: int) -> int:
    """What a rank on layer `i` is measured against: its full rank, else (a sweep stored
    without shapes) the largest rank tried on it."""
    full = table.full_rank[i]
    return full or max((o[3] or 0 for o in table.options[i]), default=0)


def _cell(table: LayerTable, i: int, knob: str, v: Any) -> tuple[float | None, str]:
    """One heatmap cell of layer `i`: how hard `knob` at value `v` compresses and its text."""
    if knob not in table.allowed[i]:  # not searched on this layer: a blank cell
        return None, ""
    if knob == "sparsity":
        return float(v or 0.0), f"{v or 0:.3g}"
    if knob in ("bits", "act_bits"):
        bits = 32 if v is None else v
        return 1.0 - bits / 32, str(bits)
    scale = _rank_scale(table, i)
    return (0.0 if v is None or not scale else 1.0 - v / scale), ("full" if v is None else str(v))


def heat_cells(table: LayerTable, i: int, values: tuple[Any, ...]) -> tuple[list, list[str]]:
    """One heatmap row for layer `i` at `values` (an option row): how hard each knob
    compresses (0 none .. 1 most: the sparsity, 1 - bits/32, 1 - rank/full rank; None where
    the knob is not searched on the layer) and the text shown in each cell."""
    cells = [_cell(table, i, knob, values[KNOBS.index(knob)]) for knob in table.knobs]
    return [z for z, _ in cells], [text for _, text in cells]


def _option_cells(table: LayerTable, i: int) -> list[list[Any]]:
    """`heat_cells` of every option of layer `i` with its params and ops, each knob's cell
    worked out once per distinct value (a layer has hundreds of options, a knob few values)."""
    options = table.options[i]
    columns = []
    for knob in table.knobs:
        k = KNOBS.index(knob)
        memo: dict[Any, tuple[float | None, str]] = {}
        column = []
        for option in options:
            cell = memo.get(option[k])
            if cell is None:
                cell = memo[option[k]] = _cell(table, i, knob, option[k])
            column.append(cell)
        columns.append(column)
    return [
        [[c[j][0] for c in columns], [c[j][1] for c in columns], option[4], option[5]]
        for j, option in enumerate(options)
    ]


def layer_view(table: LayerTable, number: int | None) -> dict[str, Any]:
    """The per-layer view of trial `number` (None: the dense model): each layer's heatmap row
    (`heat_cells`), and params and ops per layer (plus everything else as "other") beside the
    dense model's; `hover` adds to each bar's hover text (why "other" exceeds dense)."""
    z, text, params, ops = [], [], [], []
    for i, _ in enumerate(table.layers):
        if number is None or number not in table.choice:
            values: tuple[Any, ...] = (0.0, 32, 32, None, *table.dense[i])
        else:
            values = table.options[i][table.choice[number][i]]
        zr, tr = heat_cells(table, i, values)
        z.append(zr)
        text.append(tr)
        params.append(values[4])
        ops.append(values[5])
    other = (
        table.dense_other if number is None or number not in table.other else table.other[number]
    )
    lost = number is not None and number in table.lost_allowance
    return {
        "trial": number,
        "layers": [*table.layers, "other"],
        "knobs": [_KNOB_LABELS[k] for k in table.knobs],
        "z": z,
        "text": text,
        "params": [*params, other[0]],
        "ops": [*ops, other[1]],
        "dense_params": [d[0] for d in table.dense] + [table.dense_other[0]],
        "dense_ops": [d[1] for d in table.dense] + [table.dense_other[1]],
        "hover": [""] * len(table.layers) + [ALLOWANCE_NOTE if lost else ""],
    }


def page_payload(table: LayerTable, best: int | None = None) -> dict[str, Any]:
    """What the page's script needs to redraw the per-layer view of any trial: per layer,
    each distinct option's heatmap row, text and counts, each trial's option indexes, the
    best feasible trial (its titles say so) and the trials whose "other" bar lost the 16-bit
    allowance (its hover says why)."""
    cells = [_option_cells(table, i) for i in range(len(table.options))]
    return {
        "cells": cells,
        "choice": {str(k): v for k, v in table.choice.items()},
        "other": {str(k): v for k, v in table.other.items()},
        "best": best,
        "best_note": BEST_NOTE,
        "lost": sorted(table.lost_allowance),
        "allowance_note": ALLOWANCE_NOTE,
    }


def _layer_figures(
    table: LayerTable, number: int | None, best: int | None = None
) -> tuple[Any, Any]:
    """The per-layer heatmap and the counts against dense of trial `number`, titled by
    `view_label` (so the best feasible trial is named as such)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    view = layer_view(table, number)
    title = view_label(number, best)
    label = view_label(number)
    heat = go.Figure(
        go.Heatmap(
            z=view["z"],
            x=view["knobs"],
            y=view["layers"][:-1],
            text=view["text"],
            texttemplate="%{text}",
            zmin=0.0,
            zmax=1.0,
            colorscale="Reds",
            colorbar=dict(title="compression", thickness=12),
            hovertemplate="%{y}<br>%{x}: %{text}<extra></extra>",
        )
    )
    rows = len(view["layers"])
    heat.update_layout(
        title=f"{title}: policy per layer",
        yaxis=dict(autorange="reversed", automargin=True),
        template="plotly_white",
        height=max(320, 90 + 22 * rows),
        margin=dict(l=10, r=10, t=50, b=30),
    )
    counts = make_subplots(
        rows=1, cols=2, shared_yaxes=True, subplot_titles=("parameters", "operations per token")
    )
    for col, key in ((1, "params"), (2, "ops")):
        for who, values, colour, hover in (
            ("dense", view[f"dense_{key}"], "#bbbbbb", [""] * len(view["layers"])),
            (label, view[key], "#d62728", view["hover"]),
        ):
            counts.add_trace(
                go.Bar(
                    y=view["layers"],
                    x=values,
                    orientation="h",
                    name=who,
                    marker_color=colour,
                    legendgroup=who,
                    showlegend=col == 1,
                    hovertext=hover,
                    hovertemplate="%{y}<br>%{fullData.name}: %{x:,.0f}%{hovertext}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    counts.update_yaxes(autorange="reversed", automargin=True)
    counts.update_layout(
        title=f"{title}: parameters and operations per layer against dense",
        barmode="group",
        template="plotly_white",
        height=max(320, 90 + 22 * rows),
        margin=dict(l=10, r=10, t=60, b=30),
        legend=dict(orientation="h", y=-0.08),
    )
    return heat, counts


def _importance_figure(imp: Importances) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("by knob", "by layer"))
    for col, groups in ((1, imp.by_knob), (2, imp.by_layer)):
        names = sorted(groups, key=lambda g: -groups[g]["score"])
        for target, colour in (("score", "#1f77b4"), ("perplexity", "#ff7f0e")):
            fig.add_trace(
                go.Bar(
                    x=names,
                    y=[groups[g][target] for g in names],
                    name=target,
                    marker_color=colour,
                    legendgroup=target,
                    showlegend=col == 1,
                    hovertemplate=f"%{{x}}<br>{target}: %{{y:.1%}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.update_yaxes(tickformat=".0%")
    fig.update_layout(
        title=f"parameter importances over {imp.trials} completed trials (share of the spread "
        "each parameter explains alone)",
        barmode="group",
        template="plotly_white",
        height=420,
    )
    return fig


def figures(data: ReportData, trial: int | None = None) -> dict[str, Any]:
    """The report's plotly figures by name; the per-layer pair shows `trial` (default: the
    trial the page opens on)."""
    from microsweep.report._sensitivity import figure as sensitivity_figure

    number = data.selected if trial is None else trial
    if number is not None and number not in data.layers.choice:
        raise UsageError(
            f"trial {number} of sweep {data.pareto.name!r} has no per-layer rows (failed before "
            "it was counted, or not finished); pick one from 'microsweep trials'"
        )
    heat, counts = _layer_figures(data.layers, number, data.pareto.best_feasible)
    out = {
        "pareto": figure(data.pareto),
        "layers": heat,
        "counts": counts,
        "history": history_figure(data.pareto),
        "importances": _importance_figure(data.importances),
    }
    if data.sensitivity is not None:
        out["sensitivity"] = sensitivity_figure(data.sensitivity)
    return out


def _front_table(data: ReportData) -> str:
    head = (
        "<tr><th>trial</th><th>origin</th><th>score</th><th>perplexity</th><th>policy</th>"
        "<th>export</th></tr>"
    )
    body = []
    for row in data.front:
        trial = row["trial"]
        attr = f' data-trial="{trial}"' if isinstance(trial, int) else ""
        origin = row.get("origin") or "-"
        body.append(
            f"<tr{attr}><td>{trial}</td><td>{escape(origin)}</td><td>{row['score']:.5g}</td>"
            f"<td>{row['perplexity']:.4f}</td><td>{escape(row['policy'])}</td>"
            f"<td><code>{escape(row['export'])}</code></td></tr>"
        )
    return f'<table id="ms-front">{head}{"".join(body)}</table>'


_STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
.row{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1.3fr);gap:12px}
#ms-front{border-collapse:collapse;font-size:12px} #ms-front td,#ms-front th{border:1px solid #ddd;
padding:3px 6px;vertical-align:top;text-align:left} #ms-front tr[data-trial]{cursor:pointer}
#ms-front tr[data-trial]:hover{background:#f3f3f3} code{font-size:11px}
#ms-view{scroll-margin-top:8px}
"""

_SCRIPT = """
(function(){
const D = JSON.parse(document.getElementById('ms-data').textContent);
const lost = new Set(D.lost);
function show(n){
  const picks = D.choice[String(n)];
  if (n === null || n === undefined || picks === undefined) return false;
  const rows = picks.map((k, i) => D.cells[i][k]);  // [z row, text row, params, ops]
  const other = D.other[String(n)], label = 'trial ' + n;
  const title = label + (n === D.best ? D.best_note : '');
  const hover = rows.map(() => '').concat([lost.has(n) ? D.allowance_note : '']);
  const heat = document.getElementById('ms-layers'), counts = document.getElementById('ms-counts');
  Plotly.restyle(heat, {z: [rows.map(r => r[0])], text: [rows.map(r => r[1])]}, [0]);
  Plotly.relayout(heat, {'title.text': title + ': policy per layer'});
  Plotly.restyle(counts, {x: [rows.map(r => r[2]).concat([other[0]]),
                              rows.map(r => r[3]).concat([other[1]])],
                          name: [label, label], hovertext: [hover, hover]}, [1, 3]);
  Plotly.relayout(counts, {'title.text': title +
    ': parameters and operations per layer against dense'});
  document.getElementById('ms-selected').textContent = label;
  document.getElementById('ms-selected').dataset.trial = String(n);
  document.getElementById('ms-selected-note').textContent =
    n === D.best ? D.best_note + ' (the view opens on it)' : '';
  return true;
}
function pick(ev){
  const c = ev && ev.points && ev.points[0] && ev.points[0].customdata;
  if (c != null) show(Array.isArray(c) || ArrayBuffer.isView(c) ? c[0] : c);  // typed arrays
}
['ms-pareto', 'ms-history'].forEach(id => {
  const el = document.getElementById(id); if (el && el.on) el.on('plotly_click', pick);
});
// the table sits below the view: bring the redrawn view into sight
document.querySelectorAll('#ms-front tr[data-trial]').forEach(tr =>
  tr.addEventListener('click', () => {
    if (show(Number(tr.dataset.trial)))
      document.getElementById('ms-view').scrollIntoView({behavior: 'smooth', block: 'start'});
  }));
})();
"""


def write_report(store: Store, name: str, path: str | Path) -> ReportData:
    """Write sweep `name`'s report to `path` as one HTML page and return its data."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"folder {path.parent} for the report does not exist; create it first")
    from microsweep.spaces import Policy

    data = report_data(store, name)
    figs = figures(data)
    first = True
    html_of: dict[str, str] = {}
    for key, fig in figs.items():
        html_of[key] = fig.to_html(
            include_plotlyjs=first, full_html=False, div_id=f"ms-{key}", validate=False
        )
        first = False
    p = data.pareto
    counts = ", ".join(f"{k} {v}" for k, v in sorted(p.states.items())) or "no trials"
    ceiling = "none" if p.ceiling is None else f"{p.ceiling:.4f}"
    payload = json.dumps(page_payload(data.layers, p.best_feasible), separators=(",", ":"))
    payload = payload.replace("</", "<\\/")
    sens = (
        f"<h2>Sensitivity: each layer alone at each level</h2>{html_of['sensitivity']}"
        if "sensitivity" in html_of
        else "<p>No sensitivity table for this sweep ('microsweep sensitivity' measures one; "
        "the auto and allocate samplers measure it themselves).</p>"
    )
    selected = view_label(data.selected)
    note = ""
    if data.selected is not None and data.selected == p.best_feasible:
        note = f"{BEST_NOTE} (the view opens on it)"
    selected_attr = "" if data.selected is None else f' data-trial="{data.selected}"'
    title = f"microsweep report: {escape(name)}"
    html = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title><style>{_STYLE}</style></head>
<body>
<h1>{title}</h1>
<p>{counts}; {p.feasible} feasible, {p.front_trials} of them on the Pareto front. Dense model:
perplexity {p.dense_perplexity:.4f}, score {p.dense_score:.5g} ({escape(p.baseline)} baseline);
perplexity ceiling {ceiling}.
Click a point (or a row of the front table) to see its policy per layer.
Policy notation: {escape(Policy.NOTATION)}.</p>
{html_of["pareto"]}
<h2 id="ms-view">Per-layer view: <span id="ms-selected"{selected_attr}>{selected}</span><span
id="ms-selected-note">{note}</span></h2>
<div class="row"><div>{html_of["layers"]}</div><div>{html_of["counts"]}</div></div>
<h2>Pareto front</h2>
{_front_table(data)}
<h2>Search history</h2>
{html_of["history"]}
<h2>Parameter importances</h2>
{html_of["importances"]}
{sens}
<script type="application/json" id="ms-data">{payload}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""
    path.write_text(html, encoding="utf-8")
    return data
