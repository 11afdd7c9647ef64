"""One conformance suite over every backend: a SQLite file and the PostgreSQL server."""

from __future__ import annotations

import importlib.util
import os
import sqlite3

import pytest

from microsweep.errors import StorageError
from microsweep.storage import Store, TrialRecord, resolve_url, unpack_layer_counts
from microsweep.storage._models import SCHEMA_VERSION
from tests.conftest import POSTGRES_URL, postgres_available

BACKENDS = [
    pytest.param("sqlite", id="sqlite-file"),
    pytest.param(
        "postgres",
        id="postgresql",
        marks=[
            pytest.mark.postgres,
            # CI sets MICROSWEEP_REQUIRE_POSTGRES=1: there a missing server fails, not skips
            pytest.mark.skipif(
                not os.environ.get("MICROSWEEP_REQUIRE_POSTGRES") and not postgres_available(),
                reason="no PostgreSQL",
            ),
        ],
    ),
]


@pytest.fixture(params=BACKENDS)
def store(request, sqlite_url) -> Store:
    url = sqlite_url if request.param == "sqlite" else POSTGRES_URL
    s = Store(url)
    yield s
    s.dispose()


def _sweep_fields(name: str) -> dict:
    return dict(
        name=name,
        study_name=name,
        space_path="x.py",
        space_source="space = 1",
        space_json={"rules": []},
        objective_json={"baseline": "dense"},
        model_fingerprint="m",
        data_fingerprint="d",
        model_recipe=None,
        dense_perplexity=4.5,
        dense_params=1000.0,
        dense_ops=2000.0,
        dense_layers=[],
        baseline_name="dense",
        baseline_params=1000.0,
        baseline_ops=2000.0,
        ceiling=4.7,
        sampler="tpe",
        seed=0,
        target_trials=3,
        versions={"torch": "x"},
    )


def _layers(n: int) -> list[dict]:
    return [
        {
            "name": f"blocks.{i}.mlp.c_fc",
            "kind": "compressed_linear",
            "params": 10.0 + i,
            "ops": 20.0 + i,
            "bits": 4,
            "sparsity": 0.5,
            "mask_bits": 64,
            "mults": 3.0,
            "adds": 4.0,
            "others": 0.0,
        }
        for i in range(n)
    ]


def test_sweep_trial_and_layer_rows_round_trip(store, unique_name):
    sweep = store.create_sweep(**_sweep_fields(unique_name))
    record = TrialRecord(
        state="COMPLETE",
        policy={"layers": {}},
        layers=_layers(3),
        score=0.5,
        perplexity=4.6,
        params=33.0,
        ops=63.0,
        feasible=True,
        summary="x",
        timings={"compress": 0.1},
    )
    store.record_trial(sweep.id, record, number=0)
    store.record_trial(sweep.id, TrialRecord(state="FAIL", reason="boom", policy={}), number=1)
    got = store.get_sweep(unique_name)
    assert got.dense_perplexity == 4.5 and got.space_json == {"rules": []}
    trials = store.trials(unique_name, with_layers=True)
    assert [t.number for t in trials] == [0, 1]
    assert trials[0].score == 0.5 and trials[0].timings == {"compress": 0.1}
    assert [lr.layer for lr in trials[0].layers] == [f"blocks.{i}.mlp.c_fc" for i in range(3)]
    assert trials[0].layers[2].params == 12.0 and trials[0].layers[0].bits == 4
    assert trials[1].reason == "boom" and trials[1].layers == []
    assert store.trial(unique_name, 0).layers[1].ops == 21.0
    assert store.schema_version() == SCHEMA_VERSION == 4


def test_trials_carry_their_counts_per_target_layer(store, unique_name):
    """A trial's summary sums each target layer's rows (its own and a factorized layer's
    factors) when it is recorded, in the order the sweep row pins; other rows stay out."""
    fields = _sweep_fields(unique_name)
    fields["space_json"] = {
        "rules": [
            {"pattern": "blocks.*.mlp.c_fc", "layers": ["blocks.1.mlp.c_fc", "blocks.0.mlp.c_fc"]},
            {"pattern": "head", "layers": ["head", "blocks.0.mlp.c_fc"]},
        ]
    }
    sweep = store.create_sweep(**fields)
    names = ["blocks.1.mlp.c_fc", "blocks.0.mlp.c_fc", "head"]
    assert store.get_sweep(unique_name).summary_layers == names
    rows = [
        *_layers(2),
        {"name": "head", "kind": "low_rank", "params": 0.5, "ops": 0.25},
        {"name": "head.first", "kind": "compressed_linear", "params": 3.0, "ops": 5.0},
        {"name": "head.second", "kind": "compressed_linear", "params": 7.0, "ops": 11.0},
        {"name": "ln_f", "kind": "layernorm", "params": 100.0, "ops": 100.0},
    ]
    store.record_trial(sweep.id, TrialRecord("COMPLETE", {}, layers=rows), number=0)
    store.record_trial(sweep.id, TrialRecord.failed("boom"), number=1)
    only_other = [{"name": "ln_f", "kind": "layernorm", "params": 1.0, "ops": 1.0}]
    store.record_trial(sweep.id, TrialRecord("COMPLETE", {}, layers=only_other), number=2)
    got = {t.number: unpack_layer_counts(names, t.layer_counts) for t in store.trials(unique_name)}
    assert got == {
        0: {
            "blocks.1.mlp.c_fc": (11.0, 21.0),
            "blocks.0.mlp.c_fc": (10.0, 20.0),
            "head": (10.5, 16.25),
        },
        1: {},
        2: {},
    }
    rows = {r.number: r.layer_counts for r in store.trial_rows_for_report(unique_name)}
    assert unpack_layer_counts(names, rows[0]) == got[0] and rows[1] is None


