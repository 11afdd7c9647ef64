"""Truncated-SVD factorization of a Linear into a `LowRankLinear` pair."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init

from ._modules import LowRankLinear

__all__ = ["factorize"]


def factorize(
    linear: nn.Linear, rank: int, *, svd: tuple[torch.Tensor, ...] | None = None
) -> LowRankLinear:
    """Best rank-`rank` approximation W ~= (U_r sqrt(S_r)) (sqrt(S_r) Vh_r), SVD in float64.

    The two factors are plain Linears in the weight's dtype and device; `second` reuses the
    original bias Parameter. Built with `skip_init` so the global RNG is not advanced. `svd` is
    the weight's ``torch.linalg.svd(w.double(), full_matrices=False)`` when already computed
    (one decomposition serves every rank).
    """
    w = linear.weight.detach()
    out_f, in_f = w.shape
    if svd is None:
        svd = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    u, s, vh = svd
    root = s[:rank].sqrt()
    kw = {"device": w.device, "dtype": w.dtype}
    first = skip_init(nn.Linear, in_f, rank, bias=False, **kw)
    second = skip_init(nn.Linear, rank, out_f, bias=linear.bias is not None, **kw)
    with torch.no_grad():
        first.weight.copy_(root[:, None] * vh[:rank])
        second.weight.copy_(u[:, :rank] * root[None, :])
    if linear.bias is not None:
        second.bias = linear.bias
    return LowRankLinear(first, second).train(linear.training)
