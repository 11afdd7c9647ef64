"""Data-aware methods under the existing knobs: `Sparsity(method="wanda" | "sparsegpt")` and
`Bits(method="gptq")` on a real model, through `compress`, the per-worker variant cache and the
planner; formats, counts and policies as before, less perplexity lost. Embedding tables take
them through their token frequencies (the diagonal of their one-hot inputs' Gram matrix)."""

from __future__ import annotations

import optuna
import pytest
import torch

from microsweep.compress import VariantCache, compress
from microsweep.errors import SpaceError
from microsweep.policy import LayerPolicy, Policy
from microsweep.score import eval_windows, perplexity
from microsweep.spaces import Bits, Space, Sparsity

MLP = [f"blocks.{b}.mlp.{n}" for b in range(2) for n in ("c_fc", "c_proj")]


def _policy(**settings) -> Policy:
    return Policy(layers={name: LayerPolicy(**settings) for name in MLP})


@pytest.fixture(scope="module")
def setup(tiny_gpt, corpus):
    windows = eval_windows(corpus.val, window=32, max_tokens=2048)
    calib = corpus.train[: 32 * 32].view(32, 32)
    return tiny_gpt, windows, calib


def test_sparsegpt_and_gptq_lose_less_than_magnitude_and_rtn(setup) -> None:
    model, windows, calib = setup
    ppl = {}
    for label, settings in {
        "magnitude": dict(sparsity=0.7),
        "sparsegpt": dict(sparsity=0.7, prune_method="sparsegpt"),
        "wanda": dict(sparsity=0.7, prune_method="wanda"),
        "rtn": dict(bits=3),
        "gptq": dict(bits=3, quant_method="gptq"),
        "joint": dict(sparsity=0.5, bits=4, prune_method="sparsegpt", quant_method="gptq"),
        "plain": dict(sparsity=0.5, bits=4),
    }.items():
        ppl[label] = perplexity(compress(model, _policy(**settings), calib=calib), windows)
    dense = perplexity(model, windows)
    assert ppl["sparsegpt"] - dense < 0.7 * (ppl["magnitude"] - dense), ppl
    assert ppl["gptq"] < ppl["rtn"], ppl  # (Wanda's edge needs outlier features: not asserted)
    assert ppl["joint"] < ppl["plain"], ppl


def test_formats_are_those_of_the_plain_methods(setup) -> None:
    """Exactly round(s * numel) zeros per matrix and every value on its row's grid, at a rank
    too (each factor pruned with the statistics that reach it)."""
    model, _, calib = setup
    for settings in (
        dict(sparsity=0.5, bits=4, prune_method="sparsegpt", quant_method="gptq"),
        dict(sparsity=0.3, bits=3, prune_method="wanda", quant_method="gptq", act_order=True),
        dict(sparsity=0.5, bits=4, rank=16, prune_method="sparsegpt", quant_method="gptq"),
    ):
        out = compress(model, _policy(**settings), calib=calib)
        for name in MLP:
            layer = out.get_submodule(name)
            mats = [layer] if not hasattr(layer, "first") else [layer.first, layer.second]
            for m in mats:
                w = m.weight.detach()
                assert int((w == 0).sum()) >= round(settings["sparsity"] * w.numel())
                assert int((~m.mask).sum()) == round(settings["sparsity"] * w.numel())
                steps = w / m.weight_scale[:, None]
                assert torch.allclose(steps, steps.round(), atol=1e-3)
                assert int(steps.round().abs().max()) <= 2 ** (settings["bits"] - 1) - 1


def test_the_variant_cache_builds_what_compress_builds(setup) -> None:
    model, _, calib = setup
    policy = _policy(sparsity=0.6, bits=4, prune_method="sparsegpt", quant_method="gptq")
    cache = VariantCache(model, calib=calib)
    cached = cache.model(policy)
    direct = compress(model, policy, calib=calib)
    for name in MLP:
        assert torch.equal(cached.get_submodule(name).weight, direct.get_submodule(name).weight)
    again = cache.model(policy)
    assert cache.hits >= len(MLP) and again.get_submodule(MLP[0]) is cached.get_submodule(MLP[0])


