"""The sweep report's data (points, per-layer table, importances, front with export commands),
`microsweep report`, and `open_sweep` in Python, checked against the stored rows."""

from __future__ import annotations

import math
import shlex

import pytest

from microsweep.errors import UsageError
from microsweep.report import (
    LayerTable,
    figures,
    importances,
    layer_table,
    layer_view,
    open_sweep,
    report_data,
    trial_rows,
    write_report,
)
from microsweep.search import run_sensitivity, run_sweep
from microsweep.storage import Store
from tests.conftest import ROOT
from tests.conftest import cli as _cli

TINY = str(ROOT / "examples" / "tiny.py")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_gpt) -> str:
    """An auto sweep: uniform warm starts, a whole sensitivity table, trials stopped early, and one
    trial of ours that quantizes a single layer to 8 bits (so it loses the 16-bit allowance)."""
    from microsweep.spaces import LayerPolicy, Policy

    url = f"sqlite:///{tmp_path_factory.mktemp('report') / 'report.db'}"
    one_layer = Policy(layers={"blocks.0.mlp.c_fc": LayerPolicy(bits=8)})
    # the whole table first (a sweep's own pass measures what its time budget allows)
    run_sensitivity(TINY, name="table", storage=url, in_process=True, progress=False)
    run_sweep(
        TINY, name="a", trials=12, storage=url, seed=1, sampler="auto", in_process=True,
        progress=False, warm_start=[one_layer],
    )  # fmt: skip
    return url


def test_layer_table_matches_the_stored_layers_and_policies(sweep):
    store = Store(sweep, must_exist=True)
    table = layer_table(store, "a")
    rows = {r.number: r for r in store.trials("a", with_layers=True)}
    assert table.layers[:2] == ["blocks.0.attn.c_attn", "blocks.0.attn.c_proj"]
    assert table.knobs == ["sparsity", "bits", "act_bits", "rank"]
    assert table.allowed[table.layers.index("head")] == ["bits"]
    assert set(table.choice) == {n for n, r in rows.items() if r.layers}
    for number, row in rows.items():
        if number not in table.choice:
            continue
        # each target layer's counts are its stored rows' (its own and a factorized layer's
        # factors), and the rest is what the other layers' rows hold
        mine = set()
        for n in table.layers:
            rows_n = [lr for lr in row.layers if lr.layer == n or lr.layer.startswith(n + ".")]
            mine.update(id(lr) for lr in rows_n)
            got = table.row(number, n)
            assert got["params"] == pytest.approx(sum(lr.params for lr in rows_n), rel=1e-12)
            assert got["ops"] == pytest.approx(sum(lr.ops for lr in rows_n), rel=1e-12)
        rest = [lr for lr in row.layers if id(lr) not in mine]
        assert table.other[number][0] == pytest.approx(sum(lr.params for lr in rest), abs=1e-6)
        assert table.other[number][1] == pytest.approx(sum(lr.ops for lr in rest), abs=1e-6)
        for name, lp in row.policy["layers"].items():
            got = table.row(number, name)
            assert got["bits"] == lp.get("bits", 32)
            assert got["rank"] == lp.get("rank")
            assert got["sparsity"] == pytest.approx(lp.get("sparsity", 0.0), abs=0.01)
    dense = store.get_sweep("a")
    assert sum(p for p, _ in table.dense) + table.dense_other[0] == pytest.approx(
        dense.dense_params, rel=1e-12
    )


def test_layer_view_encodes_each_knob(sweep):
    store = Store(sweep, must_exist=True)
    table = layer_table(store, "a")
    number = next(iter(table.choice))
    view = layer_view(table, number)
    assert view["layers"] == [*table.layers, "other"]
    for i, name in enumerate(table.layers):
        row = table.row(number, name)
        for j, knob in enumerate(table.knobs):
            z, text = view["z"][i][j], view["text"][i][j]
            if knob not in table.allowed[i]:
                assert (z, text) == (None, "")
            elif knob == "sparsity":
                assert z == pytest.approx(row["sparsity"] or 0.0)
            elif knob in ("bits", "act_bits"):
                bits = row[knob] or 32
                assert (z, text) == (pytest.approx(1 - bits / 32), str(bits))
            else:
                assert (row["rank"] is None) == (text == "full")
        assert view["params"][i] == row["params"]
    # the page's script reads each trial's rows from the payload: the same as layer_view
    from microsweep.report._page import page_payload

    payload = page_payload(table)
    for n, picks in table.choice.items():
        rows = [payload["cells"][i][k] for i, k in enumerate(picks)]
        want = layer_view(table, n)
        assert [r[0] for r in rows] == want["z"] and [r[1] for r in rows] == want["text"]
        assert [r[2] for r in rows] + [payload["other"][str(n)][0]] == want["params"]
    # a rank is measured against the layer's full rank
    i = table.layers.index("blocks.0.mlp.c_fc")
    assert table.full_rank[i] == 32  # Linear(32, 128) in the tiny GPT
    ranked = [n for n in table.choice if table.row(n, "blocks.0.mlp.c_fc")["rank"]]
    if ranked:
        rank = table.row(ranked[0], "blocks.0.mlp.c_fc")["rank"]
        z = layer_view(table, ranked[0])["z"][i][table.knobs.index("rank")]
        assert z == pytest.approx(1 - rank / 32)
    dense_view = layer_view(table, None)
    assert dense_view["params"][:-1] == [p for p, _ in table.dense]
    assert all(z in (0.0, None) for zr in dense_view["z"] for z in zr)


