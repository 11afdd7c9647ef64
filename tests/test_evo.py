"""Staged evaluation and the `evo` sampler on real sweeps of examples/tiny.py: screens are stored
as partial (PRUNED, with what they read), a continuation that reads every window measures exactly
what a whole evaluation does, a stopped sweep resumes its generation, and children stay one level
step from their parent."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from microsweep.search import resume_sweep, run_sweep
from microsweep.search._evo import EVO_ATTR, mutate
from microsweep.search._stages import SCREENED_ATTR, STAGE_ATTR
from microsweep.spaces import Policy
from microsweep.storage import Store
from tests.conftest import ROOT

TINY = str(ROOT / "examples" / "tiny.py")


@pytest.fixture(scope="module")
def evo_sweep(tmp_path_factory, tiny_gpt):
    """An evo sweep stopped after 22 trials (inside a generation), then resumed to 44."""
    url = f"sqlite:///{tmp_path_factory.mktemp('evo') / 'evo.db'}"
    common = dict(storage=url, in_process=True, progress=False)
    first = run_sweep(TINY, name="evo", trials=22, sampler="evo", seed=0, **common)
    store = Store(url)
    before = {r.number for r in store.trials("evo")}
    resumed = resume_sweep("evo", trials=44, **common)
    return {"url": url, "store": store, "first": first, "resumed": resumed, "before": before}


def _study(evo_sweep) -> optuna.Study:
    return optuna.load_study(study_name="evo", storage=evo_sweep["store"].optuna_storage())


def test_screens_are_stored_as_partial_trials(evo_sweep):
    store, study = evo_sweep["store"], _study(evo_sweep)
    sweep = store.get_sweep("evo")
    rows = {r.number: r for r in store.trials("evo")}
    screens = [t for t in study.trials if SCREENED_ATTR in t.user_attrs]
    assert len(screens) >= 12
    for t in screens:
        row = rows[t.number]
        read = t.user_attrs[SCREENED_ATTR]
        nll = t.user_attrs["window_nll"]
        assert t.state == TrialState.PRUNED and row.state == "PRUNED" and not row.feasible
        assert len(nll) == read == t.user_attrs[STAGE_ATTR]["read"] and 0 < read < 64
        tokens = read * 32  # tiny: windows of 32 predicted tokens
        assert t.user_attrs["perplexity_estimate"] == pytest.approx(
            math.exp(math.fsum(nll) / tokens), rel=1e-12
        )
        assert row.perplexity == pytest.approx(t.user_attrs["perplexity_estimate"], rel=1e-12)
        assert row.reason.startswith(f"screened on {read} of 64 windows: perplexity ")
        assert t.constraints["perplexity"] == pytest.approx(row.perplexity - sweep.ceiling)
        assert row.score == pytest.approx(t.user_attrs["score"])


def test_a_continuation_completes_with_the_whole_evaluation(evo_sweep, tmp_path):
    """A survivor continued to every window is COMPLETE, its per-window sums extend the screen's,
    and its perplexity is what a whole evaluation of the same policy measures."""
    store, study = evo_sweep["store"], _study(evo_sweep)
    by_number = {t.number: t for t in study.trials}
    done = [
        t
        for t in study.trials
        if t.state == TrialState.COMPLETE and t.user_attrs.get(STAGE_ATTR, {}).get("continues")
    ]
    assert done, "no survivor reached the whole evaluation"
    t = done[0]
    screen = by_number[t.user_attrs[STAGE_ATTR]["continues"]]
    assert screen.params == t.params and screen.state == TrialState.PRUNED
    assert t.user_attrs[STAGE_ATTR]["start"] == screen.user_attrs[SCREENED_ATTR]
    row = {r.number: r for r in store.trials("evo")}[t.number]
    again = run_sweep(
        TINY, name="whole", trials=1, sampler="random", seed=1, in_process=True, progress=False,
        storage=f"sqlite:///{tmp_path / 'whole.db'}", warm_start=[Policy.from_json(row.policy)],
    )  # fmt: skip
    whole = Store(f"sqlite:///{tmp_path / 'whole.db'}").trials("whole")[0]
    assert whole.state == "COMPLETE" and whole.score == pytest.approx(row.score, rel=1e-12)
    assert row.perplexity == pytest.approx(whole.perplexity, rel=1e-7)
    assert again.best_number == 0 or whole.perplexity > store.get_sweep("evo").ceiling


def test_a_stopped_evo_sweep_resumes_its_generation(evo_sweep):
    study = _study(evo_sweep)
    before = evo_sweep["before"]
    assert len(study.trials) == 44 and len(before) == 22
    assert evo_sweep["resumed"].states.get("FAIL", 0) == 0
    # the resumed driver continued screens the first one left, in the same generation
    continued = [
        t
        for t in study.trials
        if t.number not in before and t.user_attrs.get(STAGE_ATTR, {}).get("continues") in before
    ]
    gens = {t.user_attrs[EVO_ATTR]["gen"] for t in study.trials if EVO_ATTR in t.user_attrs}
    assert continued or len(gens) >= 2
    for t in study.trials:  # every continuation continues a screen of the same policy
        stage = t.user_attrs.get(STAGE_ATTR, {})
        if stage.get("continues") is not None:
            prior = study.trials[stage["continues"]]
            assert prior.params == t.params and SCREENED_ATTR in prior.user_attrs
            assert t.user_attrs[EVO_ATTR]["level"] == prior.user_attrs[EVO_ATTR]["level"] + 1


def test_children_stay_one_level_step_from_the_parent(evo_sweep):
    """Each child moves one unit one level step more compressed and, for a swap, another unit
    one step less: the score moves by at most one unit's step cost."""
    from microsweep.allocate import Planner
    from microsweep.prepare import load_space_file, prepare
    from microsweep.score import Baseline, CountConfig, count

    sf = load_space_file(TINY)
    prepared = prepare(sf, 0)
    dense = count(sf.model, context=prepared.settings.context)
    planner = Planner(
        sf.space, sf.model, context=prepared.settings.context, config=CountConfig(),
        baseline=Baseline(dense.params, dense.ops), calib=prepared.calib,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(200):
        parent = tuple(int(rng.integers(len(o))) for o in planner.options)
        swap = bool(rng.integers(2))
        child = mutate(planner, parent, rng, swap=swap, seen=set())
        assert child is not None
        moved = [u for u, (a, b) in enumerate(zip(parent, child, strict=True)) if a != b]
        assert 1 <= len(moved) <= (2 if swap else 1)
        steps = []
        for u in moved:
            old, new = planner.options[u].combos[parent[u]], planner.options[u].combos[child[u]]
            assert np.abs(old - new).sum() == 1  # one knob, one level
            col = 0 if planner.plan(parent).mode == "quantized" else 1
            steps.append(
                planner.options[u].cost[child[u], col] - planner.options[u].cost[parent[u], col]
            )
        delta = planner.plan(child).score - planner.plan(parent).score
        if planner.plan(child).mode != planner.plan(parent).mode:
            continue  # the 16-bit allowance switched: another counting mode altogether
        if len(steps) == 2 and steps[0] * steps[1] <= 0:  # opposite steps: a swap
            assert abs(delta) <= max(abs(s) for s in steps) + 1e-9
            checked += 1
        elif len(steps) == 1:
            assert delta == pytest.approx(steps[0], abs=1e-9)
            checked += 1
    assert checked >= 100


@pytest.fixture(scope="module")
def tiny_file():
    from microsweep.prepare import load_space_file

    return load_space_file(TINY)


def _budgeted(sf, budget: float, **extra):
    from microsweep import MicroNet

    return MicroNet(**{**sf.objective.to_json(), "score_budget": budget, **extra})


@pytest.mark.parametrize("sampler", ["evo", "evopress", "uniform"])
def test_budget_form_ranks_by_perplexity_within_the_score_budget(sampler, tiny_file, tmp_path):
    """MicroNet(score_budget=...): the study minimizes perplexity, a trial over the budget is
    infeasible (its 'score' constraint positive), the best is the least perplexity within it."""
    sf, budget = tiny_file, 0.85
    url = f"sqlite:///{tmp_path / 'b.db'}"
    result = run_sweep(
        sf.space, objective=_budgeted(sf, budget), corpus=sf.corpus, name="b", trials=30,
        sampler=sampler, seed=0, in_process=True, progress=False, storage=url,
    )  # fmt: skip
    store = Store(url)
    rows = store.trials("b")
    study = optuna.load_study(study_name="b", storage=store.optuna_storage())
    ceiling = store.get_sweep("b").ceiling
    for t, row in zip(study.trials, rows, strict=True):
        if t.state == TrialState.COMPLETE:
            assert t.values[0] == pytest.approx(row.perplexity, rel=1e-12)  # the objective
            assert t.constraints["score"] == pytest.approx(row.score - budget)
            assert row.feasible == (row.score <= budget and row.perplexity <= ceiling)
    feasible = [r for r in rows if r.state == "COMPLETE" and r.feasible]
    assert feasible, f"{sampler} found nothing within the score budget"
    best = min(feasible, key=lambda r: r.perplexity)
    assert result.best_number == best.number and result.best_perplexity == best.perplexity
    assert result.by == "perplexity"
    from microsweep.report import sweep_status

    assert sweep_status(store, "b")["best"][0]["trial"] == best.number
    if sampler == "evopress":  # ranks by KL whatever select_by says: every trial has it
        assert all("kl" in t.user_attrs for t in study.trials if t.state != TrialState.FAIL)
        gens = [t for t in study.trials if EVO_ATTR in t.user_attrs]
        assert all(t.user_attrs[EVO_ATTR]["budget"] == budget for t in gens)
        assert all(rows[t.number].score <= budget for t in gens)  # every child within it
    if sampler == "uniform":  # the least compressed uniform policies within the budget first
        first = rows[0]
        assert first.origin == "uniform" and first.score <= budget


def test_budget_form_refuses_what_cannot_work(tiny_file, tmp_path):
    from microsweep import MicroNet
    from microsweep.errors import SpaceError, UsageError

    sf = tiny_file
    with pytest.raises(SpaceError, match="score_budget"):
        MicroNet(score_budget=-1.0)
    with pytest.raises(SpaceError, match="objectives='score'"):
        MicroNet(score_budget=0.8, objectives="score+perplexity")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with pytest.raises(UsageError, match="--sampler allocate finds the least score"):
        run_sweep(
            sf.space, objective=_budgeted(sf, 0.8), corpus=sf.corpus, name="r", trials=2,
            sampler="allocate", in_process=True, progress=False, storage=url,
        )  # fmt: skip
    assert "r" not in Store(url).sweep_names()  # refused before anything was stored


def test_stages_read_more_windows_each_time_or_none_at_all():
    from microsweep.search._evo import EvoPressSampler, EvoSampler

    for cls in (EvoSampler, EvoPressSampler):
        sampler = cls.__new__(cls)
        for n in (0, 8, 16, 19, 32, 33, 64, 256, 1000):
            sampler.n_windows = n
            reads = sampler.stage_reads()
            if sampler.staging():
                assert reads[-1] == n and all(a < b for a, b in zip(reads, reads[1:], strict=False))
            else:  # too few windows to stage: every child evaluated whole
                assert n < 4 * cls.MIN_SCREEN or len(set(reads)) < len(reads)


def test_interpolated_levels_stay_anchored_and_respect_a_broken_one():
    """Unmeasured levels read off the measured ones from the dense NLL at no compression; a
    level that broke (inf) makes the ones past it inf, not the ones before it."""
    from microsweep.allocate import Probe
    from microsweep.search._sensitivity import interpolate

    probes = [Probe("l", "sparsity", f"{v}", v, None) for v in (0.1, 0.2, 0.3, 0.4)]
    dense = 2.0
    entries, estimated = interpolate(probes, {("l", "sparsity", "0.4"): 2.4}, dense=dense)
    assert estimated == 3
    assert entries[("l", "sparsity", "0.2")] == pytest.approx(2.2)  # linear from (0, dense)
    broken = {("l", "sparsity", "0.3"): math.inf, ("l", "sparsity", "0.1"): 2.05}
    entries, _ = interpolate(probes, broken, dense=dense)
    assert entries[("l", "sparsity", "0.2")] == pytest.approx(2.1)  # 2.05 carried on, x 2
    assert entries[("l", "sparsity", "0.4")] == math.inf