def test_policies_space_and_bad_input(tiny_gpt) -> None:
    """Methods travel in the policy JSON only when not the default (old policies read as
    before), show in the summary, come from the knobs, and are refused where they cannot act."""
    lp = LayerPolicy(sparsity=0.5, bits=4, prune_method="sparsegpt", quant_method="gptq")
    assert LayerPolicy.from_json(lp.to_json()) == lp
    assert LayerPolicy.from_json({"sparsity": 0.5, "bits": 4}).prune_method == "magnitude"
    assert "s=0.50/sgpt w4/gptq" in Policy(layers={"x": lp}).summary()
    assert LayerPolicy(bits=32, quant_method="gptq", act_order=True).quant_method == "rtn"
    space = Space(
        tiny_gpt,
        rules={
            "blocks.*.mlp.*": dict(
                sparsity=Sparsity(0.5, 0.5, method="wanda"), bits=Bits(4, method="gptq")
            )
        },
    )
    policy = space.suggest(optuna.trial.FixedTrial({}))
    assert {(p.prune_method, p.quant_method) for p in policy.layers.values()} == {("wanda", "gptq")}
    with pytest.raises(SpaceError, match="method 'bogus'"):
        Sparsity(0.1, 0.5, method="bogus")
    with pytest.raises(SpaceError, match="act_order"):
        Bits(4, act_order=True)
    with pytest.raises(SpaceError, match="act_bits rounds inputs to nearest"):
        Space(tiny_gpt, rules={"blocks.*.mlp.*": dict(act_bits=Bits(8, method="gptq"))})
    with pytest.raises(SpaceError, match="calib"):
        compress(tiny_gpt, _policy(sparsity=0.5, prune_method="sparsegpt"))
    with pytest.raises(SpaceError, match="calib"):
        compress(tiny_gpt, Policy(layers={"wte": LayerPolicy(bits=4, quant_method="gptq")}))
    table = Space(
        tiny_gpt,
        rules={
            "wte": dict(
                sparsity=Sparsity(0.5, 0.5, method="sparsegpt"), bits=Bits(4, method="gptq")
            )
        },
    )
    chosen = table.suggest(optuna.trial.FixedTrial({})).layers["wte"]
    assert (chosen.prune_method, chosen.quant_method) == ("sparsegpt", "gptq")


def test_a_planned_sweep_with_data_aware_methods_exports_what_it_measured(
    tmp_path, tiny_gpt, corpus
) -> None:
    """`auto` plans over data-aware levels (sensitivity probes and options built with them),
    every trial runs, and an exported trial reloads with its stored perplexity and a payload
    equal to its count."""
    from microsweep import MicroNet, run_sweep
    from microsweep.export import export_trial, load
    from microsweep.storage import Store

    space = Space(
        tiny_gpt,
        rules={
            "blocks.*.mlp.*": dict(
                sparsity=Sparsity(0.0, 0.6, step=0.3, method="sparsegpt"),
                bits=Bits(4, 8, method="gptq"),
            )
        },
    )
    objective = MicroNet(
        perplexity_ceiling=1.2, relative_to="dense", baseline="dense", eval_tokens=2048
    )
    url = f"sqlite:///{tmp_path / 'da.db'}"
    result = run_sweep(
        space, objective=objective, corpus=corpus, name="da", trials=4, storage=url,
        sampler="auto", seed=0, in_process=True, progress=False,
    )  # fmt: skip
    assert sum(result.states.values()) == 4 and "FAIL" not in result.states
    store = Store(url, must_exist=True)
    rows = store.trials("da")
    store.dispose()
    assert all(
        lp.get("prune_method", "sparsegpt") == "sparsegpt" and lp.get("quant_method") == "gptq"
        for r in rows
        for lp in r.policy["layers"].values()
        if lp.get("bits", 32) < 32
    )
    windows = eval_windows(corpus.val, window=32, max_tokens=2048)
    done = [r for r in rows if r.state == "COMPLETE"]
    assert done
    for row in done[:2]:
        path = tmp_path / f"t{row.number}.msz"
        info = export_trial("da", row.number, path, storage=url, space=space, corpus=corpus)
        assert abs(info.ratio - 1.0) <= 0.02 and info.exact
        assert perplexity(load(path), windows) == pytest.approx(row.perplexity, rel=1e-4)


