"""Frequency bands of a table or output head: exact counts by hand, perplexity equal to the dense
model of the same reconstructed table, export round trips, and a Space of bands on a tied GPT's
head whose planner costs are exact and whose sweep completes trials."""

from __future__ import annotations

import copy
import math

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from microsweep import Bands, Bits, MicroNet, Policy, Rank, Space, Sparsity, run_sweep
from microsweep.allocate import Planner
from microsweep.compress import BandedEmbedding, BandedHead, VariantCache, compress, token_order
from microsweep.errors import SpaceError
from microsweep.export import load, save
from microsweep.policy import LayerPolicy
from microsweep.score import Baseline, CountConfig, count, mean_context, micronet_score, perplexity
from microsweep.storage import Store, unpack_layer_counts

V, D = 20, 8
CONTEXT = mean_context(32)


class TiedLM(nn.Module):
    """A table and a head sharing one (V, d) weight, with nothing between them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight
        t = torch.arange(V, dtype=torch.float64)[:, None]
        j = torch.arange(D, dtype=torch.float64)[None, :]
        # row t has magnitudes in (t + 0.9, t + 1.1): rows are ordered by magnitude, and the
        # small wobble keeps every band's matrix of full rank
        with torch.no_grad():
            self.emb.weight.copy_((t + 1 + 0.1 * torch.sin(3 * t + 5 * j + 1)).float())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def _calib() -> torch.Tensor:
    """Token t appears 20 - t times: the frequency order is 0, 1, ..., 19 (210 tokens)."""
    ids = torch.cat([torch.full((V - t,), t) for t in range(V)])
    return ids.view(10, 21)


POLICY = Policy(
    layers={
        "head@0": LayerPolicy(band=(0, 2)),  # untouched: the dense rest band
        "head@1": LayerPolicy(band=(2, 6), rank=2, bits=8, act_bits=8),
        "head@2": LayerPolicy(band=(6, 20), sparsity=0.5, bits=4),
    }
)


def test_counts_by_hand():
    model = compress(TiedLM(), POLICY, calib=_calib())
    assert isinstance(model.head, BandedHead) and isinstance(model.emb, BandedEmbedding)
    assert model.head.bands is model.emb.bands  # tied: one set of bands
    assert list(model.head.bands.bands) == ["head@1", "head@2", "rest"]
    band1, band2, rest = model.head.bands.bands.values()
    assert rest.rows.weight.shape == (2, D) and band1.rank == 2
    assert torch.equal(band1.words, torch.arange(2, 6)) and rest.words is None
    assert torch.equal(model.head.bands.order, torch.arange(2, 20))
    # the sparse band lost its 7 smallest rows whole; the factors are fully non-zero
    assert int((band2.rows.weight != 0).sum()) == 56
    assert (band2.rows.weight != 0).any(1).tolist() == [False] * 7 + [True] * 7
    assert bool((band1.table.weight != 0).all()) and bool((band1.proj.weight != 0).all())

    counts = count(nn.ModuleList([model.emb, model.head]), context=1.0)
    assert not counts.freebie
    bits = (
        18 * 5  # word order: the 4 + 14 words of the stored bands at ceil(log2 20) = 5 bits
        + 4 * 2 * 8 + 4 * 32  # band 1 table (4, 2) at 8 bits and its row scales
        + 2 * 8 * 8 + 2 * 32  # band 1 projection (2, 8) at 8 bits and its row scales
        + 32  # band 1's scale of the head's input (act_bits 8)
        + 56 * 4 + 14 * 8 + 14 * 32  # band 2: kept values at 4 bits, mask, row scales
        + 2 * 8 * 32  # the rest band, dense fp32
    )  # fmt: skip
    assert counts.params == bits / 32
    share = (18 + 17 + 16 + 15) / 210  # band 1's words' share of the calibration tokens
    assert band1.share == pytest.approx(share, rel=1e-12)
    # each band's row: its words, its head logits (every token) and its table projection
    # (words' bits, multiplies, of which weighted 1/4, adds): band 1's P_b h multiplies an
    # 8-bit weight by the 8-bit input (8/32 each); every other multiply has an fp32 input
    want = {
        "head@1": (4 * 5, 2 * 8 + 4 * 2 + 8 * 2 * share, 2 * 8, 2 * 7 + 4 * 1 + 8 * 1 * share),
        "head@2": (14 * 5, 56, 0, 7 * 7),  # 7 empty rows: 7 rows of 8 non-zeros, 7 adds each
        "rest": (0, 2 * 8, 0, 2 * 7),  # dense, no words stored
    }
    rows = {lc.name.rpartition(".")[2]: lc for lc in counts.layers if lc.kind == "band"}
    for key, (word_bits, mults, quarter, adds) in want.items():
        assert rows[key].value_bits == word_bits
        assert rows[key].mults == pytest.approx(mults, rel=1e-12)
        assert rows[key].mults_w == pytest.approx(mults - 0.75 * quarter, rel=1e-12)
        assert rows[key].adds == pytest.approx(adds, rel=1e-12)
    assert sum(lc.ops for lc in counts.layers if lc.kind != "band") == 0
    total = sum(m - 0.75 * q + a for _, m, q, a in want.values())
    assert counts.ops == pytest.approx(total, rel=1e-12)

    # with every width >= 16 the allowance halves the weights but not the word order
    wide = Policy(layers={"head@1": LayerPolicy(band=(2, 6), rank=2, bits=16)})
    counted = count(compress(TiedLM(), wide, calib=_calib()).head, context=1.0)
    assert counted.freebie
    assert counted.params == (4 * 5 + (4 * 2 + 2 * 8 + 4 + 2 + 16 * 8) * 16) / 32


def test_untouched_bands_cost_the_plain_layer_and_bands_add_up():
    """Each band's cost alone, summed, is the cost of banding them together: isolation is exact."""
    base, calib = TiedLM(), _calib()
    identity = Policy(layers={f"head@{i}": LayerPolicy(band=b) for i, b in
                              enumerate([(0, 2), (2, 6), (6, 20)])})  # fmt: skip
    same = compress(base, identity, calib=calib)
    assert type(same.head) is nn.Linear and type(same.emb) is nn.Embedding

    def score(policy: Policy) -> tuple[float, float]:
        model = compress(base, policy, calib=calib)
        counted = count(model, context=1.0, config=CountConfig(freebie=False))  # one mode
        return counted.params, counted.ops

    dense = score(Policy())
    both = score(POLICY)
    alone = [score(Policy(layers={n: POLICY.layers[n]})) for n in ("head@1", "head@2")]
    for k in range(2):
        assert both[k] - dense[k] == pytest.approx(sum(a[k] - dense[k] for a in alone), 1e-12)


