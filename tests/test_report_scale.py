"""The report reads each trial's summary per target layer (`layer_counts`), not its layer rows:
the summaries equal the sums of the stored per-layer rows, for a real sweep, and a store written
before they existed (schema version 3) gets them on upgrade, on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
import uuid
from pathlib import Path

import pytest

from microsweep.errors import StorageError
from microsweep.report import layer_table, open_sweep, report_data
from microsweep.report._layers import target_layers
from microsweep.storage import Store, TrialRecord, unpack_layer_counts
from microsweep.storage._models import SCHEMA_VERSION
from tests.conftest import POSTGRES_URL, ROOT, postgres_available

TINY = str(ROOT / "examples" / "tiny.py")
FACTORIZED = "blocks.0.mlp.c_fc"


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory, tiny_gpt) -> Path:
    """A real sweep of the tiny GPT whose first trial factorizes one layer (rows `.first` and
    `.second` beside its own) and quantizes another; the file, closed."""
    from microsweep.search import run_sweep
    from microsweep.spaces import LayerPolicy, Policy

    path = tmp_path_factory.mktemp("scale") / "small.db"
    warm = Policy(
        layers={FACTORIZED: LayerPolicy(rank=16), "blocks.1.attn.c_proj": LayerPolicy(bits=8)}
    )
    run_sweep(
        TINY, name="s", trials=5, storage=f"sqlite:///{path}", seed=3, sampler="random",
        in_process=True, progress=False, warm_start=[warm],
    )  # fmt: skip
    return path


def _copy(src: Path, dst: Path) -> str:
    """A copy of SQLite file `src` at `dst` (through SQLite's backup: WAL included); its URL."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return f"sqlite:///{dst}"


def _from_layer_rows(store: Store, name: str) -> dict[int, dict[str, tuple]]:
    """What the report showed per trial before summaries, computed from the per-layer rows:
    each target layer's settings from the policy and its own and its factors' rows' params and
    ops summed, and (under "other") the trial's totals less them; trials without rows for any
    target layer left out."""
    layers = target_layers(store.get_sweep(name).space_json)[0]
    out = {}
    for trial in store.trials(name, with_layers=True):
        per: dict[str, tuple] = {}
        found = False
        for n in layers:
            rows = [lr for lr in trial.layers if lr.layer in (n, f"{n}.first", f"{n}.second")]
            found = found or bool(rows)
            lp = (trial.policy.get("layers") or {}).get(n) or {}
            per[n] = (
                float(lp.get("sparsity", 0.0) or 0.0), int(lp.get("bits", 32)),
                int(lp.get("act_bits", 32)), lp.get("rank"),
                sum(lr.params for lr in rows), sum(lr.ops for lr in rows),
            )  # fmt: skip
        if not found:
            continue
        targets = [sum(row[k] for row in per.values()) for k in (4, 5)]
        per["other"] = ((trial.params or 0.0) - targets[0], (trial.ops or 0.0) - targets[1])
        out[trial.number] = per
    return out


def _assert_table_matches(table, expected: dict[int, dict[str, tuple]]) -> None:
    assert set(table.choice) == set(expected)
    for number, per in expected.items():
        for n in table.layers:
            got = table.row(number, n)
            *knobs, params, ops = per[n]
            assert [got[k] for k in ("sparsity", "bits", "act_bits", "rank")] == knobs
            assert got["params"] == pytest.approx(params, rel=1e-12, abs=1e-9)
            assert got["ops"] == pytest.approx(ops, rel=1e-12, abs=1e-9)
        assert table.other[number] == pytest.approx(per["other"], rel=1e-12, abs=1e-6)


def _assert_same_summaries(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for number, counts in want.items():
        assert got[number].keys() == counts.keys()
        for n, pair in counts.items():
            assert got[number][n] == pytest.approx(pair, rel=1e-12, abs=1e-9)


def _summaries(store: Store, name: str) -> dict[int, dict[str, tuple[float, float]]]:
    names = store.get_sweep(name).summary_layers
    return {t.number: unpack_layer_counts(names, t.layer_counts) for t in store.trials(name)}


def test_summaries_equal_the_per_layer_rows_and_feed_the_report(small_sweep):
    url = f"sqlite:///{small_sweep}"
    store = Store(url, must_exist=True)
    expected = _from_layer_rows(store, "s")
    factorized = [
        t for t in store.trials("s", with_layers=True)
        if any(lr.layer == f"{FACTORIZED}.first" for lr in t.layers)
    ]  # fmt: skip
    assert factorized, "no trial factorized a layer: the factors' sums go untested"
    assert len(expected) >= 3
    # the stored summaries are the rows' sums (a failed trial has none)
    for number, counts in _summaries(store, "s").items():
        if number not in expected:
            assert counts == {}
            continue
        assert set(counts) == set(expected[number]) - {"other"}
        for n, (params, ops) in counts.items():
            assert (params, ops) == pytest.approx(expected[number][n][4:], rel=1e-12, abs=1e-9)
    # the table, the report's data and Sweep.trials(layers=True) built from them
    _assert_table_matches(layer_table(store, "s"), expected)
    _assert_table_matches(report_data(store, "s").layers, expected)
    with open_sweep("s", url) as sweep:
        frame = sweep.trials(layers=True)
    allowed = dict(
        zip(*(target_layers(store.get_sweep("s").space_json)[i] for i in (0, 2)), strict=True)
    )
    for number in frame.index:
        for n, knobs in allowed.items():
            for knob in knobs:
                got = frame.loc[number, f"{n}.{knob}"]
                if number not in expected:
                    assert got is None or got != got  # no counted layers: no setting shown
                    continue
                want = expected[number][n][("sparsity", "bits", "act_bits", "rank").index(knob)]
                assert (None if got != got else got) == want, (number, n, knob)
    store.dispose()


def _downgrade_to_3(url: str) -> None:
    """Make `url`'s tables what version 3 wrote: no summaries, version 3."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE microsweep_trials DROP COLUMN layer_counts"))
        conn.execute(text("ALTER TABLE microsweep_sweeps DROP COLUMN summary_layers"))
        conn.execute(text("UPDATE microsweep_schema SET version = 3"))
    engine.dispose()


def _upgrade_and_check(url: str, name: str, before: dict, expected: dict) -> None:
    _downgrade_to_3(url)
    with pytest.raises(StorageError, match="version 3 is older.*microsweep upgrade"):
        Store(url, must_exist=True).get_sweep(name)
    store = Store(url, must_exist=True, upgrade=True)
    assert store.upgrade() == (3, SCHEMA_VERSION)
    reader = Store(url, must_exist=True)
    assert reader.schema_version() == SCHEMA_VERSION
    _assert_same_summaries(_summaries(reader, name), before)
    _assert_table_matches(layer_table(reader, name), expected)
    _assert_table_matches(report_data(reader, name).layers, expected)
    store.dispose()
    reader.dispose()


def test_a_version_3_sqlite_store_gets_its_summaries_on_upgrade(small_sweep, tmp_path):
    url = _copy(small_sweep, tmp_path / "old.db")
    store = Store(url, must_exist=True)
    before, expected = _summaries(store, "s"), _from_layer_rows(store, "s")
    store.dispose()
    _upgrade_and_check(url, "s", before, expected)


@pytest.fixture
def postgres_schema_url():
    """A URL on the PostgreSQL server whose tables live in a schema of their own (dropped
    after), so taking them back to version 3 touches no other test's tables."""
    if not os.environ.get("MICROSWEEP_REQUIRE_POSTGRES") and not postgres_available():
        pytest.skip("no PostgreSQL")
    import psycopg

    schema = f"ms_scale_{uuid.uuid4().hex[:10]}"
    dsn = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.mark.postgres
def test_a_version_3_postgres_store_gets_its_summaries_on_upgrade(small_sweep, postgres_schema_url):
    """The real sweep's rows written into PostgreSQL through `record_trial`, then taken back to
    version 3 and upgraded."""
    from sqlalchemy import select

    from microsweep.storage._models import SweepRow

    source = Store(f"sqlite:///{small_sweep}", must_exist=True)
    with source.session() as s:
        sweep = dict(
            s.execute(select(SweepRow.__table__).where(SweepRow.name == "s")).one()._mapping
        )
    target = Store(postgres_schema_url)
    for key in ("id", "created_at", "summary_layers"):
        sweep.pop(key)
    sweep_id = target.create_sweep(**sweep).id
    for trial in source.trials("s", with_layers=True):
        record = TrialRecord(
            **{k: getattr(trial, k) for k in TrialRecord.__dataclass_fields__ if k != "layers"},
            layers=[
                {
                    "name": lr.layer,
                    "kind": lr.kind,
                    "params": lr.params,
                    "ops": lr.ops,
                    "sparsity": lr.sparsity,
                    "bits": lr.bits,
                    "act_bits": lr.act_bits,
                    "rank": lr.rank,
                    "mask_bits": lr.mask_bits,
                    "mults": lr.mults,
                    "adds": lr.adds,
                    "others": lr.others,
                }  # fmt: skip
                for lr in trial.layers
            ],
        )
        target.record_trial(sweep_id, record, number=trial.number)
    before, expected = _summaries(target, "s"), _from_layer_rows(target, "s")
    _assert_same_summaries(before, _summaries(source, "s"))
    assert expected.keys() == _from_layer_rows(source, "s").keys()
    source.dispose()
    target.dispose()
    _upgrade_and_check(postgres_schema_url, "s", before, expected)


def test_sensitivity_lines_are_what_add_hline_draws():
    """The dense and ceiling lines, set in one layout update, are the shapes and the label
    plotly's add_hline gives on each panel (the label right of the last one)."""
    import plotly.graph_objects as go

    from microsweep.report._sensitivity import SensitivityData, figure

    curves = {
        knob: {f"l{i}": [(1.0, 4.0 + i), (2.0, 4.5 + i)] for i in range(3)}
        for knob in ("sparsity", "bits", "rank")
    }
    data = SensitivityData("k", "s", dense_perplexity=4.0, ceiling=4.4, curves=curves)
    fig = figure(data)
    titles = len(curves)  # make_subplots' panel titles come first
    ref = go.Figure(fig)
    ref.layout.shapes = ()
    ref.layout.annotations = fig.layout.annotations[:titles]
    for col in range(1, len(curves) + 1):
        for value, name, dash in ((4.0, "dense", "dot"), (4.4, "ceiling", "dash")):
            label = {"annotation_text": name, "annotation_position": "right"}
            ref.add_hline(
                y=value, line_dash=dash, line_color="#444", row=1, col=col,
                **(label if col == len(curves) else {}),
            )  # fmt: skip
    assert len(fig.layout.shapes) == 6 and len(fig.layout.annotations) == titles + 2
    assert fig.to_dict()["layout"] == ref.to_dict()["layout"]
