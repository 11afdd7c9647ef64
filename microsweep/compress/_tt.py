"""Tensor-train (TT) layers: a Linear or Embedding weight stored as a chain of small 4-D cores.

A weight W of shape (out, in) is zero-padded to (M, N) with M = m_1·…·m_d and N = n_1·…·n_d,
viewed as a d-way tensor with paired indices (i_k, j_k), and written as
``W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] @ … @ G_d[:, i_d, j_d, :]`` with cores G_k of
shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1. Multi-indices are row-major (i_1 most
significant), as ``W.reshape(m_1, …, m_d, n_1, …, n_d)`` reads them. `tt_svd` finds the cores by
sequential truncated SVDs (exact at full TT-ranks); `TTLinear` multiplies by W (contracting
the cores, or by W rebuilt once where that costs fewer ops) and `TTEmbedding` reads rows of a
table without rebuilding it, so inference stores only Σ r_{k-1} m_k n_k r_k values
(`tt_params`).

Shape rules (`tt_dims`, `tt_shape`): a dimension n is padded to the N in [n, n + ceil(0.1·n)]
whose most balanced d factors have the smallest sum (for a fixed product, the sum is smallest
when the factors are equal; across N, a larger N raises it, so the rule trades padding against
balance); ties go to the smaller N, then to the factors with the smaller largest one. Factors
are returned in ascending order. The number of cores d is 2, 3 or 4: the largest with
4^d <= min(out, in) (2 below that), so each factor of the smaller side is about 4 or more.

Ops (MicroNet counting, dot product of length k = k mults + k-1 adds) are counted from the
contraction order the forward passes run (`tt_matvec_ops`, `tt_lookup_ops`). A `TTLinear`
may contract the input with its cores in any chain order (`tt_orders`: left to right, right
to left, or from a middle core outwards) or multiply by the weight reconstructed once
(`DENSE`); `tt_order_ops` counts each and `tt_best_order` picks the least, falling back to
the dense product when every chain costs more, so the layer never costs more ops than the
dense layer. Padded input columns are computed (zeros, paid for); padded output rows never
are: once the contraction reaches the first core only the row prefixes of real rows are
computed, so a vocabulary head gives exactly V logits and its padding costs stored core
values only. A table lookup reads one row, so its padded rows are never read either.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from microsweep.errors import SpaceError

__all__ = [
    "DENSE",
    "Order",
    "TTEmbedding",
    "TTLinear",
    "tt_best_order",
    "tt_dims",
    "tt_full",
    "tt_lookup_ops",
    "tt_matvec_ops",
    "tt_max_ranks",
    "tt_order_ops",
    "tt_orders",
    "tt_params",
    "tt_shape",
    "tt_svd",
]

PAD_MARGIN = 0.1
"""Default most padding `tt_dims` may add, as a fraction of the dimension (rounded up)."""
MAX_CORES = 4
"""The most cores `tt_shape` picks on its own."""


# --------------------------------------------------------------------------- validation


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpaceError(f"{what} {value!r} must be a positive int")
    return int(value)


def _factors(values: Any, what: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise SpaceError(f"{what} {values!r} must be a non-empty sequence of positive ints")
    return tuple(_positive_int(v, f"{what} entry") for v in values)


def _check_shape(
    out_features: int, in_features: int, out_factors: Any, in_factors: Any
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validated factors: same length, products covering the (out, in) matrix."""
    out_f = _factors(out_factors, "out_factors")
    in_f = _factors(in_factors, "in_factors")
    if len(out_f) != len(in_f):
        raise SpaceError(
            f"out_factors {out_f} and in_factors {in_f} must have the same length (one pair of "
            "factors per core)"
        )
    if math.prod(out_f) < out_features:
        raise SpaceError(f"out_factors {out_f} multiply to less than {out_features} rows")
    if math.prod(in_f) < in_features:
        raise SpaceError(f"in_factors {in_f} multiply to less than {in_features} columns")
    return out_f, in_f


def _resolve_ranks(
    ranks: int | Sequence[int], out_factors: Sequence[int], in_factors: Sequence[int]
) -> tuple[int, ...]:
    """Inner ranks (r_1..r_{d-1}): a scalar r gives min(r, max rank) at every cut, a sequence
    gives one rank per cut, each also capped at the cut's max rank."""
    caps = tt_max_ranks(out_factors, in_factors)
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        r = _positive_int(ranks, "TT rank")
        return tuple(min(r, cap) for cap in caps)
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
        raise SpaceError(f"TT ranks {ranks!r} must be a positive int or a sequence of them")
    if len(ranks) != len(caps):
        raise SpaceError(
            f"TT ranks {tuple(ranks)} must give one rank per cut: {len(caps)} for "
            f"{len(caps) + 1} cores"
        )
    return tuple(min(_positive_int(r, "TT rank"), cap) for r, cap in zip(ranks, caps, strict=True))


# --------------------------------------------------------------------------- shapes


