"""Tensor-train layers: shape rules, exact and truncated TT-SVD, forward passes, op counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import microsweep.compress  # noqa: F401  (registers the TT counting rules)
from microsweep.compress._techniques._base import Given
from microsweep.compress._techniques._tensor_train import TensorTrain, tensor_train_tied
from microsweep.compress._tt import (
    DENSE,
    TTEmbedding,
    TTLinear,
    tt_best_order,
    tt_dims,
    tt_full,
    tt_lookup_ops,
    tt_matvec_ops,
    tt_max_ranks,
    tt_order_ops,
    tt_orders,
    tt_params,
    tt_shape,
    tt_svd,
)
from microsweep.errors import SpaceError
from microsweep.export import load, save
from microsweep.models.gpt import GPT, GPTConfig
from microsweep.policy import LayerPolicy, Policy
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
        TTLinear.from_linear(nn.Linear(64, 64), 2),  # its own choice: left to right
        TTLinear.from_linear(
            nn.Linear(50, 30), (3,), out_factors=(5, 6), in_factors=(5, 10), order=(0, 1)
        ),
        TTLinear.from_linear(
            nn.Linear(50, 30, bias=False), (2, 3), out_factors=(2, 3, 5), order=(2, 1, 0)
        ),
    ]
    # every chain order, with padded rows (29 of 32, 7 of 8) and padded columns (50 of 56)
    for out_f, in_f, ranks, rows, cols in [
        ((2, 4, 4), (2, 4, 7), (3, 4), 29, 50),
        ((2, 2, 2), (2, 2, 2), (2, 2), 7, 8),
        ((2, 3, 2, 2), (2, 2, 3, 2), (2, 3, 2), 23, 24),
    ]:
        for order in tt_orders(len(out_f)):
            cases.append(TTLinear(cols, rows, out_f, in_f, ranks, order=order))
    assert cases[0].order == (0, 1, 2)
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
        "order": "dense",  # every chain costs more than 30 x 50 dense (below)
    }


# --------------------------------------------------------------------------- contraction orders


def test_chain_orders_are_every_run_growing_from_one_core():
    assert tt_orders(1) == [(0,)]
    assert tt_orders(2) == [(0, 1), (1, 0)]
    assert tt_orders(3) == [(0, 1, 2), (2, 1, 0), (1, 0, 2), (1, 2, 0)]
    four = tt_orders(4)
    assert len(four) == len(set(four)) == 8 and four[:2] == [(0, 1, 2, 3), (3, 2, 1, 0)]
    assert {(1, 0, 2, 3), (1, 2, 0, 3), (1, 2, 3, 0), (2, 1, 0, 3)} <= set(four)
    for bad in ((0, 2, 1), (0, 0, 1), (0, 1), (0.0, 1.0, 2.0), (True, 1, 2), "fastest", 3):
        with pytest.raises(SpaceError):
            TTLinear(8, 8, (2, 2, 2), (2, 2, 2), 2, order=bad)


# Hand counts: a step's outputs are dot products of its contracted length k (k mults, k - 1
# adds). Shapes (2, 2, 2) x (2, 2, 2), ranks (1, 2, 2, 1), 7 real rows of 8, 8 columns.
#   (0, 1, 2): core 0 meets x: ceil(7/4) = 2 prefixes i0, rows (i0, r1) = 4, k = n0 = 2, over
#              n1 n2 = 4 columns: 16 outputs. Core 1 (right): ceil(7/2) = 4 prefixes = 2 whole
#              blocks of (m1 r2) = 4 rows, k = r1 n1 = 4, over n2 = 2 columns: 16 outputs.
#              Core 2: 7 rows = 3 whole blocks of (m2 r3) = 2 and 1 row, k = r2 n2 = 4: 7 outputs.
#              mults 2·16 + 4·16 + 4·7 = 124, adds 1·16 + 3·16 + 3·7 = 85.
#   (2, 1, 0): core 2 meets x: n0 n1 = 4 blocks of (r2 m2 r3) = 4 rows, k = n2 = 2: 16 outputs.
#              Core 1 (left): n0 = 2 blocks of (r1 m1) = 4 rows, k = n1 r2 = 4, over m2 = 2
#              columns: 16. Core 0: 7 rows = i0 = 0 over all 4 of (i1, i2), then 3 of i0 = 1,
#              k = n0 r1 = 4: 7 outputs. mults 32 + 64 + 28 = 124, adds 16 + 48 + 21 = 85.
#   (1, 0, 2): core 1 meets x: n0 = 2 blocks of (r1 m1 r2) = 8 rows, k = n1 = 2, over n2 = 2:
#              32 outputs. Core 0 (left): ceil(7/2) = 4 prefixes (i0, i1) = 2 whole i0 over
#              m1 = 2, k = n0 r1 = 4, over m1 (r2 n2) = 2·4 = 8 columns: 16 outputs. Core 2: 7,
#              k = 4. mults 64 + 64 + 28 = 156, adds 32 + 48 + 21 = 101.
#   (1, 2, 0): core 1: 32 outputs (k = 2). Core 2 (right): n0 r1 m1 = 8 blocks of (m2 r3) = 2
#              rows, k = r2 n2 = 4: 16 outputs. Core 0: 7 outputs, k = n0 r1 = 4.
#              mults 64 + 64 + 28 = 156, adds 32 + 48 + 21 = 101.
#   dense:     7·8 = 56 mults, 7·7 = 49 adds. Bias: 7 adds more for each.
SMALL_BY_HAND = {
    (0, 1, 2): (124, 85),
    (2, 1, 0): (124, 85),
    (1, 0, 2): (156, 101),
    (1, 2, 0): (156, 101),
    DENSE: (56, 49),
}


def _dense_like(tt: TTLinear) -> nn.Linear:
    """The nn.Linear whose weight is the TT layer's reconstruction (and the same bias)."""
    linear = nn.Linear(tt.in_features, tt.out_features, bias=tt.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(tt.weight_matrix())
        if tt.bias is not None:
            linear.bias.copy_(tt.bias)
    return linear


def test_every_order_counted_by_hand_and_equal_outputs():
    torch.manual_seed(0)
    base = TTLinear.from_linear(nn.Linear(8, 7), 2, out_factors=(2, 2, 2), in_factors=(2, 2, 2))
    assert base.ranks == (2, 2)
    by_hand = {o: (m, a + 7) for o, (m, a) in SMALL_BY_HAND.items()}  # bias adds
    assert base.order_ops() == by_hand
    assert tt_order_ops(7, 8, (2, 2, 2), (2, 2, 2), 2, bias=False) == SMALL_BY_HAND
    assert base.order == DENSE  # everything is cheaper dense at this size
    x = torch.randn(5, 8)
    want = x @ base.weight_matrix().T + base.bias
    for order, (mults, adds) in by_hand.items():
        tt = TTLinear(8, 7, (2, 2, 2), (2, 2, 2), (2, 2), order=order)
        tt.load_state_dict(base.state_dict())
        assert tt.order == order and tt.matvec_ops() == (mults, adds)
        (row,) = count(tt, context=1.0, config=FP32).layers
        assert (row.mults, row.adds) == (mults, adds)
        y = tt(x)
        assert y.shape == (5, 7)  # exactly the real rows
        assert (y - want).abs().max() < 1e-5


def test_order_choice_prefers_the_least_operations():
    # 64 x 64 at rank 2: both ends 2048 + 1728 (+64 bias), dense 4096 + 4032 (+64)
    costs = tt_order_ops(64, 64, (4, 4, 4), (4, 4, 4), 2, bias=True)
    assert costs[(0, 1, 2)] == costs[(2, 1, 0)] == (2048, 1792)
    assert costs[DENSE] == (4096, 4096)
    assert tt_best_order(costs) == (0, 1, 2)  # a tie goes to the earlier order
    # (2, 2, 3) x (2, 3, 2), ranks (1, 3, 1, 1): from the middle core out is the least.
    #   (1, 0, 2): core 1 meets x: n0 = 2 blocks of r1 m1 r2 = 6 rows, k = n1 = 3, over n2 = 2
    #   columns: 24 outputs; core 0: 2 rows i0, k = n0 r1 = 6, over m1 (r2 n2) = 4: 8 outputs;
    #   core 2: 4 blocks of m2 = 3 rows, k = r2 n2 = 2: 12. mults 72 + 48 + 24, adds 48 + 40 + 12.
    #   (0, 1, 2): core 0: 6 rows, k = 2, over 6 columns: 36 outputs; core 1: 2 blocks of
    #   m1 r2 = 2 rows, k = r1 n1 = 9, over 2: 8 outputs; core 2: 12 outputs, k = 2.
    #   mults 72 + 72 + 24, adds 36 + 64 + 12. Dense: 144 mults, 12·11 = 132 adds.
    costs = tt_order_ops(12, 12, (2, 2, 3), (2, 3, 2), (3, 1), bias=False)
    assert costs[(1, 0, 2)] == (144, 100) and costs[(0, 1, 2)] == (168, 112)
    assert costs[DENSE] == (144, 132)
    assert tt_best_order(costs) == (1, 0, 2)
    # each chain order is the least for some shapes
    for out_f, in_f, ranks, best in [
        ((2, 2, 2), (3, 3, 2), (1, 3), (0, 1, 2)),
        ((2, 2, 2), (2, 2, 4), (3, 1), (2, 1, 0)),
        ((2, 2, 3), (2, 3, 3), (1, 3), (1, 2, 0)),
    ]:
        rows, cols = math.prod(out_f), math.prod(in_f)
        costs = tt_order_ops(rows, cols, out_f, in_f, ranks, bias=False)
        assert tt_best_order(costs) == best
        tt = TTLinear(cols, rows, out_f, in_f, ranks, bias=False)
        assert tt.order == best and tt.matvec_ops() == costs[best]
    # the dense product wins when a chain would cost more with multiplies weighed 1 or 1/2
    assert tt_best_order({(0, 1): (100, 100), DENSE: (110, 100)}) == (0, 1)
    assert tt_best_order({(0, 1): (100, 100), DENSE: (99, 100)}) == DENSE
    # fewer in all at weight 1 (190 < 191) but not at 1/2 (145 > 144): dense
    assert tt_best_order({(0, 1): (90, 100), DENSE: (80, 111)}) == (0, 1)
    assert tt_best_order({(0, 1): (90, 100), DENSE: (82, 104)}) == DENSE


@pytest.mark.parametrize(
    ("rows", "cols", "rank", "falls_back"),
    [
        (30, 50, 6, True),
        (13, 7, 2, True),
        (256, 64, 8, True),
        (30, 50, 3, False),  # right to left
        (64, 64, 2, False),
        (256, 64, 3, False),
    ],
)
def test_dense_fallback_never_costs_more_than_the_dense_layer(rows, cols, rank, falls_back):
    torch.manual_seed(1)
    linear = nn.Linear(cols, rows)
    tt = TTLinear.from_linear(linear, rank)
    assert (tt.order == DENSE) == falls_back
    dense = _dense_like(tt)
    for config in (FP32, CountConfig()):  # fp32, and the 16-bit allowance halving multiplies
        got, plain = count(tt, context=1.0, config=config), count(dense, context=1.0, config=config)
        assert got.ops <= plain.ops
        if falls_back:  # counted as the dense product, stored as the cores
            assert got.ops == plain.ops
        else:
            assert got.ops < plain.ops
    (row,) = count(tt, context=1.0, config=FP32).layers
    assert row.params == sum(c.numel() for c in tt.cores) + rows  # the cores and the bias
    x = torch.randn(4, cols)
    assert (tt(x) - dense(x)).abs().max() < 1e-5


def test_dense_order_reconstructs_once_and_follows_the_cores():
    tt = TTLinear.from_linear(nn.Linear(50, 30), 6)
    assert tt.order == DENSE
    with torch.no_grad():
        first = tt.dense_weight()
        assert tt.dense_weight() is first  # kept, not rebuilt per call
        tt.cores[0].mul_(2.0)  # a core changed in place: rebuilt
        again = tt.dense_weight()
        assert again is not first and (again - 2 * first).abs().max() < 1e-5
        x = torch.randn(3, 50)
        assert (tt(x) - (x @ tt.weight_matrix().T + tt.bias)).abs().max() < 1e-5
    tt(torch.randn(2, 50)).square().sum().backward()  # training sees the cores
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in tt.cores)
    assert list(tt.buffers()) == [] and "_dense" not in tt.state_dict()


