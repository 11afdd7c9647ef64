"""Rules: parsing what the user wrote, and assigning each compressible layer its rule.

A selector is a glob over dotted layer names, a regular expression prefixed ``re:`` (full
match), or a module type. A rule whose selector is the exact layer name wins; otherwise the first
matching rule in order wins. Pattern rules take an embedding table only where their settings fit
it and its tied head is not compressed too (`TableChoice` records each such decision).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from microsweep.compress import embedding_misfit
from microsweep.errors import SpaceError
from microsweep.policy import VALID_BITS
from microsweep.spaces._knobs import Bands, Bits, Knob, Rank, Sparsity
from microsweep.spaces._layers import LayerInfo

__all__ = [
    "LAYER_KNOBS",
    "Rule",
    "TableChoice",
    "assign",
    "misfit",
    "parse_hyper",
    "parse_rule",
]

LAYER_KNOBS = ("sparsity", "bits", "act_bits", "rank")
_RULE_KEYS = frozenset([*LAYER_KNOBS, "tied", "bands"])
_KNOB_TYPES: dict[str, type[Knob]] = {
    "sparsity": Sparsity,
    "bits": Bits,
    "act_bits": Bits,
    "rank": Rank,
}


@dataclass(frozen=True)
class Rule:
    """One parsed rule: how it was written (`key`, for messages and parameter names), what it
    selects, its layer knobs, and whether its layers share one value per knob (`tied`)."""

    key: str
    selector: str | type
    settings: Mapping[str, Any]
    tied: bool
    bands: Bands | None = None
    """Frequency bands its tables and heads are cut into (each band a layer of its own)."""

    def matches(self, name: str, module: nn.Module) -> bool:
        """Whether the rule's selector takes layer `name` (whose module is `module`)."""
        if isinstance(self.selector, type):
            return isinstance(module, self.selector)
        if self.selector.startswith("re:"):
            return re.fullmatch(self.selector[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.selector)


@dataclass(frozen=True)
class TableChoice:
    """What a pattern rule did with an embedding table it matched: took it (no reason), or
    left it alone because its settings cannot apply (`misfit`) or its tied head is compressed
    (`partner`)."""

    rule: str
    table: str
    misfit: str | None = None
    partner: str | None = None


def misfit(settings: Mapping[str, Any], info: LayerInfo) -> str | None:
    """Why rule `settings` cannot apply to embedding table `info`, or None: the techniques
    decide, and a pattern rule leaves such a table alone."""
    return embedding_misfit(settings, info.shared_with)


def _bad(rule: str, key: str, value: Any) -> Any:
    """Refuse a constant that is not valid for setting `key`."""
    raise SpaceError(f"rule {rule!r}: {key}={value!r} is not valid; use a knob such as Bits(4, 8)")


def _check_setting(rule: str, key: str, value: Any) -> Knob:
    """Validate a constant or a knob given for a layer setting; constants become knobs."""
    if isinstance(value, Knob):
        expected = _KNOB_TYPES[key]
        if not isinstance(value, expected):
            raise SpaceError(f"rule {rule!r}: {key} takes {expected.__name__}(...), not {value!r}")
        if key == "act_bits" and (value.method not in (None, "rtn") or value.group is not None):
            raise SpaceError(
                f"rule {rule!r}: act_bits rounds inputs to nearest with one scale; drop "
                "method= and group= from its Bits"
            )
        return value
    if key == "sparsity":
        if isinstance(value, (int, float)):
            return Sparsity(float(value), float(value))
        return _bad(rule, key, value)
    if key in ("bits", "act_bits"):
        if isinstance(value, int) and value in VALID_BITS:
            return Bits(value)
        return _bad(rule, key, value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # rank
        return Rank(value)
    return _bad(rule, key, value)


def _rule_key(selector: str | type) -> str:
    """How a selector is named in messages and parameter names; a bad selector is refused."""
    if isinstance(selector, type):
        if not issubclass(selector, nn.Module):
            raise SpaceError(f"rule {selector!r}: a type selector must be an nn.Module class")
        return f"{selector.__module__}.{selector.__qualname__}"
    if not (isinstance(selector, str) and selector):
        raise SpaceError(f"rule {selector!r}: use a name pattern string or an nn.Module type")
    if selector.startswith("re:"):
        try:
            re.compile(selector[3:])
        except re.error as exc:
            raise SpaceError(f"rule {selector!r}: bad regular expression ({exc})") from None
    return selector


def parse_rule(selector: str | type, settings: Mapping[str, Any]) -> Rule:
    """A `Rule` from one entry of `Space(rules=...)`, every setting checked."""
    key = _rule_key(selector)
    if not isinstance(settings, Mapping):
        raise SpaceError(f"rule {key!r}: settings must be a dict like dict(bits=Bits(4, 8))")
    unknown = set(settings) - _RULE_KEYS
    if unknown:
        raise SpaceError(
            f"rule {key!r}: unknown setting(s) {sorted(unknown)}; use {sorted(_RULE_KEYS)}"
        )
    tied = bool(settings.get("tied", False))
    bands = settings.get("bands")
    if bands is not None and not isinstance(bands, Bands):
        raise SpaceError(f"rule {key!r}: bands takes Bands(...), such as Bands(0.1, 0.3)")
    checked = {
        k: _check_setting(key, k, v) for k, v in settings.items() if k not in ("tied", "bands")
    }
    return Rule(key, selector, checked, tied, bands)


def parse_hyper(hyper: Mapping[str, Knob] | None) -> dict[str, Knob]:
    """The plain hyperparameters of `Space(hyper=...)`, checked."""
    out: dict[str, Knob] = {}
    for key, knob in (hyper or {}).items():
        if not isinstance(knob, Knob) or isinstance(knob, (Sparsity, Bits, Rank)):
            raise SpaceError(f"hyper {key!r}: use Choice, Float or Int, not {knob!r}")
        if ":" in key:
            raise SpaceError(f"hyper {key!r}: names may not contain ':'")
        out[key] = knob
    return out


def _first_match(
    rules: list[Rule], layers: Mapping[str, tuple[nn.Module, LayerInfo]], taken: list[TableChoice]
) -> dict[str, Rule]:
    """Each layer's winning rule (exact name, else the first match), leaving alone tables
    whose pattern rule cannot apply to them."""
    assignment: dict[str, Rule] = {}
    for name, (module, info) in layers.items():
        exact = [r for r in rules if r.selector == name]
        matching = exact or [r for r in rules if r.matches(name, module)]
        if not matching:
            continue
        why = None if exact or info.kind != "embedding" else misfit(matching[0].settings, info)
        if why:
            taken.append(TableChoice(matching[0].key, name, misfit=why))
            continue
        assignment[name] = matching[0]
    return assignment


def _settle_tables(
    assignment: dict[str, Rule],
    layers: Mapping[str, tuple[nn.Module, LayerInfo]],
    taken: list[TableChoice],
) -> None:
    """A tied table a pattern took is left alone when its head is compressed (the head keeps
    the weight); otherwise the taking is recorded."""
    for name in list(assignment):
        info, rule = layers[name][1], assignment[name]
        if info.kind != "embedding" or rule.selector == name:
            continue
        partner = next((p for p in info.shared_with if p in assignment), None)
        if partner is not None:
            del assignment[name]
        taken.append(TableChoice(rule.key, name, partner=partner))


def _check_used(
    rules: list[Rule],
    assignment: Mapping[str, Rule],
    layers: Mapping[str, tuple[nn.Module, LayerInfo]],
    model: nn.Module,
) -> None:
    """Every rule must take some layer: one that matches only layers others took is shadowed;
    one that matches nothing is told the names it could use."""
    for rule in rules:
        if any(r is rule for r in assignment.values()):
            continue
        if any(rule.matches(n, m) for n, (m, _) in layers.items()):
            raise SpaceError(
                f"rule {rule.key!r} is shadowed: exact names or earlier patterns "
                "take all its layers"
            )
        names = ", ".join(list(layers)[:6])
        conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
        hint = (
            "; this model has transformers Conv1D layers (GPT-2): pass "
            "microsweep.models.hf(model) to Space, which makes them Linear"
            if conv1d
            else ""
        )
        raise SpaceError(
            f"rule {rule.key!r} matches no Linear, Embedding or LSTM gate matrix; "
            f"layer names are like: {names}{hint}"
        )


def assign(
    rules: list[Rule], layers: Mapping[str, tuple[nn.Module, LayerInfo]], model: nn.Module
) -> tuple[dict[str, Rule], list[TableChoice]]:
    """Each controlled layer's rule in model order, and what pattern rules did with embedding
    tables; a rule that takes no layer is refused."""
    taken: list[TableChoice] = []
    assignment = _first_match(rules, layers, taken)
    _settle_tables(assignment, layers, taken)
    _check_used(rules, assignment, layers, model)
    return assignment, taken
