"""Definition-time checks of the techniques, on plain data: what a Space rule may ask of them.

`Space` calls these with its rules' knobs and `LayerInfo`s; `compress_` shares the checks of
tied weights (settings from one side only; a rank only by a method that builds the factorized
tied pair, on a weight one table and one Linear share). No Space object is needed, so the
checks sit with the techniques they ask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from microsweep.errors import SpaceError

from ._techniques import (
    LayerShape,
    MatrixTechnique,
    RankTechnique,
    RuleCheck,
    technique,
    techniques,
)

__all__ = ["check_rule", "check_shared_weight", "check_tied_rank", "embedding_misfit", "ties"]


def check_rule(
    method: str,
    *,
    rule_key: str,
    settings: Mapping[str, Any],
    members: Sequence[LayerShape],
    tied: bool,
) -> None:
    """Raise `SpaceError` when rule `rule_key` (its knobs by setting, the layers it takes,
    ``tied``) asks rank `method` or the matrix techniques for what they cannot do; then check
    that every embedding table among `members` can take the rule's settings."""
    rule = RuleCheck(rule_key, settings, tuple(members), bool(tied))
    technique(method).check_rule(rule)
    for tech in techniques():
        if isinstance(tech, MatrixTechnique):
            tech.check_rule(rule)
    for info in members:
        if info.kind != "embedding":
            continue
        why = embedding_misfit(settings, info.shared_with)
        if why:
            raise SpaceError(
                f"rule {rule_key!r}: layer {info.name!r} is an embedding table and {why}; give "
                "it a rule of its own without that setting"
            )


def embedding_misfit(settings: Mapping[str, Any], shared_with: Sequence[str]) -> str | None:
    """Why a rule's `settings` cannot apply to an embedding table tied to `shared_with` (its
    input is token ids; rank would untie a tied table), or None when they fit."""
    rule = RuleCheck("", settings, (), False)
    for tech in techniques():
        if isinstance(tech, MatrixTechnique):
            why = tech.table_misfit(rule)
            if why:
                return why
    rank = settings.get("rank")
    method = getattr(rank, "method", None)
    if rank is not None and method is not None:
        if shared_with:  # the tied pair reads the head's inputs: any method that ties fits
            if not ties(method):
                return f"it is tied to {shared_with[0]!r} and {_tie_refusal(method)}"
            return None
        why = technique(method).table_misfit(rule)
        if why:
            return why
    return None


def ties(method: str) -> bool:
    """Whether rank `method` builds a factorized tied pair (`RankTechnique.ties`)."""
    tech = technique(method)
    return isinstance(tech, RankTechnique) and tech.ties


def _tie_refusal(method: str) -> str:
    tech = technique(method)
    if isinstance(tech, RankTechnique):
        return tech.tie_refusal()
    return f"{method!r} is not a rank method"


def check_tied_rank(name: str, kind: str, partners: Sequence[tuple[str, str]], method: str) -> None:
    """Refuse a rank by `method` on layer `name` (its `kind`: ``"embedding"``, ``"linear"``)
    whose weight `partners` ((name, kind) of every other module holding it) share, unless
    they are one table and one Linear and `method` builds the factorized tied pair."""
    if not partners:
        return
    first = partners[0][0]
    if not ties(method):
        raise SpaceError(f"layer {name!r} shares its weight with {first!r}; {_tie_refusal(method)}")
    if len(partners) != 1 or {kind, partners[0][1]} != {"embedding", "linear"}:
        names = ", ".join(repr(n) for n, _ in partners)
        raise SpaceError(
            f"layer {name!r} shares its weight with {names}; a rank factorizes a weight shared "
            "by one embedding table and one Linear only, so drop rank for this layer"
        )


def check_shared_weight(name: str, partners: Sequence[str]) -> None:
    """Refuse compression settings on layer `name` when `partners` (other layers given
    settings) hold the same weight: compressing one would change or untie the other."""
    if partners:
        raise SpaceError(
            f"layers {name!r} and {partners[0]!r} share one weight (tied); give compression "
            "settings to only one of them"
        )
