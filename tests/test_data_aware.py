"""Data-aware methods under the existing knobs: `Sparsity(method="wanda" | "sparsegpt")` and
`Bits(method="gptq")` on a real model, through `compress`, the per-worker variant cache and the
planner; formats, counts and policies as before, less perplexity lost."""

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
    with pytest.raises(SpaceError, match="embedding"):
        compress(
            tiny_gpt,
            Policy(layers={"wte": LayerPolicy(sparsity=0.5, prune_method="wanda")}),
            calib=torch.zeros(2, 8, dtype=torch.long),
        )


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