def test_group_wise_scales_counted_by_hand_projected_and_exported(tmp_path, tiny_gpt, corpus):
    """`Bits(4, group=g)`: one fp32 scale per row and run of g input columns, each counted;
    fine-tuning's projection keeps the group grid; an export stores exactly the count and
    reloads the same model."""
    from torch import nn

    from microsweep.compress import project_
    from microsweep.export import load, save
    from microsweep.score import count

    layer = nn.Sequential(nn.Linear(8, 4, bias=False))
    small = compress(layer, Policy(layers={"0": LayerPolicy(bits=4, quant_group=2)}))
    assert small[0].weight_scale.shape == (4, 4)
    # 32 values at 4 bits = 4 params, plus 16 scales at 32 bits = 16 params
    assert count(small, context=1.0).params == pytest.approx(4 + 16)
    with pytest.raises(SpaceError, match="group=3 does not divide"):
        compress(layer, Policy(layers={"0": LayerPolicy(bits=4, quant_group=3)}))

    calib = corpus.train[: 32 * 32].view(32, 32)
    policy = _policy(bits=4, quant_group=16, quant_method="gptq")
    model = compress(tiny_gpt, policy, calib=calib)
    fc = model.get_submodule(MLP[0])
    assert fc.group == 16 and fc.weight_scale.shape == (fc.out_features, fc.in_features // 16)
    with torch.no_grad():
        fc.weight.add_(1e-3)
    project_(model)
    steps = fc.weight / fc.weight_scale.repeat_interleave(16, dim=1)
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    info = save(model, tmp_path / "g.msz", policy=policy, recipe=tiny_gpt.recipe())
    assert abs(info.ratio - 1.0) <= 0.02 and info.exact
    assert info.counted_params == pytest.approx(count(model, context=16.5).params, rel=1e-12)
    back = load(tmp_path / "g.msz")
    ids = corpus.val[:64].view(2, 32)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    assert "w4/gptq/g16" in policy.summary()
    space = Space(tiny_gpt, rules={"blocks.*.mlp.*": dict(bits=Bits(4, group=16))})
    chosen = space.suggest(optuna.trial.FixedTrial({}))
    assert {lp.quant_group for lp in chosen.layers.values()} == {16}


def test_lstm_gate_matrices_take_the_data_aware_methods(corpus) -> None:
    """A gate's inputs (the layer input, the previous hidden state) reach its statistics when
    the LSTM runs as LinearLSTM, so SparseGPT and GPTQ apply there as on a Linear."""
    from microsweep import models

    model = models.lstm(corpus, n_embd=32, n_hidden=32, n_layer=1, pretrain_steps=200)
    gates = ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]
    calib = corpus.train[: 32 * 32].view(32, 32)
    windows = eval_windows(corpus.val, window=32, max_tokens=2048)
    dense = perplexity(model, windows)

    def loss(**settings) -> float:
        policy = Policy(layers={g: LayerPolicy(**settings) for g in gates})
        return perplexity(compress(model, policy, calib=calib), windows) - dense

    assert loss(sparsity=0.6, prune_method="sparsegpt") < 0.5 * loss(sparsity=0.6)
    assert loss(bits=3, quant_method="gptq") < loss(bits=3)