def _table(values: list[tuple[float, int]]) -> LayerTable:
    """Two layers, A and B, each with (sparsity, bits) per trial."""
    table = LayerTable(
        layers=["A", "B"],
        knobs=["sparsity", "bits"],
        allowed=[["sparsity", "bits"], ["sparsity", "bits"]],
        full_rank=[None, None],
        dense=[(1.0, 1.0), (1.0, 1.0)],
        dense_other=(0.0, 0.0),
        options=[[], []],
    )
    for n, (a, b) in enumerate(values):
        picks = []
        for i, key in enumerate([(a, 32, None, None, 1.0, 1.0), (0.0, b, None, None, 1.0, 1.0)]):
            if key not in table.options[i]:
                table.options[i].append(key)
            picks.append(table.options[i].index(key))
        table.choice[n] = picks
    return table


def test_importances_credit_the_parameter_that_drives_the_score():
    import random

    rng = random.Random(0)
    values = [(rng.choice([0.0, 0.3, 0.6, 0.9]), rng.choice([4, 8, 32])) for _ in range(200)]
    table = _table(values)
    scores = {n: 1.0 - a + 0.01 * rng.random() for n, (a, _) in enumerate(values)}
    ppl = {n: math.exp(2.0 + b / 32 + 0.01 * rng.random()) for n, (_, b) in enumerate(values)}
    imp = importances(table, scores, ppl, {n: {"lr": rng.random()} for n in scores})
    assert imp.trials == 200
    assert imp.params["A.sparsity"]["score"] > 0.9  # the score depends on A's sparsity alone
    assert imp.params["B.bits"]["perplexity"] > 0.9  # the perplexity on B's bits alone
    for target in ("score", "perplexity"):
        assert sum(p[target] for p in imp.params.values()) == pytest.approx(1.0)
        assert sum(g[target] for g in imp.by_knob.values()) == pytest.approx(1.0)
        assert sum(g[target] for g in imp.by_layer.values()) == pytest.approx(1.0)
    assert "B.sparsity" not in imp.params  # never varied: nothing to credit
    assert imp.by_knob["sparsity"]["score"] == imp.params["A.sparsity"]["score"]
    assert imp.by_layer["B"]["perplexity"] == imp.params["B.bits"]["perplexity"]
    assert imp.by_layer["(hyperparameters)"]["score"] == imp.params["lr"]["score"]
    assert importances(table, {0: 1.0}, {0: 2.0}).params == {}  # too few trials: nothing


def test_importances_are_not_buried_by_noise_and_count_tied_layers_once():
    """48 layers, one that matters: chance correction keeps the noise near zero. Two layers
    that always take the same value are one parameter."""
    import random

    rng = random.Random(1)
    n_layers, n_trials = 48, 100
    table = LayerTable(
        layers=[f"L{i}" for i in range(n_layers)],
        knobs=["sparsity"],
        allowed=[["sparsity"]] * n_layers,
        full_rank=[None] * n_layers,
        dense=[(1.0, 1.0)] * n_layers,
        dense_other=(0.0, 0.0),
        options=[[(s, 32, 32, None, 1.0, 1.0) for s in (0.0, 0.3, 0.6, 0.9)]] * n_layers,
    )
    picks = {n: [rng.randrange(4) for _ in range(n_layers)] for n in range(n_trials)}
    for n in picks:
        picks[n][1] = picks[n][0]  # L1 is tied to L0
    table.choice = picks
    scores = {n: 0.5 * p[5] + rng.gauss(0, 1) for n, p in picks.items()}  # only L5 matters
    ppl = {n: 10.0 for n in picks}
    imp = importances(table, scores, ppl)
    assert imp.params["L5.sparsity"]["score"] > 0.5
    assert "L1.sparsity" not in imp.params  # folded into L0's parameter
    assert imp.by_layer["L0"]["score"] == pytest.approx(imp.params["L0.sparsity"]["score"] / 2)
    assert imp.by_layer["L1"]["score"] == imp.by_layer["L0"]["score"]


