"""Tensor-train layers: shape rules, exact and truncated TT-SVD, forward passes, op counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import microsweep.compress  # noqa: F401  (registers the TT counting rules)
from microsweep.compress._tt import (
    TTEmbedding,
    TTLinear,
    tt_dims,
    tt_full,
    tt_lookup_ops,
    tt_matvec_ops,
    tt_max_ranks,
    tt_params,
    tt_shape,
    tt_svd,
)
from microsweep.errors import SpaceError
from microsweep.score import CountConfig, count

FP32 = CountConfig(freebie=False)
"""Count at fp32 (no 16-bit freebie), so a stored value counts 1."""


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unfoldings(matrix: torch.Tensor, out_f: tuple[int, ...], in_f: tuple[int, ...]):
    """The k-th unfoldings (Π_{j<=k} m_j n_j, rest) of the padded, permuted tensor."""
    d = len(out_f)
    padded = torch.zeros(math.prod(out_f), math.prod(in_f), dtype=torch.float64)
    padded[: matrix.shape[0], : matrix.shape[1]] = matrix
    order = [axis for k in range(d) for axis in (k, d + k)]
    tensor = padded.reshape(*out_f, *in_f).permute(*order)
    sizes = [m * n for m, n in zip(out_f, in_f, strict=True)]
    return padded, [tensor.reshape(math.prod(sizes[: k + 1]), -1) for k in range(d - 1)]


# --------------------------------------------------------------------------- shapes


def test_dims_pad_primes_and_keep_good_factorizations():
    assert tt_dims(64, 3) == (4, 4, 4)
    assert tt_dims(10000, 3) == (20, 20, 25)  # exact: 20·20·25, the smallest sum (65)
    assert tt_dims(13, 2) == (3, 5)  # prime: padded to 15 (margin ceil(1.3) = 2)
    assert tt_dims(7, 2) == (2, 4)  # prime: padded to 8
    assert tt_dims(13, 2, margin=0) == (1, 13)  # no room to pad
    for n in (1, 2, 7, 13, 50, 97, 200, 768, 1000, 50257):
        for d in (1, 2, 3, 4):
            dims = tt_dims(n, d)
            assert len(dims) == d and list(dims) == sorted(dims)
            assert n <= math.prod(dims) <= n + math.ceil(0.1 * n)


def test_shape_picks_the_number_of_cores():
    assert tt_shape(64, 64) == ((4, 4, 4), (4, 4, 4))  # 4^3 <= 64 < 4^4: 3 cores
    assert tt_shape(13, 7) == ((3, 5), (2, 4))  # small: 2 cores, both sides padded
    assert tt_shape(4096, 4096) == ((8, 8, 8, 8), (8, 8, 8, 8))  # capped at 4 cores
    assert tt_shape(30, 50, d=3) == ((2, 3, 5), (2, 5, 5))
    assert tt_shape(31, 50, d=3) == ((2, 4, 4), (2, 5, 5))  # 31 prime: padded to 32
    assert tt_max_ranks((4, 4, 4), (4, 4, 4)) == (16, 16)
    assert tt_max_ranks((3, 5), (2, 4)) == (6,)


@pytest.mark.parametrize(
    "call",
    [
        lambda: tt_dims(0, 2),
        lambda: tt_dims(10, True),
        lambda: tt_svd(torch.zeros(8, 8), (2, 2), (2, 2, 2), 2),  # lengths differ
        lambda: tt_svd(torch.zeros(9, 8), (2, 4), (2, 4), 2),  # 8 < 9 rows
        lambda: tt_svd(torch.zeros(8, 8), (2, 4), (2, 4), 0),
        lambda: tt_svd(torch.zeros(8, 8), (2, 2, 2), (2, 2, 2), (2,)),  # one rank per cut
        lambda: tt_params((4, 4), (4, 4), 1.5),
        lambda: TTLinear.from_linear(nn.Linear(8, 8), 2, out_factors=(2, 4), in_factors=(8,)),
        lambda: TTLinear.from_spec({"type": "tt_embedding"}),
        lambda: TTEmbedding.from_embedding(nn.Embedding(8, 4, max_norm=1.0), 2),
    ],
)
def test_bad_input_raises_space_error(call):
    with pytest.raises(SpaceError):
        call()


# --------------------------------------------------------------------------- TT-SVD


@pytest.mark.parametrize(
    ("rows", "cols", "out_f", "in_f"),
    [
        (30, 50, (5, 6), (5, 10)),
        (13, 7, (3, 5), (2, 4)),  # primes: padded to 15 x 8
        (64, 64, (4, 4, 4), (4, 4, 4)),
        (30, 50, (2, 3, 5), (3, 4, 5)),  # padded columns, 3 cores
    ],
)
def test_full_rank_reconstruction_is_exact(rows, cols, out_f, in_f):
    w = torch.randn(rows, cols, dtype=torch.float64, generator=_gen())
    cores = tt_svd(w, out_f, in_f, 10**6)
    assert tuple(c.shape[-1] for c in cores[:-1]) == tt_max_ranks(out_f, in_f)
    assert all(c.dtype == torch.float64 for c in cores)
    assert (tt_full(cores, rows, cols) - w).abs().max() < 1e-8


def test_truncated_error_within_the_tt_svd_bound():
    """||W - W_tt||_F² <= Σ_k ε_k², ε_k the best rank-r_k error of the k-th unfolding; and
    >= max_k ε_k² (each unfolding of W_tt has rank <= r_k)."""
    for rows, cols, out_f, in_f, ranks in [
        (64, 48, (4, 4, 4), (4, 4, 3), (3, 5)),
        (13, 7, (3, 5), (2, 4), (2,)),
        (60, 60, (3, 4, 5), (3, 4, 5), (4, 4)),
    ]:
        w = torch.randn(rows, cols, dtype=torch.float64, generator=_gen(rows))
        cores = tt_svd(w, out_f, in_f, ranks)
        assert tuple(c.shape[-1] for c in cores[:-1]) == ranks
        padded, unfoldings = _unfoldings(w, out_f, in_f)
        eps2 = [
            float((torch.linalg.svdvals(u)[r:] ** 2).sum())
            for u, r in zip(unfoldings, ranks, strict=True)
        ]
        err2 = float(((tt_full(cores, *padded.shape) - padded) ** 2).sum())
        cropped2 = float(((tt_full(cores, rows, cols) - w) ** 2).sum())
        assert max(eps2) > 1e-3  # the truncation really discards something
        assert max(eps2) * (1 - 1e-9) <= err2 <= sum(eps2) * (1 + 1e-9)
        assert cropped2 <= err2 * (1 + 1e-12)


# --------------------------------------------------------------------------- modules


@pytest.mark.parametrize(("rows", "cols", "rank"), [(30, 50, 4), (13, 7, 3), (64, 64, 2)])
def test_tt_linear_forward_matches_its_weight(rows, cols, rank):
    torch.manual_seed(0)
    linear = nn.Linear(cols, rows)
    tt = TTLinear.from_linear(linear, rank)
    assert isinstance(tt.cores, nn.ParameterList)
    assert all(c.dtype == torch.float32 for c in tt.cores)
    assert list(tt.buffers()) == []
    x = torch.randn(2, 3, cols)
    expected = x @ tt.weight_matrix().T + tt.bias
    assert tt(x).shape == (2, 3, rows)
    assert (tt(x) - expected).abs().max() < 1e-5
    assert (tt(x[0, 0]) - expected[0, 0]).abs().max() < 1e-5  # no batch dims

    full = TTLinear.from_linear(linear, 10**6)  # full rank: the original layer
    assert (full(x) - linear(x)).abs().max() < 1e-5

    no_bias = TTLinear.from_linear(nn.Linear(cols, rows, bias=False), rank)
    assert no_bias.bias is None
    assert (no_bias(x) - x @ no_bias.weight_matrix().T).abs().max() < 1e-5


def test_tt_linear_trains():
    tt = TTLinear.from_linear(nn.Linear(12, 10), 2)
    tt(torch.randn(4, 12)).square().sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in tt.cores)


def test_tt_embedding_forward_is_a_row_lookup():
    torch.manual_seed(0)
    emb = nn.Embedding(13, 7)
    tt = TTEmbedding.from_embedding(emb, 2)
    assert tt.row_factors == (3, 5) and tt.col_factors == (2, 4) and tt.ranks == (2,)
    assert list(tt.buffers()) == []
    idx = torch.randint(0, 13, (4, 6))
    assert tt(idx).shape == (4, 6, 7)
    assert (tt(idx) - tt.table()[idx]).abs().max() < 1e-6
    assert (tt.table() - emb.weight).abs().max() > 1e-2  # rank 2 is lossy

    full = TTEmbedding.from_embedding(emb, 10**6)
    assert (full.table() - emb.weight).abs().max() < 1e-5
    assert (full(idx) - emb(idx)).abs().max() < 1e-5

    big = TTEmbedding.from_embedding(nn.Embedding(64, 64), 3)  # 3 cores
    ids = torch.arange(64)
    assert (big(ids) - big.table()).abs().max() < 1e-6
    with pytest.raises(IndexError):
        tt(torch.tensor([13]))


# --------------------------------------------------------------------------- counts


def test_counts_64x64_rank_2_by_hand():
    """(4,4,4) x (4,4,4), ranks (1, 2, 2, 1)."""
    tt = TTLinear.from_linear(nn.Linear(64, 64), 2)
    assert tt.out_factors == (4, 4, 4) and tt.ranks == (2, 2)
    # cores: 1·4·4·2 + 2·4·4·2 + 2·4·4·1 = 32 + 64 + 32 = 128 values
    assert [tuple(c.shape) for c in tt.cores] == [(1, 4, 4, 2), (2, 4, 4, 2), (2, 4, 4, 1)]
    assert tt_params((4, 4, 4), (4, 4, 4), 2) == 128
    assert sum(c.numel() for c in tt.cores) == 128

    # forward, step k is a (m_k r_k x r_{k-1} n_k) by (r_{k-1} n_k x Q_k) product for each of
    # P_k slices, P_k = Π_{j<k} m_j, Q_k = Π_{j>k} n_j:
    #   k=1: P=1,  m·r=4·2=8, r·n=1·4=4, Q=16: mults 1·8·4·16 = 512,  adds 1·8·3·16 = 384
    #   k=2: P=4,  m·r=4·2=8, r·n=2·4=8, Q=4:  mults 4·8·8·4 = 1024,  adds 4·8·7·4 = 896
    #   k=3: P=16, m·r=4·1=4, r·n=2·4=8, Q=1:  mults 16·4·8·1 = 512,  adds 16·4·7·1 = 448
    # mults 2048 (half the dense 4096); adds 1728 + 64 bias = 1792
    assert tt_matvec_ops((4, 4, 4), (4, 4, 4), (2, 2)) == (2048, 1728)
    assert tt.matvec_ops() == (2048, 1792)

    counts = count(nn.Sequential(tt), context=1.0, config=FP32)
    (row,) = [lc for lc in counts.layers if lc.kind == "tt_linear"]
    assert counts.params == row.params == 128 + 64  # cores + bias, fp32
    assert (row.mults, row.adds, row.ops) == (2048, 1792, 2048 + 1792)
    assert row.rank == 2 and row.bits == 32 and row.sparsity == 0.0
    assert counts.ops == 3840

    # the freebie halves the stored values and the multiplies, never the adds
    free = count(tt, context=1.0)
    assert free.freebie and free.params == 96 and free.ops == 1024 + 1792


def test_counted_multiplies_are_what_forward_runs(monkeypatch):
    """Every matmul forward runs, seen from outside: each output element is one dot product of
    the contracted length, so mults = out.numel() · k and adds = out.numel() · (k - 1)."""
    seen = [0, 0]

    def spy(real):
        def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            out = real(a, b)
            seen[0] += out.numel() * a.shape[-1]
            seen[1] += out.numel() * (a.shape[-1] - 1)
            return out

        return product

    monkeypatch.setattr(torch, "matmul", spy(torch.matmul))
    monkeypatch.setattr(torch, "bmm", spy(torch.bmm))
    cases = [
        TTLinear.from_linear(nn.Linear(64, 64), 2),
        TTLinear.from_linear(nn.Linear(50, 30), (3,), out_factors=(5, 6), in_factors=(5, 10)),
        TTLinear.from_linear(nn.Linear(50, 30, bias=False), (2, 3), out_factors=(2, 3, 5)),
    ]
    for tt in cases:
        seen[:] = [0, 0]
        tt(torch.randn(1, tt.in_features))
        bias_adds = tt.out_features if tt.bias is not None else 0
        assert tt.matvec_ops() == (seen[0], seen[1] + bias_adds)
    for emb in (
        TTEmbedding.from_embedding(nn.Embedding(64, 64), 2),
        TTEmbedding.from_embedding(nn.Embedding(200, 30), (3, 4), row_factors=(5, 5, 8)),
    ):
        seen[:] = [0, 0]
        emb(torch.tensor([[37]]))
        assert emb.lookup_ops() == tuple(seen)


def test_embedding_lookup_costs_one_row():
    emb = TTEmbedding.from_embedding(nn.Embedding(64, 64), 2)
    # first slice read as is; step k >= 2 multiplies (B_{k-1} x r_{k-1}) by (r_{k-1} x b_k r_k):
    #   k=2: B=4:  mults 4·2·4·2 = 64,   adds 4·1·4·2 = 32
    #   k=3: B=16: mults 16·2·4·1 = 128, adds 16·1·4·1 = 64
    assert emb.lookup_ops() == tt_lookup_ops((4, 4, 4), (4, 4, 4), (2, 2)) == (192, 96)
    linear_ops = TTLinear.from_linear(nn.Linear(64, 64, bias=False), 2).matvec_ops()
    assert sum(emb.lookup_ops()) * 10 < sum(linear_ops)  # 288 vs 3776

    counts = count(emb, context=1.0, config=FP32)
    (row,) = counts.layers
    assert row.kind == "tt_embedding" and row.rank == 2
    assert (row.params, row.mults, row.adds) == (128, 192, 96)


# --------------------------------------------------------------------------- spec


def test_from_spec_on_meta_rebuilds_the_shapes():
    for module in (
        TTLinear.from_linear(nn.Linear(50, 30), 3, out_factors=(2, 3, 5)),
        TTLinear.from_linear(nn.Linear(7, 13, bias=False), 2),
        TTEmbedding.from_embedding(nn.Embedding(13, 7), 2),
    ):
        spec = json.loads(json.dumps(module.spec()))
        with torch.device("meta"):
            rebuilt = type(module).from_spec(spec)
        assert rebuilt.spec() == module.spec()
        shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
        assert {n: tuple(p.shape) for n, p in rebuilt.named_parameters()} == shapes
        assert all(p.is_meta for p in rebuilt.parameters())
        assert list(rebuilt.buffers()) == []
    assert TTLinear.from_linear(nn.Linear(50, 30), 3, out_factors=(2, 3, 5)).spec() == {
        "type": "tt_linear",
        "in": 50,
        "out": 30,
        "bias": True,
        "out_factors": [2, 3, 5],
        "in_factors": [2, 5, 5],
        "ranks": [3, 3],
    }