def test_sensitivity_levels_are_named_by_method() -> None:
    """A data-aware level is another measurement: its sensitivity key names the method, so a
    sweep never reuses a magnitude or round-to-nearest probe for it (stored keys of the plain
    methods are unchanged)."""
    from microsweep.allocate import level_key

    assert level_key("sparsity", LayerPolicy(sparsity=0.5)) == "0.5"
    assert level_key("sparsity", LayerPolicy(sparsity=0.5, block=(4, 4))) == "0.5@4x4"
    sgpt = LayerPolicy(sparsity=0.5, prune_method="sparsegpt")
    assert level_key("sparsity", sgpt) == "0.5/sparsegpt"
    assert level_key("bits", LayerPolicy(bits=4)) == "4"
    assert level_key("bits", LayerPolicy(bits=4, quant_method="gptq", act_order=True)) == (
        "4/gptq+ao"
    )
    assert level_key("bits", LayerPolicy(bits=4, quant_group=32)) == "4/g32"
    assert level_key("act_bits", LayerPolicy(act_bits=8, bits=4, quant_method="gptq")) == "8"


def test_the_variant_cache_computes_each_layers_statistics_once(setup, monkeypatch) -> None:
    """Statistics depend only on the base and the calibration tokens: new data-aware levels
    of the same layers in later trials reuse them instead of running calibration again."""
    import microsweep.compress._cache as cache_module

    model, _, calib = setup
    passes: list[list[str]] = []
    real = cache_module.input_stats

    def counted(base, modules, tokens):  # noqa: ANN001, ANN202
        passes.append(sorted(modules))
        return real(base, modules, tokens)

    monkeypatch.setattr(cache_module, "input_stats", counted)
    cache = VariantCache(model, calib=calib)
    cache.model(_policy(sparsity=0.5, prune_method="sparsegpt"))
    cache.model(_policy(sparsity=0.7, prune_method="wanda"))
    cache.model(_policy(bits=3, quant_method="gptq"))
    assert passes == [sorted(MLP)]


def _table(model, calib: torch.Tensor, **settings) -> torch.nn.Module:
    """The tied GPT's token table after compressing it alone with `settings`."""
    out = compress(model, Policy(layers={"wte": LayerPolicy(**settings)}), calib=calib)
    assert out.head.weight is out.wte.weight  # the tied head follows the table
    return out.wte


def test_a_tables_statistics_are_its_token_frequencies(setup) -> None:
    """A table's input statistics are a (V,) vector of lookup frequencies (no V x V matrix);
    GPTQ has nothing to compensate there, so it is round-to-nearest exactly (groups and
    act-order too)."""
    from microsweep.compress import input_stats

    model, _, calib = setup
    stats = input_stats(model, {"wte": model.wte}, calib)["wte"]
    counts = torch.bincount(calib.flatten(), minlength=65).double()
    assert stats.diagonal and stats.rows == calib.numel()
    assert torch.equal(stats.gram, counts / calib.numel()) and int((counts == 0).sum()) > 0
    for extra in ({}, {"quant_group": 8}, {"quant_group": 8, "act_order": True}):
        rtn = _table(model, calib, bits=3, **extra)
        gptq = _table(model, calib, bits=3, quant_method="gptq", **extra)
        assert torch.equal(gptq.weight, rtn.weight) and torch.equal(
            gptq.weight_scale, rtn.weight_scale
        )
    pruned = _table(model, calib, sparsity=0.5, bits=4, prune_method="sparsegpt")
    joint = _table(
        model, calib, sparsity=0.5, bits=4, prune_method="sparsegpt", quant_method="gptq"
    )
    assert torch.equal(joint.weight, pruned.weight) and torch.equal(joint.mask, pruned.mask)


