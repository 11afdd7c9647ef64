"""The report page in a real browser: headless Chromium opens the file `microsweep report`
wrote, every figure renders without a script error, and a real mouse click on a Pareto point
(and on a front-table row) redraws the per-layer view for that trial; a row click scrolls the
view into sight; the best feasible trial is marked and named.

The screenshot goes under the test's tmp_path; with MICROSWEEP_REPORT_SCREENSHOT=PATH it is also
copied to PATH (how benchmarks/report.py --screenshot refreshes benchmarks/results/report.png),
so a test run leaves tracked files alone.

Playwright drives the system's Chromium (no browser download). Without one the test skips, unless
MICROSWEEP_REQUIRE_BROWSER=1 (CI), where a missing browser is a failure.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, NoReturn

import pytest

from microsweep.report import layer_view, report_data
from microsweep.search import run_sweep
from microsweep.storage import Store
from tests.conftest import ROOT, cli

FIGURES = ("pareto", "layers", "counts", "history", "importances", "sensitivity")
SCREENSHOT_ENV = "MICROSWEEP_REPORT_SCREENSHOT"
"""Where to copy the screenshot besides tmp_path (unset: nowhere)."""

_RENDERED = """ids => ids.every(id => {
  const el = document.getElementById(id);
  return el && el._fullLayout && el.querySelector('svg.main-svg');
})"""

_POINTS = """() => {
  // every drawn marker of the Pareto plot: its trial (customdata[0]) and its centre on screen
  const gd = document.getElementById('ms-pareto');
  const area = gd.querySelector('.nsewdrag').getBoundingClientRect();
  const out = [];
  gd.querySelectorAll('.scatterlayer .trace').forEach(tr => {
    const trace = tr.__data__ && tr.__data__[0] && tr.__data__[0].trace;
    if (!trace) return;
    tr.querySelectorAll('.point').forEach(pt => {
      const r = pt.getBoundingClientRect(), i = pt.__data__ && pt.__data__.i;
      const cd = trace.customdata && trace.customdata[i];
      const x = r.left + r.width / 2, y = r.top + r.height / 2;
      const inside = x > area.left + 2 && x < area.right - 2 && y > area.top + 2
        && y < area.bottom - 2;
      out.push({trace: trace.name, trial: cd ? cd[0] : null, x: x, y: y, inside: inside});
    });
  });
  return out;
}"""


_VIEW_BOX = """() => {
  // where the per-layer view's heading and heatmap are against the viewport
  const h = document.getElementById('ms-view').getBoundingClientRect();
  const f = document.getElementById('ms-layers').getBoundingClientRect();
  return {top: h.top, bottom: h.bottom, figureTop: f.top, height: window.innerHeight};
}"""

_VIEW_SHOWN = f"""() => {{
  const b = ({_VIEW_BOX})();
  return b.top >= -1 && b.bottom <= b.height && b.figureTop < b.height;
}}"""


def _need(reason: str) -> NoReturn:
    """Skip for want of a browser, or fail where one is required (CI)."""
    if os.environ.get("MICROSWEEP_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (MICROSWEEP_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def _chromium() -> str:
    """The system Chromium's path (playwright cannot download its own here)."""
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None
    )
    if found is None:
        _need("no chromium binary on PATH or at /usr/bin/chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _need("the playwright package is not installed (pip install -e '.[dev]')")
    return found


def _same(got: Any, want: Any) -> bool:
    """Equal nested lists of numbers, None for JavaScript's null, floats to 1e-12."""
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(got) == len(want)
            and all(_same(g, w) for g, w in zip(got, want, strict=True))
        )
    if want is None or got is None:
        return got is None and want is None
    return math.isclose(float(got), float(want), rel_tol=1e-12, abs_tol=1e-12)


def _pick(points: list[dict[str, Any]], wanted: set[int]) -> dict[str, Any]:
    """The visible point of a wanted trial farthest from any marker of another trial, so the
    click cannot land on a neighbour; a point of the front trace when one is clear of others."""
    shown = [p for p in points if p["inside"] and p["trial"] is not None]

    def clearance(p: dict[str, Any]) -> float:
        others = [
            math.dist((p["x"], p["y"]), (q["x"], q["y"])) for q in shown if q["trial"] != p["trial"]
        ]
        return min(others, default=math.inf)

    candidates = [(clearance(p), p) for p in shown if p["trial"] in wanted]
    assert candidates, f"no visible point of trials {sorted(wanted)} in {points}"
    front = [c for c in candidates if c[1]["trace"].startswith("Pareto front") and c[0] >= 12]
    best, point = max(front or candidates, key=lambda c: c[0])
    assert best >= 6, f"every candidate point overlaps another trial's: {candidates}"
    return point