def test_banded_logits_equal_the_dense_model_of_the_reconstructed_table(tiny_gpt, corpus):
    calib = corpus.train[: 8 * 32].view(8, 32)
    policy = Policy(
        layers={
            "head@0": LayerPolicy(band=(0, 6), bits=8),
            "head@1": LayerPolicy(band=(6, 20), rank=8, bits=6, sparsity=0.3),
            "head@2": LayerPolicy(band=(20, 65), rank=4, sparsity=0.5, block=(1, 4)),
        }
    )
    banded = compress(tiny_gpt, policy, calib=calib)
    bands = banded.head.bands
    # the words: ranked by frequency in calib, ties by token id
    order, counts = token_order(calib, 65)
    assert torch.equal(bands.words(), order)
    assert all(counts[order[i]] >= counts[order[i + 1]] for i in range(64))
    dense = copy.deepcopy(tiny_gpt)
    table = torch.empty_like(dense.wte.weight)
    with torch.no_grad():
        table[bands.words()] = torch.cat([b.weight_matrix() for b in bands.bands.values()])
        dense.wte.weight.copy_(table)  # the head is tied to it
    windows = corpus.val[: 16 * 32].view(16, 32)
    got, want = perplexity(banded, windows), perplexity(dense, windows)
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(perplexity(tiny_gpt, windows), rel=1e-3)  # it did compress
    with torch.no_grad():
        probs = torch.softmax(banded(windows[:2]), -1)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 32), atol=1e-5)  # a full distribution