def test_duplicate_sweep_and_unknown_names_are_clear_errors(store, unique_name):
    store.create_sweep(**_sweep_fields(unique_name))
    with pytest.raises(StorageError, match="already exists"):
        store.create_sweep(**_sweep_fields(unique_name))
    with pytest.raises(StorageError, match="no sweep named 'nope"):
        store.get_sweep("nope-" + unique_name)
    with pytest.raises(StorageError, match="no finished trial 7"):
        store.trial(unique_name, 7)


def test_a_failed_trial_write_leaves_nothing_half_written(store, unique_name):
    sweep = store.create_sweep(**_sweep_fields(unique_name))
    store.record_trial(sweep.id, TrialRecord("COMPLETE", {}, layers=_layers(2)), number=0)
    with pytest.raises(StorageError):  # same trial number again: unique constraint
        store.record_trial(sweep.id, TrialRecord("COMPLETE", {}, layers=_layers(5)), number=0)
    trials = store.trials(unique_name, with_layers=True)
    assert len(trials) == 1 and len(trials[0].layers) == 2


def test_store_survives_pickling(store, unique_name):
    import pickle

    store.create_sweep(**_sweep_fields(unique_name))
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get_sweep(unique_name).name == unique_name
    clone.dispose()


def test_optuna_storage_shares_the_url(store, unique_name):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=unique_name, storage=store.optuna_storage())
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = optuna.load_study(study_name=unique_name, storage=Store(store.url).optuna_storage())
    assert len(again.trials) == 2


def test_sqlite_is_in_wal_mode_with_a_busy_timeout(tmp_path):
    path = tmp_path / "w.db"
    Store(f"sqlite:///{path}").schema_version()  # the first use creates the tables
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / "new.db"
    Store(f"sqlite:///{path}").schema_version()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE microsweep_schema SET version = 99")
    with pytest.raises(StorageError, match="schema version 99 is newer"):
        Store(f"sqlite:///{path}").sweep_names()


def test_read_commands_do_not_create_a_database(tmp_path):
    path = tmp_path / "absent.db"
    with pytest.raises(StorageError, match="no sweep database"):
        Store(f"sqlite:///{path}", must_exist=True)
    assert not path.exists()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "is not a database URL"),
        ("mysql://root@localhost/x", "not supported"),
        ("sqlite:////no/such/folder/x.db", "does not exist"),
    ],
)
def test_bad_urls(url, message):
    with pytest.raises(StorageError, match=message):
        resolve_url(url)


def test_url_defaults_and_environment(monkeypatch):
    monkeypatch.delenv("MICROSWEEP_STORAGE", raising=False)
    assert resolve_url(None) == "sqlite:///microsweep.db"
    monkeypatch.setenv("MICROSWEEP_STORAGE", "sqlite:///env.db")
    assert resolve_url(None) == "sqlite:///env.db"
    assert resolve_url("sqlite:///arg.db") == "sqlite:///arg.db"
    driver = "postgresql://" if importlib.util.find_spec("psycopg2") else "postgresql+psycopg://"
    assert resolve_url("postgresql://u@h/db").startswith(driver)


def test_read_commands_leave_a_foreign_database_untouched(tmp_path):
    path = tmp_path / "foreign.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE mine (x INTEGER)")
    with pytest.raises(StorageError, match="holds no microsweep tables"):
        Store(f"sqlite:///{path}", must_exist=True).sweep_names()
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert tables == ["mine"]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_optuna_rows_carry_what_optuna_dashboard_reads(tmp_path, tiny_gpt):
    """Feasibility in the list form optuna-dashboard 0.21 reads (beside Optuna 5's named
    constraint) and metric names; samplers on resume still see one constraint."""
    import optuna

    from microsweep.search import run_sweep
    from microsweep.search._study import memory_study
    from tests.conftest import ROOT

    url = f"sqlite:///{tmp_path / 'dash.db'}"
    run_sweep(
        str(ROOT / "examples" / "tiny.py"), name="d", trials=3, storage=url, sampler="random",
        in_process=True, progress=False,
    )  # fmt: skip
    store = Store(url, must_exist=True)
    sweep = store.get_sweep("d")
    study = optuna.load_study(study_name="d", storage=store.optuna_storage())
    assert study.metric_names == ["score"]
    rows = {r.number: r for r in store.trials("d")}
    for t in study.trials:
        row = rows[t.number]
        if row.state == "FAIL":
            continue
        assert t.system_attrs["constraints"] == [t.system_attrs["constraints:perplexity"]]
        expected = row.perplexity - sweep.ceiling
        assert t.system_attrs["constraints"][0] == pytest.approx(expected)
        assert (t.system_attrs["constraints"][0] <= 0) == bool(row.feasible)
    mem = memory_study(study)
    assert all(list(t.constraints) == ["perplexity"] for t in mem.trials if t.constraints)


