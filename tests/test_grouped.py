"""Grouped rank methods (a basis shared across layers, one decoder per group) and sweeps over the
new layer forms: LSTM gate matrices, embedding tables, tensor-trains, shared bases and
autoencoder codes, from a Space through the driver, the variant cache and the store."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from microsweep import MicroNet, Policy, Space, run_sweep
from microsweep.compress import DecodedLinear, LowRankLinear, VariantCache, compress
from microsweep.errors import SpaceError
from microsweep.export import load, save
from microsweep.score import CountConfig, count, round_to_storage
from microsweep.spaces import Bits, LayerPolicy, Rank, Sparsity
from microsweep.storage import Store

FP32 = CountConfig(freebie=False)


class _Two(nn.Module):
    """Two 8 -> 6 Linears fed the same input (a group with one input size), then a 6 -> 5."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(8, 6)
        self.out = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.a(x) * self.b(x))


def _shared(rank: int = 3) -> Policy:
    return Policy(
        layers={n: LayerPolicy(rank=rank, rank_method="shared", group="ab") for n in ("a", "b")}
    )


def test_shared_basis_is_stored_once_and_reaches_the_stacked_svd_tail():
    torch.manual_seed(0)
    model = _Two()
    c = compress(model, _shared(3))
    assert isinstance(c.a, LowRankLinear) and c.a.first.weight is c.b.first.weight
    # the best rank-3 row space of [W_a; W_b]: the error is exactly the stacked SVD's tail
    stacked = torch.cat([model.a.weight, model.b.weight]).detach().double()
    s = torch.linalg.svdvals(stacked)
    with torch.no_grad():
        got = torch.cat(
            [c.a.second.weight @ c.a.first.weight, c.b.second.weight @ c.b.first.weight]
        )
        err = float(torch.linalg.norm(got.double() - stacked))
    assert err == pytest.approx(float(s[3:].pow(2).sum().sqrt()), rel=1e-4)
    counts = count(c, context=1.0, config=FP32)
    # basis 3*8 = 24 once, coefficients 2 * 6*3 = 36, biases 2*6, head 6*5 + 5 = 35
    assert counts.params == 24 + 36 + 12 + 35
    # per member: basis product 3*8 mults, 3*7 adds; coefficients 6*3 mults, 6*2 adds + 6 bias
    # adds; then a*b: 6 mults (not counted: a plain Python multiply in forward) and the head
    member_mults, member_adds = 3 * 8 + 6 * 3, 3 * 7 + 6 * 2 + 6
    head_mults, head_adds = 6 * 5, 5 * 5 + 5
    mults = sum(r.mults for r in counts.layers if r.name.startswith(("a.", "b.", "out")))
    adds = sum(r.adds for r in counts.layers if r.name.startswith(("a.", "b.", "out")))
    assert (mults, adds) == (2 * member_mults + head_mults, 2 * member_adds + head_adds)


def test_grouped_layers_export_with_one_stored_basis_and_one_decoder(tmp_path):
    torch.manual_seed(1)
    model = _Two()
    decoded = Policy(
        layers={n: LayerPolicy(rank=2, rank_method="autoencoder", group="ab") for n in ("a", "b")}
    )
    x = torch.randn(4, 8)
    for tag, policy in (("shared", _shared(3)), ("ae", decoded)):
        c = compress(model, policy)
        if tag == "ae":
            assert isinstance(c.a, DecodedLinear) and c.a.decoder is c.b.decoder
        counts = count(c, context=1.0)
        if counts.freebie:
            round_to_storage(c, counts)
        path = tmp_path / f"{tag}.msz"
        info = save(c, path, policy=policy, recipe={"builder": "custom", "class": "x._Two"},
                    base=model)  # fmt: skip
        assert abs(info.ratio - 1) <= 0.02
        back = load(path, model=_Two())
        assert torch.allclose(back(x), c(x), atol=1e-6)
        assert count(back, context=1.0).params == counts.params
        if tag == "shared":
            assert back.a.first.weight is back.b.first.weight
        else:
            assert back.a.decoder is back.b.decoder