def test_report_data_marks_every_kind_of_trial(sweep):
    store = Store(sweep, must_exist=True)
    data = report_data(store, "a")
    rows = store.trials("a")
    p = data.pareto
    assert [x.number for x in p.stopped] == [r.number for r in rows if r.state == "PRUNED"]
    assert [n for n, _ in p.failures] == [r.number for r in rows if r.state == "FAIL"]
    uniform = [r for r in rows if r.state == "COMPLETE" and r.feasible and r.origin == "uniform"]
    assert uniform, "the auto sampler's warm starts include uniform policies"
    assert p.best_uniform == min(uniform, key=lambda r: r.score).number
    # the dense model is on the front unless a feasible trial beats it on both axes
    beaten = any(
        r.state == "COMPLETE" and r.feasible and r.score <= p.dense_score
        and r.perplexity <= p.dense_perplexity
        for r in rows
    )  # fmt: skip
    assert (-1 in p.front) == (not beaten)
    # the front table: best score first, each trial with the command that exports it
    assert [row["trial"] for row in data.front] == [n if n >= 0 else "dense" for n in p.front]
    assert data.sensitivity is not None and data.sensitivity.probes > 0
    feasible = [r for r in rows if r.state == "COMPLETE" and r.feasible]
    assert data.selected == min(feasible, key=lambda r: r.score).number
    figs = figures(data)
    assert set(figs) == {"pareto", "layers", "counts", "history", "importances", "sensitivity"}
    want = layer_view(data.layers, data.selected)["z"]
    assert [list(row) for row in figs["layers"].data[0].z] == want
    names = [t.name for t in figs["pareto"].data]
    assert any(n.startswith("stopped early") for n in names)
    assert any(n.startswith("best uniform policy") for n in names)
    with pytest.raises(UsageError, match="no per-layer rows"):
        figures(data, trial=10_000)