def test_a_table_is_pruned_by_frequency_weighted_saliency(setup) -> None:
    """Uniform frequencies give magnitude pruning exactly; skewed ones (the corpus's) lose
    less frequency-weighted error sum_t f_t ||row_t - row_t'||^2 at exactly round(s * numel)
    zeros, tokens never looked up going first; blocks as well."""
    from microsweep.compress._prune import magnitude_mask

    model, _, calib = setup
    table = model.wte.weight.detach()
    uniform = torch.arange(65).repeat(32).view(65, 32)  # every token 32 times
    for s in (0.3, 0.7):
        assert torch.equal(
            _table(model, uniform, sparsity=s, prune_method="sparsegpt").mask,
            magnitude_mask(table, s),
        )
    freq = torch.bincount(calib.flatten(), minlength=65).double() / calib.numel()

    def error(pruned: torch.Tensor) -> float:
        return float((freq[:, None] * (table - pruned.detach()).double() ** 2).sum())

    for s in (0.3, 0.7):
        magnitude = error(_table(model, calib, sparsity=s).weight)
        for method in ("sparsegpt", "wanda"):
            out = _table(model, calib, sparsity=s, prune_method=method)
            assert int((~out.mask).sum()) == round(s * table.numel())
            assert error(out.weight) < 0.5 * magnitude, (method, s)
    out = _table(model, calib, sparsity=0.4, prune_method="sparsegpt")
    assert not out.mask[freq == 0].any()  # 19 unseen of 65 tokens: all their entries go
    blocks = _table(model, calib, sparsity=0.5, block=(1, 8), prune_method="sparsegpt")
    assert int((~blocks.mask).sum()) == 8 * round(0.5 * table.numel() / 8)
    assert error(blocks.weight) < error(_table(model, calib, sparsity=0.5, block=(1, 8)).weight)
    cached = VariantCache(model, calib=calib).model(
        Policy(layers={"wte": LayerPolicy(sparsity=0.5, prune_method="wanda")})
    )
    assert torch.equal(
        cached.wte.weight, _table(model, calib, sparsity=0.5, prune_method="wanda").weight
    )


def test_a_tied_table_by_sparsegpt_and_gptq_exports_what_it_counts(setup, tmp_path) -> None:
    """The table keeps its format: an export stores exactly the count and reloads the same
    model, the head tied to the table."""
    from microsweep.export import load, round_to_storage, save
    from microsweep.score import count

    model, windows, calib = setup
    settings = dict(sparsity=0.5, bits=4, prune_method="sparsegpt", quant_method="gptq")
    policy = Policy(layers={"wte": LayerPolicy(**settings), **_policy(**settings).layers})
    out = compress(model, policy, calib=calib)
    round_to_storage(out, count(out, context=16.5))
    info = save(out, tmp_path / "t.msz", policy=policy, recipe=model.recipe())
    assert abs(info.ratio - 1.0) <= 0.02 and info.exact and info.uncounted_bytes == 0
    back = load(tmp_path / "t.msz")
    assert back.head.weight is back.wte.weight
    assert count(back, context=16.5).params == count(out, context=16.5).params
    assert perplexity(back, windows) == pytest.approx(perplexity(out, windows), rel=1e-6)


def test_a_factorized_table_prunes_both_factors_on_its_statistics(corpus) -> None:
    """At a rank, the (V, r) table reads the token frequencies and the r -> d projection the
    looked-up rows' Gram matrix T^T diag(f) T: exact counts on both factors, and less
    frequency-weighted error than magnitude pruning of the same factors."""
    from tests._tiny import pretrained

    model = pretrained(corpus)
    calib = corpus.train[: 32 * 32].view(32, 32)
    table = model.emb.weight.detach().double()
    freq = torch.bincount(calib.flatten(), minlength=table.shape[0]).double() / calib.numel()

    def error(**settings) -> float:
        out = compress(model, Policy(layers={"emb": LayerPolicy(rank=16, **settings)}), calib=calib)
        pair = out.emb
        for factor in (pair.first, pair.second):
            assert int((~factor.mask).sum()) == round(0.5 * factor.weight.numel())
        rebuilt = pair(torch.arange(table.shape[0])).detach().double()
        return float((freq[:, None] * (table - rebuilt) ** 2).sum())

    assert error(sparsity=0.5, prune_method="sparsegpt") < error(sparsity=0.5)
