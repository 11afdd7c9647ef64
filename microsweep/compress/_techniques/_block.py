"""Block pruning: the round(s * n_blocks) `block`-shaped tiles of lowest L2 norm become zeros."""

from __future__ import annotations

from microsweep.policy import LayerPolicy, concrete_block

from .._obs import block_mask, sparsegpt
from .._prune import check_block, magnitude_mask
from ._base import LayerCheck, Matrix, MatrixTechnique, check_inputs, matrices_of
from ._data_aware import as_linear, from_linear, gram_of
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
        """Every matrix the layer becomes (the weight, or each factor at a rank) must tile;
        blocks chosen by a data-aware saliency need the layer's calibration inputs."""
        for what, shape in matrices_of(layer):
            check_block(shape, layer.settings.block, what)
        method = layer.settings.prune_method
        if method != "magnitude":
            check_inputs(
                layer,
                f"layer {layer.name!r} chooses blocks by {method}, which reads the layer's "
                "inputs; pass calib=token ids of shape (B, T)",
            )

    def apply(self, matrix: Matrix) -> None:
        """Keep the largest-norm blocks (or the precomputed mask), or the blocks of most summed
        saliency (Wanda's for ``wanda``; for ``sparsegpt`` the OBS saliency with the removed
        blocks' error moved onto the kept weights; on a table, weighted by token frequencies,
        nothing to move), and zero the rest."""
        s = matrix.settings
        if s.prune_method == "sparsegpt" and gram_of(matrix, "sparsegpt").dim() == 2:
            # SparseGPT in tiles: the kept weights take the removed tiles' error (and, with
            # GPTQ bits, are rounded in the same pass)
            joint = s.quant_method == "gptq" and s.bits < 32 and s.quant_group is None
            tile = concrete_block(s.block, matrix.values.shape)
            values, keep, scales = sparsegpt(
                matrix.values, matrix.gram, s.sparsity, bits=s.bits if joint else 32, tile=tile
            )
            matrix.values, matrix.mask = values, keep
            if joint:
                matrix.weight_scale, matrix.quantized = scales, True
            return
        if s.prune_method != "magnitude":
            method = "obs" if s.prune_method == "sparsegpt" else "wanda"
            rows, cols = concrete_block(s.block, matrix.values.shape)
            block = (cols, rows) if matrix.table else (rows, cols)  # as `as_linear` sees it
            weight, gram = as_linear(matrix, s.prune_method)
            mask = from_linear(matrix, block_mask(weight, gram, s.sparsity, block, method=method))
        else:
            mask = matrix.given_mask
            if mask is None:
                mask = magnitude_mask(matrix.values, s.sparsity, s.block)
        matrix.mask = mask
        matrix.values = matrix.values * mask
