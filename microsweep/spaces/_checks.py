"""Definition-time checks: what a rule may ask of the layers it takes, refused with one line
before any trial runs. What a technique allows is asked of the technique (`microsweep.compress`);
what a layer's shape allows is checked here. Both read plain layer descriptions (`LayerInfo`),
never the model."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from microsweep.compress import check_rule as check_techniques
from microsweep.compress import check_shared_weight, check_tied_rank
from microsweep.errors import SpaceError, UsageError
from microsweep.policy import concrete_block
from microsweep.spaces._knobs import Rank, Sparsity
from microsweep.spaces._layers import LayerInfo
from microsweep.spaces._rules import Rule

__all__ = ["check_gate_owners", "check_rule"]


def _check_weight(
    rule: Rule, info: LayerInfo, assigned: Collection[str], layers: Mapping[str, LayerInfo]
) -> None:
    """What a layer's weight allows: a tied weight takes settings from one side only, and a
    rank only by a method that builds the factorized tied pair of one table and one Linear."""
    check_shared_weight(info.name, [n for n in info.shared_with if n in assigned])
    rank = rule.settings.get("rank")
    if rank is not None and info.shared_with:
        partners = [(n, layers[n].kind if n in layers else "other") for n in info.shared_with]
        method = rank.method if isinstance(rank, Rank) else "plain"
        check_tied_rank(info.name, info.kind, partners, method)


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
        untied_table = info.kind == "embedding" and not info.shared_with
        if rank is not None and untied_table and shape[1] % br:
            raise SpaceError(  # its projection factor is (d, rank)
                f"rule {rule.key!r}: block {sparsity.block} with rank needs its row "
                f"side to divide embedding {info.name!r}'s width {shape[1]}"
            )


def check_rule(
    rule: Rule,
    members: Sequence[LayerInfo],
    assigned: Collection[str],
    layers: Mapping[str, LayerInfo],
) -> None:
    """Everything the rule asks of its layers `members` (`assigned`: every layer some rule
    controls, for tied weights; `layers`: every compressible layer by name): first what its
    techniques allow, then each layer's weight and shape; the first misfit is refused with one
    line."""
    rank = rule.settings.get("rank")
    method = rank.method if isinstance(rank, Rank) else "plain"
    check_techniques(
        method, rule_key=rule.key, settings=rule.settings, members=members, tied=rule.tied
    )
    for info in members:
        _check_weight(rule, info, assigned, layers)
        _check_shape(rule, info)


def check_gate_owners(infos: Sequence[LayerInfo]) -> None:
    """A gate matrix compresses by running its LSTM as Linears inside the model, which needs a
    parent module: an LSTM given as the model itself is refused."""
    if any(i.kind == "lstm_gate" and "." not in i.name for i in infos):
        raise UsageError("the model is an nn.LSTM itself; wrap it in a module to compress it")
