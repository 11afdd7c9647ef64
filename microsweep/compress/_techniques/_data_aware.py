"""Data-aware pruning and quantization: Wanda, SparseGPT and GPTQ on a matrix's calibration
inputs (the algorithms are in `compress/_obs.py`; the formats stay those of magnitude pruning
and round-to-nearest, so counting and export need nothing new).

Each reads the Gram matrix of the matrix's inputs (`Matrix.gram`): the layer's own for a
Linear or the first factor of a rank, A G A^T for the second factor. A table (V, d) is the
Linear table^T on one-hot token inputs, whose Gram matrix is diagonal, the token frequencies:
pruning there weighs each row by how often calibration looks it up, and GPTQ, with no other
column to move an error onto, is round-to-nearest.
"""

from __future__ import annotations

import torch

from microsweep.errors import SpaceError
from microsweep.policy import LayerPolicy

from .._obs import gptq, sparsegpt, wanda_mask
from ._base import LayerCheck, Matrix, MatrixTechnique, check_groups, check_inputs
from ._matrix import COMPRESSED
from ._weight_quant import round_to_nearest

__all__ = ["GPTQ", "SparseGPT", "Wanda", "as_linear", "from_linear", "gram_of"]


def gram_of(matrix: Matrix, method: str) -> torch.Tensor:
    """The matrix's input Gram matrix, which `method` cannot do without."""
    if matrix.gram is None:
        raise SpaceError(
            f"{method} reads the layer's inputs but no calibration statistics reached it; "
            "pass calib=token ids of shape (B, T)"
        )
    return matrix.gram


def as_linear(matrix: Matrix, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (out, in) weight the `_obs` algorithms read and its inputs' Gram matrix: a table's
    values transposed (V one-hot inputs to d outputs) with its token frequencies."""
    gram = gram_of(matrix, method)
    return (matrix.values.T, gram) if matrix.table else (matrix.values, gram)


def from_linear(matrix: Matrix, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped result of `as_linear`'s view back in the matrix's own layout."""
    return tensor.T if matrix.table else tensor


class _DataAware(MatrixTechnique):
    """What the data-aware matrix techniques share: calibration inputs."""

    def check_layer(self, layer: LayerCheck) -> None:
        """The inputs come from calibration tokens (a table's: the token ids it looks up)."""
        check_inputs(
            layer,
            f"layer {layer.name!r} uses {self.name}, which reads the layer's inputs; pass "
            "calib=token ids of shape (B, T)",
        )


class Wanda(_DataAware):
    """Pruning by |w| times the input's norm, per output row; no weight is updated."""

    name = "wanda"
    reads = ("sparsity", "prune_method")
    forms = (COMPRESSED,)
    order = 0

    def applies(self, settings: LayerPolicy) -> bool:
        """Unstructured sparsity by Wanda (blocks go through `BlockPruning`)."""
        return settings.sparsity > 0 and settings.block is None and settings.prune_method == "wanda"

    def apply(self, matrix: Matrix) -> None:
        """Zero the entries of least saliency, exactly round(s * numel) of them (on a table,
        |w| * sqrt(frequency), per dimension of the embedding)."""
        weight, gram = as_linear(matrix, self.name)
        mask = from_linear(matrix, wanda_mask(weight, gram, matrix.settings.sparsity))
        matrix.mask = mask
        matrix.values = matrix.values * mask


class SparseGPT(_DataAware):
    """Pruning by the OBS saliency with the error of every removed weight moved onto the
    columns not yet done; with GPTQ bits, pruning and rounding in one pass."""

    name = "sparsegpt"
    reads = ("sparsity", "prune_method", "bits", "quant_method")
    forms = (COMPRESSED,)
    order = 0

    def applies(self, settings: LayerPolicy) -> bool:
        """Unstructured sparsity by SparseGPT (blocks go through `BlockPruning`)."""
        s = settings
        return s.sparsity > 0 and s.block is None and s.prune_method == "sparsegpt"

    def apply(self, matrix: Matrix) -> None:
        """Prune (and, with GPTQ bits, round) column by column with compensation. A table has
        nothing to compensate: its entries of least w^2 * frequency go, and GPTQ rounds after."""
        s = matrix.settings
        joint = s.quant_method == "gptq" and s.bits < 32 and s.quant_group is None
        joint = joint and not matrix.table  # a table's scales are per token row: GPTQ's step
        weight, gram = as_linear(matrix, self.name)
        values, keep, scales = sparsegpt(weight, gram, s.sparsity, bits=s.bits if joint else 32)
        matrix.values, matrix.mask = from_linear(matrix, values), from_linear(matrix, keep)
        if joint:
            matrix.weight_scale, matrix.quantized = scales, True


class GPTQ(_DataAware):
    """Weights rounded column by column to their per-row grid, each rounding error moved onto
    the columns not yet done (in order of input energy with `act_order`)."""

    name = "gptq"
    reads = ("bits", "quant_method", "act_order", "quant_group")
    forms = (COMPRESSED,)
    order = 1

    def applies(self, settings: LayerPolicy) -> bool:
        """Weight widths below 32 bits by GPTQ."""
        return settings.bits < 32 and settings.quant_method == "gptq"

    def apply(self, matrix: Matrix) -> None:
        """Round with compensation, keeping pruned zeros (unless a joint pass rounded). A
        table's one-hot inputs never overlap (a diagonal Hessian): no error can move, so its
        rows are rounded to nearest on their own grids."""
        if matrix.quantized:
            return
        if matrix.table:
            round_to_nearest(matrix)
            return
        s = matrix.settings
        matrix.values, matrix.weight_scale = gptq(
            matrix.values,
            gram_of(matrix, self.name),
            s.bits,
            mask=matrix.mask,
            act_order=s.act_order,
            group=s.quant_group,
        )

    def check_layer(self, layer: LayerCheck) -> None:
        """Calibration inputs, and scale groups that divide the input columns."""
        super().check_layer(layer)
        check_groups(layer)
