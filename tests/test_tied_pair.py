"""The factorized tied pair: a rank on a tied table or head builds W ~= A B once for both
sides. Exact counts on a small vocabulary (hand-computed), logits against the dense model with
W replaced by A B, the data-aware variant against its closed-form optimum, export round trips,
the planner's exact costs, a sweep with rank on the head, and the refusals."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from microsweep import LayerPolicy, Policy, Rank, Space
from microsweep.compress import (
    CompressedLinear,
    LevelStore,
    LowRankLinear,
    TiedLowRankEmbedding,
    VariantCache,
    compress,
    compress_tied,
    frequency_rows,
    input_stats,
    project_,
    rank_transform,
)
from microsweep.errors import SpaceError
from microsweep.export import load, round_to_storage, save
from microsweep.models import GPT, GPTConfig
from microsweep.score import Baseline, CountConfig, count, mean_context, micronet_score

FP32 = CountConfig(freebie=False)
V, D, R = 12, 8, 3


class TiedLM(nn.Module):
    """A table and the head tied to it, nothing between: every count is the pair's."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.wte = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=True)
        self.head.weight = self.wte.weight
        with torch.no_grad():
            self.wte.weight.copy_(torch.randn(V, D, generator=gen))
            self.head.bias.copy_(torch.randn(V, generator=gen))  # every entry non-zero

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.wte(ids))


def _rows(counts, *names):
    by_name = {lc.name: lc for lc in counts.layers}
    return [by_name[n] for n in names]


def _exact_adds(weight: torch.Tensor, bias: int = 0) -> int:
    """Sum over output rows of max(nnz - 1, 0), plus the bias entries: the dot-product rule."""
    nnz = (weight != 0).sum(dim=1)
    return int((nnz - 1).clamp_min(0).sum()) + bias


@pytest.mark.parametrize("side", ["head", "wte"])
def test_exact_counts_of_the_dense_pair(side):
    model = TiedLM().eval()
    dense = count(model, context=1.0, config=FP32)
    assert dense.params == V * D + V  # the tied matrix once, the bias
    assert (dense.mults, dense.adds) == (V * D, V * (D - 1) + V)
    out = compress(model, Policy(layers={side: LayerPolicy(rank=R)}))
    assert isinstance(out.wte, TiedLowRankEmbedding) and isinstance(out.head, LowRankLinear)
    a, b = out.head.second.weight, out.head.first.weight
    assert out.wte.table is a and out.wte.proj is b  # one Parameter each, used by both sides
    assert (tuple(a.shape), tuple(b.shape)) == ((V, R), (R, D))
    assert len(list(out.parameters())) == 3  # A, B and the head's bias
    counts = count(out, context=1.0, config=FP32)
    # stored once: V r + r d values, plus the bias
    assert counts.params == V * R + R * D + V == 72
    table, first, second = _rows(counts, "wte", "head.first", "head.second")
    assert table.params == 0 and first.params == R * D and second.params == V * R + V
    # table: the r -> d projection of the looked-up row, d dot products of r terms
    assert (table.mults, table.adds) == (D * R, D * (R - 1)) == (24, 16)
    # head: h -> h B^T (r dot products of d terms), then -> (h B^T) A^T + bias
    assert (first.mults, first.adds) == (R * D, R * (D - 1)) == (24, 21)
    assert (second.mults, second.adds) == (V * R, V * (R - 1) + V) == (36, 36)
    assert (counts.mults, counts.adds) == (84, 73)
    assert counts.ops == 84 + 73