def test_spec_carries_the_order_and_load_runs_it():
    base = TTLinear.from_linear(nn.Linear(50, 30), 3, out_factors=(2, 3, 5))
    for order in (*tt_orders(3), DENSE):
        tt = TTLinear(50, 30, base.out_factors, base.in_factors, base.ranks, order=order)
        spec = json.loads(json.dumps(tt.spec()))
        assert spec["order"] == (order if order == DENSE else list(order))
        with torch.device("meta"):
            rebuilt = TTLinear.from_spec(spec)
        assert rebuilt.order == order and rebuilt.matvec_ops() == tt.matvec_ops()
    old = {k: v for k, v in base.spec().items() if k != "order"}  # written before orders
    assert TTLinear.from_spec(old).order == (0, 1, 2)
    with pytest.raises(SpaceError):
        TTLinear.from_spec({**base.spec(), "order": [0, 2, 1]})


# --------------------------------------------------------------------------- vocabulary scale


def test_head_at_vocabulary_scale_gives_exactly_v_logits():
    """WikiText-2's 33,278 words at d = 128: 33,278 = 2·7·2377 does not factor into small
    factors, so the rows are padded to 30·30·37 = 33,300; the padded rows are stored in the
    cores but never computed."""
    vocab, dim = 33278, 128
    torch.manual_seed(2)
    head = nn.Linear(dim, vocab, bias=False)
    tt = TTLinear.from_linear(head, 8)
    assert (tt.out_factors, tt.in_factors, tt.ranks) == ((30, 30, 37), (4, 4, 8), (8, 8))
    # cores (1, 30, 4, 8), (8, 30, 4, 8), (8, 37, 8, 1): 960 + 7680 + 2368
    assert sum(c.numel() for c in tt.cores) == tt_params((30, 30, 37), (4, 4, 8), 8) == 11008
    # right to left: core 2 meets x: n0 n1 = 16 blocks of r2 m2 = 296 rows, k = n2 = 8: 4,736
    #   outputs; core 1: n0 = 4 blocks of r1 m1 = 240 rows, k = n1 r2 = 32, over m2 = 37
    #   columns: 35,520; core 0: the 33,278 real rows only (29 whole i0 blocks of 1,110 and
    #   1,088 of the 30th), k = n0 r1 = 32.
    mults = 4736 * 8 + 35520 * 32 + 33278 * 32
    adds = 4736 * 7 + 35520 * 31 + 33278 * 31
    assert (mults, adds) == (2239424, 2165890)
    assert tt.order == (2, 1, 0) and tt.matvec_ops() == (mults, adds)
    counts = count(tt, context=1.0, config=FP32)
    assert counts.params == 11008 and (counts.mults, counts.adds) == (mults, adds)
    assert mults < vocab * dim == 4259584  # about half the dense head's multiplies
    x = torch.randn(3, dim)
    with torch.no_grad():
        y = tt(x)
        assert y.shape == (3, vocab)
        want = x @ tt.weight_matrix().T
        assert (y - want).abs().max() < 1e-5 * max(1.0, float(want.abs().max()))

    wide = TTLinear.from_linear(head, 16)  # rank 16: every chain costs more than dense
    assert wide.order == DENSE
    wide_counts = count(wide, context=1.0, config=FP32)
    assert (wide_counts.mults, wide_counts.adds) == (vocab * dim, vocab * (dim - 1))
    assert wide_counts.params == tt_params((30, 30, 37), (4, 4, 8), 16)


