"""Search spaces: knobs, layer rules and the plain `Policy` a suggestion produces."""

from microsweep.spaces._knobs import Bits, Choice, Float, Int, Knob, Rank, Sparsity
from microsweep.spaces._policy import POLICY_VERSION, RANK_METHODS, LayerPolicy, Policy
from microsweep.spaces._space import LayerInfo, Space, Unit

__all__ = [
    "POLICY_VERSION",
    "RANK_METHODS",
    "Bits",
    "Choice",
    "Float",
    "Int",
    "Knob",
    "LayerInfo",
    "LayerPolicy",
    "Policy",
    "Rank",
    "Space",
    "Sparsity",
    "Unit",
]
