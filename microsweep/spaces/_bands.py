"""Frequency bands in a Space: a rule with ``bands=Bands(...)`` cuts each table or output head
it takes into bands, and each band becomes a layer of its own (``"head@1"``, kind ``"band"``:
V_b rows of d), so every per-layer step (suggest, policies, planner units, probes) treats it
as any layer. Which words a band holds is decided when a model is built, from the calibration
tokens' frequencies; the space fixes only how many rows each band has."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from microsweep.compress import check_rule as check_techniques
from microsweep.compress import check_shared_weight
from microsweep.errors import SpaceError
from microsweep.spaces._checks import _check_shape
from microsweep.spaces._knobs import Bits, Rank, Sparsity
from microsweep.spaces._layers import LayerInfo
from microsweep.spaces._rules import Rule

__all__ = ["band_layers", "check_band_rule", "expand_bands"]


def band_layers(rule: Rule, info: LayerInfo) -> list[LayerInfo]:
    """The band layers rule `rule` cuts layer `info` into, most frequent words first."""
    assert rule.bands is not None
    ranges = rule.bands.ranges(info.out_features, repr(info.name))
    return [
        LayerInfo(f"{info.name}@{i}", stop - start, info.in_features, (), "band", (start, stop))
        for i, (start, stop) in enumerate(ranges)
    ]


def check_band_rule(rule: Rule, members: Sequence[LayerInfo], assigned: Collection[str]) -> None:
    """What a rule with bands may ask: tables and heads (a tied partner left to it), knobs
    each band can take (plain SVD, magnitude pruning, round-to-nearest; act_bits on a head's
    input only), one value per band (not ``tied``), and bands that each keep a row."""
    key = rule.key
    if rule.tied:
        raise SpaceError(f"rule {key!r}: bands are searched one by one; drop tied=True")
    rank = rule.settings.get("rank")
    if isinstance(rank, Rank) and rank.method != "plain":
        raise SpaceError(
            f"rule {key!r}: bands factorize by plain SVD; drop method={rank.method!r} from Rank"
        )
    for name in ("sparsity", "bits"):
        knob = rule.settings.get(name)
        if isinstance(knob, (Sparsity, Bits)) and knob.method not in (None, "magnitude", "rtn"):
            raise SpaceError(
                f"rule {key!r}: bands prune by magnitude and round to nearest; drop "
                f"method={knob.method!r} from {type(knob).__name__}"
            )
    for info in members:
        if info.kind not in ("linear", "embedding"):
            raise SpaceError(
                f"rule {key!r}: {info.name!r} is not a table or output head; bands cut a "
                "vocabulary's rows"
            )
        check_shared_weight(info.name, [n for n in info.shared_with if n in assigned])
        if "act_bits" in rule.settings and info.kind == "embedding" and not info.shared_with:
            raise SpaceError(
                f"rule {key!r}: act_bits quantizes a head's input, and table {info.name!r} has "
                "no head; drop act_bits"
            )
        bands = band_layers(rule, info)
        check_techniques("plain", rule_key=key, settings=rule.settings, members=bands, tied=False)
        for band in bands:
            _check_shape(rule, band)


def expand_bands(assignment: dict[str, Rule], layers: dict[str, LayerInfo]) -> dict[str, Rule]:
    """The assignment with each layer of a rule with bands replaced by its band layers (in
    place, in order); their descriptions are added to `layers`."""
    out: dict[str, Rule] = {}
    for name, rule in assignment.items():
        if rule.bands is None:
            out[name] = rule
            continue
        for band in band_layers(rule, layers[name]):
            layers[band.name] = band
            out[band.name] = rule
    return out