def _write_trial(store: Store, study_name: str, trial) -> object:
    """Write a FrozenTrial through `finish_trial` as a sweep does and read it back by Optuna."""
    import optuna

    from microsweep.storage._optuna_rows import finish_trial, reserve_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=store.optuna_storage())
    with store.session() as s:
        trial_id, _ = reserve_trials(s, study._study_id, 1)[0]
        finish_trial(s, trial_id, trial)
    return optuna.load_study(study_name=study_name, storage=store.optuna_storage()).trials[0]


def test_float_params_are_stored_without_rounding_noise(store, unique_name):
    """Grid values lose float noise (0.30000000000000004 -> 0.3); sampled values, log-scale
    values and values whose decimal would leave the distribution are stored as they are."""
    import math

    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    noisy_low = 0.1 + 0.2  # 0.30000000000000004: its decimal 0.3 lies below this distribution
    cases = {
        "grid": (FloatDistribution(0.0, 0.9, step=0.1), 3 * 0.1, 0.3),
        "grid_top": (FloatDistribution(0.0, 0.9, step=0.1), 7 * 0.1, 0.7),
        "grid_zero": (FloatDistribution(-0.3, 0.6, step=0.1), -0.3 + 3 * 0.1, 0.0),
        "fine_grid": (FloatDistribution(0.0, 1.0, step=0.05), 13 * 0.05, 0.65),
        "span": (FloatDistribution(0.05, 0.9), 0.9 - 0.8, 0.1),
        "sampled": (FloatDistribution(0.25, 1.0), 0.5488135039273248, 0.5488135039273248),
        "log": (FloatDistribution(1e-5, 1e-3, log=True), 7.537078298264379e-05, None),
        "log_noise": (FloatDistribution(1e-5, 1e-3, log=True), math.exp(math.log(1e-4)), None),
        "leaves": (FloatDistribution(noisy_low, 0.9), noisy_low, noisy_low),
    }
    assert repr(3 * 0.1) == "0.30000000000000004"  # the noise this is about
    trial = create_trial(
        params={k: v for k, (_, v, _) in cases.items()},
        distributions={k: d for k, (d, _, _) in cases.items()},
        value=1.0,
    )
    stored = _write_trial(store, unique_name, trial).params
    for name, (_, value, clean) in cases.items():
        expected = value if clean is None else clean
        assert repr(stored[name]) == repr(expected), name


def test_pruned_trial_stores_its_score_and_constraints_parse_as_strict_json(store, unique_name):
    """A PRUNED trial's value is its score, not Optuna's last intermediate value (a perplexity
    projection here); an infinite constraint stays infinite in Optuna's named attribute and is
    the largest float in the dashboard's list, which browsers must parse as JSON."""
    import json
    import math
    import sys

    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    trial = create_trial(
        state=TrialState.PRUNED,
        value=math.inf,  # what Optuna's tell keeps: the last projection
        intermediate_values={0: 40.0, 1: math.inf},
        params={"x": 0.5},
        distributions={"x": FloatDistribution(0.0, 1.0)},
        user_attrs={"score": 0.25, "perplexity_estimate": math.inf},
        system_attrs={"constraints:perplexity": math.inf},
    )
    back = _write_trial(store, unique_name, trial)
    assert back.state == TrialState.PRUNED and back.value == 0.25
    assert back.intermediate_values == {0: 40.0, 1: math.inf}
    assert back.system_attrs["constraints:perplexity"] == math.inf
    assert back.system_attrs["constraints"] == [sys.float_info.max]
    assert all(v > 0 for v in back.constraints.values())  # infeasible either way

    def refuse(constant: str) -> float:
        raise ValueError(f"{constant} is not JSON")

    from optuna.storages._rdb import models
    from sqlalchemy import select

    with store.session() as s:
        stored = s.scalar(
            select(models.TrialSystemAttributeModel.value_json).where(
                models.TrialSystemAttributeModel.trial_id == back._trial_id,
                models.TrialSystemAttributeModel.key == "constraints",
            )
        )
    assert json.loads(stored, parse_constant=refuse) == [sys.float_info.max]
