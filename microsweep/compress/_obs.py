"""Data-aware layer compressors of the Optimal Brain Surgeon family: GPTQ, SparseGPT and Wanda.

Each reads a layer's calibration statistics, the Gram matrix G = X^T X / n of its inputs (the
layer-wise Hessian up to a factor), and keeps microsweep's formats: per-row symmetric scales
computed from the weight before any update (the grid `quantize_rows` uses), exactly
round(s * numel) pruned entries, zeros that stay zero. GPTQ and SparseGPT go through the input
columns in order and, after rounding or pruning a column, move its error onto the columns not
yet done along the inverse Hessian (Frantar and Alistarh); with an identity Hessian there is
nothing to move, so GPTQ is round-to-nearest and SparseGPT is magnitude pruning.

A Gram matrix may also come as its diagonal, a vector: an embedding table is a Linear on one-hot
inputs, whose Gram matrix is diagonal (how often calibration looks each token up). Nothing then
moves between columns, so the saliencies alone choose: w^2 * g_j (OBS) or |w| * sqrt(g_j)
(Wanda), ties (an input never seen has g_j = 0) broken by magnitude.
"""

from __future__ import annotations

import torch

from ._modules import fake_quantize_symmetric
from ._quantize import quantize_rows, row_scales

__all__ = [
    "DAMP",
    "block_mask",
    "gptq",
    "group_scales",
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


def _checked(weight: torch.Tensor, gram: torch.Tensor, *, diagonal: bool = True) -> None:
    """`weight` is (out, in) and `gram` (in, in), or (in,) as a diagonal where `diagonal`."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be a matrix, got shape {tuple(weight.shape)}")
    n = weight.shape[1]
    if gram.shape != (n, n) and not (diagonal and gram.shape == (n,)):
        raise ValueError(f"gram of shape {tuple(gram.shape)} does not match {n} inputs")


def _energy(gram: torch.Tensor) -> torch.Tensor:
    """Each input's mean square (the Gram diagonal, or the vector given for it), float64."""
    diag = gram if gram.dim() == 1 else torch.diagonal(gram)
    return diag.detach().to(torch.float64).clamp_min(0)


def _ascending(saliency: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Indices along the last dimension from the least `saliency` up, equal saliencies from
    the least `magnitude` up, then by index: a deterministic order where saliencies tie."""
    by_magnitude = torch.argsort(magnitude, dim=-1, stable=True)
    by_saliency = torch.argsort(saliency.gather(-1, by_magnitude), dim=-1, stable=True)
    return by_magnitude.gather(-1, by_saliency)


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
    With `group`, each run of `group` input columns has its own per-row scale: taken from the
    weights as updated when the run starts, or with `act_order` (static groups) from the
    weight before any update, so each group stays a contiguous run of the original columns
    whichever order rounds them. Returns the rounded weight (the input's dtype) and the
    scales: (out,), or (out, in / group) with groups."""
    _checked(weight, gram, diagonal=False)
    if not 2 <= bits <= 16:
        raise ValueError(f"gptq bits {bits} must be in 2..16")
    _check_group(group, weight.shape[1])
    w = weight.detach().to(torch.float64).clone()
    keep = None if mask is None else mask.to(torch.bool)
    if keep is not None:
        w[~keep] = 0.0
    scale = row_scales(w.to(torch.float32), bits)[:, None]
    static = None
    if group is not None and act_order:
        static = group_scales(w.to(torch.float32), bits, group)
    upper, dead = inverse_hessian_factor(gram, damp)
    w[:, dead] = 0.0
    columns = torch.arange(w.shape[1])  # each processed column's place in the original order
    order = _order(gram, act_order)
    if order is not None:
        w, upper, keep = _permuted(w, gram, damp, order, keep)
        columns = order
    group_scales_seen = []
    q = torch.zeros_like(w)
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        err = torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype)
        for i in range(i1, i2):
            if static is not None:  # the column's own contiguous group, fixed up front
                scale = static[:, int(columns[i]) // group, None]
            elif group is not None and i % group == 0:  # a new group: its scales from now
                scale = row_scales(w[:, i : i + group].to(torch.float32), bits)[:, None]
                group_scales_seen.append(scale[:, 0])
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
    if static is not None:
        scales = static
    elif group is not None:
        scales = torch.stack(group_scales_seen, dim=1)
    else:
        scales = scale[:, 0]
    return q.to(weight.dtype), scales.to(weight.dtype)


def _check_group(group: int | None, cols: int) -> None:
    """A group is a positive int dividing the input columns."""
    if group is None:
        return
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or cols % group:
        raise ValueError(f"group {group!r} must be a positive int dividing the {cols} inputs")


def group_scales(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The (out, in / group) scales max|w| / (2^(b-1) - 1) of each row's runs of `group`
    input columns, in the weight's dtype (1.0 for an all-zero run)."""
    rows, cols = weight.shape
    tiles = weight.detach().reshape(rows, cols // group, group)
    amax = tiles.abs().amax(dim=2)
    qmax = 2 ** (bits - 1) - 1
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_groups(
    weight: torch.Tensor, bits: int, group: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest with one scale per row and run of `group` input columns: the weight
    on its grids (mask re-applied) and the (out, in / group) scales."""
    _check_group(group, weight.shape[1])
    rows, cols = weight.shape
    w = weight.detach()
    if mask is not None:
        w = w * mask
    scales = group_scales(w, bits, group)
    tiles = w.reshape(rows, cols // group, group)
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
    tile: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SparseGPT: prune `weight` (out, in) to exactly round(`sparsity` * numel) zeros, choosing
    each block's mask by the OBS saliency w^2 / [H^-1]_jj^2 on the weights updated so far and
    compensating every removed (and, with `bits` < 32, rounded) entry on the later columns: the
    joint pass of pruning and quantization. Returns the weight, the kept-entry mask and the
    per-row scales (None at 32 bits). With `tile` (rows, cols; concrete sides that divide the
    weight) whole tiles go, exactly round(s * n_tiles), each column block's by the saliency
    summed over the tile, and the kept weights still take the removed ones' error. A diagonal
    `gram` (a vector) moves nothing: each block's mask is chosen by w^2 * g_j alone and kept
    values are rounded to nearest after pruning."""
    _checked(weight, gram)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} must be in [0, 1)")
    if gram.dim() == 1:
        if tile is not None:
            raise ValueError("tiles on a diagonal gram: use block_mask (nothing to compensate)")
        return _diagonal_sparsegpt(weight, _energy(gram), sparsity, bits, block)
    w = weight.detach().to(torch.float64).clone()
    quantized = bits < 32
    scale = row_scales(w.to(torch.float32), bits) if quantized else None
    upper, dead = inverse_hessian_factor(gram, damp)
    w[:, dead] = 0.0
    rows, cols = w.shape
    br, bc = tile or (1, 1)
    if br < 1 or bc < 1 or rows % br or cols % bc:
        raise ValueError(f"tile {tile} does not tile a {rows}x{cols} weight")
    block = max(bc, block // bc * bc)  # column blocks of whole tiles
    total = round(sparsity * (rows // br) * (cols // bc))  # tiles (entries without `tile`)
    keep = torch.ones_like(w, dtype=torch.bool)
    out = torch.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        # cumulative rounding: the blocks' counts add up to exactly `total`
        k = round(total * i2 / cols) - round(total * i1 / cols)
        saliency = w[:, i1:i2] ** 2 / torch.diagonal(upper)[i1:i2][None, :] ** 2
        sums = saliency.reshape(rows // br, br, (i2 - i1) // bc, bc).sum(dim=(1, 3))
        pruned = torch.argsort(sums.flatten(), stable=True)[:k]
        tiles_keep = torch.ones(sums.numel(), dtype=torch.bool)
        tiles_keep[pruned] = False
        grid = tiles_keep.view(sums.shape)
        keep[:, i1:i2] = grid.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)
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


def _diagonal_sparsegpt(
    weight: torch.Tensor, energy: torch.Tensor, sparsity: float, bits: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SparseGPT on a diagonal Hessian: per block of `block` input columns, the cumulative
    share of round(s * numel) entries of least w^2 * g_j (ties by |w|) go; no compensation."""
    w = weight.detach().to(torch.float64)
    rows, cols = w.shape
    total = round(sparsity * rows * cols)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        k = round(total * i2 / cols) - round(total * i1 / cols)
        part = w[:, i1:i2]
        saliency = part**2 * energy[None, i1:i2]
        pruned = _ascending(saliency.flatten(), part.abs().flatten())[:k]
        block_keep = torch.ones(part.numel(), dtype=torch.bool)
        block_keep[pruned] = False
        keep[:, i1:i2] = block_keep.view(rows, i2 - i1)
    out = weight.detach() * keep
    if bits >= 32:
        return out, keep, None
    q, scale = quantize_rows(out, bits, keep)
    return q, keep, scale.to(weight.dtype)


def wanda_mask(weight: torch.Tensor, gram: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda: the kept-entry mask that removes, in each output row, the entries of least
    |w_ij| * ||x_j|| (||x_j|| from the Gram diagonal); rows lose floor or ceil of s * in
    entries so that exactly round(s * numel) go in all. No weight is updated. With a diagonal
    `gram` (a vector), equal saliencies (inputs never seen) go by |w|."""
    _checked(weight, gram)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} must be in [0, 1)")
    rows, cols = weight.shape
    magnitude = weight.detach().to(torch.float64).abs()
    saliency = magnitude * _energy(gram).sqrt()[None, :]
    if gram.dim() == 1:
        order = _ascending(saliency, magnitude)
    else:
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
    L2 norm, as magnitude block pruning) or Wanda's |w| * ||x_j|| (``"wanda"``). With a
    diagonal `gram` (a vector) the OBS saliency is w^2 * g_j, and equal sums (blocks of inputs
    never seen) go by the blocks' L2 norms."""
    _checked(weight, gram)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} must be in [0, 1)")
    rows, cols = weight.shape
    br, bc = block
    if br < 1 or bc < 1 or rows % br or cols % bc:
        raise ValueError(f"block {block} does not tile a {rows}x{cols} weight")
    w = weight.detach().to(torch.float64)
    diagonal = gram.dim() == 1
    if method == "obs" and diagonal:
        saliency = w**2 * _energy(gram)[None, :]
    elif method == "obs":
        upper, _ = inverse_hessian_factor(gram, damp)
        saliency = w**2 / torch.diagonal(upper)[None, :] ** 2
    elif method == "wanda":
        saliency = w.abs() * _energy(gram).sqrt()[None, :]
    else:
        raise ValueError(f"block saliency method {method!r} is not 'obs' or 'wanda'")

    def block_sums(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(rows // br, br, cols // bc, bc).sum(dim=(1, 3)).flatten()

    if diagonal:
        order = _ascending(block_sums(saliency), block_sums(w**2))
    else:
        order = torch.argsort(block_sums(saliency), stable=True)
    keep = torch.ones(order.numel(), dtype=torch.bool)
    keep[order[: round(sparsity * order.numel())]] = False
    grid = keep.view(rows // br, cols // bc)
    return grid.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)


def output_error(weight: torch.Tensor, changed: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W') X||^2 / ||W X||^2 over the calibration inputs whose Gram matrix is `gram`
    (or its diagonal, a vector)."""
    g = gram.to(torch.float64)
    w, d = weight.to(torch.float64), (weight - changed).to(torch.float64)
    if g.dim() == 1:
        return float(((d**2) @ g).sum() / ((w**2) @ g).sum())
    return float(torch.einsum("ij,jk,ik->", d, g, d) / torch.einsum("ij,jk,ik->", w, g, w))
