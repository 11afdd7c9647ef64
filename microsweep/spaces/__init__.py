"""Search spaces: knobs, layer rules and the plain `Policy` a suggestion produces."""

from typing import TYPE_CHECKING, Any

from microsweep.policy import (
    DATA_AWARE_METHODS,
    DENSE_METHODS,
    GROUP_METHODS,
    POLICY_VERSION,
    RANK_METHODS,
    LayerPolicy,
    Policy,
)
from microsweep.spaces._knobs import Bands, Bits, Choice, Float, Int, Knob, Rank, Sparsity

if TYPE_CHECKING:
    from microsweep.spaces._space import LayerInfo, Space, Unit, layer_policy


def __getattr__(name: str) -> Any:
    """`Space`, `LayerInfo` and `Unit` load on first use: they need torch, while policies and
    knobs (what reports read) do not."""
    if name in ("LayerInfo", "Space", "Unit", "layer_policy"):
        from microsweep.spaces import _space

        value = getattr(_space, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'microsweep.spaces' has no attribute {name!r}")


__all__ = [
    "DATA_AWARE_METHODS",
    "DENSE_METHODS",
    "GROUP_METHODS",
    "POLICY_VERSION",
    "RANK_METHODS",
    "Bands",
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
    "layer_policy",
]
