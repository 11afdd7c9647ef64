"""Reweighted group lasso before block pruning: the block norms, penalty and reweighting by hand,
the stage driving the weakest blocks of a trained LM to zero, and the runner's group-lasso trials.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from microsweep import LayerPolicy, Policy
from microsweep.compress import CompressedLinear, compress, magnitude_mask
from microsweep.compress._group_lasso import (
    block_norms,
    group_lasso_penalty,
    group_lasso_train_,
    reweight,
)
from microsweep.compress._prune import magnitude_order
from microsweep.errors import UsageError
from microsweep.score import eval_windows, mean_context, perplexity
from microsweep.workers import EvalSettings, TrialRunner
from tests._tiny import TinyLM, one_thread, pretrained

BLOCKS = {"up": (4, 4), "down": (4, 4)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def lm(corpus) -> TinyLM:
    return pretrained(corpus)


@pytest.fixture(scope="module")
def windows(corpus) -> torch.Tensor:
    return eval_windows(corpus.val, window=32, max_tokens=64 * 32)


def test_block_norms_by_hand():
    w = torch.arange(16.0).view(4, 4)
    tiles = block_norms(w, (2, 2))
    expected = torch.tensor([[42.0, 98.0], [458.0, 642.0]]).sqrt()  # 0+1+16+25, 4+9+36+49, ...
    assert torch.allclose(tiles, expected)
    rows = block_norms(w, (1, 4))  # (1, C): whole rows
    assert rows.shape == (4, 1)
    assert torch.allclose(rows.flatten(), torch.tensor([14.0, 126.0, 366.0, 734.0]).sqrt())
    assert torch.equal(block_norms(w, (1, 0)), rows)  # a 0 side spans the whole side
    assert torch.allclose(block_norms(w, (0, 1)).flatten(), w.square().sum(0).sqrt())
    segments = block_norms(w, (1, 2))  # row segments, as in the paper's column blocks
    assert torch.allclose(segments[0], torch.tensor([1.0, 13.0]).sqrt())
    # row-major like the pruning order, so the blocks pruning removes are the smallest norms
    r = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    order = torch.argsort(block_norms(r, (2, 3)).flatten().double(), stable=True)
    assert torch.equal(order, magnitude_order(r, (2, 3)))


def test_penalty_and_reweighting_by_hand():
    w1 = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)  # row norms 5 and 0
    w2 = torch.tensor([[1.0, -2.0], [0.5, 0.0]], requires_grad=True)  # 1x1 groups: |w|
    alphas = [torch.tensor([[2.0], [7.0]]), torch.ones(2, 2)]
    value = group_lasso_penalty([(w1, (1, 2)), (w2, (1, 1))], alphas)
    assert value.item() == pytest.approx(2 * 5 + 7 * 0 + (1 + 2 + 0.5 + 0))
    value.backward()  # alpha_g * W_g / ||W_g||, and 0 on an empty group
    assert torch.allclose(w1.grad, torch.tensor([[1.2, 1.6], [0.0, 0.0]]))
    assert torch.allclose(w2.grad, torch.tensor([[1.0, -1.0], [1.0, 0.0]]))

    alpha = reweight(w1, (1, 2), eps=0.1)
    assert not alpha.requires_grad
    assert torch.allclose(alpha, torch.tensor([[1 / 5.1], [1 / 0.1]]))
    r = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(reweight(r, (4, 2), eps=1e-3), 1 / (block_norms(r, (4, 2)) + 1e-3))


def test_bad_input_is_refused_in_one_line():
    w = torch.ones(6, 4)
    with pytest.raises(UsageError, match="does not split into 4x4 blocks"):
        block_norms(w, (4, 4))
    with pytest.raises(UsageError, match="two ints >= 0, not both 0"):
        block_norms(w, (0, 0))
    with pytest.raises(UsageError, match="two ints >= 0, not both 0"):
        block_norms(w, (-1, 2))
    with pytest.raises(UsageError, match="2-D tensor"):
        block_norms(torch.ones(4), (1, 1))
    with pytest.raises(UsageError, match="1 weights but 2 alpha grids"):
        group_lasso_penalty([(w, (2, 2))], [torch.ones(3, 2), torch.ones(3, 2)])
    with pytest.raises(UsageError, match=r"alphas\[0\] has shape \(2, 2\)"):
        group_lasso_penalty([(w, (2, 2))], [torch.ones(2, 2)])
    with pytest.raises(UsageError, match="eps 0 must be a positive number"):
        reweight(w, (2, 2), eps=0)
    model = TinyLM(10)
    tokens = torch.randint(0, 10, (500,))
    kw = dict(steps=2, lr=1e-3, penalty=1e-3, reweight_every=1, block_size=8)
    with pytest.raises(UsageError, match="'act' is not a Linear, Embedding or LSTM gate"):
        group_lasso_train_(model, {"act": (1, 1)}, tokens, **kw)
    with pytest.raises(UsageError, match="layer 'up' of shape 64x32 does not split into 5x5"):
        group_lasso_train_(model, {"up": (5, 5)}, tokens, **kw)
    with pytest.raises(UsageError, match="group lasso steps 0 must be a positive int"):
        group_lasso_train_(model, BLOCKS, tokens, **{**kw, "steps": 0})
    for e in (UsageError, ValueError):  # a ValueError for callers that catch the builtin
        with pytest.raises(e):
            group_lasso_train_(model, BLOCKS, tokens, **{**kw, "penalty": -1.0})


def _mass_in_weakest_half(model: nn.Module) -> list[float]:
    """Per target layer, the share of its squared weight in the half of its blocks with the
    smallest norms: what 50% block pruning removes."""
    out = []
    for name, block in BLOCKS.items():
        norms = block_norms(model.get_submodule(name).weight.detach(), block).flatten().sort()[0]
        out.append(float(norms[: norms.numel() // 2].square().sum() / norms.square().sum()))
    return out


def test_group_lasso_drives_the_weakest_blocks_to_zero(lm, corpus, windows):
    """Same seed, steps and learning rate, with and without the penalty: with it, the half of
    the blocks that 50% pruning removes holds a small fraction of the weight, and pruning them
    costs far less perplexity. Measured: weakest-half mass 0.036 / 0.006 (up / down) against
    0.37 / 0.37 plain; perplexity after pruning 15.1 (dense 14.8) against 21.3 (dense 13.5)."""
    trained = {}
    for penalty in (0.0, 3e-3):
        model = copy.deepcopy(lm)
        group_lasso_train_(
            model, BLOCKS, corpus.train, steps=150, lr=3e-3, penalty=penalty,
            reweight_every=10, block_size=32, batch_size=8, seed=0,
        )  # fmt: skip
        trained[penalty] = model
    plain, lasso = trained[0.0], trained[3e-3]
    prune = Policy(layers={n: LayerPolicy(sparsity=0.5, block=b) for n, b in BLOCKS.items()})
    ppl = {
        k: (perplexity(m, windows), perplexity(compress(m, prune), windows))
        for k, m in (("plain", plain), ("lasso", lasso))
    }
    for before, after in zip(_mass_in_weakest_half(plain), _mass_in_weakest_half(lasso),
                             strict=True):  # fmt: skip
        assert before > 0.3  # plain training leaves the weight spread over the blocks
        assert after < before / 5
    (plain_dense, plain_pruned), (lasso_dense, lasso_pruned) = ppl["plain"], ppl["lasso"]
    assert plain_pruned > 1.3 * plain_dense  # pruning a plainly trained model hurts
    assert lasso_pruned < 1.1 * lasso_dense  # the penalty moved the function out of those blocks
    assert lasso_pruned < 0.8 * plain_pruned
    # deterministic: the same call on the same weights gives the same weights
    again = copy.deepcopy(lm)
    group_lasso_train_(again, BLOCKS, corpus.train, steps=150, lr=3e-3, penalty=3e-3,
                       reweight_every=10, block_size=32, batch_size=8, seed=0)  # fmt: skip
    for a, b in zip(again.parameters(), lasso.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in again.parameters()) and not again.training


def test_runner_trains_then_prunes_blocks_on_the_trained_weights(lm, corpus, windows):
    """A trial with `group_lasso_steps` trains a copy of the dense base, selects blocks by
    magnitude on the trained weights, and prunes them to exact zeros; the base is untouched."""
    seen: list[nn.Module] = []

    def evaluate(model: nn.Module) -> float:
        seen.append(model)
        return perplexity(model, windows)

    base = copy.deepcopy(lm)
    runner = TrialRunner(
        base, windows, EvalSettings(context=mean_context(32)),
        train_tokens=corpus.train, threads=1, evaluate=evaluate,
    )  # fmt: skip
    before = {k: v.clone() for k, v in base.state_dict().items()}
    layers = {
        "up": LayerPolicy(sparsity=0.5, block=(4, 4)),
        "down": LayerPolicy(sparsity=0.5, block=(4, 4)),
        "head": LayerPolicy(sparsity=0.5),  # unstructured: pruned, not penalised
    }
    hyper = {"group_lasso_steps": 40, "group_lasso_penalty": 3e-3, "group_lasso_lr": 3e-3}
    res = runner.run(0, Policy(layers=layers, hyper=hyper).to_json())
    assert res.status == "ok", res.error
    assert res.timings["group_lasso"] > 0 and "compress" in res.timings
    model = seen[-1]
    trained = runner.group_lasso(Policy(layers=layers, hyper=hyper))
    assert trained is not None
    for name in ("up", "down"):
        layer = model.get_submodule(name)
        assert isinstance(layer, CompressedLinear) and layer.block == (4, 4)
        kept = magnitude_mask(trained.get_submodule(name).weight, 0.5, (4, 4))
        assert torch.equal(layer.mask, kept)  # chosen on the trained weights...
        assert not torch.equal(kept, magnitude_mask(base.get_submodule(name).weight, 0.5, (4, 4)))
        zero = block_norms(layer.weight.detach(), (4, 4)) == 0
        assert zero.float().mean().item() == 0.5  # ...and removed exactly
        assert torch.equal(layer.weight[~layer.mask], torch.zeros(int((~layer.mask).sum())))
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    again = runner.run(0, Policy(layers=layers, hyper=hyper).to_json())
    assert again.perplexity == res.perplexity  # repeatable, not served from a cache

    plain = runner.run(0, Policy(layers=layers).to_json())
    assert "group_lasso" not in plain.timings and plain.perplexity != res.perplexity
    # no layer pruned in blocks: nothing to penalise, the stage is skipped
    unstructured = Policy(layers={"up": LayerPolicy(sparsity=0.5)}, hyper=hyper).to_json()
    skipped = runner.run(0, unstructured)
    assert skipped.status == "ok" and "group_lasso" not in skipped.timings


@pytest.mark.parametrize(
    ("hyper", "message"),
    [
        ({"group_lasso_steps": 2.5}, "group_lasso_steps 2.5 must be a whole number"),
        ({"group_lasso_penalty": -1.0}, "group_lasso_penalty -1.0 must be >= 0"),
        ({"group_lasso_lr": 0}, "group_lasso_lr 0.0 must be above 0"),
        ({"group_lasso_reweight_every": 0}, "group_lasso_reweight_every 0 must be at least 1"),
        ({"group_lasso_lr": "fast"}, "group_lasso_lr 'fast' must be a finite number"),
    ],
)
def test_bad_group_lasso_hyperparameters_fail_the_trial(lm, windows, hyper, message):
    runner = TrialRunner(lm, windows, EvalSettings(context=mean_context(32)), threads=1,
                         train_tokens=torch.zeros(100, dtype=torch.long))  # fmt: skip
    layers = {"up": LayerPolicy(sparsity=0.5, block=(4, 4))}
    res = runner.run(0, Policy(layers=layers, hyper={"group_lasso_steps": 5, **hyper}).to_json())
    assert res.status == "error" and message in res.error
    assert "\n" not in res.error


def test_group_lasso_needs_training_tokens(lm, windows):
    runner = TrialRunner(lm, windows, EvalSettings(context=mean_context(32)), threads=1)
    layers = {"up": LayerPolicy(sparsity=0.5, block=(4, 4))}
    res = runner.run(0, Policy(layers=layers, hyper={"group_lasso_steps": 5}).to_json())
    assert res.status == "error" and "no training tokens" in res.error
    assert math.isfinite(runner.run(0, Policy(layers=layers).to_json()).perplexity)


def test_group_lasso_takes_embedding_tables_and_lstm_gate_matrices():
    from microsweep.models import LSTMLM, LSTMConfig

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LSTMLM(LSTMConfig(vocab_size=12, n_embd=8, n_hidden=8))
    tokens = torch.randint(0, 12, (400,), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = {"wte": (1, 4), "lstm.weight_hh_l0": (4, 4)}
    group_lasso_train_(model, targets, tokens, steps=3, lr=1e-2, penalty=1e-2,
                       reweight_every=1, block_size=8)  # fmt: skip
    assert type(model.lstm).__name__ == "LinearLSTM"  # its gates became Linears to penalise
    assert not torch.equal(model.wte.weight, before["wte.weight"])
    assert not torch.equal(model.lstm.weight_hh_l0.weight, before["lstm.weight_hh_l0"])
