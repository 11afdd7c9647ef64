"""Samplers by name on real sweeps of examples/tiny.py: each runs with the perplexity constraint;
the planned ones measure sensitivity once and reuse it, enqueue warm starts, keep tied rules
tied, and `uniform` walks one-setting-for-all policies cheapest first."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from microsweep.search import SAMPLERS, run_sweep
from microsweep.storage import Store
from microsweep.storage._models import SCHEMA_VERSION
from tests.conftest import ROOT
from tests.conftest import cli as _cli

TINY = str(ROOT / "examples" / "tiny.py")


@pytest.fixture(scope="module")
def shared_url(tmp_path_factory) -> str:
    """One store for the planned samplers, so the sensitivity table is measured once."""
    return f"sqlite:///{tmp_path_factory.mktemp('samplers') / 'shared.db'}"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_runs_with_the_constraint(sampler, shared_url, tiny_gpt):
    result = run_sweep(
        TINY,
        name=f"s-{sampler}",
        trials=6,
        storage=shared_url,
        seed=2,
        in_process=True,
        progress=False,
        sampler=sampler,
    )
    assert sum(result.states.values()) == 6 and set(result.states) <= {"COMPLETE", "PRUNED"}
    if sampler in ("nsga2", "gp"):  # they learn only from completed trials: evaluated in full
        assert set(result.states) == {"COMPLETE"}
    store = Store(shared_url)
    sweep = store.get_sweep(f"s-{sampler}")
    study = optuna.load_study(study_name=f"s-{sampler}", storage=store.optuna_storage())
    rows = {r.number: r for r in store.trials(f"s-{sampler}")}
    for t in study.trials:
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        row = rows[t.number]
        assert t.constraints["perplexity"] == pytest.approx(row.perplexity - sweep.ceiling)
        assert row.feasible == (t.state == TrialState.COMPLETE and row.perplexity <= sweep.ceiling)
        assert row.origin
        if t.state == TrialState.PRUNED:
            assert "stopped after" in row.reason and row.perplexity > sweep.ceiling
    store.dispose()


def test_sensitivity_pass_keeps_its_budget_and_is_reused(tmp_path, tiny_gpt):
    """A 2-trial sweep's pass stops at its floor of trials' time, first round included,
    and estimates the rest (most layers and knobs from the proxy errors scaled to the measured
    probes); `microsweep sensitivity` then measures only what is missing, on the same windows;
    a sweep after it measures nothing and rewrites nothing."""
    from microsweep.search._sensitivity import PROBE_FLOOR_TRIALS, SENSITIVITY_SHARE

    url = f"sqlite:///{tmp_path / 'reuse.db'}"
    first = run_sweep(
        TINY, name="reuse-a", trials=2, storage=url, seed=4, in_process=True, progress=False,
        sampler="allocate",
    )  # fmt: skip
    s = first.sensitivity
    assert s["probes"] > 50 and s["reused"] == 0
    assert s["trial_seconds"] > 0 and 32 <= s["windows"] < s["of_windows"]
    share = SENSITIVITY_SHARE * 2 * s["trial_seconds"]  # a short sweep: the floor instead
    assert s["budget_seconds"] == pytest.approx(PROBE_FLOOR_TRIALS * s["trial_seconds"])
    assert share < s["budget_seconds"]
    assert 1 <= s["measured"] < s["probes"]  # the budget cut the pass short
    assert len({p.knob for p in _tiny_planner_probes()}) <= s["measured"]  # each knob's first
    assert s["estimated"] == s["probes"] - s["measured"] and s["from_proxy"] > 0
    # no probe started past the budget, once the first had told how long one takes: the pass
    # ended within the dense read and that first probe, or one probe past the budget
    slowest = max(s["trial_seconds"], 1.0)
    assert s["seconds"] <= s["budget_seconds"] + 2 * slowest
    store = Store(url)
    key = store.get_sweep("reuse-a").eval_key
    probe_key = key + "|probe-windows"
    stored = store.sensitivity(probe_key)
    assert len(stored) == s["measured"] + 1  # and the dense row on the probe windows
    from microsweep.search import run_sensitivity

    m = run_sensitivity(TINY, name="all", storage=url, in_process=True, progress=False).summary
    assert m["reused"] == s["measured"] and m["measured"] == m["probes"] - m["reused"]
    assert m["estimated"] == 0
    full = store.sensitivity(probe_key)
    assert all(full[k] == v for k, v in stored.items())  # measured once, never again
    again = run_sweep(
        TINY, name="reuse-c", trials=2, storage=url, seed=6, in_process=True, progress=False,
        sampler="auto",
    )  # fmt: skip
    assert again.sensitivity["measured"] == 0
    assert again.sensitivity["reused"] == again.sensitivity["probes"]
    assert store.sensitivity(probe_key) == full  # nothing measured again, nothing rewritten
    assert store.get_sweep("reuse-c").eval_key == key
    # a sweep with a time budget spends its share of that when it is the shorter
    from microsweep.search._sensitivity import ProbeBudget

    assert ProbeBudget(200, 2, 256, None).seconds(2.0) == pytest.approx(20.0)
    assert ProbeBudget(1000, 2, 256, None, timeout=300.0).seconds(2.0) == pytest.approx(30.0)
    assert ProbeBudget(2, 1, 256, None).seconds(2.0) == pytest.approx(PROBE_FLOOR_TRIALS * 2.0)
    from microsweep.search._sensitivity import sensitivity_line

    def line(budget: ProbeBudget) -> str:
        summary = dict(measured=3, probes=9, seconds=1.0, trial_seconds=2.0, windows=64)
        return sensitivity_line({**summary, "budget_seconds": budget.seconds(2.0)}, budget)

    assert "at least" not in line(ProbeBudget(1000, 2, 256, None, timeout=300.0))
    assert "(budget 10.0s:" in line(ProbeBudget(1000, 2, 256, None, timeout=30.0))
    assert "at least" in line(ProbeBudget(1000, 2, 256, None, timeout=30.0))  # the floor
    # a different evaluation (other windows) is another key: nothing is reused across them
    from microsweep.prepare import load_space_file, prepare
    from microsweep.search import eval_key

    sf = load_space_file(TINY)
    prepared = prepare(sf, 0)
    sweep = store.get_sweep("reuse-a")
    kwargs = dict(
        model_fingerprint=sweep.model_fingerprint,
        data_fingerprint=sweep.data_fingerprint,
        calib=prepared.calib,
        objective=sf.objective,
        evaluate_source=None,
    )
    assert eval_key(windows=prepared.windows, **kwargs) == key
    assert eval_key(windows=prepared.windows[:-1], **kwargs) != key
    store.dispose()


def _tiny_planner_probes():
    """The probes a planned sweep of examples/tiny.py lists (levels only: nothing is built)."""
    from microsweep.allocate import plan_levels, probes
    from microsweep.prepare import load_space_file

    units = load_space_file(TINY).space.units()
    return probes(units, {u.key: plan_levels(u) for u in units})


def test_unmeasured_probes_take_the_proxy_error_scaled_by_the_measured_ones():
    """Between measured levels of a layer and knob: linear in the proxy error; a layer and knob
    with nothing measured: its proxy error times the knob's largest NLL increase per unit of
    proxy error over its layers' most compressed measured levels; without a prior: the levels'
    old read-off. The pass measures knobs in turn, each knob's layers by the proxy error,
    largest first."""
    from microsweep.allocate import Probe
    from microsweep.search._sensitivity import interpolate_with_priors, priority_order

    dense = 2.0
    probes, priors = [], {}
    errors = {
        ("a", "sparsity"): (0.01, 0.04), ("b", "sparsity"): (0.02, 0.08),
        ("c", "sparsity"): (0.03, 0.12), ("a", "bits"): (0.001, 0.02),
        ("b", "bits"): (0.002, 0.04), ("c", "bits"): None,
    }  # fmt: skip
    for (layer, knob), errs in errors.items():
        for i, key in enumerate(("0.25", "0.5") if knob == "sparsity" else ("8", "4")):
            probes.append(Probe(layer, knob, key, float(key), None))
            if errs is not None:
                priors[(layer, knob, key)] = errs[i]
    measured = {
        ("a", "sparsity", "0.5"): dense + 0.4,  # 10 per unit of proxy error
        ("b", "sparsity", "0.5"): dense + 1.2,  # 15
        ("a", "bits", "4"): dense + 0.2,  # 10
    }
    entries, estimated, from_proxy = interpolate_with_priors(
        probes, measured, dense=dense, priors=priors
    )
    want = {
        ("a", "sparsity", "0.25"): 2.1,  # a quarter of the way to 0.04, from the dense NLL
        ("b", "sparsity", "0.25"): 2.3,
        ("c", "sparsity", "0.25"): 2.0 + 15 * 0.03,
        ("c", "sparsity", "0.5"): 2.0 + 15 * 0.12,
        ("a", "bits", "8"): 2.01,
        ("b", "bits", "8"): 2.0 + 10 * 0.002,
        ("b", "bits", "4"): 2.0 + 10 * 0.04,
        ("c", "bits", "4"): 2.2,  # no prior: what other layers measured at that level
        ("c", "bits", "8"): math.inf,  # nothing anywhere: allocation avoids it
        **measured,
    }
    assert entries.keys() == want.keys()
    for k, v in want.items():
        assert entries[k] == pytest.approx(v, rel=1e-12), k
    assert (estimated, from_proxy) == (9, 4)
    # a level that broke the model (inf) measures that level, not the knob's scale elsewhere
    broken = {**measured, ("a", "sparsity", "0.5"): math.inf}
    again, _, _ = interpolate_with_priors(probes, broken, dense=dense, priors=priors)
    assert again[("c", "sparsity", "0.5")] == pytest.approx(2.0 + 15 * 0.12, rel=1e-12)
    order = [(p.layer, p.knob, p.key) for p in priority_order(probes, priors)]
    assert order[:6] == [
        ("c", "sparsity", "0.5"), ("b", "bits", "4"), ("b", "sparsity", "0.5"),
        ("a", "bits", "4"), ("a", "sparsity", "0.5"), ("c", "bits", "4"),
    ]  # fmt: skip
    assert sorted(order[6:]) == sorted(k for k in want if k[2] in ("0.25", "8"))


@pytest.mark.ray
def test_auto_starts_with_its_warm_starts(shared_url, tiny_gpt):
    """On Ray workers the opening trial runs while the planner works, then the sampler's own
    warm starts (none repeating it), then its proposals."""
    run_sweep(
        TINY,
        name="warm",
        trials=12,
        storage=shared_url,
        seed=6,
        workers=2,
        progress=False,
        sampler="auto",
    )
    store = Store(shared_url)
    study = optuna.load_study(study_name="warm", storage=store.optuna_storage())
    trials = sorted(study.trials, key=lambda t: t.number)
    origins = [t.user_attrs.get("origin") for t in trials]
    rows = {r.number: r for r in store.trials("warm")}
    # the opening trial ran before the planner: quantization alone, the mildest uniform widths
    # that count below the dense model
    assert origins[0] == "opening"
    opening = rows[0].policy["layers"]
    assert opening and any(s.get("bits", 32) < 32 for s in opening.values())
    for name, settings in opening.items():
        assert settings.get("sparsity", 0.0) == 0.0 and settings.get("rank") is None, name
    sweep = store.get_sweep("warm")
    dense = sweep.dense_params / sweep.baseline_params + sweep.dense_ops / sweep.baseline_ops
    assert rows[0].state == "COMPLETE" and rows[0].score < dense
    warm = [o for o in origins[1:] if o in ("uniform", "allocation")]
    # the warm starts come next, from both sources, and were enqueued (fixed parameters)
    assert origins[1 : 1 + len(warm)] == warm and {"uniform", "allocation"} <= set(warm)
    assert 3 <= len(warm) <= 8 and len(warm) < len(trials) - 1
    for t in trials[: 1 + len(warm)]:
        fixed = t.system_attrs.get("fixed_params")
        assert fixed == {k: v for k, v in t.params.items() if k != "finetune_lr"}
    for t in trials[1 : 1 + len(warm)]:
        if t.user_attrs["origin"] == "uniform":
            _assert_uniform(rows[t.number].policy["layers"])
    choices = [json.dumps(rows[t.number].policy["layers"], sort_keys=True) for t in trials]
    assert len(set(choices[: 1 + len(warm)])) == 1 + len(warm)  # no warm start repeats one
    later = set(origins[1 + len(warm) :])
    assert later <= {"tpe-allocation", "refit", "local", "random"} and later
    store.dispose()


def _assert_uniform(layers: dict) -> None:
    """Layers with the same knob levels share one value per knob."""
    by_knob: dict[tuple[str, str], set] = {}
    for name, settings in layers.items():
        kind = "head" if name == "head" else name.split(".")[2]
        for knob in ("sparsity", "bits", "act_bits"):
            by_knob.setdefault((kind, knob), set()).add(settings.get(knob))
    for values in by_knob.values():
        assert len(values) == 1, layers


def test_uniform_bisects_the_score_order_and_skips_what_must_fail(tmp_path, tiny_gpt):
    url = f"sqlite:///{tmp_path / 'u.db'}"
    run_sweep(
        TINY,
        name="u",
        trials=10,
        storage=url,
        seed=0,
        in_process=True,
        progress=False,
        sampler="uniform",
    )
    store = Store(url)
    rows = store.trials("u")
    assert rows and all(r.origin == "uniform" for r in rows)
    for r in rows:
        _assert_uniform(r.policy["layers"])
    levels = [_compression(r.policy["layers"]) for r in rows]
    best = None
    for i, r in enumerate(rows):
        # after a feasible trial, every later proposal scores lower (exact scores)
        if best is not None:
            assert r.score < best
        if r.state == "COMPLETE" and r.feasible:
            best = r.score if best is None else min(best, r.score)
        else:  # no later trial compresses at least as much in every knob as this one
            for later in levels[i + 1 :]:
                assert not all(a >= b for a, b in zip(later, levels[i], strict=True))
    assert best is not None  # bisection reaches the feasible side within 10 trials
    store.dispose()


def _compression(layers: dict) -> tuple[float, ...]:
    mlp = layers["blocks.0.mlp.c_fc"]
    attn = layers["blocks.0.attn.c_attn"]
    return (
        mlp.get("sparsity", 0.0),
        -mlp.get("bits", 32),
        -mlp.get("act_bits", 32),
        -mlp.get("rank", math.inf),
        attn.get("sparsity", 0.0),
        -attn.get("bits", 32),
        -layers["head"].get("bits", 32),
    )


TIED_SPACE = """
from microsweep import Bits, MicroNet, Space, Sparsity, data, models

