"""Apply a compression `Policy` to a PyTorch model: low rank, pruning and quantization per layer.

Order per layer (documented and tested): factorize to `rank` by truncated SVD (plain, or
data-aware on the layer's calibration inputs: activation-scaled or whitened), prune each
resulting weight by magnitude to `sparsity` (unstructured or in `block`s), round weights to
`bits` with per-output-channel scales keeping pruned zeros, and quantize inputs to `act_bits`
with a static scale calibrated on the unchanged model. `project_` restores mask and grid after
a fine-tuning step.
"""

from __future__ import annotations

from ._apply import compress, compress_, compress_layer, input_stats, layer_inputs, project_
from ._cache import VariantCache
from ._lowrank import InputStats, factorize, rank_transform
from ._modules import CompressedLinear, LowRankLinear, fake_quantize_symmetric
from ._prune import magnitude_mask, magnitude_masks, sparsity_of
from ._quantize import tensor_scale

__all__ = [
    "CompressedLinear",
    "InputStats",
    "LowRankLinear",
    "VariantCache",
    "compress",
    "compress_",
    "compress_layer",
    "factorize",
    "input_stats",
    "fake_quantize_symmetric",
    "layer_inputs",
    "magnitude_mask",
    "magnitude_masks",
    "rank_transform",
    "project_",
    "sparsity_of",
    "tensor_scale",
]
