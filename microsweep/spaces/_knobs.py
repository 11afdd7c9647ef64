"""Knobs: frozen descriptions of one searchable value, validated when the space is defined.

A knob knows how to ask an Optuna trial for its value (`suggest`) and how to describe itself as
JSON for the store. Layer knobs (`Sparsity`, `Bits`, `Rank`) become `LayerPolicy` fields; plain
knobs (`Choice`, `Float`, `Int`) become hyperparameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from microsweep.errors import SpaceError
from microsweep.policy import PRUNE_METHODS, QUANT_METHODS, RANK_METHODS, VALID_BITS
from microsweep.policy import valid_block as _valid_block

if TYPE_CHECKING:
    import optuna

__all__ = ["Bands", "Bits", "Choice", "Float", "Int", "Knob", "Rank", "Sparsity"]


class Knob:
    """Base class: `suggest(trial, name)` returns one value; `to_json()` describes the knob."""

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> Any:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def is_constant(self) -> bool:
        """True when `suggest` asks the trial nothing (a single fixed value)."""
        return False


def _on_grid(value: float, step: float | None) -> float:
    """A step-grid value as its decimal (Optuna's 0.1 * 3 is 0.30000000000000004; the policy
    stores 0.3); a value off any grid is returned as sampled."""
    return float(f"{value:.12g}") if step is not None else value


def _check_range(kind: str, low: float, high: float) -> None:
    if low > high:
        raise SpaceError(f"{kind}: low {low} is above high {high}; swap them")


@dataclass(frozen=True)
class Sparsity(Knob):
    """Fraction of weights pruned by magnitude, in [low, high] with optional `step`.

    `block=(rows, cols)` prunes whole blocks and stores one mask bit per block; a side of 0
    spans the matrix (``block="row"``, the same as ``(1, 0)``, prunes whole rows; ``(0, 1)``
    whole columns). Shapes such as (1, 4), (4, 1), (4, 4), (8, 8) or (16, 1) suit kernels that
    skip blocks; a factorized layer's rank is rounded to whole blocks.

    `method` chooses which weights go: ``"magnitude"`` (the smallest |w|), ``"wanda"`` (|w|
    times the input's norm, per output row) or ``"sparsegpt"`` (the OBS saliency, with each
    removed weight's error moved onto the weights not yet done; with ``Bits(method="gptq")`` one
    joint pass). The data-aware methods read the layer's inputs on calibration tokens; blocks
    go by their summed saliency. Left out (None), a sweep with calibration tokens uses
    ``"sparsegpt"`` and one without uses ``"magnitude"`` (see `Space.use_default_methods`).
    """

    low: float = 0.0
    high: float = 0.9
    step: float | None = None
    block: tuple[int, int] | None = None
    method: str | None = None

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in PRUNE_METHODS:
            raise SpaceError(
                f"Sparsity: method {self.method!r} is not one of {', '.join(PRUNE_METHODS)}"
            )
        for value in (self.low, self.high):
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise SpaceError(
                    f"Sparsity: {value!r} is outside [0, 1); use e.g. Sparsity(0, 0.9)"
                )
        _check_range("Sparsity", self.low, self.high)
        if self.step is not None and not 0 < self.step < 1:
            raise SpaceError(f"Sparsity: step {self.step!r} must be in (0, 1)")
        if self.block is not None:
            block = (1, 0) if self.block == "row" else tuple(self.block)
            if not _valid_block(block):
                raise SpaceError(
                    f"Sparsity: block {self.block!r} must be two ints >= 0 like (4, 4), or "
                    "'row' for whole rows (a 0 side spans the matrix)"
                )
            object.__setattr__(self, "block", block)

    @property
    def is_constant(self) -> bool:
        return self.low == self.high

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> float:
        if self.low == self.high:
            return float(self.low)
        return _on_grid(trial.suggest_float(name, self.low, self.high, step=self.step), self.step)

    def grid(self, levels: int = 11) -> list[float]:
        """The values an allocation chooses among: the `step` grid, else `levels` evenly spaced
        values from `low` to `high` (decimal-rounded, so 0.3 is 0.3)."""
        if self.low == self.high:
            return [float(self.low)]
        if not isinstance(levels, int) or levels < 2:
            raise SpaceError(f"Sparsity.grid: levels={levels!r} must be an int >= 2")
        if self.step is not None:
            n = int(math.floor((self.high - self.low) / self.step + 1e-9))
            values = [self.low + i * self.step for i in range(n + 1)]
        else:
            values = [self.low + (self.high - self.low) * i / (levels - 1) for i in range(levels)]
        return sorted({round(v, 10) for v in values})

    def to_json(self) -> dict[str, Any]:
        out = {
            "knob": "Sparsity",
            "low": self.low,
            "high": self.high,
            "step": self.step,
            "block": list(self.block) if self.block else None,
        }
        if self.method not in (None, "magnitude"):
            out["method"] = self.method
        return out

    def with_method(self, method: str) -> Sparsity:
        """This knob with `method` in place of a left-out one."""
        return Sparsity(self.low, self.high, self.step, self.block, method)


@dataclass(frozen=True, init=False)
class Bits(Knob):
    """A choice of bit-widths in 2..16, or 32 for "leave at fp32": ``Bits(4, 8, 16)``.

    `method` chooses how weights reach their grid: ``"rtn"`` (round to nearest) or ``"gptq"``
    (column by column on calibration inputs, each rounding error moved onto the columns not
    yet done; `act_order` takes the columns of most input energy first). `group=128` gives
    every run of 128 input columns of a row its own scale (each counted and stored at fp32)
    instead of one per row. As input widths (`act_bits`) neither applies. Left out (None), a
    sweep with calibration tokens uses ``"gptq"`` with `act_order` and one without ``"rtn"``
    (see `Space.use_default_methods`)."""

    choices: tuple[int, ...]
    method: str | None
    act_order: bool
    group: int | None

    def __init__(
        self,
        *choices: int,
        method: str | None = None,
        act_order: bool = False,
        group: int | None = None,
    ) -> None:
        if not choices:
            raise SpaceError("Bits: give at least one width, e.g. Bits(4, 8)")
        for c in choices:
            if isinstance(c, bool) or c not in VALID_BITS:
                raise SpaceError(f"Bits: {c!r} is not a width in 2..16 or 32 (32 means off)")
        if method is not None and method not in QUANT_METHODS:
            raise SpaceError(f"Bits: method {method!r} is not one of {', '.join(QUANT_METHODS)}")
        if not isinstance(act_order, bool) or (act_order and method != "gptq"):
            raise SpaceError("Bits: act_order=True goes with method='gptq'")
        if group is not None and (isinstance(group, bool) or not isinstance(group, int)):
            raise SpaceError(f"Bits: group {group!r} must be a positive int such as 128")
        if group is not None and group < 1:
            raise SpaceError(f"Bits: group {group} must be >= 1, such as 128")
        object.__setattr__(self, "choices", tuple(int(c) for c in choices))
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "act_order", act_order)
        object.__setattr__(self, "group", group)

    @property
    def is_constant(self) -> bool:
        return len(self.choices) == 1

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> int:
        if len(self.choices) == 1:
            return self.choices[0]
        return int(trial.suggest_categorical(name, self.choices))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"knob": "Bits", "choices": list(self.choices)}
        if self.method not in (None, "rtn"):
            out["method"] = self.method
        if self.act_order:
            out["act_order"] = True
        if self.group is not None:
            out["group"] = self.group
        return out

    def with_method(self, method: str, act_order: bool = False) -> Bits:
        """This knob with `method` (and `act_order`) in place of a left-out method."""
        return Bits(*self.choices, method=method, act_order=act_order, group=self.group)


@dataclass(frozen=True, init=False)
class Rank(Knob):
    """Low-rank factorization rank: ``Rank(0.1, 1.0)`` (floats) is a fraction range of each
    layer's full rank; ``Rank(8, 16, 32)`` (ints) are explicit ranks, so ``Rank(1)`` is rank one
    while ``Rank(1.0)`` is full rank. A rank at or past the break-even r * (out + in) >= out * in
    leaves the layer dense, since its factors would not be smaller.

    ``method`` chooses how the factors are found: ``"plain"`` truncated SVD of the weight,
    ``"activation"`` (columns scaled by the mean |input| on calibration tokens) or ``"whiten"``
    (whitened by the inputs' Gram matrix: the least output error at that rank). The data-aware
    methods need calibration tokens (a corpus, or `calib` in the space file). ``"tt"`` makes
    the layer a tensor-train (TT-SVD; reshaping factors chosen from its shape) whose every
    inner TT-rank is the rank, capped where the unfolding is smaller; its cores stay dense fp32,
    so a tensor-train rule takes no sparsity or bits. An embedding table takes ``"plain"`` or
    ``"tt"`` (its input is token ids)."""

    low: float | None
    high: float | None
    values: tuple[int, ...] | None
    method: str

    def __init__(self, *args: float, method: str = "plain") -> None:
        if method not in RANK_METHODS:
            raise SpaceError(f"Rank: method {method!r} is not one of {', '.join(RANK_METHODS)}")
        object.__setattr__(self, "method", method)
        if not args:
            raise SpaceError(
                "Rank: give a fraction range like Rank(0.1, 1.0) or ranks like Rank(8, 16)"
            )
        if all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            if any(a < 1 for a in args):
                raise SpaceError(f"Rank: explicit ranks {args} must be >= 1")
            object.__setattr__(self, "values", tuple(args))
            object.__setattr__(self, "low", None)
            object.__setattr__(self, "high", None)
            return
        if len(args) > 2 or any(not isinstance(a, (int, float)) for a in args):
            raise SpaceError(f"Rank{args}: use Rank(low, high) fractions or integer ranks")
        low = float(args[0])
        high = float(args[-1])
        for value in (low, high):
            if not 0.0 < value <= 1.0:
                raise SpaceError(f"Rank: fraction {value} is outside (0, 1]; use ints for ranks")
        _check_range("Rank", low, high)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "values", None)

    @property
    def is_constant(self) -> bool:
        if self.values is not None:
            return len(self.values) == 1
        return self.low == self.high

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> float | int:
        """A fraction (float) or an explicit rank (int); `resolve` turns it into a rank."""
        if self.values is not None:
            if len(self.values) == 1:
                return self.values[0]
            return int(trial.suggest_categorical(name, self.values))
        if self.low == self.high:
            return float(self.low)
        return trial.suggest_float(name, self.low, self.high)

    @staticmethod
    def resolve(value: float | int, out_features: int, in_features: int) -> int | None:
        """The rank for an out x in layer, or None (leave it dense) when the two factors,
        r * (out + in) values, would not be smaller than the out * in matrix."""
        full = min(out_features, in_features)
        rank = value if isinstance(value, int) else max(1, round(value * full))
        return None if rank >= Rank.break_even(out_features, in_features) else rank

    @staticmethod
    def break_even(out_features: int, in_features: int) -> int:
        """The smallest rank whose factors, r * (out + in) values, are not smaller than the
        out x in matrix: every rank from here on leaves the layer dense."""
        return -(-(out_features * in_features) // (out_features + in_features))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"knob": "Rank"}
        if self.values is not None:
            out["values"] = list(self.values)
        else:
            out.update(low=self.low, high=self.high)
        if self.method != "plain":
            out["method"] = self.method
        return out


@dataclass(frozen=True, init=False)
class Bands:
    """Cut a table or output head into frequency bands, each with its own knobs (rare words
    smaller): ``Bands(0.1, 0.3)`` gives 3 bands, the most frequent 10% of the vocabulary (ranked
    by frequency in the calibration tokens), the next 20% and the rarest 70%; ints are
    cumulative row counts, ``Bands(2000, 10000)``. Each band is a layer of the Space named
    ``"head@0"``, ``"head@1"``, ... whose knobs are searched apart (``"head@1:rank"``)."""

    edges: tuple[float | int, ...]

    def __init__(self, *edges: float | int) -> None:
        if not edges:
            raise SpaceError("Bands: give where bands end, e.g. Bands(0.1, 0.3) or Bands(2000)")
        ints = all(isinstance(e, int) and not isinstance(e, bool) for e in edges)
        floats = all(isinstance(e, float) for e in edges)
        if not (ints or floats):
            raise SpaceError(
                f"Bands{edges}: give fractions of the vocabulary (0.1, 0.3) or row counts "
                "(2000, 10000), not a mix"
            )
        if floats and not all(0.0 < e < 1.0 for e in edges):
            raise SpaceError(f"Bands{edges}: fractions must lie in (0, 1)")
        if ints and edges[0] < 1:
            raise SpaceError(f"Bands{edges}: row counts must be >= 1")
        if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise SpaceError(f"Bands{edges}: edges must increase, e.g. Bands(0.1, 0.3)")
        object.__setattr__(self, "edges", tuple(edges))

    def ranges(self, vocab: int, where: str = "the layer") -> list[tuple[int, int]]:
        """[start, stop) of each band in a vocabulary of `vocab` rows ranked by frequency; a
        band left without a row is refused, naming `where`."""
        cuts = [e if isinstance(e, int) else round(e * vocab) for e in self.edges]
        bounds = [0, *cuts, vocab]
        out = list(zip(bounds, bounds[1:], strict=False))
        if any(stop <= start for start, stop in out):
            raise SpaceError(
                f"Bands{self.edges} leaves a band of {where} ({vocab} rows) without rows; "
                "use edges that cut it into non-empty bands"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {"knob": "Bands", "edges": list(self.edges)}


@dataclass(frozen=True, init=False)
class Choice(Knob):
    """A categorical hyperparameter: ``Choice("adam", "sgd")``."""

    choices: tuple[Any, ...]

    def __init__(self, *choices: Any) -> None:
        if not choices:
            raise SpaceError("Choice: give at least one value")
        for c in choices:
            if not isinstance(c, (str, int, float, bool)) and c is not None:
                raise SpaceError(f"Choice: {c!r} is not a str, int, float, bool or None")
        object.__setattr__(self, "choices", tuple(choices))

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> Any:
        return trial.suggest_categorical(name, self.choices)

    def to_json(self) -> dict[str, Any]:
        return {"knob": "Choice", "choices": list(self.choices)}


@dataclass(frozen=True)
class Float(Knob):
    """A float hyperparameter in [low, high], optionally log-scaled or stepped."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    def __post_init__(self) -> None:
        _check_range("Float", self.low, self.high)
        if self.log and self.low <= 0:
            raise SpaceError(f"Float: log=True needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise SpaceError("Float: log and step cannot be used together")

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> float:
        value = trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)
        return _on_grid(value, self.step)

    def to_json(self) -> dict[str, Any]:
        return {
            "knob": "Float",
            "low": self.low,
            "high": self.high,
            "log": self.log,
            "step": self.step,
        }


@dataclass(frozen=True)
class Int(Knob):
    """An int hyperparameter in [low, high], optionally log-scaled or stepped."""

    low: int
    high: int
    log: bool = False
    step: int = 1

    def __post_init__(self) -> None:
        _check_range("Int", self.low, self.high)
        if self.log and self.low <= 0:
            raise SpaceError(f"Int: log=True needs low > 0, got {self.low}")

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log, step=self.step)

    def to_json(self) -> dict[str, Any]:
        return {
            "knob": "Int",
            "low": self.low,
            "high": self.high,
            "log": self.log,
            "step": self.step,
        }
