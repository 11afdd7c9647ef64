"""Budget allocation: the knapsack against brute force, exact option costs against the counter on
whole compressed models, level grids, the plan <-> Optuna parameter mapping, and corrections."""

from __future__ import annotations

import itertools
import math

import numpy as np
import optuna
import pytest
import torch

from microsweep import Bits, Rank, Space, Sparsity
from microsweep.allocate import (
    KNOBS,
    PAIRS,
    Correction,
    Planner,
    SensitivityTable,
    fit_correction,
    fit_interactions,
    fit_weights,
    pareto_options,
    plan_levels,
    solve,
    unit_levels,
)
from microsweep.compress import compress
from microsweep.score import Baseline, CountConfig, count, mean_context, micronet_score

CONTEXT = mean_context(32)


def _brute(costs, losses, budget):
    best = None
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        if any(not math.isfinite(c[i]) for c, i in zip(costs, pick, strict=True)):
            continue
        loss = sum(max(0.0, lo[i]) for lo, i in zip(losses, pick, strict=True))
        cost = sum(c[i] for c, i in zip(costs, pick, strict=True))
        if loss <= budget + 1e-12 and (best is None or cost < best):
            best = cost
    return best


def test_knapsack_matches_brute_force_on_grid_losses():
    rng = np.random.default_rng(7)
    for _ in range(300):
        groups = int(rng.integers(1, 5))
        costs = [rng.normal(size=int(rng.integers(1, 6))) for _ in range(groups)]
        for c in costs:  # some options barred (NaN cost), as the freebie mode does
            c[rng.random(len(c)) < 0.15] = np.nan
        losses = [rng.integers(0, 12, size=len(c)).astype(float) for c in costs]
        budget = float(rng.integers(0, 30))
        # losses on the solver's grid: one unit of loss = budget / resolution
        choice = solve(costs, losses, budget, resolution=max(int(budget), 1))
        best = _brute(costs, losses, budget)
        if best is None:
            assert choice is None
            continue
        assert choice is not None
        got = sum(c[i] for c, i in zip(costs, choice, strict=True))
        assert got == pytest.approx(best, abs=1e-12)
        assert sum(lo[i] for lo, i in zip(losses, choice, strict=True)) <= budget


def test_knapsack_never_exceeds_the_budget_off_grid():
    rng = np.random.default_rng(3)
    for _ in range(200):
        costs = [rng.normal(size=5) for _ in range(4)]
        losses = [rng.random(5) for _ in range(4)]
        budget = float(rng.random() * 2)
        choice = solve(costs, losses, budget, resolution=500)
        if choice is not None:
            assert sum(lo[i] for lo, i in zip(losses, choice, strict=True)) <= budget + 1e-12
            best = _brute(costs, losses, budget)
            got = sum(c[i] for c, i in zip(costs, choice, strict=True))
            # each group's loss rounds up by under one unit (budget / 500): the solution is at
            # least as good as the best one within the budget less 4 units
            assert got >= best - 1e-12
            tighter = _brute(costs, losses, budget * (1 - 4 / 500))
            if tighter is not None:
                assert got <= tighter + 1e-12


def test_pareto_options_are_the_non_dominated_ones():
    cost = np.array([5.0, 3.0, 4.0, 3.0, np.nan, 1.0])
    loss = np.array([0.0, 1.0, 1.0, 2.0, 0.0, 3.0])
    assert list(pareto_options(cost, loss)) == [0, 1, 5]


TINY_RULES = {
    "blocks.*.attn.c_attn": dict(sparsity=Sparsity(0, 0.6, step=0.2), bits=Bits(4, 8, 32)),
    "blocks.*.attn.c_proj": dict(act_bits=Bits(8, 32), tied=True),
    "blocks.*.mlp.*": dict(
        sparsity=Sparsity(0, 0.5, step=0.25),
        bits=Bits(4, 16),
        act_bits=Bits(8, 16),
        rank=Rank(0.25, 1.0),
    ),
    "head": dict(bits=Bits(6, 8, 16, 32)),
}
"""The tiny planner's rules: every knob, a tied rule, and a head (also planned on workers)."""


@pytest.fixture(scope="module")
def tiny_planner(tiny_gpt, corpus):
    calib = corpus.train[: 8 * 32].view(8, 32)
    space = Space(tiny_gpt, rules=TINY_RULES)
    dense = count(tiny_gpt, context=CONTEXT)
    baseline = Baseline(dense.params, dense.ops)
    planner = Planner(
        space,
        tiny_gpt,
        context=CONTEXT,
        config=CountConfig(),
        baseline=baseline,
        calib=calib,
        rank_levels=4,
    )
    return planner, baseline, calib


