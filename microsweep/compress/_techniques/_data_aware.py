"""Data-aware pruning and quantization: Wanda, SparseGPT and GPTQ on a matrix's calibration
inputs (the algorithms are in `compress/_obs.py`; the formats stay those of magnitude pruning
and round-to-nearest, so counting and export need nothing new).

Each reads the Gram matrix of the matrix's inputs (`Matrix.gram`): the layer's own for a
Linear or the first factor of a rank, A G A^T for the second factor. A table's input is token
ids, so tables keep the plain methods.
"""

from __future__ import annotations

import torch

from microsweep.errors import SpaceError
from microsweep.policy import LayerPolicy

from .._obs import gptq, sparsegpt, wanda_mask
from ._base import LayerCheck, Matrix, MatrixTechnique, RuleCheck, check_groups, check_inputs
from ._matrix import COMPRESSED

__all__ = ["GPTQ", "SparseGPT", "Wanda", "gram_of"]


def gram_of(matrix: Matrix, method: str) -> torch.Tensor:
    """The matrix's input Gram matrix, which `method` cannot do without."""
    if matrix.gram is None:
        raise SpaceError(
            f"{method} reads the layer's inputs but no calibration statistics reached it; "
            "pass calib=token ids of shape (B, T)"
        )
    return matrix.gram


class _DataAware(MatrixTechnique):
    """What the data-aware matrix techniques share: calibration inputs, and no tables."""

    takes_tables = False
    knob = "sparsity"
    default = "magnitude"

    def check_layer(self, layer: LayerCheck) -> None:
        """A table's input is token ids; the inputs come from calibration tokens."""
        check_inputs(
            layer,
            f"layer {layer.name!r} is an embedding: its input is token ids, so {self.name} "
            f"does not apply; keep {self.knob}'s method at {self.default!r} for it",
            f"layer {layer.name!r} uses {self.name}, which reads the layer's inputs; pass "
            "calib=token ids of shape (B, T)",
        )

    def table_misfit(self, rule: RuleCheck) -> str | None:
        """A rule whose knob asks for this method does not fit a table."""
        knob = rule.settings.get(self.knob)
        if getattr(knob, "method", self.default) == self.name:
            return f"its input is token ids, so {self.knob} method {self.name!r} does not apply"
        return None


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
        """Zero the entries of least saliency, exactly round(s * numel) of them."""
        mask = wanda_mask(matrix.values, gram_of(matrix, self.name), matrix.settings.sparsity)
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
        """Prune (and, with GPTQ bits, round) column by column with compensation."""
        s = matrix.settings
        joint = s.quant_method == "gptq" and s.bits < 32 and s.quant_group is None
        values, keep, scales = sparsegpt(
            matrix.values, gram_of(matrix, self.name), s.sparsity, bits=s.bits if joint else 32
        )
        matrix.values, matrix.mask = values, keep
        if joint:
            matrix.weight_scale, matrix.quantized = scales, True


class GPTQ(_DataAware):
    """Weights rounded column by column to their per-row grid, each rounding error moved onto
    the columns not yet done (in order of input energy with `act_order`)."""

    name = "gptq"
    reads = ("bits", "quant_method", "act_order")
    forms = (COMPRESSED,)
    order = 1
    knob = "bits"
    default = "rtn"

    def applies(self, settings: LayerPolicy) -> bool:
        """Weight widths below 32 bits by GPTQ."""
        return settings.bits < 32 and settings.quant_method == "gptq"

    def apply(self, matrix: Matrix) -> None:
        """Round with compensation, keeping pruned zeros (unless a joint pass rounded)."""
        if matrix.quantized:
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
        """Calibration inputs, no tables, and scale groups that divide the input columns."""
        super().check_layer(layer)
        check_groups(layer)