def test_report_command_writes_a_page_whose_export_command_works(tmp_path, sweep):
    proc = _cli("report", "--name", "a", "--storage", sweep, "-o", "r.html", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    html = (tmp_path / "r.html").read_text()
    assert "<title>microsweep report: a</title>" in html
    for div in ("ms-pareto", "ms-layers", "ms-counts", "ms-history", "ms-importances"):
        assert f'id="{div}"' in html
    assert len(html) < 6_000_000  # plotly.js inlined (about 4.7 MB) plus the sweep's data
    data = report_data(Store(sweep, must_exist=True), "a")
    row = next(r for r in data.front if r["trial"] != "dense")
    assert f'data-trial="{row["trial"]}"' in html
    words = shlex.split(row["export"])
    assert words[:2] == ["microsweep", "export"]
    proc = _cli(*words[1:], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / f"a-trial{row['trial']}.msz").stat().st_size > 0
    # plot stays as an alias; bad input is one line and exit 2
    assert _cli("plot", "--name", "a", "--storage", sweep, cwd=tmp_path).returncode == 0
    proc = _cli("report", "--name", "zz", "--storage", sweep, cwd=tmp_path)
    assert proc.returncode == 2 and "zz" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = _cli("report", "--name", "a", "--storage", sweep, "-o", "no/r.html", cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_open_sweep_gives_frames_policies_the_study_and_figures(tmp_path, sweep):
    import microsweep

    store = Store(sweep, must_exist=True)
    with microsweep.open_sweep("a", sweep) as s:
        frame = s.trials()
        rows = trial_rows(store, "a")
        assert list(frame.index) == [r["trial"] for r in rows]
        assert list(frame["score"].fillna(-1)) == [
            -1 if r["score"] is None else r["score"] for r in rows
        ]
        feasible = s.trials(feasible=True)
        assert set(feasible.index) == {r["trial"] for r in rows if r["feasible"]}
        assert set(s.trials(state="PRUNED")["state"]) <= {"PRUNED"}
        wide = s.trials(layers=True)
        table = layer_table(store, "a")
        n = table.layers[0]
        first = wide.index[0]
        assert wide.loc[first, f"{n}.bits"] == table.row(first, n)["bits"]
        assert "head.sparsity" not in wide.columns  # not searched on the head
        best = s.best()
        assert best is not None
        assert best["score"] == min(feasible["score"]) and best["feasible"]
        assert s.policy(best["trial"]).to_json() == store.trial("a", best["trial"]).policy
        assert len(s.study.trials) == len(rows)
        assert s.dense["score"] == pytest.approx(store.get_sweep("a").dense_score)
        assert "pareto" in s.figures() and s.report(tmp_path / "x.html").pareto.name == "a"
        with pytest.raises(UsageError, match="not one of"):
            s.trials(state="DONE")
    with pytest.raises(Exception, match="no sweep named"):
        open_sweep("nope", sweep)
    with pytest.raises(UsageError, match="does not exist"):
        write_report(store, "a", tmp_path / "missing" / "r.html")


def test_pareto_marks_the_best_feasible_trial_and_labels_counts_as_the_header(tmp_path, sweep):
    """One trace holds exactly the best feasible trial; the legend's counts are the stored
    ones (the front out of all feasible trials, as the header says); the per-layer view names
    the best trial; no label for the dense model sits in the plot."""
    import re

    store = Store(sweep, must_exist=True)
    data = report_data(store, "a")
    rows = store.trials("a")
    feasible = [r for r in rows if r.state == "COMPLETE" and r.feasible]
    best = min(feasible, key=lambda r: r.score)
    p = data.pareto
    assert p.best_feasible == best.number == data.selected
    figs = figures(data)
    traces = {t.name: t for t in figs["pareto"].data if t.showlegend is not False}  # legend
    marked = [t for name, t in traces.items() if name.startswith("best feasible")]
    assert len(marked) == 1 and marked[0].name == f"best feasible (trial {best.number})"
    assert [int(c[0]) for c in marked[0].customdata] == [best.number]
    assert (list(marked[0].x), list(marked[0].y)) == ([best.perplexity], [best.score])

    on_front = [n for n in p.front if n >= 0]
    infeasible = [r for r in rows if r.state == "COMPLETE" and not r.feasible]
    pruned = [r for r in rows if r.state == "PRUNED"]

    def count(prefix: str) -> tuple[int, ...]:
        (name,) = [n for n in traces if n.startswith(prefix)]
        return tuple(int(x) for x in re.findall(r"\d+", name.removeprefix(prefix)))

    assert count("feasible, off the front") == (len(feasible) - len(on_front),)
    assert count("over the ceiling") == (len(infeasible),)
    assert count("stopped early") == (len(pruned),)
    assert count("Pareto front") == (len(on_front), len(feasible))
    (front,) = [t for n, t in traces.items() if n.startswith("Pareto front")]
    assert sorted(int(c[0]) for c in front.customdata) == sorted(p.front)
    assert ("dense model" in front.name) == (-1 in p.front)
    assert f"; {len(feasible)} feasible)" in figs["pareto"].layout.title.text
    # no text label inside the plot for the dense model: the legend says where it is
    assert not [a for a in figs["pareto"].layout.annotations if "dense" in (a.text or "")]
    top = figs["pareto"].layout.yaxis.range[1]
    (dense,) = [t for n, t in traces.items() if n.startswith("dense model")]
    assert ("above the plot" in dense.name) == (p.dense_score > top)

    title = f"trial {best.number} — best feasible"
    assert figs["layers"].layout.title.text == f"{title}: policy per layer"
    assert figs["counts"].layout.title.text.startswith(f"{title}: ")
    other = next(n for n in data.layers.choice if n != best.number)
    assert figures(data, trial=other)["layers"].layout.title.text == (
        f"trial {other}: policy per layer"
    )
    page = write_report(store, "a", tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert page.selected == best.number
    assert f"{len(feasible)} feasible, {len(on_front)} of them on the Pareto front" in html
    assert f'data-trial="{best.number}">trial {best.number}</span>' in html
    assert "— best feasible (the view opens on it)</span>" in html


def test_pareto_without_a_feasible_trial_marks_none():
    from microsweep.report._pareto import ParetoData, Point, figure, legend_names

    points = [Point(n, 0.5 + n / 10, 20.0 + n, False, 1.0, 1.0, "x") for n in range(3)]
    data = ParetoData("z", points, [-1], 15.0, 10.0, 2.0, "dense", states={"COMPLETE": 3})
    assert data.best_feasible is None and data.front_trials == 0 and data.feasible == 0
    names = [t.name for t in figure(data).data]
    assert not [n for n in names if n.startswith("best feasible")]
    assert (
        legend_names(data)["front"] == "Pareto front (0 of 0 feasible trials and the dense model)"
    )
    assert "over the ceiling (3)" in names


def test_other_bar_hover_explains_the_lost_16_bit_allowance(sweep):
    """A trial counted without the 16-bit allowance whose "other" exceeds dense says why in
    that bar's hover (and on the page, from the payload); no other bar carries a note."""
    from microsweep.report._page import ALLOWANCE_NOTE, page_payload

    store = Store(sweep, must_exist=True)
    table = layer_table(store, "a")
    rows = {r.number: r for r in store.trials("a")}
    dense = table.dense_other
    lost = {
        n
        for n, (p, o) in table.other.items()
        if rows[n].freebie is False and (p > dense[0] * 1.001 or o > dense[1] * 1.001)
    }
    assert lost, "the tiny sweep quantizes below 16 bits in some trial"
    assert table.lost_allowance == lost
    assert "16-bit allowance" in ALLOWANCE_NOTE and "32 bits" in ALLOWANCE_NOTE
    for n in table.choice:
        hover = layer_view(table, n)["hover"]
        assert hover == [""] * len(table.layers) + [ALLOWANCE_NOTE if n in lost else ""]
        if rows[n].freebie:  # counted with the allowance: "other" is dense's
            assert n not in lost
    assert layer_view(table, None)["hover"][-1] == ""
    data = report_data(store, "a")
    one = min(lost)
    counts = figures(data, trial=one)["counts"]
    for trace in counts.data:
        assert "%{hovertext}" in trace.hovertemplate
        assert list(trace.hovertext)[-1] == ("" if trace.name == "dense" else ALLOWANCE_NOTE)
    payload = page_payload(table, data.pareto.best_feasible)
    assert payload["lost"] == sorted(lost) and payload["allowance_note"] == ALLOWANCE_NOTE
    assert payload["best"] == data.pareto.best_feasible


def test_sensitivity_legend_lists_every_layer_once_below_the_panels(sweep):
    """Each layer is one legend entry (also one only in a later panel, like the head), in rows
    below the plot that the figure grows for, not a side box that scrolls."""
    from microsweep.report._sensitivity import figure

    data = report_data(Store(sweep, must_exist=True), "a").sensitivity
    assert data is not None
    fig = figure(data)
    layers = {layer for curves in data.curves.values() for layer in curves}
    listed = [t.name for t in fig.data if t.showlegend is not False and t.name in layers]
    assert sorted(listed) == sorted(layers)
    assert "head" in layers and "head" not in data.curves["sparsity"]
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0
    assert fig.layout.height >= 420 + 24 * (len(layers) // 4)


def test_pareto_rings_uniform_trials_and_each_hover_names_the_origin(tmp_path, sweep):
    """The auto sweep's uniform warm starts are one legend entry of their own (completed and
    stopped alike, at their stored numbers and perplexities); every trial's hover text is its
    stored origin; the front table on the page has an origin column."""
    import re

    store = Store(sweep, must_exist=True)
    rows = {r.number: r for r in store.trials("a")}
    uniform = sorted(
        n
        for n, r in rows.items()
        if r.origin == "uniform" and r.state in ("COMPLETE", "PRUNED") and r.perplexity
    )
    assert uniform, "the auto sweep starts from uniform policies"
    assert any(r.origin != "uniform" for r in rows.values())
    data = report_data(store, "a")
    assert [p.number for p in data.pareto.uniform] == uniform
    fig = figures(data)["pareto"]
    (ring,) = [t for t in fig.data if (t.name or "").startswith("uniform sampler's trials")]
    assert ring.name == f"uniform sampler's trials ({len(uniform)})"
    assert ring.marker.symbol == "square-open"
    assert [int(c[0]) for c in ring.customdata] == uniform
    assert list(ring.x) == [rows[n].perplexity for n in uniform]
    assert list(ring.y) == [rows[n].score for n in uniform]
    for trace in fig.data:  # the hover's "(%{text})" is the trial's origin
        if trace.customdata is None or trace.text is None:
            continue
        for c, text in zip(trace.customdata, trace.text, strict=True):
            n = int(c[0])
            assert text == ("dense" if n < 0 else rows[n].origin or "-")
        assert "trial %{customdata[0]} (%{text})" in trace.hovertemplate
    write_report(store, "a", tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    table = re.search(r'<table id="ms-front">(.*?)</table>', html).group(1)
    assert "<th>trial</th><th>origin</th>" in table
    for row in data.front:
        trial = row["trial"]
        origin = "dense" if trial == "dense" else rows[trial].origin or "-"
        assert f"<td>{trial}</td><td>{origin}</td>" in table