def test_plan_scores_equal_the_counter_on_whole_compressed_models(tiny_planner, tiny_gpt):
    """Exact: dense total + the sum of each unit's option delta is the count of the model
    compressed by that policy, in whichever counting mode the policy falls."""
    planner, baseline, calib = tiny_planner
    rng = np.random.default_rng(0)
    choices = [tuple(int(rng.integers(len(o))) for o in planner.options) for _ in range(12)]
    # and two that keep every width >= 16 bits, so the 16-bit allowance applies
    for _ in range(2):
        choice = []
        for o in planner.options:
            wide = [k for k in range(len(o)) if np.isfinite(o.cost[k, 1])]
            choice.append(int(rng.choice(wide)))
        choices.append(tuple(choice))
    modes = set()
    for choice in choices:
        plan = planner.plan(choice)
        modes.add(plan.mode)
        model = compress(tiny_gpt, planner.policy(choice), calib=calib)
        counted = count(model, context=CONTEXT)
        assert counted.freebie == (plan.mode == "freebie")
        exact = micronet_score(counted.params, counted.ops, baseline)
        assert plan.score == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert modes == {"freebie", "quantized"}


def test_options_at_each_input_width_cost_what_a_fresh_build_counts(tiny_planner, tiny_gpt):
    """The input widths of one weight setting share its build: every option of an MLP layer
    (2 input widths) costs exactly what the layer built from scratch for it counts, in both
    modes, and each single-knob proxy error is the proxy's own for that knob alone."""
    from microsweep import LayerPolicy
    from microsweep.allocate._levels import layer_setting
    from microsweep.allocate._options import _LayerBuilder, _plain, _Proxy, _score
    from microsweep.compress import compress_layer, layer_inputs

    planner, baseline, calib = tiny_planner
    opts = next(o for o in planner.options if o.unit.key == "blocks.1.mlp.c_fc")
    assert len(opts.levels["act_bits"]) == 2 and len(opts.unit.layers) == 1
    (info,) = opts.unit.layers
    linear = tiny_gpt.get_submodule(info.name)
    layer_in = layer_inputs(tiny_gpt, {info.name: linear}, calib, max_rows=4096)[info.name]
    proxy = _Proxy(linear, layer_in)
    fresh = _LayerBuilder(linear, [])
    quantized, freebie = CountConfig(freebie=False), CountConfig()
    dense_q = _score(linear, CONTEXT, quantized, baseline)[0]
    dense_f = _score(linear, CONTEXT, freebie, baseline)[0]
    both = 0
    for k in range(len(opts)):
        setting = _plain(layer_setting(info, dict(opts.unit.knobs), opts.values(k), info.name))
        factors = None if setting.rank is None else fresh.factors(setting.rank)
        module = compress_layer(
            linear, setting, act_scale=proxy.act_scale(setting.act_bits), factors=factors
        )
        want_q = _score(module, CONTEXT, quantized, baseline)[0] - dense_q
        assert opts.cost[k, 0] == pytest.approx(want_q, rel=1e-12, abs=1e-15)
        want_f, applied = _score(module, CONTEXT, freebie, baseline)
        if min(setting.bits, setting.act_bits) >= 16 and applied:
            assert opts.cost[k, 1] == pytest.approx(want_f - dense_f, rel=1e-12, abs=1e-15)
            both += 1
        else:
            assert np.isnan(opts.cost[k, 1])
    assert both > 0
    builder = _LayerBuilder(linear, list(opts.levels["sparsity"]), proxy.stats)
    for (_, kn, i), err in opts.proxy.items():
        value = opts.levels[kn][i]
        single = _plain(layer_setting(info, dict(opts.unit.knobs), {kn: value}, info.name))
        if kn == "act_bits":
            want = proxy.act_error(value)
        else:
            block = single.block if kn == "sparsity" else None
            want = proxy.weight_error(LayerPolicy(**{kn: getattr(single, kn), "block": block}),
                                      builder)  # fmt: skip
        assert err == pytest.approx(want, rel=1e-9) and err > 0
    # every knob's every level but the identity ones has its error
    levels = sum(1 for (_, kn, i), key in opts.keys.items() if key is not None)
    assert len(opts.proxy) == levels and {kn for (_, kn, _) in opts.proxy} == set(opts.knobs)


