"""Apply a compression `Policy` to a PyTorch model: low rank, pruning and quantization per layer.

Order per layer (documented and tested): factorize to `rank` by truncated SVD (plain, or
data-aware on the layer's calibration inputs: activation-scaled or whitened), prune each
resulting weight by magnitude to `sparsity` (unstructured or in `block`s), round weights to
`bits` with per-output-channel scales keeping pruned zeros, and quantize inputs to `act_bits`
with a static scale calibrated on the unchanged model. `project_` restores mask and grid after
a fine-tuning step.

Each technique (pruning, quantization, each way of reaching a rank) is a `Technique` in a
registry (`technique(name)`, `techniques()`, `register_technique`): its checks, how it builds a
layer, and the counting rules and export specs of the modules it produces.
"""

from __future__ import annotations

from ._apply import (
    build_group,
    compress,
    compress_,
    compress_layer,
    compress_tied,
    group_modules,
    input_stats,
    layer_inputs,
    project_,
    tensor_train,
    tied_factors,
)
from ._autoencoder import AutoDecoder, DecodedLinear, compress_linears, train_decoder
from ._banded import Band, BandedEmbedding, BandedHead, BandSet
from ._banding import BandSlot, band_reads, parse_band, token_order
from ._cache import VariantCache
from ._checks import check_rule, check_shared_weight, check_tied_rank, embedding_misfit, ties
from ._group_lasso import block_norms, group_lasso_penalty, group_lasso_train_, reweight
from ._groups import shared_basis
from ._levels import LevelStore
from ._lowrank import InputStats, factorize, frequency_rows, rank_transform, weight_svd
from ._modules import (
    CompressedEmbedding,
    CompressedLinear,
    LowRankEmbedding,
    LowRankLinear,
    TiedLowRankEmbedding,
    fake_quantize_symmetric,
)
from ._prune import magnitude_mask, magnitude_masks, sparsity_of
from ._quantize import tensor_scale
from ._techniques import (
    Form,
    MatrixTechnique,
    RankTechnique,
    RebuildContext,
    SpecContext,
    Technique,
    form_for,
    form_of_spec,
    register_technique,
    technique,
    techniques,
)
from ._tt import TTEmbedding, TTLinear, tt_shape, tt_svd

__all__ = [
    "Band",
    "BandedEmbedding",
    "BandedHead",
    "BandSet",
    "BandSlot",
    "band_reads",
    "parse_band",
    "token_order",
    "Form",
    "MatrixTechnique",
    "RankTechnique",
    "RebuildContext",
    "SpecContext",
    "Technique",
    "form_for",
    "form_of_spec",
    "check_rule",
    "check_shared_weight",
    "check_tied_rank",
    "embedding_misfit",
    "register_technique",
    "technique",
    "techniques",
    "ties",
    "AutoDecoder",
    "DecodedLinear",
    "block_norms",
    "build_group",
    "compress_linears",
    "group_lasso_penalty",
    "group_lasso_train_",
    "group_modules",
    "reweight",
    "shared_basis",
    "train_decoder",
    "CompressedEmbedding",
    "CompressedLinear",
    "LowRankEmbedding",
    "InputStats",
    "LevelStore",
    "LowRankLinear",
    "TTEmbedding",
    "TTLinear",
    "TiedLowRankEmbedding",
    "VariantCache",
    "compress",
    "compress_",
    "compress_layer",
    "compress_tied",
    "factorize",
    "frequency_rows",
    "input_stats",
    "fake_quantize_symmetric",
    "layer_inputs",
    "magnitude_mask",
    "magnitude_masks",
    "rank_transform",
    "project_",
    "sparsity_of",
    "tensor_scale",
    "tensor_train",
    "tt_shape",
    "tt_svd",
    "tied_factors",
    "weight_svd",
]
