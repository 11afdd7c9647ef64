"""Data-aware layer compressors of the Optimal Brain Surgeon family: GPTQ, SparseGPT and Wanda.

Each reads a layer's calibration statistics, the Gram matrix G = X^T X / n of its inputs (the
layer-wise Hessian up to a factor), and keeps microsweep's formats: per-row symmetric scales
computed from the weight before any update (the grid `quantize_rows` uses), exactly
round(s * numel) pruned entries, zeros that stay zero. GPTQ and SparseGPT go through the input
columns in order and, after rounding or pruning a column, move its error onto the columns not
yet done along the inverse Hessian (Frantar and Alistarh); with an identity Hessian there is
nothing to move, so GPTQ is round-to-nearest and SparseGPT is magnitude pruning.
"""

from __future__ import annotations

import torch

from ._modules import fake_quantize_symmetric
from ._quantize import row_scales

__all__ = [
    "DAMP",
    "block_mask",
    "gptq",
    "inverse_hessian_factor",
    "output_error",
    "quantize_groups",
    "sparsegpt",
    "wanda_mask",
]

DAMP = 0.01
"""Damping added to the Hessian's diagonal, as a fraction of its mean diagonal."""
BLOCK = 128
"""Columns handled together: their errors move onto later columns in one matrix product, and
SparseGPT chooses the mask of each such block from the weights updated so far."""


def inverse_hessian_factor(
    gram: torch.Tensor, damp: float = DAMP
) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor U of (G + damp * mean(diag G) I)^-1 (float64), and which
    inputs are dead (never nonzero on calibration: their weights cannot matter and are not
    compensated). Row j of U, from the diagonal on, is how column j's error moves onward."""
    if damp < 0:
        raise ValueError(f"damp {damp} must be >= 0")
    h = gram.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    mean_diag = torch.diagonal(h).mean()
    h += (damp * mean_diag if mean_diag > 0 else damp) * torch.eye(h.shape[0], dtype=h.dtype)
    lower = torch.linalg.cholesky(h)
    inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inv, upper=True), dead


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """One column on its rows' grid, in float32 exactly as `quantize_rows` rounds."""
    return fake_quantize_symmetric(w.to(torch.float32), scale, bits).to(torch.float64)