def test_tied_rule_is_one_unit_and_plans_keep_it_tied(tiny_planner):
    planner, _, _ = tiny_planner
    keys = [u.key for u in planner.units]
    assert "blocks.*.attn.c_proj" in keys
    tied = next(u for u in planner.units if u.key == "blocks.*.attn.c_proj")
    assert [i.name for i in tied.layers] == ["blocks.0.attn.c_proj", "blocks.1.attn.c_proj"]
    for choice in [tuple(len(o) - 1 for o in planner.options), tuple(0 for _ in planner.options)]:
        policy = planner.policy(choice)
        a, b = policy.layers["blocks.0.attn.c_proj"], policy.layers["blocks.1.attn.c_proj"]
        assert a == b


def test_params_locate_and_suggest_round_trip(tiny_planner):
    planner, _, _ = tiny_planner
    rng = np.random.default_rng(1)
    for _ in range(10):
        choice = tuple(int(rng.integers(len(o))) for o in planner.options)
        params = planner.params(choice)
        assert planner.locate(params) == choice
        # Optuna replays the parameters into exactly the planned policy
        suggested = planner.space.suggest(optuna.trial.FixedTrial(params))
        assert suggested == planner.policy(choice)
    assert planner.locate({"blocks.0.attn.c_attn:sparsity": 0.123}) is None


def test_levels_grid_rank_below_break_even_and_dense_first(tiny_gpt):
    space = Space(
        tiny_gpt,
        rules={"blocks.0.mlp.c_fc": dict(rank=Rank(0.25, 1.0), sparsity=Sparsity(0.1, 0.3))},
    )
    (unit,) = space.units()
    levels = unit_levels(unit, sparsity_levels=3, rank_levels=4)
    assert levels["sparsity"] == [0.1, 0.2, 0.3]
    ranks = levels["rank"]
    info = unit.layers[0]  # 128 x 32: full rank 32, break-even 26
    assert ranks[0] == 1.0 and Rank.resolve(ranks[0], 128, 32) is None
    resolved = [Rank.resolve(r, 128, 32) for r in ranks[1:]]
    assert resolved == sorted(resolved, reverse=True)
    assert max(resolved) < Rank.break_even(info.out_features, info.in_features)
    assert min(resolved) == 8  # 0.25 of 32
    thinned = plan_levels(unit, sparsity_levels=3, rank_levels=4, max_options=4)
    assert thinned["sparsity"] == [0.1, 0.3]  # thinned evenly, ends kept
    assert len(thinned["rank"]) == 2 and thinned["rank"][0] == 1.0


def _table(planner, losses):
    """A fabricated sensitivity table: each probe's loss from `losses(layer, knob, key)`."""
    entries = {}
    for probe in planner.probes():
        entries[(probe.layer, probe.knob, probe.key)] = 1.0 + losses(probe)
    return SensitivityTable(dense_nll=1.0, entries=entries)


def test_single_knob_options_predict_exactly_the_measured_loss(tiny_planner):
    planner, _, _ = tiny_planner
    planner.set_sensitivity(_table(planner, lambda p: 0.01 * (1 + len(p.key))))
    checked = 0
    for opts, part in zip(planner.options, planner.parts, strict=True):
        for k in range(len(opts)):
            moved = [j for j, i in enumerate(opts.combos[k]) if i != 0]
            identity = [
                opts.levels[kn][0] in (0.0, 32, None) or opts.unit.knobs[kn].is_constant
                for kn in opts.knobs
            ]
            if len(moved) == 1 and all(identity):
                (j,) = moved
                kn = opts.knobs[j]
                want = sum(
                    planner.table.loss(info.name, kn, opts.keys[(m, kn, int(opts.combos[k, j]))])
                    for m, info in enumerate(opts.unit.layers)
                )
                assert part[k].sum() == pytest.approx(want, rel=1e-9)
                assert np.allclose(opts.rho[k], 1.0)
                checked += 1
    assert checked >= 10
    # and a combination's interaction ratio is read from the proxy, not assumed to be 1
    assert any(not np.allclose(o.rho, 1.0) for o in planner.options)