@pytest.mark.parametrize("side", ["head", "wte"])
def test_exact_counts_with_sparsity_and_bits(side):
    model = TiedLM().eval()
    out = compress(model, Policy(layers={side: LayerPolicy(rank=R, sparsity=0.5, bits=8)}))
    first, second = out.head.first, out.head.second
    assert isinstance(first, CompressedLinear) and isinstance(second, CompressedLinear)
    a, b = second.weight.detach(), first.weight.detach()
    # magnitude pruning keeps exactly half of each factor
    assert (int((a != 0).sum()), int((b != 0).sum())) == (V * R // 2, R * D // 2) == (18, 12)
    counts = count(out, context=1.0, config=FP32)
    # values at 8 bits, one mask bit per element, fp32 bias and per-row scales (V for A, r for B)
    bits = 18 * 8 + 12 * 8 + (V * R + R * D) + V * 32 + (V + R) * 32
    assert counts.params == bits / 32
    table, f_row, s_row = _rows(counts, "wte", "head.first", "head.second")
    assert (table.mults, table.adds) == (12, _exact_adds(b.T))
    assert (f_row.mults, f_row.adds) == (12, _exact_adds(b))
    assert (s_row.mults, s_row.adds) == (18, _exact_adds(a, V))
    # 8-bit weights by fp32 inputs: each multiply weighs 32/32 (the widest input)
    assert counts.ops == 12 + 12 + 18 + _exact_adds(b.T) + _exact_adds(b) + _exact_adds(a, V)
    # the pair with bits alone: values at 8 bits, no mask
    out8 = compress(model, Policy(layers={side: LayerPolicy(rank=R, bits=8)}))
    counts8 = count(out8, context=1.0, config=FP32)
    assert counts8.params == ((V * R + R * D) * 8 + V * 32 + (V + R) * 32) / 32 == 42
    assert (counts8.mults, counts8.adds) == (84, 73)


def _gpt() -> GPT:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()


def _ids(shape=(3, 16), seed=1):
    return torch.randint(0, 40, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "settings",
    [
        LayerPolicy(rank=5),
        LayerPolicy(rank=6, sparsity=0.4, bits=6),
        LayerPolicy(rank=4, rank_method="whiten", bits=8, quant_method="gptq"),
        LayerPolicy(rank=4, rank_method="activation", sparsity=0.3, prune_method="sparsegpt"),
    ],
)
@pytest.mark.parametrize("side", ["head", "wte"])
def test_logits_equal_the_dense_model_with_w_replaced_by_a_b(side, settings):
    model = _gpt()
    out = compress(model, Policy(layers={side: settings}), calib=_ids(seed=3))
    assert out.wte.table is out.head.second.weight and out.wte.proj is out.head.first.weight
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.wte.weight.copy_(out.head.second.weight @ out.head.first.weight)  # the head too
        ids = _ids()
        assert (out(ids) - ref(ids)).abs().max().item() <= 1e-5
        assert not torch.allclose(out(ids), model(ids), atol=1e-3)
    assert model.head.weight is model.wte.weight and type(model.wte) is nn.Embedding


def test_fine_tuning_and_projection_keep_both_sides_on_the_same_tensors():
    model = _gpt()
    out = compress(model, Policy(layers={"head": LayerPolicy(rank=4, bits=4, sparsity=0.5)}))
    params = list(out.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.5)
    ids = _ids()
    loss = nn.functional.cross_entropy(out(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    project_(out)
    first, second = out.head.first, out.head.second
    assert out.wte.table is second.weight and out.wte.proj is first.weight
    for factor in (first, second):
        w = factor.weight.detach()
        assert not w[~factor.mask].any()  # the pruned entries back at zero
        q = w / factor.weight_scale[:, None]
        assert torch.allclose(q, q.round(), atol=1e-4) and float(q.abs().max()) <= 7 + 1e-4
    with torch.no_grad():
        rows = out.wte(ids)
        want = (second.weight[ids] @ first.weight).detach()
        assert torch.equal(rows, want)


def test_data_aware_pair_is_the_closed_form_optimum_and_beats_plain_svd():
    model, calib, rank = _gpt(), _ids((8, 16), seed=4), 4
    stats = input_stats(model, {"wte": model.wte, "head": model.head}, calib)
    w = model.wte.weight.detach().double()
    rows = frequency_rows(stats["wte"].gram)
    f = stats["wte"].gram / stats["wte"].gram.sum()
    assert torch.allclose(rows, (f + 1 / 40).sqrt())  # D = diag(sqrt(f + eps)), eps = 1/V
    t, _ = rank_transform("whiten", stats["head"])  # L, L L^T = the head inputs' Gram (+ ridge)

    def weighted(approx: torch.Tensor) -> float:
        return float((rows[:, None] * (w - approx.detach().double()) @ t).norm())

    # closed form: the tail singular values of D W L
    s = torch.linalg.svdvals(rows[:, None] * w @ t)
    optimum = float(s[rank:].square().sum().sqrt())
    errors = {}
    for method in ("whiten", "plain"):
        policy = Policy(layers={"head": LayerPolicy(rank=rank, rank_method=method)})
        out = compress(model, policy, calib=calib)
        errors[method] = weighted(out.head.second.weight @ out.head.first.weight)
    assert errors["whiten"] == pytest.approx(optimum, rel=1e-5)
    assert errors["plain"] > 1.05 * errors["whiten"]
    # the rule on the table reads the same statistics and builds the same pair
    table_side = compress(
        model, Policy(layers={"wte": LayerPolicy(rank=rank, rank_method="whiten")}), calib=calib
    )
    head_side = compress(
        model, Policy(layers={"head": LayerPolicy(rank=rank, rank_method="whiten")}), calib=calib
    )
    assert torch.equal(table_side.head.first.weight, head_side.head.first.weight)


@pytest.mark.parametrize(
    "settings",
    [
        LayerPolicy(rank=5),
        LayerPolicy(rank=6, sparsity=0.5, bits=4),
        LayerPolicy(rank=4, sparsity=0.5, block=(2, 2), bits=6),
        LayerPolicy(rank=4, rank_method="whiten", bits=8, act_bits=8),
    ],
)
def test_export_round_trip_stores_the_pair_once_and_reties_it(settings, tmp_path):
    model = _gpt()
    policy = Policy(layers={"head": settings})
    out = compress(model, policy, calib=_ids(seed=3))
    counts = count(out, context=8.5)
    round_to_storage(out, counts)
    info = save(out, tmp_path / "m.msz", policy=policy, recipe=model.recipe())
    assert info.counted_params == counts.params and info.exact
    assert abs(info.ratio - 1.0) <= 0.02, info.ratio
    loaded = load(tmp_path / "m.msz", expect_recipe=model.recipe())
    assert isinstance(loaded.wte, TiedLowRankEmbedding)
    assert loaded.wte.table is loaded.head.second.weight  # re-tied: one Parameter
    assert loaded.wte.proj is loaded.head.first.weight
    assert count(loaded, context=8.5).params == counts.params
    with torch.no_grad():
        ids = _ids()
        assert (loaded(ids) - out(ids)).abs().max().item() <= 1e-6


def test_variant_cache_builds_the_pair_together_as_compress_does():
    model, calib = _gpt(), _ids((4, 16), seed=3)
    cache = VariantCache(model, calib=calib)
    for settings in (
        LayerPolicy(rank=4, bits=8, sparsity=0.5),
        LayerPolicy(rank=4, rank_method="whiten"),
    ):
        for side in ("head", "wte"):
            policy = Policy(layers={side: settings})
            built, want = cache.model(policy), compress(model, policy, calib=calib)
            assert built.wte.table is built.head.second.weight
            with torch.no_grad():
                ids = _ids()
                assert torch.allclose(built(ids), want(ids), atol=1e-5)
            assert count(built, context=1.0).params == count(want, context=1.0).params
    hits = cache.hits
    again = cache.model(Policy(layers={"wte": LayerPolicy(rank=4, rank_method="whiten")}))
    assert cache.hits == hits + 1 and again.wte.table is again.head.second.weight
    # one pair from compress_tied: the inputs are copies, untouched
    table, head = compress_tied(model.wte, model.head, LayerPolicy(rank=3))
    assert head.second.weight is table.table and model.head.weight is model.wte.weight


def test_level_store_keeps_a_data_aware_pair_whole_and_tied(tmp_path):
    model, calib = _gpt(), _ids((4, 16), seed=3)
    store = LevelStore(tmp_path / "levels")
    settings = LayerPolicy(rank=4, rank_method="whiten", bits=8, quant_method="gptq")
    policy = Policy(layers={"head": settings})
    first = VariantCache(model, calib=calib, store=store).model(policy)
    assert (store.builds, store.stored_levels()) == (1, 1)  # the pair is one level
    later = LevelStore(tmp_path / "levels")
    again = VariantCache(model, calib=calib, store=later).model(policy)
    assert (later.builds, later.loads) == (0, 1)
    assert again.wte.table is again.head.second.weight  # read back tied
    assert again.wte.proj is again.head.first.weight
    with torch.no_grad():
        ids = _ids()
        assert torch.equal(again(ids), first(ids))


def test_planner_costs_of_a_tied_rank_are_exact(tiny_gpt, corpus):
    from microsweep import Bits
    from microsweep.allocate import Planner

    context = mean_context(32)
    calib = corpus.train[: 8 * 32].view(8, 32)
    rules = {
        "blocks.*.mlp.c_fc": dict(bits=Bits(8, 32)),
        "head": dict(rank=Rank(0.125, 0.75, method="whiten"), bits=Bits(6, 16, 32)),
    }
    with pytest.warns(Warning, match="one tied pair"):
        space = Space(tiny_gpt, rules=rules)
    dense = count(tiny_gpt, context=context)
    baseline = Baseline(dense.params, dense.ops)
    planner = Planner(
        space,
        tiny_gpt,
        context=context,
        config=CountConfig(),
        baseline=baseline,
        calib=calib,
        rank_levels=3,
    )
    head = next(o for o in planner.options if o.unit.key == "head")
    rng = np.random.default_rng(0)
    choices = {tuple(len(o) - 1 for o in planner.options)}
    choices |= {tuple(int(rng.integers(len(o))) for o in planner.options) for _ in range(6)}
    ranked = 0
    for choice in sorted(choices):
        plan, policy = planner.plan(choice), planner.policy(choice)
        ranked += policy.layers["head"].rank is not None
        model = compress(tiny_gpt, policy, calib=calib)
        counted = count(model, context=context)
        assert counted.freebie == (plan.mode == "freebie")
        exact = micronet_score(counted.params, counted.ops, baseline)
        assert plan.score == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert ranked >= 1
    assert math.isfinite(float(head.rho.max()))


def test_sweep_with_rank_on_the_tied_head(tmp_path, sqlite_url, tiny_gpt):
    """A planned sweep: the planner counts the tied unit's ranks, the sensitivity pass probes
    rank on it, and trials run with rank on the head."""
    from sqlalchemy import select

    from microsweep.search import run_sensitivity, run_sweep
    from microsweep.storage import Store
    from microsweep.storage._models import SensitivityRow
    from tests.conftest import ROOT

    source = (ROOT / "examples" / "tiny.py").read_text()
    start = source.index("space = Space(")
    end = source.index("objective = ")
    space_text = (
        "space = Space(\n    model,\n    rules={\n"
        '        "blocks.*.mlp.c_fc": dict(bits=Bits(8, 32)),\n'
        '        "head": dict(rank=Rank(0.25, 0.5), bits=Bits(8, 32)),\n'
        "    },\n)\n\n"
    )
    path = tmp_path / "space.py"
    path.write_text(source[:start] + space_text + source[end:])
    # the whole table: a sweep's own pass measures only what its time budget allows
    run_sensitivity(str(path), name="table", storage=sqlite_url, in_process=True, progress=False)
    result = run_sweep(
        str(path),
        name="tied",
        trials=4,
        storage=sqlite_url,
        seed=0,
        sampler="allocate",
        in_process=True,
        progress=False,
    )
    assert sum(result.states.values()) == 4
    store = Store(sqlite_url)
    with store.session() as session:
        probes = session.execute(
            select(SensitivityRow.level).where(
                SensitivityRow.layer == "head", SensitivityRow.knob == "rank"
            )
        ).all()
    assert probes  # the sensitivity pass measured rank on the tied unit
    rows = store.trials("tied", with_layers=True)
    done = [r for r in rows if r.state in ("COMPLETE", "PRUNED")]
    assert len(done) == 4, [r.reason for r in rows]
    ranked = [r for r in done if r.policy["layers"].get("head", {}).get("rank") is not None]
    assert ranked
    for r in ranked:
        kinds = {lr.layer: lr.kind for lr in r.layers}
        assert kinds["wte"] == "tied_low_rank_embedding" and kinds["head"] == "low_rank"
        assert sum(lr.params for lr in r.layers) == pytest.approx(r.params, rel=1e-9)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("method", ["autoencoder", "shared"])
def test_a_rank_method_that_cannot_tie_is_refused_in_one_line(method):
    model = _gpt()
    with pytest.raises(SpaceError) as exc:
        compress(model, Policy(layers={"head": LayerPolicy(rank=4, rank_method=method)}))
    text = _one_line(exc)
    assert "'head' shares its weight with 'wte'" in text
    assert f"method={method!r}" in text and "'plain', 'activation', 'whiten'" in text
    tied = {"tied": True} if method == "shared" else {}
    with pytest.raises(SpaceError) as exc:
        Space(model, rules={"head": dict(rank=Rank(0.5, method=method), **tied)})
    assert "cannot factorize a table and the head tied to it" in _one_line(exc)
    assert type(model.wte) is nn.Embedding and model.head.weight is model.wte.weight


def test_a_weight_shared_beyond_one_table_and_one_linear_is_refused():
    class Three(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(10, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.aux = nn.Linear(6, 10, bias=False)
            self.head.weight = self.wte.weight
            self.aux.weight = self.wte.weight

        def forward(self, ids):
            x = self.wte(ids)
            return self.head(x) + self.aux(x)

    with pytest.raises(SpaceError) as exc:
        compress(Three(), Policy(layers={"head": LayerPolicy(rank=2)}))
    assert "one embedding table and one Linear only" in _one_line(exc)
