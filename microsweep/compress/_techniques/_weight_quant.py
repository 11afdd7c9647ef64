"""Round-to-nearest weight quantization: each output row on its own symmetric `bits` grid."""

from __future__ import annotations

from microsweep.policy import LayerPolicy

from .._quantize import quantize_rows
from ._base import Matrix, MatrixTechnique
from ._matrix import COMPRESSED

__all__ = ["RoundToNearest"]


class RoundToNearest(MatrixTechnique):
    """Weights rounded to ``bits`` with a per-output-row scale max|w_row| / (2^(b-1) - 1);
    pruned zeros stay zero."""

    name = "round_to_nearest"
    reads = ("bits",)
    forms = (COMPRESSED,)
    order = 1

    def applies(self, settings: LayerPolicy) -> bool:
        """Weight widths below 32 bits, rounded to nearest."""
        return settings.bits < 32 and settings.quant_method == "rtn"

    def apply(self, matrix: Matrix) -> None:
        """Round the (pruned) values to their row grids and keep the scales."""
        matrix.values, matrix.weight_scale = quantize_rows(
            matrix.values, matrix.settings.bits, matrix.mask
        )
