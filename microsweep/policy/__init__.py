"""Compression policies as plain data: `Policy`, `LayerPolicy`, the rank-method vocabulary.

Pure data with no torch or Optuna: the layer every other package may read a policy from
(`compress` applies one, `spaces` suggests one, the store keeps its JSON).
"""

from microsweep.policy._policy import (
    DATA_AWARE_METHODS,
    DENSE_METHODS,
    GROUP_METHODS,
    METHODS,
    POLICY_MAX_BYTES,
    POLICY_VERSION,
    PRUNE_METHODS,
    QUANT_METHODS,
    RANK_METHODS,
    VALID_BITS,
    LayerPolicy,
    Policy,
    RankMethod,
    concrete_block,
    valid_block,
)

__all__ = [
    "DATA_AWARE_METHODS",
    "DENSE_METHODS",
    "GROUP_METHODS",
    "METHODS",
    "POLICY_MAX_BYTES",
    "POLICY_VERSION",
    "PRUNE_METHODS",
    "QUANT_METHODS",
    "RANK_METHODS",
    "VALID_BITS",
    "LayerPolicy",
    "Policy",
    "RankMethod",
    "concrete_block",
    "valid_block",
]
