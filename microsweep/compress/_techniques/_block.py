"""Block pruning: the round(s * n_blocks) `block`-shaped tiles of lowest L2 norm become zeros."""

from __future__ import annotations

from microsweep.policy import LayerPolicy

from .._prune import check_block, magnitude_mask
from ._base import LayerCheck, Matrix, MatrixTechnique
from ._matrix import COMPRESSED

__all__ = ["BlockPruning"]


class BlockPruning(MatrixTechnique):
    """Magnitude pruning in ``block``-shaped tiles (one mask bit per block); a 0 side spans
    the matrix, so (1, 0) prunes whole rows."""

    name = "block"
    reads = ("sparsity", "block")
    forms = (COMPRESSED,)
    order = 0

    def applies(self, settings: LayerPolicy) -> bool:
        """Sparsity with a block."""
        return settings.sparsity > 0 and settings.block is not None

    def check_layer(self, layer: LayerCheck) -> None:
        """Every matrix the layer becomes (the weight, or each factor at a rank) must tile."""
        for what, shape in matrices_of(layer):
            check_block(shape, layer.settings.block, what)

    def apply(self, matrix: Matrix) -> None:
        """Keep the largest-norm blocks (or the precomputed mask) and zero the rest."""
        mask = matrix.given_mask
        if mask is None:
            mask = magnitude_mask(matrix.values, matrix.settings.sparsity, matrix.settings.block)
        matrix.mask = mask
        matrix.values = matrix.values * mask


def matrices_of(layer: LayerCheck) -> list[tuple[str, tuple[int, int]]]:
    """The weight matrices a layer is stored as under its settings, named for messages: the
    weight itself, or both factors of a rank (a table's (V, r) table and (d, r) projection)."""
    import torch.nn as nn

    name, settings = layer.name, layer.settings
    out_f, in_f = layer.layer.weight.shape
    if settings.rank is None:
        return [(f"layer {name!r}", (out_f, in_f))]
    r = settings.rank
    if isinstance(layer.layer, nn.Embedding):
        return [
            (f"embedding {name!r} table factor", (out_f, r)),
            (f"embedding {name!r} projection factor", (in_f, r)),
        ]
    return [
        (f"layer {name!r} first factor", (r, in_f)),
        (f"layer {name!r} second factor", (out_f, r)),
    ]
