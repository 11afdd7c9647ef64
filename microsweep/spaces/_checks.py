"""Definition-time checks: what a rule may ask of the layers it takes, refused with one line
before any trial runs. They read plain layer descriptions (`LayerInfo`), never the model."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from microsweep.errors import SpaceError, UsageError
from microsweep.spaces._knobs import Rank, Sparsity
from microsweep.spaces._layers import LayerInfo
from microsweep.spaces._policy import DENSE_METHODS, concrete_block
from microsweep.spaces._rules import Rule, misfit

__all__ = ["check_gate_owners", "check_rule"]


def _check_method(rule: Rule, members: Sequence[LayerInfo]) -> None:
    """What the rule's rank method asks of the whole rule: dense-only methods take no other
    knob, a shared basis needs tied=True and one input size, a joint decoder one input size."""
    rank_knob = rule.settings.get("rank")
    method = rank_knob.method if isinstance(rank_knob, Rank) else "plain"
    if method in DENSE_METHODS:
        for key in ("sparsity", "bits", "act_bits"):
            knob = rule.settings.get(key)
            if knob is not None and not (knob.is_constant and knob.suggest(None, key) in (
                0.0, 32)):  # fmt: skip
                raise SpaceError(
                    f"rule {rule.key!r}: Rank(..., method={method!r}) keeps its factors "
                    f"dense at fp32; drop {key} from this rule"
                )
    if method == "shared":
        if not rule.tied:
            raise SpaceError(
                f"rule {rule.key!r}: Rank(..., method='shared') shares one basis across "
                "the rule's layers; add tied=True"
            )
        if len({i.in_features for i in members}) > 1:
            raise SpaceError(
                f"rule {rule.key!r}: a shared basis needs layers with one input size; "
                f"{members[0].name!r} and others differ"
            )
    if method == "autoencoder" and rule.tied and len({i.in_features for i in members}) > 1:
        raise SpaceError(
            f"rule {rule.key!r}: a joint decoder (tied=True) needs layers with one "
            "input size; split the rule or drop tied"
        )


def _check_weight(rule: Rule, info: LayerInfo, assigned: Collection[str]) -> None:
    """What a layer's weight allows: a named table must fit the rule, a tied weight takes
    settings from one side only and no rank (factors would untie it)."""
    if info.kind == "embedding":
        why = misfit(rule.settings, info)
        if why:
            raise SpaceError(
                f"rule {rule.key!r}: layer {info.name!r} is an embedding table and {why}; give "
                "it a rule of its own without that setting"
            )
    both = [n for n in info.shared_with if n in assigned]
    if both:
        raise SpaceError(
            f"layers {info.name!r} and {both[0]!r} share one weight (tied); give "
            "compression settings to only one of them"
        )
    if rule.settings.get("rank") is not None and info.shared_with:
        raise SpaceError(
            f"layer {info.name!r} shares its weight with {info.shared_with[0]!r}; "
            "low-rank factorization would untie it: drop rank from its rule"
        )


def _check_shape(rule: Rule, info: LayerInfo) -> None:
    """What a layer's shape allows: explicit ranks up to its full rank, blocks that tile it
    (and, with rank on a table, its projection's rows)."""
    rank = rule.settings.get("rank")
    if isinstance(rank, Rank) and rank.values is not None:
        too_big = [v for v in rank.values if v > info.full_rank]
        if too_big:
            raise SpaceError(
                f"rule {rule.key!r}: rank {too_big[0]} is above layer {info.name!r}'s "
                f"full rank {info.full_rank}; use ranks in 1..{info.full_rank}"
            )
    sparsity = rule.settings.get("sparsity")
    if isinstance(sparsity, Sparsity) and sparsity.block is not None:
        shape = (info.out_features, info.in_features)
        br, bc = concrete_block(sparsity.block, shape)
        if shape[0] % br or shape[1] % bc:
            raise SpaceError(
                f"rule {rule.key!r}: block {sparsity.block} does not tile layer "
                f"{info.name!r} of shape ({info.out_features}, {info.in_features})"
            )
        if rank is not None and info.kind == "embedding" and shape[1] % br:
            raise SpaceError(  # its projection factor is (d, rank)
                f"rule {rule.key!r}: block {sparsity.block} with rank needs its row "
                f"side to divide embedding {info.name!r}'s width {shape[1]}"
            )


def check_rule(rule: Rule, members: Sequence[LayerInfo], assigned: Collection[str]) -> None:
    """Everything the rule's techniques ask of its layers `members` (`assigned`: every layer
    some rule controls, for tied weights); the first misfit is refused with one line."""
    _check_method(rule, members)
    for info in members:
        _check_weight(rule, info, assigned)
        _check_shape(rule, info)


def check_gate_owners(infos: Sequence[LayerInfo]) -> None:
    """A gate matrix compresses by running its LSTM as Linears inside the model, which needs a
    parent module: an LSTM given as the model itself is refused."""
    if any(i.kind == "lstm_gate" and "." not in i.name for i in infos):
        raise UsageError("the model is an nn.LSTM itself; wrap it in a module to compress it")