@pytest.mark.slow
def test_report_renders_and_a_click_on_a_point_shows_its_policy(
    tmp_path: Path, tiny_gpt: object
) -> None:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    url = f"sqlite:///{tmp_path / 'sweeps.db'}"
    run_sweep(
        str(ROOT / "examples" / "tiny.py"), name="b", trials=8, storage=url, sampler="auto",
        seed=5, in_process=True, progress=False,
    )  # fmt: skip
    page_path = tmp_path / "report.html"
    screenshot = tmp_path / "report.png"
    proc = cli("report", "--name", "b", "--storage", url, "-o", str(page_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = report_data(Store(url, must_exist=True), "b")
    assert data.sensitivity is not None, "auto measures a sensitivity table"
    assert data.selected is not None
    views = {n: layer_view(data.layers, n) for n in data.layers.choice}
    other = {n for n, v in views.items() if not _same(v["z"], views[data.selected]["z"])}
    assert other, "every trial has the selected trial's policy"

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(30_000)
            page.on(
                "console",
                lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(page_path.as_uri())
            page.wait_for_function(_RENDERED, arg=[f"ms-{k}" for k in FIGURES])

            # every figure drew: the points, the heatmap, the bars
            drawn = page.evaluate(
                """() => ({
                  points: document.querySelectorAll('#ms-pareto .scatterlayer .point').length,
                  heatmap: document.getElementById('ms-layers')._fullData[0].type,
                  heatImages: document.querySelectorAll('#ms-layers .heatmaplayer image').length,
                  bars: document.querySelectorAll('#ms-counts .barlayer .point').length,
                  history: document.querySelectorAll('#ms-history .scatterlayer .point').length,
                })"""
            )
            assert drawn["points"] > 0 and drawn["history"] > 0, drawn
            assert drawn["heatmap"] == "heatmap" and drawn["heatImages"] == 1, drawn
            assert drawn["bars"] > 0, drawn

            # the page opens on the best feasible trial
            selected = page.locator("#ms-selected")
            assert selected.text_content() == f"trial {data.selected}"
            if selected.get_attribute("data-trial") is not None:
                assert selected.get_attribute("data-trial") == str(data.selected)
            heat_z = "() => document.getElementById('ms-layers').data[0].z"
            assert _same(page.evaluate(heat_z), views[data.selected]["z"])
            # ... and says so: the heading, both titles, and a mark on the Pareto plot
            best = f"trial {data.selected} — best feasible"
            title_js = "id => document.getElementById(id).layout.title.text"
            assert page.evaluate(title_js, "ms-layers") == f"{best}: policy per layer"
            assert page.evaluate(title_js, "ms-counts").startswith(f"{best}: ")
            assert "best feasible" in page.locator("#ms-selected-note").text_content()
            marks = [p for p in page.evaluate(_POINTS) if p["trace"].startswith("best feasible")]
            assert [(m["trial"], m["inside"]) for m in marks] == [(data.selected, True)], marks

            # a real mouse click on another trial's point: plotly_click, then show(K)
            page.evaluate(
                """() => document.getElementById('ms-pareto').on('plotly_click', ev => {
                  window.msClicked = ev.points.map(p => p.customdata && p.customdata[0]); })"""
            )
            page.locator("#ms-pareto").scroll_into_view_if_needed()
            target = _pick(page.evaluate(_POINTS), other)
            trial = int(target["trial"])
            page.mouse.move(target["x"], target["y"])
            page.wait_for_selector("#ms-pareto .hoverlayer .hovertext")
            page.mouse.click(target["x"], target["y"])
            page.wait_for_function("() => window.msClicked !== undefined", timeout=10_000)
            clicked = page.evaluate("() => window.msClicked")
            assert clicked and set(clicked) == {trial}, (clicked, target)
            assert selected.text_content() == f"trial {trial}"
            assert selected.get_attribute("data-trial") == str(trial)
            assert _same(page.evaluate(heat_z), views[trial]["z"])
            title = page.evaluate("() => document.getElementById('ms-layers').layout.title.text")
            assert title == f"trial {trial}: policy per layer"
            bars = page.evaluate("() => document.getElementById('ms-counts').data[1].x")
            assert _same(bars, views[trial]["params"])
            hover = page.evaluate("() => document.getElementById('ms-counts').data[1].hovertext")
            assert hover == views[trial]["hover"]  # the "other" bar's note on the lost allowance
            assert page.locator("#ms-selected-note").text_content() == ""

            page.screenshot(path=str(screenshot), full_page=True)  # showing the clicked trial

            # a front-table row does the same, and brings the view (above the table) into sight
            rows = page.locator("#ms-front tr[data-trial]")
            row_trials = [int(t) for t in rows.evaluate_all("rs => rs.map(r => r.dataset.trial)")]
            assert row_trials, "the front table lists no trial"
            back = next((n for n in row_trials if n != trial), None)
            clicked_row = row_trials[0] if back is None else back
            row = page.locator(f'#ms-front tr[data-trial="{clicked_row}"]')
            row.evaluate("r => r.scrollIntoView({block: 'start'})")  # the view out of sight
            page.wait_for_function(f"() => ({_VIEW_BOX})().bottom < 0")
            row.click()
            page.wait_for_function(_VIEW_SHOWN, timeout=15_000)
            assert page.evaluate(_VIEW_BOX)["top"] >= -1
            if back is not None:
                assert selected.text_content() == f"trial {back}"
                assert _same(page.evaluate(heat_z), views[back]["z"])
                named = f"trial {back}{' — best feasible' if back == data.selected else ''}"
                assert page.evaluate(title_js, "ms-layers") == f"{named}: policy per layer"
        finally:
            browser.close()
    assert not errors, errors
    assert screenshot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):  # only on request (benchmarks/report.py --screenshot)
        target = Path(os.environ[SCREENSHOT_ENV])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, target)
