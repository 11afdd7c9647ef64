"""`CountConfig`: the conventions a MicroNet count follows where the rules leave a choice."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from microsweep.errors import UsageError
from microsweep.score._formulas import ADDS_MODES

__all__ = ["CountConfig"]

COUNT_CONFIG_VERSION = 1
_TAG = "microsweep.CountConfig"
MASK_MODES: tuple[str, ...] = ("sparse", "always")
ATTENTION_MODES: tuple[str, ...] = ("faithful", "mit")
RELU_MODES: tuple[str, ...] = ("mult", "other")


@dataclass(frozen=True)
class CountConfig:
    """Counting conventions; the defaults are the faithful reading of the rules.

    - `freebie`: count every value as 16-bit and every multiply as 16/32 when nothing in the model
      is quantized below 16 bits (weights or activations); adds always stay at 1.
    - `mask`: ``"sparse"`` stores a bitmask only for tensors stored sparse (counting.py);
      ``"always"`` stores every parameter tensor as non-zeros plus a bitmask (MIT-HAN-Lab).
    - `adds`: the additions of a linear layer, see `linear_adds` (exact, countingpy or mit).
    - `fold_layernorm`: LayerNorm γ/β are folded into the next linear: not stored, not computed.
    - `attention`: ``"faithful"`` counts what attention computes, per head: the softmax
      (h·(3C-1)), the 1/√d_k scaling (h·C mults) and any positional term; ``"mit"`` follows the
      winning entry (reference §3.4): one softmax per layer, no scaling (folded into the q
      weights), a positional term shared by the heads counted once.
    - `relu`: ``"mult"`` counts a ReLU as 1 multiply per element (counting.py, so it may be
      weighted below 32 bits); ``"other"`` as 1 full-precision op (MIT-HAN-Lab).
    """

    freebie: bool = True
    mask: Literal["sparse", "always"] = "sparse"
    adds: Literal["exact", "countingpy", "mit"] = "exact"
    fold_layernorm: bool = False
    attention: Literal["faithful", "mit"] = "faithful"
    relu: Literal["mult", "other"] = "mult"

    def __post_init__(self) -> None:
        for name in ("freebie", "fold_layernorm"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise UsageError(f"CountConfig.{name}={value!r} must be True or False")
        for name, allowed in (
            ("mask", MASK_MODES),
            ("adds", ADDS_MODES),
            ("attention", ATTENTION_MODES),
            ("relu", RELU_MODES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                choices = ", ".join(allowed)
                raise UsageError(f"CountConfig.{name}={value!r} must be one of {choices}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict carrying a type tag and a version, read back by `from_json`."""
        return {"type": _TAG, "version": COUNT_CONFIG_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CountConfig:
        """Read `to_json()` output; a hand-written dict may leave out the type tag and version."""
        if not isinstance(data, Mapping):
            raise UsageError(f"a count config must be a JSON object, got {type(data).__name__}")
        body = dict(data)
        tag = body.pop("type", _TAG)
        version = body.pop("version", COUNT_CONFIG_VERSION)
        if tag != _TAG:
            raise UsageError(f"not a count config: type {tag!r} is not {_TAG!r}")
        if version != COUNT_CONFIG_VERSION:
            raise UsageError(
                f"count config version {version!r} is not supported (this release reads "
                f"version {COUNT_CONFIG_VERSION}); upgrade microsweep"
            )
        unknown = set(body) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"unknown count config setting(s) {sorted(unknown)}")
        return cls(**body)