def test_table_at_vocabulary_scale_reads_one_row():
    vocab, dim = 33278, 128
    torch.manual_seed(3)
    tt = TTEmbedding.from_embedding(nn.Embedding(vocab, dim), 8)
    assert (tt.row_factors, tt.col_factors) == ((30, 30, 37), (4, 4, 8))
    # (4 x 8) by (8 x 4·8): 1,024 mults, 4·7·32 = 896 adds; (16 x 8) by (8 x 8): 1,024, 896
    assert tt.lookup_ops() == (2048, 1792)
    ids = torch.tensor([0, 1, 12345, vocab - 1])
    with torch.no_grad():
        assert (tt(ids) - tt.table()[ids]).abs().max() < 1e-6
    with pytest.raises(IndexError):
        tt(torch.tensor([vocab]))  # a padded row is no token


# --------------------------------------------------------------------------- tied pair


def _tied_gpt() -> GPT:
    torch.manual_seed(4)
    return GPT(GPTConfig(vocab_size=200, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()


def test_tied_pair_shares_one_set_of_cores():
    model = _tied_gpt()
    dense_counts = count(model, context=4.0, config=FP32)
    technique = TensorTrain()
    assert technique.ties
    settings = LayerPolicy(rank=3, rank_method="tt")
    table, head = technique.build_tied(model.wte, model.head, settings, Given())
    assert model.head.weight is model.wte.weight  # the model is left as it is
    assert isinstance(table, TTEmbedding) and isinstance(head, TTLinear)
    assert len(head.cores) == len(table.cores) == 2
    assert all(a is b for a, b in zip(head.cores, table.cores, strict=True))
    assert head.bias is None and (head.out_features, head.in_features) == (200, 16)
    cores = sum(c.numel() for c in table.cores)
    # (12, 17) x (4, 4) at rank 3: 1·12·4·3 + 3·17·4·1 = 144 + 204; 4 padded rows, never logits
    assert cores == 348 and table.row_factors == (12, 17)

    model.wte, model.head = table, head
    counts = count(model, context=4.0, config=FP32)
    assert counts.params == dense_counts.params - 200 * 16 + cores  # the cores once
    by_name = {lc.name: lc for lc in counts.layers}
    assert by_name["wte"].params + by_name["head"].params == cores
    assert (by_name["head"].mults, by_name["head"].adds) == head.matvec_ops()
    assert (by_name["wte"].mults, by_name["wte"].adds) == table.lookup_ops()

    reference = _tied_gpt()  # the same model with the reconstructed table, tied
    with torch.no_grad():
        reference.wte.weight.copy_(table.table())
    ids = torch.randint(0, 200, (2, 8), generator=_gen(5))
    with torch.no_grad():
        assert (model(ids) - reference(ids)).abs().max() < 1e-5

    head(torch.randn(3, 16)).square().sum().backward()  # one gradient for both uses
    assert all(c.grad is not None for c in table.cores)


def test_tied_pair_saves_once_and_loads_tied(tmp_path):
    model = _tied_gpt()
    model.wte, model.head = tensor_train_tied(model.wte, model.head, 3)
    path = tmp_path / "tied.msz"
    info = save(model, path, policy=Policy(), recipe=model.recipe(), count_config=FP32)
    assert info.exact and abs(info.ratio - 1.0) < 0.02
    loaded = load(path)
    assert all(a is b for a, b in zip(loaded.head.cores, loaded.wte.cores, strict=True))
    assert loaded.head.order == model.head.order
    ids = torch.randint(0, 200, (2, 8), generator=_gen(6))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_tied_pair_refuses_an_untied_head():
    model = _tied_gpt()
    untied = nn.Linear(16, 200, bias=False)
    with pytest.raises(SpaceError, match="one shared weight"):
        tensor_train_tied(model.wte, untied, 3)
    with pytest.raises(SpaceError, match="nn.Embedding and an nn.Linear"):
        tensor_train_tied(model.head, model.wte, 3)
