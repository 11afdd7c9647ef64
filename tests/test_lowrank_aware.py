"""Data-aware low rank: activation-scaled and whitened SVD against plain truncated SVD at equal
rank, checked against the optimum they promise and on a real model's perplexity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from microsweep import LayerPolicy, Policy, Rank, Space
from microsweep.compress import InputStats, compress, factorize, input_stats, rank_transform
from microsweep.errors import SpaceError


def _layer_and_inputs(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, InputStats]:
    """A Linear and correlated inputs with uneven feature scales (as activations are)."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g))
    mix = torch.randn(64, 64, generator=g) * torch.linspace(0.05, 3.0, 64)
    x = (torch.randn(4000, 64, generator=g) @ mix).double()
    return linear, x, InputStats(x.T @ x / len(x), x.abs().mean(0), len(x))


def _output_error(linear: nn.Linear, rank: int, x: torch.Tensor, transform=None) -> float:
    f = factorize(linear, rank, transform=transform)
    w = linear.weight.detach().double()
    approx = f.second.weight.double() @ f.first.weight.double()
    return float(((w - approx) @ x.T).norm() ** 2)


@pytest.mark.parametrize("rank", [2, 8, 24, 40])
def test_whitened_svd_reaches_the_least_output_error_at_its_rank(rank: int) -> None:
    linear, x, stats = _layer_and_inputs()
    plain = _output_error(linear, rank, x)
    act = _output_error(linear, rank, x, rank_transform("activation", stats))
    white = _output_error(linear, rank, x, rank_transform("whiten", stats))
    # the optimum over all rank-r matrices: the tail of W L's singular values (G = L L^T), x n
    lower = torch.linalg.cholesky(stats.gram)
    tail = torch.linalg.svdvals(linear.weight.detach().double() @ lower)[rank:]
    optimum = float((tail**2).sum()) * len(x)
    assert white == pytest.approx(optimum, rel=1e-6)
    assert white < act < plain  # scaling columns helps; whitening is optimal


def test_every_method_is_exact_at_full_rank_and_keeps_the_bias() -> None:
    linear, x, stats = _layer_and_inputs(1)
    ref = (linear.weight.detach().double() @ x.T).norm() ** 2
    for method in ("plain", "activation", "whiten"):
        t = None if method == "plain" else rank_transform(method, stats)
        assert _output_error(linear, 48, x, t) <= 1e-10 * float(ref)  # float32 factors
        assert factorize(linear, 8, transform=t).second.bias is linear.bias


def test_inputs_that_never_vary_still_factorize() -> None:
    """A dead input feature makes the Gram matrix singular; a small ridge keeps it invertible."""
    linear, x, _ = _layer_and_inputs(2)
    x[:, :5] = 0.0
    stats = InputStats(x.T @ x / len(x), x.abs().mean(0), len(x))
    for method in ("activation", "whiten"):
        f = factorize(linear, 16, transform=rank_transform(method, stats))
        assert torch.isfinite(f.first.weight).all() and torch.isfinite(f.second.weight).all()
    with pytest.raises(ValueError, match="calibration inputs"):
        rank_transform("whiten", None)


def test_input_stats_are_the_moments_of_what_the_layer_sees(tiny_gpt, corpus) -> None:
    calib = corpus.train[: 4 * 32].view(4, 32)
    name = "blocks.0.mlp.c_fc"
    seen = []
    handle = tiny_gpt.get_submodule(name).register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]).double())
    )
    try:
        with torch.no_grad():
            tiny_gpt.eval()(calib)
    finally:
        handle.remove()
    x = torch.cat(seen)
    stats = input_stats(tiny_gpt, {name: tiny_gpt.get_submodule(name)}, calib)[name]
    assert stats.rows == 4 * 32
    assert torch.allclose(stats.gram, x.T @ x / len(x), rtol=1e-10, atol=1e-12)
    assert torch.allclose(stats.abs_mean, x.abs().mean(0), rtol=1e-10)


def test_data_aware_rank_lowers_perplexity_at_equal_rank(tiny_gpt, corpus) -> None:
    """On the tiny GPT, each MLP layer at a quarter of its rank: whitened SVD keeps the
    perplexity closer to dense than plain SVD, with the same parameter count."""
    from microsweep.score import count, eval_windows, perplexity

    calib = corpus.train[: 16 * 32].view(16, 32)
    windows = eval_windows(corpus.val, window=32, max_tokens=4096)
    layers = [f"blocks.{b}.mlp.{n}" for b in range(2) for n in ("c_fc", "c_proj")]
    result = {}
    for method in ("plain", "activation", "whiten"):
        policy = Policy(layers={n: LayerPolicy(rank=8, rank_method=method) for n in layers})
        model = compress(tiny_gpt, policy, calib=calib)
        result[method] = (perplexity(model, windows), count(model, context=16).params)
    dense = perplexity(tiny_gpt, windows)
    assert result["whiten"][0] < result["plain"][0]
    assert dense < result["activation"][0] < 2 * result["plain"][0]  # a heuristic: no promise
    assert dense < result["whiten"][0]
    assert result["plain"][1] == result["whiten"][1] == result["activation"][1]


def test_the_method_travels_from_the_knob_to_the_policy_and_back() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    knob = Rank(0.25, 0.5, method="whiten")
    assert knob.to_json() == {"knob": "Rank", "low": 0.25, "high": 0.5, "method": "whiten"}
    assert "method" not in Rank(0.25, 0.5).to_json()
    space = Space(Net(), rules={"a": dict(rank=knob), "b": dict(rank=Rank(4, 8))})
    import optuna

    policy = space.suggest(optuna.trial.FixedTrial({"a:rank": 0.25, "b:rank": 4}))
    assert policy.layers["a"] == LayerPolicy(rank=8, rank_method="whiten")
    assert policy.layers["b"].rank_method == "plain"
    assert Policy.from_json(policy.to_json()) == policy
    assert "a: r=8/white" in policy.summary()
    params = space.params_from_policy(policy)
    assert params["b:rank"] == 4 and 0.25 <= params["a:rank"] <= 0.5
    assert space.suggest(optuna.trial.FixedTrial(params)) == policy
    plain_a = Policy(layers={"a": LayerPolicy(rank=8), "b": LayerPolicy(rank=4)})
    with pytest.raises(SpaceError, match="cannot produce"):
        space.params_from_policy(plain_a)  # the space factorizes `a` whitened
    with pytest.raises(SpaceError, match="method 'svd'"):
        Rank(0.5, method="svd")
    with pytest.raises(SpaceError, match="rank_method 'qr'"):
        LayerPolicy(rank=4, rank_method="qr")
    assert LayerPolicy(rank_method="whiten").rank_method == "plain"  # no rank: nothing to do
    with pytest.raises(SpaceError, match="pass calib"):
        compress(Net(), Policy(layers={"a": LayerPolicy(rank=4, rank_method="whiten")}))