def test_allocation_is_the_best_plan_within_the_predicted_budget(tiny_gpt, corpus):
    """A small space whose every plan can be enumerated: the allocation is the brute-force
    optimum of score under predicted loss <= budget."""
    space = Space(
        tiny_gpt,
        rules={
            "blocks.0.mlp.c_fc": dict(sparsity=Sparsity(0, 0.6, step=0.3), bits=Bits(4, 8)),
            "blocks.1.mlp.c_fc": dict(sparsity=Sparsity(0, 0.6, step=0.3), bits=Bits(4, 8)),
            "blocks.1.attn.c_attn": dict(bits=Bits(3, 6, 16)),
        },
    )
    dense = count(tiny_gpt, context=CONTEXT)
    planner = Planner(
        space,
        tiny_gpt,
        context=CONTEXT,
        config=CountConfig(),
        baseline=Baseline(dense.params, dense.ops),
        calib=corpus.train[:256].view(8, 32),
    )
    rng = np.random.default_rng(5)
    drawn = {}
    planner.set_sensitivity(
        _table(planner, lambda p: drawn.setdefault((p.layer, p.knob, p.key), rng.random() * 0.1))
    )
    plans = [planner.plan(c) for c in itertools.product(*(range(len(o)) for o in planner.options))]
    for budget in (0.0, 0.02, 0.05, 0.1, 0.2, 1.0):
        fits = [p for p in plans if p.loss <= budget]
        got = planner.allocate(budget, resolution=20000)
        if not fits:
            assert got is None
            continue
        best = min(p.score for p in fits)
        assert got is not None and got.loss <= budget + 1e-12
        # within the loss rounding of the solver (at most one unit per group)
        near = [p.score for p in plans if p.loss <= budget * (1 - 3 / 20000)]
        assert best - 1e-12 <= got.score <= (min(near) if near else best) + 1e-12


def test_fit_weights_and_correction_recover_known_multipliers():
    rng = np.random.default_rng(11)
    n, units = 60, 5
    features = rng.random((n, units, len(KNOBS))) * 0.01
    truth = np.ones((units, len(KNOBS))) * np.array([1.5, 0.8, 1.0, 2.0])
    truth[2] *= 3.0  # one unit the predictor misjudges
    measured = np.einsum("nuk,uk->n", features, truth)
    shared = fit_weights(features.sum(axis=1), measured, budget=1.0)
    assert shared[0] > 1.2 and shared[3] > 1.5  # the knob-level trend is found
    per_unit = fit_correction(features, measured, budget=1.0)
    assert per_unit.shape == (units, len(KNOBS))
    assert np.mean(per_unit[2]) > 1.5 * np.mean(np.delete(per_unit, 2, axis=0))
    predicted = np.einsum("nuk,uk->n", features, per_unit)
    assert np.abs(predicted - measured).mean() < 0.2 * np.abs(measured).mean()
    # with no data the correction is the identity
    assert np.all(fit_correction(features[:0], measured[:0], 1.0) == 1.0)


def test_space_notes_report_wasteful_levels(tiny_gpt):
    with pytest.warns(UserWarning) as caught:
        space = Space(
            tiny_gpt,
            rules={
                "blocks.*.mlp.*": dict(
                    sparsity=Sparsity(0, 0.5), bits=Bits(4, 8), rank=Rank(0.5, 1.0)
                )
            },
        )
    text = " ".join(space.notes)
    assert "0.25 at w4" in text and "0.125 at w8" in text  # 1 mask bit against b bits saved
    assert "break-even" in text and "blocks.0.mlp.c_fc" in text
    assert len(caught) == len(space.notes) == 2
    quiet = Space(tiny_gpt, rules={"blocks.*.mlp.*": dict(bits=Bits(4, 8))})
    assert quiet.notes == []


def test_planner_needs_a_table_before_allocating(tiny_planner):
    planner, _, _ = tiny_planner
    fresh = Planner.__new__(Planner)
    fresh.parts = None
    from microsweep.errors import UsageError

    with pytest.raises(UsageError, match="sensitivity"):
        fresh.allocate(0.1)
    with pytest.raises(UsageError, match="no entry"):
        SensitivityTable(1.0, {}).loss("x", "bits", "4")
    assert SensitivityTable(1.0, {("x", "bits", "4"): 0.5}).loss("x", "bits", "4") == 0.0
    assert torch.isfinite(torch.tensor(planner.totals["quantized"]))


