"""Low-rank factorization of a Linear into a `LowRankLinear` pair: truncated SVD of the weight,
or data-aware SVD that weighs the weight's columns by what the layer's inputs carry.

Plain SVD minimizes ||W - W_r|| and ignores the inputs. `activation` scales column j by the
square root of the mean |x_j| seen on calibration tokens (activation-aware SVD: columns fed by
large inputs are kept more exactly); `whiten` takes L with L L^T = X^T X / n (Cholesky of the
input Gram matrix), so the truncated SVD of W L minimizes the output error ||(W - W_r) X|| over
every rank-r W_r (whitened SVD). Both return W_r = U_r S_r V_r^T T^-1 as the same two factors.

A tied table and head (one (V, d) matrix) factorized data-aware also weigh its rows: with
D = diag(sqrt(f + eps)) from the table's row frequencies f (`frequency_rows`), the truncated
SVD of D W T minimizes ||D (W - W_r) T|| over every rank-r W_r, and W_r = D^-1 U_r S_r V_r^T T^-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import skip_init

from microsweep.policy import RANK_METHODS

from ._modules import LowRankEmbedding, LowRankLinear

__all__ = [
    "RANK_METHODS",
    "InputStats",
    "factorize",
    "frequency_rows",
    "rank_transform",
    "weight_svd",
]


@dataclass
class InputStats:
    """What a layer's inputs look like on calibration tokens (float64): the Gram matrix
    X^T X / n and the mean |x| per input feature, over n rows.

    An embedding's input is a one-hot token, whose Gram matrix is diagonal: `gram` is then its
    diagonal, the (V,) vector of how often each token is looked up (a V x V matrix would be
    mostly zeros), and `abs_mean` the same frequencies."""

    gram: torch.Tensor
    abs_mean: torch.Tensor
    rows: int

    @property
    def diagonal(self) -> bool:
        """Whether `gram` is given as its diagonal (an embedding's token frequencies)."""
        return self.gram.dim() == 1


def rank_transform(method: str, stats: InputStats | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, T^-1), float64, for a data-aware `method`: the SVD of W T is truncated. A diagonal
    T (activation scaling) is given as its diagonal vector."""
    if stats is None:
        raise ValueError(f"rank method {method!r} needs the layer's calibration inputs")
    if method == "activation":
        scale = stats.abs_mean.sqrt()
        scale = scale.clamp_min(max(float(scale.max()) * 1e-6, 1e-12))  # dead inputs stay usable
        return scale, 1.0 / scale
    if method == "whiten":
        gram = stats.gram
        n = gram.shape[0]
        # a small ridge keeps the factor invertible when some inputs never vary
        diag = gram if stats.diagonal else gram.diagonal()
        ridge = max(float(diag.mean()) * 1e-6, 1e-12)
        if stats.diagonal:  # a diagonal Gram matrix: its Cholesky factor is its square root
            root = (gram + ridge).sqrt()
            return root, 1.0 / root
        lower = torch.linalg.cholesky(gram + ridge * torch.eye(n, dtype=gram.dtype))
        eye = torch.eye(n, dtype=gram.dtype)
        return lower, torch.linalg.solve_triangular(lower, eye, upper=False)
    raise ValueError(f"rank method {method!r} is not one of {', '.join(RANK_METHODS)}")


def frequency_rows(freqs: torch.Tensor) -> torch.Tensor:
    """D's diagonal for a tied pair: sqrt(f + eps) per row, float64, with f a table's token
    frequencies normalized to sum 1 and eps = 1/V (a uniform prior as heavy as the calibration
    tokens: rows the tokens never look up still weigh, as the head scores every row)."""
    f = freqs.detach().to(torch.float64).reshape(-1)
    total = float(f.sum())
    f = f / total if total > 0 else torch.zeros_like(f)
    return (f + 1.0 / max(f.numel(), 1)).sqrt()


def times_transform(matrix: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """matrix @ T, with T a matrix or a diagonal given as a vector."""
    return matrix * t[None, :] if t.dim() == 1 else matrix @ t


def weight_svd(
    weight: torch.Tensor,
    transform: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    keep: int | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD `factorize` truncates: of W T (T the identity without `transform`; D W T with
    `rows`, D's diagonal), computed in float64 and kept as (U, S, Vh) in float32 (float64 for
    a float64 weight), only the first `keep` singular triples when given. Half the bytes of
    the float64 SVD (a variant cache holds one per layer), and every rank is built from these
    same values, cached or not."""
    target = weight.detach().to(torch.float64)
    if transform is not None:
        target = times_transform(target, transform[0].to(target.device))
    if rows is not None:
        target = rows.to(target.device, torch.float64)[:, None] * target
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    if keep is not None:
        u, s, vh = u[:, :keep], s[:keep], vh[:keep]
    dtype = torch.promote_types(weight.dtype, torch.float32)
    # fresh contiguous storage: a slice would keep the whole float64 SVD alive
    return tuple(torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t) for t in (u, s, vh))


