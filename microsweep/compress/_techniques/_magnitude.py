"""Magnitude pruning: the round(s * numel) smallest |w| of a weight matrix become exact zeros."""

from __future__ import annotations

from microsweep.policy import LayerPolicy

from .._prune import magnitude_mask
from ._base import Matrix, MatrixTechnique
from ._matrix import COMPRESSED

__all__ = ["MagnitudePruning"]


class MagnitudePruning(MatrixTechnique):
    """Unstructured magnitude pruning to ``sparsity`` (one mask bit per element)."""

    name = "magnitude"
    reads = ("sparsity",)
    forms = (COMPRESSED,)
    order = 0

    def applies(self, settings: LayerPolicy) -> bool:
        """Sparsity without a block, by magnitude."""
        s = settings
        return s.sparsity > 0 and s.block is None and s.prune_method == "magnitude"

    def apply(self, matrix: Matrix) -> None:
        """Keep the largest entries (or the precomputed mask) and zero the rest."""
        mask = matrix.given_mask
        if mask is None:
            mask = magnitude_mask(matrix.values, matrix.settings.sparsity, None)
        matrix.mask = mask
        matrix.values = matrix.values * mask