def test_low_dimensional_point_maps_to_a_whole_policy(tiny_planner):
    """AutoSampler's mapping: more budget never costs score, a heavier knob weight moves loss
    off that knob, the same point gives the same policy, and Optuna replays it exactly."""
    from microsweep.search import AutoSampler

    planner, _, _ = tiny_planner
    planner.set_sensitivity(_table(planner, lambda p: 0.002 * (1 + len(p.key) % 5)))
    sampler = AutoSampler(planner.space, seed=0)
    floor = min(p.loss for p in (planner.plan(c) for c in [tuple(0 for _ in planner.options)]))
    budget = 4 * floor + 0.05  # every budget factor tried leaves room for a plan
    sampler.attach(planner, budget=budget, dense_nll=1.0)
    base = {f"w_{k}": 1.0 for k in KNOBS} | {"temperature": 0.0}
    scores = [sampler.plan_for(base | {"budget": b}).score for b in (0.25, 0.5, 1.0, 2.0, 4.0)]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]
    plan = sampler.plan_for(base | {"budget": 1.0})
    assert plan.loss <= budget + 1e-12
    heavy = sampler.plan_for(base | {"budget": 1.0, "w_sparsity": 4.0})
    share = planner.features(plan.choice).sum(axis=0)
    share_heavy = planner.features(heavy.choice).sum(axis=0)
    assert share_heavy[0] < share[0]  # sparsity's predicted loss, weighted 4x, is used less
    # a per-unit correction scales the same way: doubling every weight halves the budget
    twice = Correction(np.full((len(planner.options), len(KNOBS)), 2.0), np.zeros(len(PAIRS)))
    doubled = sampler.plan_for(base | {"budget": 1.0}, correction=twice)
    assert doubled.choice == sampler.plan_for(base | {"budget": 0.5}).choice
    jitter = base | {"budget": 1.0, "temperature": 0.5}
    assert sampler.plan_for(jitter, seed=3).choice == sampler.plan_for(jitter, seed=3).choice
    params = planner.params(plan.choice)
    assert planner.space.suggest(optuna.trial.FixedTrial(params)) == planner.policy(plan.choice)


def test_units_without_knobs_and_constant_fractions(tiny_gpt, corpus):
    """A rule that only names layers (no knob) plans as one identity option; a constant rank
    fraction plans exactly the rank its trials run."""
    space = Space(
        tiny_gpt,
        rules={
            "blocks.0.mlp.c_fc": {},
            "blocks.0.mlp.c_proj": dict(rank=Rank(0.3, 0.3), bits=Bits(4, 8)),
        },
    )
    dense = count(tiny_gpt, context=CONTEXT)
    planner = Planner(
        space,
        tiny_gpt,
        context=CONTEXT,
        config=CountConfig(),
        baseline=Baseline(dense.params, dense.ops),
        calib=corpus.train[:256].view(8, 32),
    )
    empty, lowrank = planner.options
    assert len(empty) == 1 and empty.cost[0, 0] == 0.0
    assert lowrank.levels["rank"] == [0.3]
    policy = planner.policy((0, 0))
    suggested = space.suggest(optuna.trial.FixedTrial(planner.params((0, 0))))
    assert suggested == policy and policy.layers["blocks.0.mlp.c_proj"].rank == round(0.3 * 32)


@pytest.fixture(scope="module")
def interacting(tiny_gpt, corpus):
    """A planner whose measured single-knob losses are fabricated, and a constructed 'true'
    loss with strong interactions: a unit where two knobs act loses 41x the sum of their
    single-knob losses (as whitened rank on pruned factors can), additive elsewhere."""
    calib = corpus.train[: 8 * 32].view(8, 32)
    space = Space(
        tiny_gpt,
        rules={
            "blocks.*.attn.c_attn": dict(sparsity=Sparsity(0, 0.6, step=0.2), bits=Bits(4, 8, 32)),
            "blocks.*.mlp.*": dict(
                sparsity=Sparsity(0, 0.5, step=0.25), bits=Bits(4, 8, 32), rank=Rank(0.25, 1.0)
            ),
            "head": dict(bits=Bits(6, 8, 16, 32)),
        },
    )
    dense = count(tiny_gpt, context=CONTEXT)
    planner = Planner(
        space,
        tiny_gpt,
        context=CONTEXT,
        config=CountConfig(),
        baseline=Baseline(dense.params, dense.ops),
        calib=calib,
        rank_levels=4,
    )

    def single(p):  # cheap sparsity and rank, bits by width
        v = float(p.value)
        if p.knob == "sparsity":
            return 0.02 * v
        if p.knob == "rank":
            return 0.01 * (32 - v) / 32
        return {8: 0.002, 6: 0.006, 4: 0.03, 16: 0.0005}.get(int(v), 0.0)

    planner.set_sensitivity(_table(planner, single))

    def truth(choice):
        f = planner.features(choice)
        both = (f > 0).sum(axis=1) >= 2
        return float(np.sum(f.sum(axis=1) * np.where(both, 41.0, 1.0)))

    return planner, truth


