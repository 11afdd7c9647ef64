"""Magnitude pruning: which entries (or blocks) of a weight matrix to keep."""

from __future__ import annotations

import torch

from microsweep.errors import SpaceError
from microsweep.policy import concrete_block

__all__ = [
    "check_block",
    "magnitude_mask",
    "magnitude_masks",
    "magnitude_order",
    "mask_from_order",
    "sparsity_of",
]


def sparsity_of(tensor: torch.Tensor) -> float:
    """Fraction of entries that are exactly zero (0.0 for an empty tensor)."""
    if tensor.numel() == 0:
        return 0.0
    return float((tensor == 0).sum().item()) / tensor.numel()


def check_block(shape: tuple[int, int], block: tuple[int, int], what: str) -> None:
    """Raise `SpaceError` unless a (rows, cols) matrix splits evenly into `block`-shaped tiles
    (a 0 side spans the matrix)."""
    rows, cols = shape
    br, bc = concrete_block(block, shape)
    if rows % br or cols % bc:
        raise SpaceError(
            f"{what} has shape {rows}x{cols}, which does not split into {br}x{bc} blocks; "
            f"pick a block whose sides divide {rows} and {cols}"
        )


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
    order = magnitude_order(weight, block)
    return [mask_from_order(order, weight.shape, s, block) for s in sparsities]


def magnitude_order(weight: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """Entries (or blocks, row-major) from the smallest magnitude up, ties by index: the one
    sort every sparsity's mask of this weight is read from. Indices are int32 below 2**31
    entries (half the memory of argsort's int64: the variant cache keeps one per matrix)."""
    w = weight.detach()
    if block is None:
        order = torch.argsort(w.abs().flatten(), stable=True)
    else:
        br, bc = concrete_block(block, w.shape)
        rows, cols = w.shape
        tiles = w.reshape(rows // br, br, cols // bc, bc)
        norms = torch.linalg.vector_norm(tiles.to(torch.float64), dim=(1, 3))  # (rows/br, cols/bc)
        order = torch.argsort(norms.flatten(), stable=True)
    return order.to(torch.int32) if order.numel() < 2**31 else order


def mask_from_order(
    order: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    sparsity: float,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The kept-entry mask of a `shape` weight at `sparsity`, from its `magnitude_order`."""
    rows, cols = shape
    br, bc = concrete_block(block, shape) if block is not None else (1, 1)
    grid = (rows // br, cols // bc)
    keep = torch.ones(order.numel(), dtype=torch.bool, device=order.device)
    n_drop = round(sparsity * order.numel())
    if n_drop:
        keep[order[:n_drop]] = False
    keep = keep.view(grid)
    if block is None:
        return keep
    return keep.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)
