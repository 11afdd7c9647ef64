"""Definition-time notes: a space that is valid but worth a second look (levels the scoring rules
make wasteful, embedding tables a pattern rule took or left alone), one line each."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from microsweep.policy import concrete_block
from microsweep.spaces._knobs import Bits, Rank, Sparsity
from microsweep.spaces._layers import LayerInfo
from microsweep.spaces._rules import Rule, TableChoice

__all__ = ["hygiene", "table_notes"]


def table_notes(choices: Sequence[TableChoice]) -> list[str]:
    """What pattern rules did with embedding tables, in the order they were decided."""
    notes = []
    for c in choices:
        if c.misfit is not None:
            notes.append(f"rule {c.rule!r} leaves embedding {c.table!r} alone: {c.misfit}")
        elif c.partner is not None:
            notes.append(
                f"rule {c.rule!r} leaves embedding {c.table!r} alone: its weight is tied to "
                f"{c.partner!r}, which the rules compress"
            )
        else:
            notes.append(
                f"rule {c.rule!r} also takes embedding table {c.table!r}; name Linear "
                "layers only to leave it dense"
            )
    return notes


def _sparsity_note(rule: Rule, first: LayerInfo) -> str | None:
    """Sparsity levels whose mask costs more bits than pruning saves (`first`: the rule's
    first layer, whose shape makes a block concrete)."""
    sparsity, bits = rule.settings.get("sparsity"), rule.settings.get("bits")
    if not (isinstance(sparsity, Sparsity) and sparsity.high > 0):
        return None
    per_value = 1.0
    if sparsity.block is not None:
        br, bc = concrete_block(sparsity.block, (first.out_features, first.in_features))
        per_value = 1.0 / (br * bc)
    widths = sorted(bits.choices) if isinstance(bits, Bits) else [32]
    # sparse storage is (1 - s) * b + (mask bits per value) against b for dense
    even = [(b, per_value / b) for b in widths]
    below = [f"{e:.3g} at w{b}" for b, e in even if 0 < e and sparsity.low < e]
    if not below:
        return None
    return (
        f"rule {rule.key!r}: sparsity below the mask break-even ({', '.join(below)}) stores "
        "more bits than the dense layer; it still saves operations"
    )


def _rank_note(rule: Rule, infos: Sequence[LayerInfo]) -> str | None:
    """Ranks at or past a layer's break-even, which leave it dense, grouped by threshold."""
    rank = rule.settings.get("rank")
    if not isinstance(rank, Rank):
        return None
    dense: dict[str, list[str]] = {}
    for info in infos:
        even = Rank.break_even(info.out_features, info.in_features)
        if rank.values is not None:
            if any(v >= even for v in rank.values):
                dense.setdefault(f"ranks >= {even}", []).append(info.name)
        elif rank.high is not None and round(rank.high * info.full_rank) >= even:
            dense.setdefault(f"fractions >= {even / info.full_rank:.3g}", []).append(info.name)
    if not dense:
        return None
    parts = []
    for what, names in dense.items():
        more = f" and {len(names) - 2} more" if len(names) > 2 else ""
        parts.append(f"{what} on {', '.join(names[:2])}{more}")
    return (
        f"rule {rule.key!r}: ranks at or past the break-even leave the layer dense "
        f"({'; '.join(parts)})"
    )


def _tied_note(rule: Rule, infos: Sequence[LayerInfo]) -> str | None:
    """A rank on a tied layer factorizes the module sharing its weight too."""
    if not isinstance(rule.settings.get("rank"), Rank):
        return None
    tied = [i for i in infos if i.shared_with]
    if not tied:
        return None
    pairs = ", ".join(f"{i.name!r} with {i.shared_with[0]!r}" for i in tied[:2])
    return (
        f"rule {rule.key!r}: rank factorizes {pairs} as one tied pair (a (V, r) table and an "
        "(r, d) projection both sides use, stored once)"
    )


def hygiene(rules: Sequence[Rule], layers_of: Callable[[Rule], list[LayerInfo]]) -> list[str]:
    """Levels the scoring rules make wasteful, one note per rule and knob; what a rank on a
    tied layer does to the other side."""
    notes = []
    for rule in rules:
        infos = layers_of(rule)
        found = (_sparsity_note(rule, infos[0]), _rank_note(rule, infos), _tied_note(rule, infos))
        for note in found:
            if note is not None:
                notes.append(note)
    return notes
