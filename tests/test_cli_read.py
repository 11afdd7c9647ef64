"""The read commands: --version, ls, trials and show, as tables, CSV and JSON, and a policy
written by show that count --policy reads."""

from __future__ import annotations

import csv
import io
import json

import pytest

from microsweep import Policy, __version__
from microsweep.report import trial_seconds
from microsweep.search import run_sweep
from microsweep.storage import Store
from tests.conftest import ROOT
from tests.conftest import cli as _cli

TINY = str(ROOT / "examples" / "tiny.py")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_gpt) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('read') / 'read.db'}"
    run_sweep(
        TINY, name="r", trials=5, storage=url, seed=3, sampler="random", in_process=True,
        progress=False,
    )  # fmt: skip
    return url


def test_version_and_the_top_level_hint(tmp_path):
    proc = _cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"microsweep {__version__}"
    proc = _cli("bogus", cwd=tmp_path)
    assert proc.returncode == 2 and "(see 'microsweep -h')" in proc.stderr


def test_ls_lists_sweeps_with_state_and_best(tmp_path, sweep):
    rows = Store(sweep, must_exist=True).trials("r")
    feasible = [r for r in rows if r.state == "COMPLETE" and r.feasible]
    proc = _cli("ls", "--storage", sweep, "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads(proc.stdout)
    assert entry["name"] == "r" and entry["state"] == "done"
    assert (entry["finished"], entry["target"], entry["feasible"]) == (5, 5, len(feasible))
    if feasible:
        best = min(feasible, key=lambda r: r.score)
        assert (entry["best_trial"], entry["best_score"]) == (best.number, best.score)
    table = _cli("ls", "--storage", sweep, cwd=tmp_path).stdout.splitlines()
    assert table[0].split()[:4] == ["name", "state", "finished", "target"]
    assert table[1].split()[:4] == ["r", "done", "5", "5"]


def test_trials_filters_by_state_and_feasibility(tmp_path, sweep):
    rows = Store(sweep, must_exist=True).trials("r")
    proc = _cli("trials", "--name", "r", "--storage", sweep, "--format", "csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [int(g["trial"]) for g in got] == [r.number for r in rows]
    proc = _cli(
        "trials", "--name", "r", "--storage", sweep, "--feasible", "--format", "json",
        cwd=tmp_path,
    )  # fmt: skip
    want = [r.number for r in rows if r.feasible]
    assert [g["trial"] for g in json.loads(proc.stdout)] == want
    proc = _cli("trials", "--name", "r", "--storage", sweep, "--state", "FAIL", cwd=tmp_path)
    assert proc.returncode == 0 and len(proc.stdout.strip().splitlines()) == 1 + sum(
        r.state == "FAIL" for r in rows
    )


def test_show_gives_the_full_policy_and_a_file_count_reads(tmp_path, sweep):
    rows = Store(sweep, must_exist=True).trials("r")
    row = next(r for r in rows if r.state == "COMPLETE")
    out = tmp_path / "policy.json"
    proc = _cli(
        "show", "--name", "r", "--trial", str(row.number), "--storage", sweep, "--json",
        str(out), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    policy = Policy.loads(out.read_text())
    assert policy.to_json() == Policy.from_json(row.policy).to_json()
    for layer in policy.layers:  # every layer, not the first six
        assert layer in proc.stdout
    detail = json.loads(
        _cli(
            "show", "--name", "r", "--trial", str(row.number), "--storage", sweep, "--format",
            "json", cwd=tmp_path,
        ).stdout
    )  # fmt: skip
    assert detail["score"] == row.score and len(detail["layers"]) > len(policy.layers)
    assert sum(layer["params"] for layer in detail["layers"]) == pytest.approx(row.params)
    counted = _cli("count", TINY, "--policy", str(out), cwd=tmp_path)
    assert counted.returncode == 0, counted.stderr
    assert f"params {row.params:,.2f}" in counted.stdout
    missing = _cli("show", "--name", "r", "--trial", "99", "--storage", sweep, cwd=tmp_path)
    assert missing.returncode == 2 and "no finished trial 99" in missing.stderr


def test_status_says_state_wall_time_and_throughput(tmp_path, sweep):
    proc = _cli("status", "--name", "r", "--storage", sweep, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("state:"))
    assert "state: done; wall time" in line
    seconds = float(line.split("wall time ")[1].split("s")[0])
    store = Store(sweep, must_exist=True)
    rows = store.trials("r")
    wall = (max(r.finished_at for r in rows) - store.get_sweep("r").created_at).total_seconds()
    assert seconds == pytest.approx(wall, abs=0.051)
    # the throughput counts trial time only: start-up (dense model, workers) is left out
    busy = trial_seconds(rows)
    assert busy is not None and 0 < busy <= wall
    rate = float(line.split(", ")[-1].split(" trials/min")[0])
    assert rate == pytest.approx(len(rows) / busy * 60, rel=0.01, abs=0.051)
    assert rate >= len(rows) / wall * 60 * 0.99
    assert f"over {busy:.1f}s of trials" in line


def test_pareto_page_has_a_title_axes_that_fit_and_the_infeasible_region(tmp_path, sweep):
    from microsweep.report import pareto_data, write_pareto_html
    from microsweep.report._pareto import figure

    store = Store(sweep, must_exist=True)
    data = write_pareto_html(store, "r", tmp_path / "p.html")
    html = (tmp_path / "p.html").read_text()
    assert html.count("<title>microsweep report: r</title>") == 1
    fig = figure(pareto_data(store, "r"))
    low, high = fig.layout.yaxis.range
    scores = [p.score for p in data.points]
    assert low < min(scores) and max(scores) < high
    if data.dense_score > high:  # the dense star is off the axis: the page says where it is
        names = [t.name or "" for t in fig.data]
        assert any(n.startswith("dense model (score") and "above the plot" in n for n in names)
    [region] = [s for s in fig.layout.shapes if s.type == "rect"]
    assert region.x0 == data.ceiling and region.x1 > data.ceiling
    # history: the running best of the feasible COMPLETE trials, in trial order
    rows = store.trials("r")
    best, want = None, []
    for r in rows:
        if r.state == "COMPLETE" and r.feasible:
            best = r.score if best is None else min(best, r.score)
        want.append((r.number, best))
    assert data.history == want
    assert "best feasible score over trials" in html and html.count("plotly-graph-div") >= 2


def test_status_json_agrees_with_the_stored_trials(tmp_path, sweep):
    proc = _cli("status", "--name", "r", "--storage", sweep, "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    rows = Store(sweep, must_exist=True).trials("r")
    feasible = sorted(
        (r for r in rows if r.state == "COMPLETE" and r.feasible), key=lambda r: r.score
    )
    complete = sum(r.state == "COMPLETE" for r in rows)
    assert (st["finished"], st["target"], st["state"]) == (5, 5, "done")
    assert (st["feasible"], st["over_ceiling"]) == (len(feasible), complete - len(feasible))
    assert [b["trial"] for b in st["best"]] == [r.number for r in feasible][:5]
    # throughput over trial time (start-up apart), which never exceeds the wall time
    assert 0 < st["trial_seconds"] <= st["wall_seconds"]
    assert st["trials_per_minute"] == pytest.approx(5 / st["trial_seconds"] * 60)
    proc = _cli("status", "--name", "r", "--storage", sweep, "--format", "xml", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
