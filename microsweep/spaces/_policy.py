"""The policy types under their earlier path: they live in `microsweep.policy`."""

from microsweep.policy._policy import (
    DATA_AWARE_METHODS,
    DENSE_METHODS,
    GROUP_METHODS,
    METHODS,
    POLICY_MAX_BYTES,
    POLICY_VERSION,
    RANK_METHODS,
    VALID_BITS,
    LayerPolicy,
    Policy,
    RankMethod,
    concrete_block,
    valid_block,
)

_valid_block = valid_block

__all__ = [
    "DATA_AWARE_METHODS",
    "DENSE_METHODS",
    "GROUP_METHODS",
    "METHODS",
    "POLICY_MAX_BYTES",
    "POLICY_VERSION",
    "RANK_METHODS",
    "VALID_BITS",
    "LayerPolicy",
    "Policy",
    "RankMethod",
    "concrete_block",
    "valid_block",
]