def _tuples_with_sum(d: int, total: int, low: int, lo: int, hi: int) -> Iterator[tuple[int, ...]]:
    """Non-decreasing d-tuples of ints >= `low` summing to `total` with product in [lo, hi].

    With the first factor f fixed (f <= total/d), the product is at most f·((total-f)/(d-1))^(d-1)
    (a balanced tail) and at least f^(d-1)·(total-(d-1)·f) (the tail as unbalanced as allowed);
    both grow with f, so only a window of f is searched (integer arithmetic, exact)."""
    if d == 1:
        if total >= low and lo <= total <= hi:
            yield (total,)
        return
    top = total // d

    def can_reach_lo(f: int) -> bool:
        return f * (total - f) ** (d - 1) >= lo * (d - 1) ** (d - 1)

    if low > top or not can_reach_lo(top):
        return
    left, right = low, top  # smallest f in [low, top] whose largest product reaches lo
    while left < right:
        mid = (left + right) // 2
        if can_reach_lo(mid):
            right = mid
        else:
            left = mid + 1
    for first in range(left, top + 1):
        if first ** (d - 1) * (total - (d - 1) * first) > hi:
            break
        for tail in _tuples_with_sum(d - 1, total - first, first, -(-lo // first), hi // first):
            yield (first, *tail)


def _balanced_split(n: int, d: int, low: int = 1) -> tuple[int, ...] | None:
    """The ascending d factors >= `low` of exactly `n` with the smallest sum (then the smallest
    largest factor), or None; trial division, for one n at a time."""
    if d == 1:
        return (n,) if n >= low else None
    best: tuple[int, ...] | None = None
    first = low
    while first**d <= n:
        if n % first == 0:
            tail = _balanced_split(n // first, d - 1, first)
            if tail is not None:
                cand = (first, *tail)
                if best is None or (sum(cand), cand[-1]) < (sum(best), best[-1]):
                    best = cand
        first += 1
    return best


_DIRECT_RANGE = 32
"""Up to this many candidate products, `tt_dims` factors each one directly."""


def tt_dims(n: int, d: int, *, margin: float = PAD_MARGIN) -> tuple[int, ...]:
    """Split dimension `n` into `d` ascending factors whose product N >= n (see the module
    docstring): the N in [n, n + ceil(margin·n)] whose factors have the smallest sum."""
    n = _positive_int(n, "dimension")
    d = _positive_int(d, "number of TT cores")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
        raise SpaceError(f"padding margin {margin!r} must be a number >= 0")
    if d == 1:
        return (n,)
    hi = n + math.ceil(margin * n)
    if hi - n < _DIRECT_RANGE:  # few candidates (small n or margin): factor each exactly
        splits = [_balanced_split(big_n, d) for big_n in range(n, hi + 1)]
        return min(
            (t for t in splits if t is not None), key=lambda t: (sum(t), math.prod(t), t[-1])
        )
    # many candidates: raise the sum from its AM-GM floor d·n^(1/d) until some product fits
    total = max(d, math.ceil(d * n ** (1 / d) - 1e-9))
    while True:
        found = list(_tuples_with_sum(d, total, 1, n, hi))
        if found:
            return min(found, key=lambda t: (math.prod(t), t[-1]))
        total += 1


def tt_shape(
    out_features: int, in_features: int, d: int | None = None, *, margin: float = PAD_MARGIN
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(out_factors, in_factors) for a TT of an (out, in) matrix; `d` defaults to the largest
    of 2, 3, 4 with 4^d <= min(out, in) (2 for small matrices)."""
    out_features = _positive_int(out_features, "out_features")
    in_features = _positive_int(in_features, "in_features")
    if d is None:
        small = min(out_features, in_features)
        d = 2
        while d < MAX_CORES and 4 ** (d + 1) <= small:
            d += 1
    d = _positive_int(d, "number of TT cores")
    return tt_dims(out_features, d, margin=margin), tt_dims(in_features, d, margin=margin)


def tt_max_ranks(out_factors: Sequence[int], in_factors: Sequence[int]) -> tuple[int, ...]:
    """The largest useful rank at each of the d-1 cuts: min(Π_{j<=k} m_j n_j, Π_{j>k} m_j n_j),
    the rank of the k-th unfolding of a generic tensor (full TT-rank: exact reconstruction)."""
    out_f, in_f = _check_shape(0, 0, out_factors, in_factors)
    sizes = [m * n for m, n in zip(out_f, in_f, strict=True)]
    return tuple(
        min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)
    )


def tt_params(
    out_factors: Sequence[int], in_factors: Sequence[int], ranks: int | Sequence[int]
) -> int:
    """Stored values of the cores, Σ_k r_{k-1} m_k n_k r_k (compare with out·in for the
    break-even rank); `ranks` as in `tt_svd`."""
    out_f, in_f = _check_shape(0, 0, out_factors, in_factors)
    full = (1, *_resolve_ranks(ranks, out_f, in_f), 1)
    return sum(full[k] * out_f[k] * in_f[k] * full[k + 1] for k in range(len(out_f)))


# --------------------------------------------------------------------------- decomposition


def tt_svd(
    matrix: torch.Tensor,
    out_factors: Sequence[int],
    in_factors: Sequence[int],
    ranks: int | Sequence[int],
) -> list[torch.Tensor]:
    """TT cores (float64, on the matrix's device) of `matrix` (M, N) zero-padded to the factors'
    products: sequential truncated SVDs, left to right, of the (m1 n1, m2 n2, …) tensor.

    A scalar rank r keeps min(r, max rank) at every cut (`tt_max_ranks`); a sequence gives one
    rank per cut (also capped). At full ranks the reconstruction is exact to roundoff; truncated,
    the Frobenius error is at most sqrt(Σ_k ε_k²), ε_k the error of the best rank-r_k
    approximation of the k-th unfolding.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise SpaceError("tt_svd needs a 2-D (out, in) tensor")
    if not matrix.is_floating_point():
        raise SpaceError(f"tt_svd needs a floating-point matrix, got {matrix.dtype}")
    rows, cols = matrix.shape
    out_f, in_f = _check_shape(rows, cols, out_factors, in_factors)
    inner = _resolve_ranks(ranks, out_f, in_f)
    d = len(out_f)
    big_m, big_n = math.prod(out_f), math.prod(in_f)
    padded = matrix.detach().new_zeros((big_m, big_n), dtype=torch.float64)
    padded[:rows, :cols] = matrix.detach().to(torch.float64)
    # (m1..md, n1..nd) -> (m1, n1, m2, n2, ...): each core's pair of indices side by side
    order = [axis for k in range(d) for axis in (k, d + k)]
    rest = padded.reshape(*out_f, *in_f).permute(*order).contiguous()
    cores = []
    r_prev = 1
    for k in range(d - 1):
        unfolding = rest.reshape(r_prev * out_f[k] * in_f[k], -1)
        u, s, vh = torch.linalg.svd(unfolding, full_matrices=False)
        r = min(inner[k], s.numel())
        cores.append(u[:, :r].reshape(r_prev, out_f[k], in_f[k], r))
        rest = s[:r, None] * vh[:r]
        r_prev = r
    cores.append(rest.reshape(r_prev, out_f[-1], in_f[-1], 1))
    return cores


def tt_full(cores: Sequence[torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
    """The (out, in) matrix the cores represent: contract the chain into the padded
    (M, N) matrix, then crop the padding. Differentiable; in the cores' dtype."""
    if not cores:
        raise SpaceError("tt_full needs at least one core")
    if any(c.dim() != 4 for c in cores) or cores[0].shape[0] != 1 or cores[-1].shape[-1] != 1:
        raise SpaceError("TT cores must be 4-D (r_prev, m, n, r) with r_0 = r_d = 1")
    full = cores[0][0]  # (m1, n1, r1)
    for core in cores[1:]:
        rows, cols, _ = full.shape
        _, m, n, r = core.shape
        full = torch.einsum("abr,rmns->ambns", full, core).reshape(rows * m, cols * n, r)
    if full.shape[0] < out_features or full.shape[1] < in_features:
        raise SpaceError(
            f"cores describe a {tuple(full.shape[:2])} matrix, smaller than "
            f"({out_features}, {in_features})"
        )
    return full[:out_features, :in_features, 0]


# --------------------------------------------------------------------------- contraction orders

DENSE = "dense"
"""The order that multiplies by the dense weight, reconstructed from the cores once (when the
module is first run after it is built or loaded, like a decoded layer's weight: no per-token
ops for the reconstruction) rather than per token."""

Order = tuple[int, ...] | str
"""A `TTLinear` contraction order: the core indices in the order they meet the input, or `DENSE`."""


def tt_orders(d: int) -> list[tuple[int, ...]]:
    """Every chain order of d cores: the input meets one core first, then each next core is a
    neighbour of the run contracted so far (left or right), so the state is always one
    (rows of the run) x (columns outside it) block: 2^(d-1) orders, left to right first,
    right to left second, the middle-out ones after them in sorted order."""
    d = _positive_int(d, "number of TT cores")
    found: list[tuple[int, ...]] = []

    def grow(seq: tuple[int, ...], lo: int, hi: int) -> None:
        if len(seq) == d:
            found.append(seq)
            return
        if hi + 1 < d:
            grow((*seq, hi + 1), lo, hi + 1)
        if lo > 0:
            grow((*seq, lo - 1), lo - 1, hi)

    for start in range(d):
        grow((start,), start, start)
    ends = [tuple(range(d)), tuple(reversed(range(d)))]
    return list(dict.fromkeys([*ends, *sorted(found)]))


def _check_order(order: Any, d: int) -> Order:
    """`order` as a tuple of core indices from `tt_orders(d)`, or `DENSE`."""
    if order == DENSE:
        return DENSE
    if isinstance(order, (str, bytes)) or not isinstance(order, Sequence):
        raise SpaceError(
            f"TT contraction order {order!r} must be {DENSE!r} or a list of core indices"
        )
    seq = tuple(order)
    if any(isinstance(k, bool) or not isinstance(k, int) for k in seq) or seq not in tt_orders(d):
        raise SpaceError(
            f"TT contraction order {list(seq)} is not a chain order of {d} cores: start at one "
            "core and add a neighbour of the contracted run at each step (see tt_orders)"
        )
    return seq


@dataclass(frozen=True)
class _Step:
    """One contraction of `TTLinear.forward`: the core-side matrix (its first `rows` rows)
    times the state's (`inner` x `cols`) blocks, for `lead` of them; `part`, when the row
    count is cut to the layer's real rows, one more product (rows, cols) on a slice
    (`TTLinear._contract` says which). Each output element is one dot product of `inner`."""

    core: int
    side: str
    """"first" (the input meets the core), "right" (the core after the run), "left" (before)."""
    lead: int
    rows: int
    inner: int
    cols: int
    part: tuple[int, int] | None = None

    def ops(self) -> tuple[int, int]:
        """(multiplies, adds) of the step: every output element is a dot product of `inner`."""
        outputs = self.lead * self.rows * self.cols
        if self.part is not None:
            outputs += self.part[0] * self.part[1]
        return outputs * self.inner, outputs * (self.inner - 1)


def _chain(
    order: Sequence[int],
    out_f: Sequence[int],
    in_f: Sequence[int],
    ranks: Sequence[int],
    rows: int,
) -> list[_Step]:
    """The steps of contracting the (padded) input with the cores in `order`.

    The state after each step is (Π n_j left of the run, r_{lo-1}, I, r_hi, Π n_j right of
    it), I the run's row multi-indices, row-major. Once the run holds the first core, its rows
    are prefixes of the output index, and only the ceil(rows / Π m_j right of the run)
    prefixes that reach a real row are computed: the step that adds a core computes the
    kept prefixes' whole blocks and one partial block, so exactly `rows` outputs come out and
    no padded row is ever computed. Padded input columns are zeros, computed like the rest.
    """
    full = (1, *ranks, 1)
    steps: list[_Step] = []
    lo = hi = -1
    kept = 0  # rows of the contracted run that are computed
    for k in order:
        right_n = math.prod(in_f[k + 1 :])
        if lo < 0:
            left_n = math.prod(in_f[:k])
            if k == 0:
                kept = -(-rows // math.prod(out_f[1:]))
                steps.append(_Step(k, "first", left_n, kept * full[1], in_f[k], right_n))
            else:
                kept = out_f[k]
                block = full[k] * out_f[k] * full[k + 1]
                steps.append(_Step(k, "first", left_n, block, in_f[k], right_n))
            lo = hi = k
        elif k == hi + 1:
            inner = full[k] * in_f[k]
            block = out_f[k] * full[k + 1]
            if lo == 0:  # prefixes: whole blocks of m_k rows, then the partial one
                new = -(-rows // math.prod(out_f[k + 1 :]))
                whole, rest = divmod(new, out_f[k])
                part = (rest * full[k + 1], right_n) if rest else None
                steps.append(_Step(k, "right", whole, block, inner, right_n, part))
                kept = new
            else:
                lead = math.prod(in_f[:lo]) * full[lo] * kept
                steps.append(_Step(k, "right", lead, block, inner, right_n))
                kept *= out_f[k]
            hi = k
        elif k == lo - 1:
            inner = in_f[k] * full[k + 1]
            tail = full[hi + 1] * math.prod(in_f[hi + 1 :])  # per run row: r_hi, right columns
            if k == 0:  # the first core's index leads: whole run blocks, then part of one
                new = -(-rows // math.prod(out_f[hi + 1 :]))
                whole, rest = divmod(new, kept)
                part = (1, rest * tail) if rest else None
                steps.append(_Step(k, "left", 1, whole, inner, kept * tail, part))
                kept = new
            else:
                lead = math.prod(in_f[:k])
                steps.append(_Step(k, "left", lead, full[k] * out_f[k], inner, kept * tail))
                kept *= out_f[k]
            lo = k
        else:  # pragma: no cover - orders are checked by _check_order
            raise SpaceError(f"TT contraction order {list(order)} is not a chain order")
    return steps


def _chain_ops(steps: Sequence[_Step]) -> tuple[int, int]:
    mults = adds = 0
    for step in steps:
        m, a = step.ops()
        mults += m
        adds += a
    return mults, adds


def tt_matvec_ops(
    out_factors: Sequence[int],
    in_factors: Sequence[int],
    ranks: int | Sequence[int],
    order: Sequence[int] | None = None,
    *,
    rows: int | None = None,
) -> tuple[int, int]:
    """(multiplies, adds) per token of the TT contraction in `order` (default left to right),
    without the bias, for a layer of `rows` real output rows (default all Π m_k: padded rows
    beyond `rows` are never computed). Each step's outputs are dot products: left to right,
    step k costs Π_{j<k} m_j·(m_k r_k)·(r_{k-1} n_k)·Π_{j>k} n_j multiplies (one add fewer per
    output); right to left, Π_{j<k} n_j·(r_{k-1} m_k)·(n_k r_k)·Π_{j>k} m_j."""
    out_f, in_f = _check_shape(0, 0, out_factors, in_factors)
    seq = _check_order(tuple(range(len(out_f))) if order is None else order, len(out_f))
    if seq == DENSE:
        raise SpaceError("tt_matvec_ops counts a chain order; the dense order is a matvec")
    big_m = math.prod(out_f)
    rows = big_m if rows is None else _positive_int(rows, "rows")
    if rows > big_m:
        raise SpaceError(f"rows {rows} exceed the {big_m} rows the out_factors {out_f} cover")
    return _chain_ops(_chain(seq, out_f, in_f, _resolve_ranks(ranks, out_f, in_f), rows))


def tt_order_ops(
    out_features: int,
    in_features: int,
    out_factors: Sequence[int],
    in_factors: Sequence[int],
    ranks: int | Sequence[int],
    *,
    bias: bool,
) -> dict[Order, tuple[int, int]]:
    """(multiplies, adds) per token of every order a `TTLinear` of these shapes may run, bias
    adds included: each of `tt_orders` and `DENSE` (out·in multiplies, out·(in - 1) adds)."""
    out_features = _positive_int(out_features, "out_features")
    in_features = _positive_int(in_features, "in_features")
    out_f, in_f = _check_shape(out_features, in_features, out_factors, in_factors)
    inner = _resolve_ranks(ranks, out_f, in_f)
    extra = out_features if bias else 0
    found: dict[Order, tuple[int, int]] = {}
    for seq in tt_orders(len(out_f)):
        mults, adds = _chain_ops(_chain(seq, out_f, in_f, inner, out_features))
        found[seq] = (mults, adds + extra)
    found[DENSE] = (out_features * in_features, out_features * (in_features - 1) + extra)
    return found


_MULT_WEIGHTS = (0.5, 1.0)
"""How a multiply may weigh against an add: 1 at fp32, 1/2 under the 16-bit allowance."""


def tt_best_order(costs: Mapping[Order, tuple[int, int]]) -> Order:
    """The order of least operations among `tt_order_ops`' costs: the chain order of least
    multiplies plus adds (then fewer multiplies, then the earlier order); the dense product
    instead when that chain would cost more than it with multiplies weighed at 1 or at 1/2
    (so the layer's ops are never above the dense layer's, with or without the allowance)."""
    chains = [o for o in costs if o != DENSE]
    best = min(chains, key=lambda o: (sum(costs[o]), costs[o][0], chains.index(o)))
    if DENSE in costs:
        (cm, ca), (dm, da) = costs[best], costs[DENSE]
        if any(w * cm + ca > w * dm + da for w in _MULT_WEIGHTS):
            return DENSE
    return best


# --------------------------------------------------------------------------- lookups


def tt_lookup_ops(
    row_factors: Sequence[int], col_factors: Sequence[int], ranks: int | Sequence[int]
) -> tuple[int, int]:
    """(multiplies, adds) per token of `TTEmbedding.forward`: the first slice is read as is,
    then step k >= 2 multiplies the (B_{k-1} × r_{k-1}) partial row by the (r_{k-1} × b_k r_k)
    slice, B_{k-1} = Π_{j<k} b_j: B_{k-1}·r_{k-1}·b_k·r_k multiplies, B_{k-1}·(r_{k-1}-1)·b_k·r_k
    adds."""
    row_f, col_factors = _check_shape(0, 0, row_factors, col_factors)
    full = (1, *_resolve_ranks(ranks, row_f, col_factors), 1)
    mults = adds = 0
    for k in range(1, len(col_factors)):
        lead = math.prod(col_factors[:k])
        mults += lead * full[k] * col_factors[k] * full[k + 1]
        adds += lead * (full[k] - 1) * col_factors[k] * full[k + 1]
    return mults, adds


# --------------------------------------------------------------------------- modules


def _empty_cores(
    out_f: Sequence[int],
    in_f: Sequence[int],
    ranks: Sequence[int],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> nn.ParameterList:
    full = (1, *ranks, 1)
    return nn.ParameterList(
        nn.Parameter(torch.zeros(full[k], m, n, full[k + 1], device=device, dtype=dtype))
        for k, (m, n) in enumerate(zip(out_f, in_f, strict=True))
    )


def _load_cores(module: nn.Module, cores: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, core in zip(module.cores, cores, strict=True):
            param.copy_(core)


def _spec_field(spec: Mapping[str, Any], key: str, kind: str) -> Any:
    if key not in spec:
        raise SpaceError(f"{kind} spec lacks {key!r}")
    return spec[key]


def _read_spec(spec: Any, kind: str) -> Mapping[str, Any]:
    if not isinstance(spec, Mapping):
        raise SpaceError(f"a {kind} spec must be a JSON object, got {type(spec).__name__}")
    if spec.get("type") != kind:
        raise SpaceError(f"not a {kind} spec: type {spec.get('type')!r}")
    return spec


def _spec_ranks(ranks: Any, d: int) -> tuple[int, ...]:
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or len(ranks) != d - 1:
        raise SpaceError(f"TT ranks {ranks!r} must be a list of {d - 1} positive ints")
    return tuple(_positive_int(r, "TT rank") for r in ranks)


class _TTMatrix(nn.Module):
    """What `TTLinear` and `TTEmbedding` share: a (rows, cols) matrix held as TT cores of
    (r_{k-1}, row_k, col_k, r_k), built by TT-SVD and described by a spec; `kind` is the spec's
    type and `factor_keys` the spec's names for the row and column factors."""

    kind: ClassVar[str]
    factor_keys: ClassVar[tuple[str, str]]
    cols_first: ClassVar[bool]
    """Whether the constructor takes the column side first (``nn.Linear(in, out)``)."""

    side_keys: ClassVar[tuple[str, str]]
    """The attributes holding the (rows, cols) sides, named as torch's module names them."""

    def _init_cores(
        self,
        shape: tuple[int, int],
        factors: tuple[Sequence[int], Sequence[int]],
        ranks: int | Sequence[int],
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        """Check the (rows, cols) `shape` and its `factors`, set the sides and factors under
        their names, resolve the ranks and make zero cores."""
        rows, cols = (_positive_int(n, key) for n, key in zip(shape, self.side_keys, strict=True))
        row_f, col_f = _check_shape(rows, cols, *factors)
        named = zip(self.side_keys + self.factor_keys, (rows, cols, row_f, col_f), strict=True)
        for key, value in named:
            setattr(self, key, value)
        self.ranks = _resolve_ranks(ranks, row_f, col_f)
        self.cores = _empty_cores(row_f, col_f, self.ranks, device, dtype)

    @classmethod
    def _from_matrix(
        cls,
        matrix: torch.Tensor,
        rank: int | Sequence[int],
        row_factors: Sequence[int] | None,
        col_factors: Sequence[int] | None,
        **kw: Any,
    ) -> Any:
        """TT-SVD of `matrix` at `rank`; factors default to `tt_shape` (one side given: the
        other gets as many factors)."""
        shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        row_f, col_f = _pick_factors(shape[0], shape[1], row_factors, col_factors)
        cores = tt_svd(matrix, row_f, col_f, rank)
        ranks = [c.shape[-1] for c in cores[:-1]]
        sides = shape[::-1] if cls.cols_first else shape
        module = cls(*sides, row_f, col_f, ranks, device=matrix.device, dtype=matrix.dtype, **kw)
        _load_cores(module, cores)
        return module

    def _factor_spec(self, row_f: Sequence[int], col_f: Sequence[int]) -> dict[str, Any]:
        """The spec's factor and rank fields."""
        row_key, col_key = self.factor_keys
        return {row_key: list(row_f), col_key: list(col_f), "ranks": list(self.ranks)}

    @classmethod
    def _read(
        cls, spec: Any
    ) -> tuple[Mapping[str, Any], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """A spec of this kind checked: (spec, row factors, column factors, ranks)."""
        spec = _read_spec(spec, cls.kind)
        row_key, col_key = cls.factor_keys
        row_f = _factors(_spec_field(spec, row_key, cls.kind), row_key)
        col_f = _factors(_spec_field(spec, col_key, cls.kind), col_key)
        return spec, row_f, col_f, _spec_ranks(_spec_field(spec, "ranks", cls.kind), len(row_f))


class TTLinear(_TTMatrix):
    """A drop-in for ``nn.Linear(in, out)`` whose weight is a TT-matrix: `cores` (an
    ``nn.ParameterList`` of (r_{k-1}, m_k, n_k, r_k) tensors) and an optional `bias`.

    `order` is how `forward` multiplies: a chain order (`tt_orders`: the zero-padded input
    meets the cores one at a time, never forming W, and only the real output rows are
    computed) or `DENSE` (the weight reconstructed from the cores once, then a dense product).
    Left as None it is the order of least operations for the shapes (`tt_best_order`), chosen
    when the module is built and written in its spec, so a loaded module runs the same order.
    The ops it costs are `matvec_ops()`. No buffers: `spec()` plus the parameters describe it.
    """

    kind = "tt_linear"
    factor_keys = ("out_factors", "in_factors")
    side_keys = ("out_features", "in_features")
    cols_first = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        out_factors: Sequence[int],
        in_factors: Sequence[int],
        ranks: int | Sequence[int],
        bias: bool = True,
        *,
        order: Sequence[int] | str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        shape = (out_features, in_features)
        self._init_cores(shape, (out_factors, in_factors), ranks, device, dtype)
        self.bias = (
            nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))
            if bias
            else None
        )
        if order is None:
            self.order: Order = tt_best_order(self.order_ops())
        else:
            self.order = _check_order(order, len(self.out_factors))
        self._steps = (
            None
            if self.order == DENSE
            else _chain(self.order, self.out_factors, self.in_factors, self.ranks, out_features)
        )
        self._dense: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | Sequence[int],
        out_factors: Sequence[int] | None = None,
        in_factors: Sequence[int] | None = None,
        *,
        order: Sequence[int] | str | None = None,
    ) -> TTLinear:
        """TT-SVD of `linear`'s weight at `rank` (see `tt_svd`); factors default to `tt_shape`
        (one side given: the other gets as many factors), the order to the cheapest. The bias
        is copied."""
        if not isinstance(linear, nn.Linear):
            raise SpaceError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        module = cls._from_matrix(
            linear.weight, rank, out_factors, in_factors, bias=linear.bias is not None, order=order
        )
        if linear.bias is not None:
            with torch.no_grad():
                module.bias.copy_(linear.bias)
        return module.train(linear.training)

    def order_ops(self) -> dict[Order, tuple[int, int]]:
        """(multiplies, adds) per token, bias included, of every order this module could run
        (`tt_order_ops`); `order` is the least (`tt_best_order`) unless it was given."""
        return tt_order_ops(
            self.out_features,
            self.in_features,
            self.out_factors,
            self.in_factors,
            self.ranks,
            bias=self.bias is not None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b`` for x of shape (..., in), in the module's `order`."""
        lead = x.shape[:-1]
        if x.shape[-1] != self.in_features:
            raise RuntimeError(
                f"TTLinear expects inputs of size {self.in_features} in the last dim, "
                f"got {tuple(x.shape)}"
            )
        if self._steps is None:
            return F.linear(x, self.dense_weight(), self.bias)
        big_n = math.prod(self.in_factors)
        z = x.reshape(-1, self.in_features)
        if big_n > self.in_features:
            z = F.pad(z, (0, big_n - self.in_features))
        for step in self._steps:
            z = self._contract(step, z)
        y = z.reshape(z.shape[0], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _contract(self, step: _Step, z: torch.Tensor) -> torch.Tensor:
        """One step on the state z (batch, ...), as `_chain` describes it: the core as a matrix
        whose columns are the contracted (rank, column) pair, times the state's blocks."""
        core = self.cores[step.core]  # (r_prev, m, n, r)
        r_prev, m, n, r = core.shape
        batch = z.shape[0]
        if step.side == "first":  # rows (r_prev, m, r), contracted n
            mat = core.permute(0, 1, 3, 2).reshape(r_prev * m * r, n)[: step.rows]
            return torch.matmul(mat, z.reshape(batch, step.lead, step.inner, step.cols))
        if step.side == "right":  # rows (m, r), contracted (r_prev, n): the state's r_hi, n_k
            mat = core.permute(1, 3, 0, 2).reshape(m * r, r_prev * n)
            z = z.reshape(batch, -1, step.inner, step.cols)
            out = torch.matmul(mat, z[:, : step.lead])
            if step.part is None:
                return out
            tail = torch.matmul(mat[: step.part[0]], z[:, step.lead : step.lead + 1])
        else:  # left: rows (r_prev, m), contracted (n, r): the state's n_k, r_lo
            mat = core.reshape(r_prev * m, n * r)
            z = z.reshape(batch, step.lead, step.inner, -1)
            out = torch.matmul(mat[: step.rows], z)
            if step.part is None:
                return out
            tail = torch.matmul(mat[step.rows : step.rows + 1], z[..., : step.part[1]])
        return torch.cat([out.reshape(batch, -1), tail.reshape(batch, -1)], dim=1)

    def weight_matrix(self) -> torch.Tensor:
        """The dense (out, in) weight the cores represent (for error checks, not inference)."""
        return tt_full(list(self.cores), self.out_features, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """The weight the `DENSE` order multiplies by: reconstructed from the cores once and
        kept (a plain attribute, never exported) until a core changes; rebuilt on every call,
        with its graph, while autograd records and a core is trainable."""
        cores = list(self.cores)
        if torch.is_grad_enabled() and any(c.requires_grad for c in cores):
            return self.weight_matrix()
        key = tuple((id(c), c.data_ptr(), c._version, c.device, c.dtype) for c in cores)
        held = self._dense
        if held is None or held[0] != key or (torch.is_grad_enabled() and held[1].is_inference()):
            with torch.no_grad():
                held = (key, self.weight_matrix())
            self._dense = held
        return held[1]

    def matvec_ops(self) -> tuple[int, int]:
        """(multiplies, adds) per token of `forward` in the module's order, bias adds included
        (`order_ops()[order]`; the dense order's from the shapes, out·in multiplies)."""
        return self.order_ops()[self.order]

    def spec(self) -> dict[str, Any]:
        """A JSON dict of every shape and the order (type "tt_linear"); `from_spec` rebuilds
        the module."""
        return {
            "type": self.kind,
            "in": self.in_features,
            "out": self.out_features,
            "bias": self.bias is not None,
            **self._factor_spec(self.out_factors, self.in_factors),
            "order": self.order if self.order == DENSE else list(self.order),
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> TTLinear:
        """An uninitialised (zero) module of `spec`'s shapes and order (a spec written before
        orders were chosen ran left to right); safe under a meta device."""
        spec, out_f, in_f, ranks = cls._read(spec)
        bias = _spec_field(spec, "bias", cls.kind)
        if not isinstance(bias, bool):
            raise SpaceError(f"tt_linear spec: bias {bias!r} must be true or false")
        order = spec.get("order", list(range(len(out_f))))
        in_features = _spec_field(spec, "in", cls.kind)
        out_features = _spec_field(spec, "out", cls.kind)
        return cls(in_features, out_features, out_f, in_f, ranks, bias=bias, order=order)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"out_factors={self.out_factors}, in_factors={self.in_factors}, ranks={self.ranks}, "
            f"bias={self.bias is not None}, order={self.order}"
        )


class TTEmbedding(_TTMatrix):
    """A drop-in for ``nn.Embedding(V, d)`` whose (V, d) table is a TT-matrix with
    V <= Π row_factors and d <= Π col_factors (padded); `cores` as in `TTLinear`.

    `forward` rebuilds only the looked-up rows: id -> multi-index (i_1..i_d), then the slices
    G_k[:, i_k] are multiplied left to right; the ops per token are `lookup_ops()`.
    """

    kind = "tt_embedding"
    factor_keys = ("row_factors", "col_factors")
    side_keys = ("num_embeddings", "embedding_dim")
    cols_first = False

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        row_factors: Sequence[int],
        col_factors: Sequence[int],
        ranks: int | Sequence[int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        shape = (num_embeddings, embedding_dim)
        self._init_cores(shape, (row_factors, col_factors), ranks, device, dtype)

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        rank: int | Sequence[int],
        row_factors: Sequence[int] | None = None,
        col_factors: Sequence[int] | None = None,
    ) -> TTEmbedding:
        """TT-SVD of `embedding`'s table at `rank`; factors default to `tt_shape` (V, d).
        ``padding_idx`` only shapes gradients and is dropped; ``max_norm`` is refused."""
        if not isinstance(embedding, nn.Embedding):
            raise SpaceError(
                f"from_embedding needs an nn.Embedding, got {type(embedding).__name__}"
            )
        if embedding.max_norm is not None:
            raise SpaceError("a TT embedding cannot renormalize rows: drop max_norm first")
        module = cls._from_matrix(embedding.weight, rank, row_factors, col_factors)
        return module.train(embedding.training)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``table[idx]`` for integer ids of any shape: (..., embedding_dim)."""
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise RuntimeError(f"TTEmbedding expects integer ids, got {idx.dtype}")
        flat = idx.reshape(-1).long()
        if flat.numel() and (bool((flat < 0).any()) or bool((flat >= self.num_embeddings).any())):
            raise IndexError(f"ids must lie in [0, {self.num_embeddings})")
        batch = flat.shape[0]
        row = None
        stride = math.prod(self.row_factors)
        width = 1  # Π_{j<k} b_j: columns built so far
        for k, core in enumerate(self.cores):
            stride //= self.row_factors[k]
            digit = torch.div(flat, stride, rounding_mode="floor") % self.row_factors[k]
            piece = core.permute(1, 0, 2, 3)[digit]  # (batch, r_prev, b_k, r_k)
            r_prev, b, r = piece.shape[1:]
            if row is None:  # r_0 = 1: the first slice is the partial row
                row = piece.reshape(batch, b, r)
            else:  # (batch, B, r_prev) @ (batch, r_prev, b r) -> (batch, B b, r)
                row = torch.bmm(row, piece.reshape(batch, r_prev, b * r))
                row = row.reshape(batch, width * b, r)
            width *= b
        out = row.reshape(batch, width)[:, : self.embedding_dim]
        return out.reshape(*idx.shape, self.embedding_dim)

    def table(self) -> torch.Tensor:
        """The dense (V, d) table the cores represent (for error checks, not inference)."""
        return tt_full(list(self.cores), self.num_embeddings, self.embedding_dim)

    def lookup_ops(self) -> tuple[int, int]:
        """(multiplies, adds) per looked-up token of `forward` (`tt_lookup_ops`)."""
        return tt_lookup_ops(self.row_factors, self.col_factors, self.ranks)

    def spec(self) -> dict[str, Any]:
        """A JSON dict of every shape (type "tt_embedding"); `from_spec` rebuilds the module."""
        return {
            "type": self.kind,
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            **self._factor_spec(self.row_factors, self.col_factors),
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> TTEmbedding:
        """An uninitialised (zero) module of `spec`'s shapes; safe under a meta device."""
        spec, row_f, col_f, ranks = cls._read(spec)
        rows = _spec_field(spec, "num_embeddings", cls.kind)
        return cls(rows, _spec_field(spec, "embedding_dim", cls.kind), row_f, col_f, ranks)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, row_factors={self.row_factors}, "
            f"col_factors={self.col_factors}, ranks={self.ranks}"
        )


def _pick_factors(
    rows: int,
    cols: int,
    row_factors: Sequence[int] | None,
    col_factors: Sequence[int] | None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Given factors where the caller passed them, `tt_shape` / `tt_dims` for the rest."""
    if row_factors is None and col_factors is None:
        return tt_shape(rows, cols)
    if row_factors is None:
        col_f = _factors(col_factors, "column factors")
        return tt_dims(rows, len(col_f)), col_f
    row_f = _factors(row_factors, "row factors")
    if col_factors is None:
        return row_f, tt_dims(cols, len(row_f))
    return _check_shape(rows, cols, row_factors, col_factors)