def factorize(
    linear: nn.Linear | nn.Embedding,
    rank: int,
    *,
    svd: tuple[torch.Tensor, ...] | None = None,
    transform: tuple[torch.Tensor, torch.Tensor] | None = None,
    rows: torch.Tensor | None = None,
) -> LowRankLinear:
    """Best rank-`rank` approximation W ~= (U_r sqrt(S_r)) (sqrt(S_r) Vh_r T^-1), from the SVD
    of W T (T the identity for plain SVD; see `rank_transform`) as `weight_svd` keeps it.

    The two factors are plain Linears in the weight's dtype and device, their products formed
    in float64; `second` reuses the original bias Parameter. Built with `skip_init` so the
    global RNG is not advanced. `svd` is ``weight_svd(W, transform)`` (possibly truncated to at
    least `rank` triples) when already computed: one decomposition serves every rank.

    An `nn.Embedding` table E (V, d) is factorized the same way, read as V rows of d: the
    result is a `LowRankEmbedding` whose (V, rank) table holds U_r sqrt(S_r) and whose
    rank -> d projection holds (sqrt(S_r) Vh_r)^T (plain SVD only).

    With `rows` (D's diagonal, see `frequency_rows`) the SVD is of D W T and the second factor
    D^-1 U_r sqrt(S_r): the rank-r W_r nearest W in ||D (W - W_r) T||.
    """
    w = linear.weight.detach()
    out_f, in_f = w.shape
    embedding = isinstance(linear, nn.Embedding)
    if embedding and (transform is not None or rows is not None):
        raise ValueError("an embedding factorizes by plain SVD only")
    if svd is None:
        svd = weight_svd(w, transform, rows=rows)
    u, s, vh = svd
    if s.numel() < min(rank, out_f, in_f):
        raise ValueError(f"the SVD given keeps {s.numel()} singular values, not rank {rank}")
    root = s[:rank].to(torch.float64).sqrt()
    first_w = root[:, None] * vh[:rank].to(torch.float64)
    if transform is not None:
        first_w = times_transform(first_w, transform[1].to(first_w.device))
    second_w = u[:, :rank].to(torch.float64) * root[None, :]
    if rows is not None:
        second_w = second_w / rows.to(second_w.device, torch.float64)[:, None]
    kw = {"device": w.device, "dtype": w.dtype}
    if embedding:
        table = skip_init(nn.Embedding, out_f, rank, padding_idx=linear.padding_idx, **kw)
        proj = skip_init(nn.Linear, rank, in_f, bias=False, **kw)
        with torch.no_grad():
            table.weight.copy_(second_w)
            proj.weight.copy_(first_w.T)
        return LowRankEmbedding(table, proj).train(linear.training)
    first = skip_init(nn.Linear, in_f, rank, bias=False, **kw)
    second = skip_init(nn.Linear, rank, out_f, bias=linear.bias is not None, **kw)
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
    if linear.bias is not None:
        second.bias = linear.bias
    return LowRankLinear(first, second).train(linear.training)
