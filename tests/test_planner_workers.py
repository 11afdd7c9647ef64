"""The planner's per-unit work on the workers: the Gram factor behind the proxy error, the pools'
`map_runners`, and the same options and plan whether the units are built here or on two Ray
actors."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from microsweep import LayerPolicy, Policy, Space
from microsweep.allocate import Planner, SensitivityTable
from microsweep.allocate._options import _effective_weight, _LayerBuilder, _Proxy, gram_factor
from microsweep.compress import layer_inputs
from microsweep.errors import SpaceError
from microsweep.score import Baseline, CountConfig, count, eval_windows, mean_context
from microsweep.workers import EvalSettings, make_pool
from tests.test_allocate import TINY_RULES

CONTEXT = mean_context(32)
RULES = TINY_RULES  # the tiny planner's, as test_allocate builds it in one process


def _full_gram_rho(proxy: _Proxy, gram: torch.Tensor, setting: LayerPolicy, builder) -> float:
    """rho as the proxy defined it before the factor: errors trace(D G D^T) with the whole Gram
    matrix, in float64 (the reference the factor must agree with)."""

    def weight_error(s: LayerPolicy) -> float:
        if s.rank is None and s.sparsity == 0 and s.bits == 32:
            return 0.0
        module = builder.build(replace(s, act_bits=32), None)
        diff = _effective_weight(module) - proxy.weight.double()
        return float(((diff @ gram) * diff).sum())

    ref = float(((proxy.weight.double() @ gram) * proxy.weight.double()).sum())
    act = proxy.act_error(setting.act_bits) * proxy.ref / ref  # rows are exact either way
    whole = weight_error(setting) / ref + act
    alone = act
    for knob, identity in (("sparsity", 0.0), ("bits", 32), ("rank", None)):
        value = getattr(setting, knob)
        if value != identity:
            alone += weight_error(LayerPolicy(**{knob: value})) / ref
    return whole / alone if alone > 1e-15 else 1.0


def test_gram_factor_reproduces_the_gram_matrix_and_keeps_only_what_carries_it():
    """Fewer rows than inputs: rows^T itself; more: as few eigenvectors as carry all but the
    tail of the trace, and L L^T = G to that tail."""
    gen = torch.Generator().manual_seed(0)
    few = torch.randn(10, 24, generator=gen)
    assert torch.equal(gram_factor(few), few.T)
    # 400 rows in 24 dimensions, 6 of which carry almost everything
    basis = torch.randn(6, 24, generator=gen, dtype=torch.float64)
    rows = torch.randn(400, 6, generator=gen, dtype=torch.float64) @ basis
    rows += 1e-5 * torch.randn(400, 24, generator=gen, dtype=torch.float64)
    gram = rows.T @ rows
    factor = gram_factor(rows.float(), tail=1e-6)
    assert factor.shape == (24, 6)
    assert torch.allclose(factor.double() @ factor.double().T, gram, atol=1e-5 * gram.trace())
    whole = gram_factor(rows.float(), tail=0.0)
    assert whole.shape == (24, 24)
    assert torch.allclose(whole.double() @ whole.double().T, gram, rtol=1e-5, atol=1e-3)


def test_gram_factor_past_its_rank_sketches_the_rest_and_errors_stay_within_a_percent():
    """Wide inputs with a slowly falling spectrum: the factor keeps `max_rank` directions
    exactly and sketches the rest, is the same for the same rows, and the output errors of
    rounding, pruning and a rank cut through it are within 1.5% of trace(D G D^T)."""
    gen = torch.Generator().manual_seed(1)
    n, d, out = 900, 320, 96
    scales = (1.0 + torch.arange(d, dtype=torch.float64)) ** -0.5
    rows = (torch.randn(n, d, generator=gen, dtype=torch.float64) * scales).float()
    gram = rows.double().T @ rows.double()
    factor = gram_factor(rows, max_rank=40, sketch=64)
    assert factor.shape == (d, 40 + 64)
    assert torch.equal(factor, gram_factor(rows.clone(), max_rank=40, sketch=64))
    values, vectors = torch.linalg.eigh(gram)
    top = vectors[:, -40:] * values[-40:].sqrt()
    assert torch.allclose((factor[:, :40].double() @ factor[:, :40].double().T), top @ top.T,
                          atol=1e-4 * float(values[-1]))  # fmt: skip
    weight = torch.randn(out, d, generator=gen, dtype=torch.float64)
    u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
    scale = weight.abs().amax(1, keepdim=True) / 7
    errors = {
        "rounding": torch.round(weight / scale) * scale - weight,
        "pruning": torch.where(weight.abs() < weight.abs().median(), -weight, 0.0),
        "rank": (u[:, :30] * sv[:30]) @ vh[:30] - weight,
    }
    for what, diff in errors.items():
        exact = float(((diff @ gram) * diff).sum())
        got = float(((diff.float() @ factor).double() ** 2).sum())
        assert got == pytest.approx(exact, rel=0.015), what
    # fewer rows than inputs: the spectrum from the rows' side, the same guarantees
    wide = (torch.randn(300, 2 * d, generator=gen, dtype=torch.float64) * scales.repeat(2)).float()
    wide_gram = wide.double().T @ wide.double()
    factor = gram_factor(wide, max_rank=40, sketch=64)
    assert factor.shape == (2 * d, 40 + 64)
    values, vectors = torch.linalg.eigh(wide_gram)
    top = vectors[:, -40:] * values[-40:].sqrt()
    assert torch.allclose((factor[:, :40].double() @ factor[:, :40].double().T), top @ top.T,
                          atol=1e-4 * float(values[-1]))  # fmt: skip
    diff = torch.round(torch.randn(out, 2 * d, generator=gen, dtype=torch.float64) * 3) / 3
    diff -= diff.mean()
    exact = float(((diff @ wide_gram) * diff).sum())
    got = float(((diff.float() @ factor).double() ** 2).sum())
    assert got == pytest.approx(exact, rel=0.015)
    # as many directions as the rank and sketch together: kept exactly, nothing sketched
    few = torch.randn(500, 24, generator=gen) @ torch.randn(24, 200, generator=gen)
    exact_factor = gram_factor(few, max_rank=16, sketch=16)
    assert exact_factor.shape == (200, 24)
    assert torch.allclose(exact_factor.double() @ exact_factor.double().T,
                          few.double().T @ few.double(), rtol=1e-4, atol=1e-2)  # fmt: skip


@pytest.mark.parametrize("layer", ["blocks.1.mlp.c_fc", "blocks.1.mlp.c_proj"])
def test_rho_from_the_factor_agrees_with_the_full_gram_on_a_real_layer(tiny_gpt, corpus, layer):
    """The pretrained tiny GPT's MLP layers on 2,048 calibration rows (more rows than inputs, so
    the eigenvector factor): every combination's rho within 1e-3 of the full Gram's."""
    calib = corpus.train[: 64 * 32].view(64, 32)
    linear = tiny_gpt.get_submodule(layer)
    layer_in = layer_inputs(tiny_gpt, {layer: linear}, calib, max_rows=4096)[layer]
    rows = layer_in[0]
    assert rows.shape[0] > rows.shape[1]
    proxy = _Proxy(linear, layer_in)
    assert proxy.factor is not None and proxy.factor.shape[0] == rows.shape[1]
    gram = rows.double().T @ rows.double()
    sparsities = [0.0, 0.25, 0.5]
    builder = _LayerBuilder(linear, sparsities)
    full = min(linear.weight.shape)
    checked = 0
    for sparsity, bits, act_bits, rank in itertools.product(
        sparsities, (3, 4, 8, 32), (8, 32), (None, full // 2, full // 4)
    ):
        setting = LayerPolicy(sparsity=sparsity, bits=bits, act_bits=act_bits, rank=rank)
        module = builder.build(setting, proxy.act_scale(act_bits))
        got = proxy.ratio(setting, builder, module)
        want = _full_gram_rho(proxy, gram, setting, builder)
        assert got == pytest.approx(want, rel=1e-3), setting
        checked += got != 1.0
    assert checked > 20  # combinations that interact, not only single knobs


def _planner(model, calib, map_runners=None) -> Planner:
    dense = count(model, context=CONTEXT)
    return Planner(
        Space(model, rules=RULES),
        model,
        context=CONTEXT,
        config=CountConfig(),
        baseline=Baseline(dense.params, dense.ops),
        calib=calib,
        rank_levels=4,
        map_runners=map_runners,
    )


def _table(planner: Planner) -> SensitivityTable:
    """A sensitivity table with a distinct loss per probe, the same for both planners."""
    entries = {}
    for i, probe in enumerate(planner.probes()):
        entries[(probe.layer, probe.knob, probe.key)] = 2.0 + 0.003 * (1 + i % 7) * (
            1 + probe.value
        )
    return SensitivityTable(dense_nll=2.0, entries=entries)


def _runner_device(runner) -> str:
    return str(next(runner.base.parameters()).device)


def _fails(runner, kind: str) -> None:
    if kind == "space":
        raise SpaceError("this unit cannot be built; change its rule")
    raise ZeroDivisionError("boom")


@pytest.mark.ray
def test_the_plan_is_the_same_built_on_two_ray_workers_as_in_one_process(tiny_gpt, corpus):
    """Options (costs, rho, combos, keys, levels) and plans from a real pool of 2 Ray actors,
    one unit per call, equal the in-process planner's; a failing call stops the map in one
    line; the pool shuts the Ray it started."""
    import ray

    calib = corpus.train[: 8 * 32].view(8, 32)
    here = _planner(tiny_gpt, calib)
    windows = eval_windows(corpus.val, window=32, max_tokens=256)
    pool = make_pool(
        2, model=tiny_gpt, windows=windows, settings=EvalSettings(context=CONTEXT), calib=calib
    )
    try:
        spread = _planner(tiny_gpt, calib, map_runners=pool.map_runners)
        assert pool.free == 2  # every actor back, ready for trials
        assert pool.map_runners(_runner_device, [()] * 3) == ["cpu"] * 3
        with pytest.raises(SpaceError, match="change its rule"):
            pool.map_runners(_fails, [("space",), ("other",)])
        with pytest.raises(RuntimeError, match="a worker failed: .*boom"):
            pool.map_runners(_fails, [("other",)])
        assert pool.free == 2
        # trials on every worker: the map waits for one, its worker joins, results kept
        dense = Policy(layers={}).to_json()
        pool.submit(7, dense)
        pool.submit(8, dense)
        assert pool.free == 0
        assert pool.map_runners(_runner_device, [()] * 3) == ["cpu"] * 3
        finished = [pool.wait(), pool.wait()]
        assert sorted(r.number for r in finished) == [7, 8]
        assert {r.status for r in finished} == {"ok"} and pool.free == 2
        assert pool.wait(timeout=0) is None  # nothing more, nothing running
        # with `on_finished`, a trial that ends during the map is handed over at once
        handed = []
        pool.on_finished = handed.append
        pool.submit(9, dense)
        pool.submit(10, dense)
        assert pool.map_runners(_runner_device, [()] * 2) == ["cpu"] * 2
        pool.on_finished = None
        assert handed and {r.number for r in handed} <= {9, 10}  # the map needed a worker
        rest = [pool.wait() for _ in range(2 - len(handed))]
        assert sorted(r.number for r in handed + rest) == [9, 10] and pool.free == 2
    finally:
        pool.close()
    assert not ray.is_initialized()
    assert [o.unit.key for o in spread.options] == [o.unit.key for o in here.options]
    for a, b in zip(here.options, spread.options, strict=True):
        assert a.knobs == b.knobs and a.levels == b.levels and a.keys == b.keys
        assert np.array_equal(a.combos, b.combos)
        assert np.array_equal(a.cost, b.cost, equal_nan=True)  # exact counts
        np.testing.assert_allclose(a.rho, b.rho, rtol=1e-9)
    assert spread.totals == here.totals
    for planner in (here, spread):
        planner.set_sensitivity(_table(planner))
    most = here.plan(tuple(len(o) - 1 for o in here.options)).loss
    plans = set()
    for budget in (0.6 * most, 0.8 * most, most, 1.5 * most):
        a, b = here.allocate(budget), spread.allocate(budget)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.choice == b.choice and a.mode == b.mode
            assert a.score == b.score and a.loss == pytest.approx(b.loss, rel=1e-9)
            plans.add(a.choice)
    assert len(plans) >= 3  # budgets that give different plans


def test_in_process_pool_maps_on_its_runner_and_gives_the_same_options(tiny_gpt, corpus):
    """The in-process pool runs each item on its runner, in order, under the runner's threads;
    a planner spread through it equals the one built directly."""
    calib = corpus.train[: 8 * 32].view(8, 32)
    windows = eval_windows(corpus.val, window=32, max_tokens=256)
    pool = make_pool(
        1, model=tiny_gpt, windows=windows, settings=EvalSettings(context=CONTEXT), calib=calib,
        in_process=True,
    )  # fmt: skip
    threads = torch.get_num_threads()
    seen = pool.map_runners(lambda runner, i: (i, torch.get_num_threads()), [(3,), (1,), (2,)])
    assert [i for i, _ in seen] == [3, 1, 2]
    assert {t for _, t in seen} == {pool.runner.threads}
    assert torch.get_num_threads() == threads
    here = _planner(tiny_gpt, calib)
    spread = _planner(tiny_gpt, calib, map_runners=pool.map_runners)
    for a, b in zip(here.options, spread.options, strict=True):
        assert np.array_equal(a.cost, b.cost, equal_nan=True)
        np.testing.assert_allclose(a.rho, b.rho, rtol=1e-9)