@pytest.mark.parametrize("widths", [(8, 4), (16, 16)])
def test_export_round_trip(tmp_path, tiny_gpt, corpus, widths):
    calib = corpus.train[: 8 * 32].view(8, 32)
    policy = Policy(
        layers={
            "head@0": LayerPolicy(band=(0, 10)),
            "head@1": LayerPolicy(
                band=(10, 30), rank=6, bits=widths[0], act_bits=widths[0], sparsity=0.25
            ),
            "head@2": LayerPolicy(band=(30, 65), rank=3, bits=widths[1]),
        }
    )
    model = compress(tiny_gpt, policy, calib=calib)
    if widths[0] >= 16:  # the 16-bit allowance: store what is evaluated
        from microsweep.score import round_to_storage

        assert round_to_storage(model, count(model, context=CONTEXT))
    path = tmp_path / "banded.msz"
    info = save(model, path, policy=policy, recipe=tiny_gpt.recipe())
    assert info.freebie == (widths[0] >= 16)
    assert info.ratio == pytest.approx(1.0, abs=0.02)
    assert info.exact
    loaded = load(path, expect_recipe=tiny_gpt.recipe())
    assert loaded.head.bands is loaded.wte.bands  # the tie is rebuilt, stored once
    ids = corpus.val[:64].view(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert count(loaded, context=CONTEXT).params == count(model, context=CONTEXT).params


HEAD_RULES = {
    "head": dict(
        bands=Bands(0.1, 0.3),
        rank=Rank(0.1, 1.0),
        bits=Bits(4, 8, 16),
        act_bits=Bits(8, 32),
        sparsity=Sparsity(0, 0.6, step=0.3),
    ),
    "blocks.*.mlp.c_fc": dict(bits=Bits(4, 8, 32)),
}


def test_space_of_bands_on_a_tied_head(tiny_gpt, corpus):
    space = Space(tiny_gpt, rules=HEAD_RULES)
    bands = [i for i in space.layers if i.kind == "band"]
    assert [(i.name, i.band, i.out_features, i.in_features) for i in bands] == [
        ("head@0", (0, 6), 6, 32),  # round(0.1 * 65) = 6
        ("head@1", (6, 20), 14, 32),
        ("head@2", (20, 65), 45, 32),
    ]
    unit = next(u for u in space.units() if u.key == "head@1")
    assert dict(unit.params) == {k: f"head@1:{k}" for k in ("rank", "bits", "act_bits", "sparsity")}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(5):
        policy = space.suggest(study.ask())
        assert policy.layers["head@2"].band == (20, 65)
        assert space.suggest(optuna.trial.FixedTrial(space.params_from_policy(policy))) == policy
    # one line for what bands cannot take
    for bad, match in [
        (dict(bands=Bands(0.1), tied=True), "tied"),
        (dict(bands=Bands(0.001)), "without rows"),
        (dict(bands=Bands(0.1), rank=Rank(0.5, method="tt")), "plain SVD"),
        (dict(bands=(0.1, 0.3)), "Bands"),
    ]:
        with pytest.raises(SpaceError, match=match):
            Space(tiny_gpt, rules={"head": bad})
    with pytest.raises(SpaceError, match="not a mix|increase|in \\(0, 1\\)"):
        Bands(0.3, 0.1)


def test_planner_costs_of_band_units_are_exact(tiny_gpt, corpus):
    calib = corpus.train[: 8 * 32].view(8, 32)
    space = Space(tiny_gpt, rules=HEAD_RULES)
    dense = count(tiny_gpt, context=CONTEXT)
    baseline = Baseline(dense.params, dense.ops)
    planner = Planner(
        space, tiny_gpt, context=CONTEXT, config=CountConfig(), baseline=baseline, calib=calib,
        rank_levels=3,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    choices = [tuple(int(rng.integers(len(o))) for o in planner.options) for _ in range(8)]
    choices.append(tuple(len(o) - 1 for o in planner.options))
    for _ in range(2):  # widths >= 16 everywhere: the 16-bit allowance
        choices.append(
            tuple(
                int(rng.choice(np.flatnonzero(np.isfinite(o.cost[:, 1])))) for o in planner.options
            )  # fmt: skip
        )
    cache = VariantCache(tiny_gpt, calib=calib)
    modes = set()
    for choice in choices:
        plan = planner.plan(choice)
        modes.add(plan.mode)
        policy = planner.policy(choice)
        assert any(isinstance(m, BandedHead) for m in cache.model(policy).modules()) or all(
            policy.layers[f"head@{i}"].is_identity for i in range(3)
        )
        model = compress(tiny_gpt, policy, calib=calib)
        counted = count(model, context=CONTEXT)
        assert counted.freebie == (plan.mode == "freebie")
        exact = micronet_score(counted.params, counted.ops, baseline)
        assert plan.score == pytest.approx(exact, rel=1e-9, abs=1e-12)
        # the sweep's cache builds the same model
        ids = corpus.val[:64].view(2, 32)
        with torch.no_grad():
            assert torch.equal(cache.model(policy)(ids), model(ids))
    assert modes == {"freebie", "quantized"}


def test_a_short_sweep_of_bands_completes_trials(tmp_path, tiny_gpt, corpus):
    url = f"sqlite:///{tmp_path / 'bands.db'}"
    objective = MicroNet(
        perplexity_ceiling=1.5, relative_to="dense", baseline="dense", eval_tokens=1024
    )
    result = run_sweep(
        Space(tiny_gpt, rules=HEAD_RULES), objective=objective, corpus=corpus, name="bands",
        trials=4, storage=url, sampler="auto", seed=0, in_process=True, progress=False,
    )  # fmt: skip
    assert result.states.get("COMPLETE", 0) + result.states.get("PRUNED", 0) == 4, result.states
    store = Store(url)
    rows = store.trials("bands", with_layers=True)
    names = store.get_sweep("bands").summary_layers
    banded = 0
    for row in rows:
        policy = Policy.from_json(row.policy)
        assert [policy.layers[f"head@{i}"].band for i in range(3)] == [(0, 6), (6, 20), (20, 65)]
        summary = unpack_layer_counts(names, row.layer_counts)
        for i in range(3):  # a changed band's own counts reach the trial's summary
            changed = not policy.layers[f"head@{i}"].is_identity
            assert (summary[f"head@{i}"][1] > 0) == changed
        if any(not policy.layers[f"head@{i}"].is_identity for i in range(3)):
            banded += 1
            kinds = {layer.kind for layer in row.layers}
            assert {"banded_head", "banded_embedding", "band_set", "band"} <= kinds
        assert row.perplexity is not None and math.isfinite(row.perplexity)
    assert banded >= 1


def test_untied_table_and_head_with_a_bias_plan_exactly_and_round_trip(tmp_path, corpus):
    """Bands on a table and on a separate head with a bias: exact planner costs (options that
    leave a band unchanged included), gradients through the bands, and an export round trip."""
    from microsweep.compress import project_
    from microsweep.export._layers import custom_recipe
    from tests._tiny import TinyLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyLM(corpus.vocab_size).eval()
    calib = corpus.train[: 8 * 32].view(8, 32)
    rules = {
        "emb": dict(bands=Bands(10, 30), rank=Rank(0.2, 1.0), bits=Bits(4, 8, 32)),
        "head": dict(bands=Bands(0.2), rank=Rank(0.2, 1.0), sparsity=Sparsity(0, 0.5, step=0.5)),
    }
    space = Space(model, rules=rules)
    assert [i.name for i in space.layers] == ["emb@0", "emb@1", "emb@2", "head@0", "head@1"]
    with pytest.raises(SpaceError, match="has no head"):  # an untied table's input is ids
        Space(model, rules={"emb": dict(bands=Bands(10), act_bits=Bits(8))})
    dense = count(model, context=CONTEXT)
    baseline = Baseline(dense.params, dense.ops)
    planner = Planner(
        space, model, context=CONTEXT, config=CountConfig(), baseline=baseline, calib=calib,
        rank_levels=3,
    )  # fmt: skip
    rng = np.random.default_rng(1)
    for _ in range(6):
        choice = tuple(int(rng.integers(len(o))) for o in planner.options)
        counted = count(compress(model, planner.policy(choice), calib=calib), context=CONTEXT)
        exact = micronet_score(counted.params, counted.ops, baseline)
        assert planner.plan(choice).score == pytest.approx(exact, rel=1e-9, abs=1e-12)
    policy = planner.policy(tuple(len(o) - 1 for o in planner.options))
    banded = compress(model, policy, calib=calib)
    assert isinstance(banded.emb, BandedEmbedding) and isinstance(banded.head, BandedHead)
    assert all(b.bias is not None for b in banded.head.bands.bands.values())
    for p in banded.parameters():
        p.requires_grad_(True)
    ids = corpus.train[:64].view(2, 32)
    loss = torch.nn.functional.cross_entropy(banded(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    assert all(p.grad is not None for p in banded.parameters())
    with torch.no_grad():
        for p in banded.parameters():
            p.add_(0.01 * p.grad)
    project_(banded)  # back onto masks and grids
    info = save(banded, tmp_path / "u.msz", policy=policy, recipe=custom_recipe(model), base=model)
    assert info.ratio == pytest.approx(1.0, abs=0.02)
    loaded = load(tmp_path / "u.msz", model=model)
    with torch.no_grad():
        assert torch.equal(loaded(ids), banded(ids))