def _checked(weight: torch.Tensor, gram: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be a matrix, got shape {tuple(weight.shape)}")
    n = weight.shape[1]
    if gram.shape != (n, n):
        raise ValueError(f"gram of shape {tuple(gram.shape)} does not match {n} inputs")


def gptq(
    weight: torch.Tensor,
    gram: torch.Tensor,
    bits: int,
    *,
    mask: torch.Tensor | None = None,
    damp: float = DAMP,
    act_order: bool = False,
    block: int = BLOCK,
    group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ: `weight` (out, in) rounded column by column to `bits` with per-row scales, each
    column's rounding error compensated on the columns after it. `mask` (kept entries) keeps
    pruned weights at zero; `act_order` takes the columns with the largest input energy first.
    With `group`, each run of `group` input columns has its own per-row scale, taken from the
    weights as updated when the run starts. Returns the rounded weight (the input's dtype) and
    the scales: (out,), or (out, in / group) with groups."""
    _checked(weight, gram)
    if not 2 <= bits <= 16:
        raise ValueError(f"gptq bits {bits} must be in 2..16")
    _check_group(group, weight.shape[1], act_order)
    w = weight.detach().to(torch.float64).clone()
    keep = None if mask is None else mask.to(torch.bool)
    if keep is not None:
        w[~keep] = 0.0
    scale = row_scales(w.to(torch.float32), bits)[:, None]
    group_scales = []
    upper, dead = inverse_hessian_factor(gram, damp)
    w[:, dead] = 0.0
    order = _order(gram, act_order)
    if order is not None:
        w, upper, keep = _permuted(w, gram, damp, order, keep)
    q = torch.zeros_like(w)
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        err = torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype)
        for i in range(i1, i2):
            if group is not None and i % group == 0:  # a new group: its scales from now
                scale = row_scales(w[:, i : i + group].to(torch.float32), bits)[:, None]
                group_scales.append(scale[:, 0])
            col = _quantize_column(w[:, i], scale[:, 0], bits)
            if keep is not None:
                col = col * keep[:, i]
            q[:, i] = col
            e = (w[:, i] - col) / upper[i, i]
            w[:, i:i2] -= e[:, None] * upper[i, i:i2][None, :]
            err[:, i - i1] = e
        w[:, i2:] -= err @ upper[i1:i2, i2:]
    if order is not None:
        q = q[:, torch.argsort(order)]
    scales = torch.stack(group_scales, dim=1) if group is not None else scale[:, 0]
    return q.to(weight.dtype), scales.to(weight.dtype)


def _check_group(group: int | None, cols: int, act_order: bool) -> None:
    """A group divides the input columns; act-order would scatter a group's columns."""
    if group is None:
        return
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or cols % group:
        raise ValueError(f"group {group!r} must be a positive int dividing the {cols} inputs")
    if act_order:
        raise ValueError("act_order with group-wise scales is not supported; drop one")


def quantize_groups(
    weight: torch.Tensor, bits: int, group: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest with one scale per row and run of `group` input columns: the weight
    on its grids (mask re-applied) and the (out, in / group) scales."""
    _check_group(group, weight.shape[1], False)
    rows, cols = weight.shape
    w = weight.detach()
    if mask is not None:
        w = w * mask
    tiles = w.reshape(rows, cols // group, group)
    amax = tiles.abs().amax(dim=2)
    qmax = 2 ** (bits - 1) - 1
    scales = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = fake_quantize_symmetric(tiles, scales[:, :, None], bits).reshape(rows, cols)
    if mask is not None:
        q = q * mask
    return q, scales


def _order(gram: torch.Tensor, act_order: bool) -> torch.Tensor | None:
    """Columns by decreasing input energy (diag G), for act-order; None keeps the order."""
    if not act_order:
        return None
    return torch.argsort(torch.diagonal(gram).to(torch.float64), descending=True, stable=True)


def _permuted(
    w: torch.Tensor,
    gram: torch.Tensor,
    damp: float,
    order: torch.Tensor,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The weight, inverse-Hessian factor and mask with their columns in `order`."""
    g = gram.detach().to(torch.float64)[order][:, order]
    upper, _ = inverse_hessian_factor(g, damp)
    return w[:, order], upper, None if keep is None else keep[:, order]


def sparsegpt(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    *,
    bits: int = 32,
    damp: float = DAMP,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SparseGPT: prune `weight` (out, in) to exactly round(`sparsity` * numel) zeros, choosing
    each block's mask by the OBS saliency w^2 / [H^-1]_jj^2 on the weights updated so far and
    compensating every removed (and, with `bits` < 32, rounded) entry on the later columns: the
    joint pass of pruning and quantization. Returns the weight, the kept-entry mask and the
    per-row scales (None at 32 bits)."""
    _checked(weight, gram)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} must be in [0, 1)")
    w = weight.detach().to(torch.float64).clone()
    quantized = bits < 32
    scale = row_scales(w.to(torch.float32), bits) if quantized else None
    upper, dead = inverse_hessian_factor(gram, damp)
    w[:, dead] = 0.0
    rows, cols = w.shape
    total = round(sparsity * rows * cols)
    keep = torch.ones_like(w, dtype=torch.bool)
    out = torch.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        # cumulative rounding: the blocks' counts add up to exactly `total`
        k = round(total * i2 / cols) - round(total * i1 / cols)
        saliency = w[:, i1:i2] ** 2 / torch.diagonal(upper)[i1:i2][None, :] ** 2
        pruned = torch.argsort(saliency.flatten(), stable=True)[:k]
        block_keep = torch.ones(saliency.numel(), dtype=torch.bool)
        block_keep[pruned] = False
        keep[:, i1:i2] = block_keep.view(rows, i2 - i1)
        err = torch.zeros(rows, i2 - i1, dtype=w.dtype)
        for i in range(i1, i2):
            col = w[:, i] * keep[:, i]
            if scale is not None:
                col = _quantize_column(col, scale, bits) * keep[:, i]
            out[:, i] = col
            e = (w[:, i] - col) / upper[i, i]
            w[:, i:i2] -= e[:, None] * upper[i, i:i2][None, :]
            err[:, i - i1] = e
        w[:, i2:] -= err @ upper[i1:i2, i2:]
    scales = None if scale is None else scale.to(weight.dtype)
    return out.to(weight.dtype), keep, scales


def wanda_mask(weight: torch.Tensor, gram: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda: the kept-entry mask that removes, in each output row, the entries of least
    |w_ij| * ||x_j|| (||x_j|| from the Gram diagonal); rows lose floor or ceil of s * in
    entries so that exactly round(s * numel) go in all. No weight is updated."""
    _checked(weight, gram)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} must be in [0, 1)")
    rows, cols = weight.shape
    norms = torch.diagonal(gram).to(torch.float64).clamp_min(0).sqrt()
    saliency = weight.detach().to(torch.float64).abs() * norms[None, :]
    order = torch.argsort(saliency, dim=1, stable=True)
    total = round(sparsity * rows * cols)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for r in range(rows):
        k = round(total * (r + 1) / rows) - round(total * r / rows)
        keep[r, order[r, :k]] = False
    return keep


def block_mask(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    block: tuple[int, int],
    *,
    method: str = "obs",
    damp: float = DAMP,
) -> torch.Tensor:
    """The kept-entry mask removing exactly round(s * n_blocks) `block`-shaped blocks (sides
    already concrete, dividing the weight), those of least saliency summed over the block:
    the OBS saliency w^2 / [H^-1]_jj^2 (``"obs"``; with an identity Hessian, the blocks of least
    L2 norm, as magnitude block pruning) or Wanda's |w| * ||x_j|| (``"wanda"``)."""
    _checked(weight, gram)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} must be in [0, 1)")
    rows, cols = weight.shape
    br, bc = block
    if br < 1 or bc < 1 or rows % br or cols % bc:
        raise ValueError(f"block {block} does not tile a {rows}x{cols} weight")
    w = weight.detach().to(torch.float64)
    if method == "obs":
        upper, _ = inverse_hessian_factor(gram, damp)
        saliency = w**2 / torch.diagonal(upper)[None, :] ** 2
    elif method == "wanda":
        saliency = w.abs() * torch.diagonal(gram).to(torch.float64).clamp_min(0).sqrt()[None, :]
    else:
        raise ValueError(f"block saliency method {method!r} is not 'obs' or 'wanda'")
    sums = saliency.reshape(rows // br, br, cols // bc, bc).sum(dim=(1, 3))
    order = torch.argsort(sums.flatten(), stable=True)
    keep = torch.ones(order.numel(), dtype=torch.bool)
    keep[order[: round(sparsity * order.numel())]] = False
    grid = keep.view(rows // br, cols // bc)
    return grid.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)


def output_error(weight: torch.Tensor, changed: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W') X||^2 / ||W X||^2 over the calibration inputs whose Gram matrix is `gram`."""
    g = gram.to(torch.float64)
    w, d = weight.to(torch.float64), (weight - changed).to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", d, g, d) / torch.einsum("ij,jk,ik->", w, g, w))
