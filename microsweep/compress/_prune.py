"""Magnitude pruning: which entries (or blocks) of a weight matrix to keep."""

from __future__ import annotations

import torch

from microsweep.errors import SpaceError

__all__ = ["check_block", "magnitude_mask", "magnitude_masks", "sparsity_of"]


def sparsity_of(tensor: torch.Tensor) -> float:
    """Fraction of entries that are exactly zero (0.0 for an empty tensor)."""
    if tensor.numel() == 0:
        return 0.0
    return float((tensor == 0).sum().item()) / tensor.numel()


def check_block(shape: tuple[int, int], block: tuple[int, int], what: str) -> None:
    """Raise `SpaceError` unless a (rows, cols) matrix splits evenly into `block`-shaped tiles."""
    rows, cols = shape
    br, bc = block
    if rows % br or cols % bc:
        raise SpaceError(
            f"{what} has shape {rows}x{cols}, which does not split into {br}x{bc} blocks; "
            f"pick a block whose sides divide {rows} and {cols}"
        )


def _keep(scores: torch.Tensor, sparsity: float, order: torch.Tensor | None = None) -> torch.Tensor:
    """Flat bool mask dropping exactly round(sparsity * n) lowest scores; ties go by index.
    `order` is ``argsort(scores.flatten(), stable=True)`` when already known."""
    n_drop = round(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_drop:
        if order is None:
            order = torch.argsort(scores.flatten(), stable=True)
        keep[order[:n_drop]] = False
    return keep


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, block: tuple[int, int] | None = None
) -> torch.Tensor:
    """Bool mask (same shape as `weight`) of the kept entries after magnitude pruning.

    Unstructured: the round(s * numel) smallest |w| go. Block: the round(s * n_blocks) blocks
    with the lowest L2 norm go. The caller checks divisibility first (see `check_block`).
    """
    return magnitude_masks(weight, [sparsity], block)[0]


def magnitude_masks(
    weight: torch.Tensor, sparsities: list[float], block: tuple[int, int] | None = None
) -> list[torch.Tensor]:
    """`magnitude_mask` at several sparsities, sorting the magnitudes once."""
    w = weight.detach()
    if block is None:
        scores = w.abs()
        order = torch.argsort(scores.flatten(), stable=True)
        return [_keep(scores, s, order).view(w.shape) for s in sparsities]
    br, bc = block
    rows, cols = w.shape
    tiles = w.reshape(rows // br, br, cols // bc, bc)
    norms = torch.linalg.vector_norm(tiles.to(torch.float64), dim=(1, 3))  # (rows/br, cols/bc)
    order = torch.argsort(norms.flatten(), stable=True)
    masks = []
    for s in sparsities:
        keep = _keep(norms, s, order).view(norms.shape)
        masks.append(keep.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1))
    return masks
