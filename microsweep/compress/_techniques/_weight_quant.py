"""Round-to-nearest weight quantization: each output row on its own symmetric `bits` grid."""

from __future__ import annotations

from microsweep.policy import LayerPolicy

from .._obs import quantize_groups
from .._quantize import quantize_rows
from ._base import LayerCheck, Matrix, MatrixTechnique, check_groups
from ._matrix import COMPRESSED

__all__ = ["RoundToNearest", "round_to_nearest"]


def round_to_nearest(matrix: Matrix) -> None:
    """Round the (pruned) values to their row (or row-and-group) grids and keep the scales."""
    s = matrix.settings
    if s.quant_group is not None:
        matrix.values, matrix.weight_scale = quantize_groups(
            matrix.values, s.bits, s.quant_group, matrix.mask
        )
        return
    matrix.values, matrix.weight_scale = quantize_rows(matrix.values, s.bits, matrix.mask)


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

    def check_layer(self, layer: LayerCheck) -> None:
        """Group-wise scales need groups that divide every matrix's input columns."""
        check_groups(layer)

    def apply(self, matrix: Matrix) -> None:
        """Round the (pruned) values to their row (or row-and-group) grids, keep the scales."""
        round_to_nearest(matrix)