def test_grouped_methods_are_checked_when_the_space_is_defined():
    model = _Two()
    with pytest.raises(SpaceError, match="tied=True"):
        Space(model, rules={"[ab]": dict(rank=Rank(2, 3, method="shared"))})
    with pytest.raises(SpaceError, match="dense at fp32"):
        Space(model, rules={"[ab]": dict(rank=Rank(2, method="autoencoder"), bits=Bits(4, 8))})
    with pytest.raises(SpaceError, match="one input size"):
        Space(model, rules={"re:.*": dict(rank=Rank(2, method="shared"), tied=True)})
    with pytest.raises(SpaceError, match="dense at fp32"):
        LayerPolicy(rank=2, rank_method="shared", sparsity=0.5)
    space = Space(model, rules={"[ab]": dict(rank=Rank(2, 3, method="shared"), tied=True)})
    policy = space.policy_for({"[ab]": {"rank": 3}})
    assert {lp.group for lp in policy.layers.values()} == {"[ab]"}
    assert Policy.from_json(policy.to_json()) == policy


def test_block_sparsity_with_rank_rounds_the_rank_to_whole_blocks():
    model = _Two()
    space = Space(
        model,
        rules={"[ab]": dict(sparsity=Sparsity(0.5, 0.5, block=(2, 2)), rank=Rank(1, 3))},
    )
    policy = space.policy_for({"a": {"rank": 3}, "b": {"rank": 1}})
    assert [policy.layers[n].rank for n in ("a", "b")] == [2, 2]  # whole 2x2 blocks
    c = compress(model, policy)
    for factor in (c.a.first, c.a.second):
        blocks = factor.weight.reshape(factor.weight.shape[0] // 2, 2, -1, 2).abs().sum((1, 3))
        assert int((blocks == 0).sum()) == round(0.5 * blocks.numel())  # whole blocks pruned
    rows = compress(model, Policy(layers={"a": LayerPolicy(sparsity=0.5, block=(1, 0))}))
    kept = (rows.a.weight != 0).any(dim=1)
    assert int(kept.sum()) == 3 and rows.a.block == (1, 8)  # whole rows, one mask bit each
    assert count(rows, context=1.0, config=FP32).layers[0].params == pytest.approx(
        (3 * 8 * 32 + 6 + 6 * 32) / 32  # kept values, one bit per row, the bias
    )


def test_the_variant_cache_builds_each_group_once():
    torch.manual_seed(2)
    model = _Two()
    cache = VariantCache(model)
    first = cache.model(_shared(3))
    again = cache.model(_shared(3))
    assert again.a is first.a and cache.hits == 1 and cache.misses == 1
    x = torch.randn(3, 8)
    assert torch.equal(first(x), compress(model, _shared(3))(x))


@pytest.mark.slow
def test_a_sweep_over_lstm_gates_and_the_tied_table(tmp_path, corpus):
    from microsweep import models

    model = models.lstm(corpus, n_embd=32, n_hidden=32, n_layer=1, block_size=32,
                        pretrain_steps=60)  # fmt: skip
    space = Space(
        model,
        rules={
            "lstm.weight_*": dict(sparsity=Sparsity(0.0, 0.6, step=0.3), bits=Bits(8, 32),
                                  rank=Rank(0.5, 1.0)),
            "wte": dict(sparsity=Sparsity(0.0, 0.5, step=0.5), bits=Bits(6, 32)),
        },
    )  # fmt: skip
    assert type(model.lstm).__name__ == "LSTM"  # a Space describes gates; the sweep swaps
    url = f"sqlite:///{tmp_path / 'lstm.db'}"
    objective = MicroNet(perplexity_ceiling=1.5, relative_to="dense", baseline="dense",
                         eval_tokens=1024)  # fmt: skip
    result = run_sweep(
        space,
        objective=objective,
        corpus=corpus,
        name="lstm",
        trials=6,
        storage=url,
        sampler="auto",
        seed=0,
        in_process=True,
        progress=False,
    )
    assert type(model.lstm).__name__ == "LinearLSTM"  # the sweep prepared the model in place
    store = Store(url, must_exist=True)
    rows = store.trials("lstm")
    assert sum(result.states.values()) == 6 and all(r.state != "FAIL" for r in rows)
    named = {n for r in rows for n in r.policy["layers"]}
    assert {"wte", "lstm.weight_ih_l0", "lstm.weight_hh_l0"} <= named
    best = min((r for r in rows if r.feasible), key=lambda r: r.score)
    assert best.score < 2.0 and math.isfinite(best.perplexity)  # dense scores 2.0 on itself


@pytest.mark.slow
def test_a_sweep_over_tensor_trains_and_shared_bases(tmp_path, corpus, tiny_gpt):
    space = Space(
        tiny_gpt,
        rules={
            "blocks.*.mlp.c_fc": dict(rank=Rank(4, 8, method="shared"), tied=True),
            "blocks.*.attn.c_attn": dict(rank=Rank(2, 4, method="tt")),
        },
    )
    url = f"sqlite:///{tmp_path / 'tt.db'}"
    objective = MicroNet(perplexity_ceiling=3.0, relative_to="dense", baseline="dense",
                         eval_tokens=1024)  # fmt: skip
    run_sweep(space, objective=objective, corpus=corpus, name="tt", trials=4, storage=url,
              sampler="random", seed=0, in_process=True, progress=False)  # fmt: skip
    rows = Store(url, must_exist=True).trials("tt")
    assert len(rows) == 4 and all(r.state == "COMPLETE" for r in rows)
    kinds = {lp.get("rank_method") for r in rows for lp in r.policy["layers"].values()}
    assert kinds == {"shared", "tt"}


def test_the_planner_counts_a_shared_basis_once_as_the_trial_does():
    """Exact costs hold for grouped methods too: the planned score of every choice equals the
    count of the model compressed by its policy (the basis stored once)."""
    from microsweep.allocate import Planner
    from microsweep.score import Baseline, micronet_score

    torch.manual_seed(3)
    model = _Two()
    space = Space(
        model,
        rules={
            "[ab]": dict(rank=Rank(1, 2, 3, method="shared"), tied=True),
            "out": dict(bits=Bits(4, 8, 32)),
        },
    )
    dense = count(model, context=1.0)
    baseline = Baseline(params=dense.params, ops=dense.ops)
    planner = Planner(space, model, context=1.0, config=CountConfig(), baseline=baseline)
    shared = next(o for o in planner.options if o.unit.key == "[ab]")
    assert len(shared) == 3  # ranks 3, 2, 1
    for k in range(len(shared)):
        for j in range(len(planner.options[1])):
            choice = (k, j) if planner.options[0] is shared else (j, k)
            plan = planner.plan(choice)
            counted = count(compress(model, planner.policy(choice)), context=1.0)
            exact = micronet_score(counted.params, counted.ops, baseline)
            assert plan.score == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_grouped_methods_on_single_layers_plan_and_order_does_not_matter():
    from microsweep.allocate import Planner
    from microsweep.score import Baseline

    torch.manual_seed(4)
    model = _Two()
    dense = count(model, context=1.0)
    baseline = Baseline(params=dense.params, ops=dense.ops)
    for rules in (
        {"a": dict(rank=Rank(2, 3, method="autoencoder"))},  # untied: a decoder per layer
        {"b": dict(rank=Rank(2, 3, method="shared"), tied=True)},  # a tied rule of one layer
    ):
        planner = Planner(Space(model, rules=rules), model, context=1.0, config=CountConfig(),
                          baseline=baseline)  # fmt: skip
        assert len(planner.options[0]) == 2
    # one decoder trained on the group's rows in one order, whatever order the policy lists
    layers = {n: LayerPolicy(rank=2, rank_method="autoencoder", group="g") for n in ("b", "a")}
    x = torch.randn(3, 8)
    one = compress(model, Policy(layers=layers))(x)
    other = compress(model, Policy(layers=dict(reversed(list(layers.items())))))(x)
    assert torch.equal(one, other)


def test_block_rounded_ranks_stay_valid_and_warm_start():
    import optuna

    model = _Two()
    space = Space(model, rules={"[ab]": dict(sparsity=Sparsity(0.5, 0.5, block=(2, 2)),
                                             rank=Rank(1, 3))})  # fmt: skip
    policy = space.policy_for({"a": {"rank": 3}, "b": {"rank": 1}})
    params = space.params_from_policy(policy)  # ranks rounded to blocks still warm-start
    assert space.suggest(optuna.trial.FixedTrial(params)) == policy
    wide = Space(model, rules={"a": dict(sparsity=Sparsity(0.5, 0.5, block=(6, 8)),
                                         rank=Rank(1, 2))})  # fmt: skip
    # one 6x8 block is wider than the layer's full rank: the layer stays unfactorized
    assert wide.policy_for({"a": {"rank": 2}}).layers["a"].rank is None


def test_running_an_lstm_with_linear_gates_draws_no_random_numbers():
    from microsweep.models import linear_gates_

    class _Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 5)

    wrapped = _Wrap()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    linear_gates_(wrapped)
    assert torch.equal(torch.rand(3), expected)
    assert not any(p.is_meta for p in wrapped.parameters())
