"""Definition-time checks of the techniques, on plain data: what a Space rule may ask of them.

`Space` calls these with its rules' knobs and `LayerInfo`s; `compress_` shares the one check
of tied weights. No Space object is needed, so the checks sit with the techniques they ask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from microsweep.errors import SpaceError

from ._techniques import LayerShape, MatrixTechnique, RuleCheck, technique, techniques

__all__ = ["check_rule", "check_shared_weight", "embedding_misfit"]


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
        why = technique(method).table_misfit(rule)
        if why:
            return why
        if shared_with:
            return f"it is tied to {shared_with[0]!r} and rank would untie it"
    return None


def check_shared_weight(name: str, partners: Sequence[str]) -> None:
    """Refuse compression settings on layer `name` when `partners` (other layers given
    settings) hold the same weight: compressing one would change or untie the other."""
    if partners:
        raise SpaceError(
            f"layers {name!r} and {partners[0]!r} share one weight (tied); give compression "
            "settings to only one of them"
        )