corpus = data.tiny_shakespeare()
model = models.gpt(corpus, n_layer=2, n_head=2, n_embd=32, block_size=32, pretrain_steps=300)
space = Space(model, rules={
    "blocks.*.attn.*": dict(sparsity=Sparsity(0.0, 0.6, step=0.2), bits=Bits(4, 8), tied=True),
    "blocks.*.mlp.*": dict(bits=Bits(4, 6, 8)),
})
objective = MicroNet(perplexity_ceiling=1.08, relative_to="dense", baseline="dense",
                     eval_tokens=2048)
"""


def test_tied_rule_stays_tied_under_auto(tmp_path, tiny_gpt):
    path = tmp_path / "tied.py"
    path.write_text(TIED_SPACE)
    url = f"sqlite:///{tmp_path / 't.db'}"
    result = run_sweep(
        str(path),
        name="tied",
        trials=8,
        storage=url,
        seed=1,
        in_process=True,
        progress=False,
    )
    assert sum(result.states.values()) == 8
    store = Store(url)
    study = optuna.load_study(study_name="tied", storage=store.optuna_storage())
    for t in study.trials:
        assert "blocks.*.attn.*:bits" in t.params  # one parameter for the tied rule
        assert not any(p.startswith("blocks.0.attn") for p in t.params)
    for row in store.trials("tied"):
        attn = [v for k, v in row.policy["layers"].items() if ".attn." in k]
        assert len(attn) == 4 and all(a == attn[0] for a in attn)
    store.dispose()


def test_cli_default_and_uniform_samplers_and_sensitivity(tmp_path, tiny_gpt):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    sens = _cli(
        "sensitivity",
        TINY,
        "--name",
        "tiny",
        "--storage",
        url,
        "--in-process",
        "-o",
        "s.html",
        cwd=tmp_path,
    )
    assert sens.returncode == 0, sens.stderr
    assert "measured now" in sens.stdout and (tmp_path / "s.html").stat().st_size > 100_000
    measured = int(sens.stdout.split("(")[1].split()[0])
    assert measured > 50
    again = _cli(
        "sensitivity",
        TINY,
        "--name",
        "tiny",
        "--storage",
        url,
        "--in-process",
        "-o",
        "s2.html",
        cwd=tmp_path,
    )
    assert again.returncode == 0 and "(0 measured now" in again.stdout

    auto = _cli(
        "run",
        TINY,
        "--name",
        "a",
        "--trials",
        "8",
        "--storage",
        url,
        "--in-process",
        "--seed",
        "3",
        cwd=tmp_path,
    )
    assert auto.returncode == 0, auto.stderr
    assert "best uniform policy" in auto.stdout and "0 probes measured" in auto.stdout
    uni = _cli(
        "run",
        TINY,
        "--name",
        "u",
        "--trials",
        "3",
        "--sampler",
        "uniform",
        "--storage",
        url,
        "--in-process",
        cwd=tmp_path,
    )
    assert uni.returncode == 0, uni.stderr
    status = _cli("status", "--name", "a", "--storage", url, cwd=tmp_path)
    assert status.returncode == 0 and "feasible:" in status.stdout and "origin" in status.stdout
    bad = _cli("run", TINY, "--name", "x", "--sampler", "annealing", "--storage", url, cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_old_schema_is_refused_by_reads_and_upgraded(tmp_path, tiny_gpt):
    import sqlite3

    url = f"sqlite:///{tmp_path / 'old.db'}"
    run_sweep(
        TINY,
        name="old",
        trials=2,
        storage=url,
        seed=0,
        in_process=True,
        progress=False,
        sampler="random",
    )
    # turn it into a version-1 database: the columns and table versions 2 and 3 added are gone
    con = sqlite3.connect(tmp_path / "old.db")
    con.execute("ALTER TABLE microsweep_sweeps DROP COLUMN owner")
    con.execute("ALTER TABLE microsweep_sweeps DROP COLUMN lease_until")
    con.execute("ALTER TABLE microsweep_trials DROP COLUMN worker")
    con.execute("ALTER TABLE microsweep_trials DROP COLUMN origin")
    con.execute("ALTER TABLE microsweep_sweeps DROP COLUMN eval_key")
    con.execute("DROP TABLE microsweep_sensitivity")
    con.execute("UPDATE microsweep_schema SET version = 1")
    con.commit()
    con.close()
    status = _cli("status", "--name", "old", "--storage", url, cwd=tmp_path)
    assert status.returncode == 2 and "microsweep upgrade" in status.stderr
    up = _cli("upgrade", "--storage", url, cwd=tmp_path)
    assert up.returncode == 0 and f"1 -> {SCHEMA_VERSION}" in up.stdout, up.stderr
    status = _cli("status", "--name", "old", "--storage", url, cwd=tmp_path)
    assert status.returncode == 0 and "2/2 finished" in status.stdout
    again = _cli("upgrade", "--storage", url, cwd=tmp_path)
    assert again.stdout.startswith(f"schema version {SCHEMA_VERSION}")
    # a resumed sweep writes into the upgraded tables
    from microsweep.search import resume_sweep

    resume_sweep("old", trials=3, storage=url, in_process=True, progress=False)
    assert [r.number for r in Store(url).trials("old")] == [0, 1, 2]


def test_cli_sampler_names_match_the_samplers():
    from microsweep.cli import SAMPLER_NAMES

    assert SAMPLER_NAMES == SAMPLERS


def test_planned_sampler_refuses_a_ceiling_no_compression_can_meet(tmp_path, tiny_gpt):
    from microsweep.errors import UsageError

    path = tmp_path / "tight.py"
    path.write_text(
        Path(TINY).read_text().replace("perplexity_ceiling=1.10", "perplexity_ceiling=1.0")
    )
    url = f"sqlite:///{tmp_path / 'tight.db'}"
    with pytest.raises(UsageError, match="not above the dense model"):
        run_sweep(str(path), name="t", trials=2, storage=url, in_process=True, progress=False)
    # uniform needs no budget: it runs, and finds every compressed policy over the ceiling
    result = run_sweep(
        str(path),
        name="u",
        trials=2,
        storage=url,
        in_process=True,
        progress=False,
        sampler="uniform",
    )
    assert sum(result.states.values()) == 2 and result.best_number is None
