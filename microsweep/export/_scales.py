"""Integer-grid scales as stored: one per row (out,), or one per row and run of input
columns (out, in / group) for group-wise quantization."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["expand_scale", "scale_fits"]


def scale_fits(scale: torch.Tensor, shape: Sequence[int]) -> bool:
    """Whether `scale` is per-row (rows,) or per-row-and-group (rows, groups) for a tensor of
    `shape` (groups dividing its last side)."""
    if not shape:
        return False
    if scale.dim() == 1:
        return scale.numel() == shape[0]
    return (
        scale.dim() == 2
        and len(shape) == 2
        and scale.shape[0] == shape[0]
        and scale.shape[1] > 0
        and shape[1] % scale.shape[1] == 0
    )


def expand_scale(scale: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`scale` broadcast to a tensor of `shape`: each row's scale (or each group's, repeated
    over its columns)."""
    if scale.dim() == 2:
        return scale.repeat_interleave(shape[1] // scale.shape[1], dim=1)
    return scale.reshape(-1, *([1] * (len(shape) - 1)))