def test_corrected_predictor_moves_an_infeasible_plan_back_under_the_ceiling(interacting):
    planner, truth = interacting
    budget = 0.1
    plan = planner.allocate(budget)
    assert plan.loss <= budget and truth(plan.choice) > 10 * budget  # the additive model misses
    features = planner.features(plan.choice)[None]
    pairs = planner.pair_features(plan.choice)[None]
    correction = fit_interactions(features, pairs, np.array([truth(plan.choice)]), budget)
    assert correction.pairs.max() > 0.5  # the measured excess lands on a knob pair
    again = planner.allocate(budget, weights=correction)
    assert again.choice != plan.choice
    assert truth(again.choice) <= budget  # back under the ceiling after one measured plan
    # the correction is what moved it: the same plan is now predicted over the budget
    assert planner.plan(plan.choice, correction).loss > budget


def _drive(sampler, planner, truth, budget: float, trials: int) -> list[tuple[str, bool, float]]:
    """Run `sampler` for `trials` trials in memory against the constructed `truth`: (origin,
    feasible, score) of each trial that landed on the planner's grid."""
    sampler.attach(planner, budget=budget, dense_nll=1.0)
    study = optuna.create_study(sampler=sampler)
    for params, attrs in sampler.warm_starts():
        study.enqueue_trial(params, user_attrs=attrs)
    ceiling = math.exp(1.0 + budget)
    outcomes = []
    for _ in range(trials):
        trial = study.ask()
        planner.space.suggest(trial)
        choice = planner.locate(trial.params)
        if choice is None:  # a random fallback off the grid
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            outcomes.append(("random", False, math.inf))
            continue
        ppl = math.exp(1.0 + truth(choice))
        trial.set_user_attr("perplexity", ppl)
        trial.set_constraint("perplexity", ppl - ceiling)
        score = planner.plan(choice).score
        study.tell(trial, score)
        outcomes.append((sampler.origins[trial.number], ppl <= ceiling, score))
    return outcomes


def test_auto_finds_a_feasible_policy_wherever_uniform_does(interacting):
    """A model 50x more fragile than its single-knob losses say: every plan the predictor
    makes misses for a while, and the uniform rescue finds a feasible policy within about as
    many trials (past the warm starts and a few of auto's own) as the uniform sampler."""
    from microsweep.search import make_sampler

    planner, _ = interacting
    budget = 0.1

    def fragile(choice):
        return 50.0 * float(planner.features(choice).sum())

    first = {}
    for name in ("uniform", "auto"):
        runs = _drive(make_sampler(name, seed=0, space=planner.space), planner, fragile, budget, 40)
        first[name] = next((i for i, (_, ok, _) in enumerate(runs) if ok), None)
    assert first["uniform"] is not None and first["auto"] is not None
    assert first["auto"] <= first["uniform"] + 8 + 4 + 1  # warm starts, RESCUE_ALONE, one more


@pytest.mark.parametrize("name", ["auto", "allocate"])
def test_planned_samplers_learn_strong_interactions(interacting, name):
    """Driven by the constructed truth for 30 trials, the planned samplers' own plans (refit,
    local) end mostly under the ceiling, and the best feasible policy is the true optimum."""
    from microsweep.search import make_sampler

    planner, truth = interacting
    budget = 0.1
    sampler = make_sampler(name, seed=0, space=planner.space)
    outcomes = _drive(sampler, planner, truth, budget, 30)
    outcomes = [o for o in outcomes if o[0] != "random"]
    planned = [ok for origin, ok, _ in outcomes[10:] if origin in ("refit", "local", "allocation")]
    assert len(planned) >= 10 and sum(planned) >= 0.7 * len(planned)
    # the true optimum: the knapsack on the true per-option losses
    true_parts = []
    for part in planner.parts:
        both = (part > 0).sum(axis=1) >= 2
        column = np.zeros_like(part)
        column[:, 0] = part.sum(axis=1) * np.where(both, 41.0, 1.0)
        true_parts.append(column)
    oracle = Planner.__new__(Planner)
    oracle.__dict__.update(planner.__dict__, parts=true_parts)
    best = oracle.allocate(budget, resolution=20000)
    found = min(score for _, ok, score in outcomes if ok)
    assert found <= best.score + 1e-9
