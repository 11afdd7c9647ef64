"""Between policies and Optuna parameters: `suggest` asks a trial for every knob and builds the
`Policy`; `policy_for`, `params_for` and `params_from_policy` go from unit choices or a whole
policy to the policy or the parameters that produce it (for planned samplers and warm starts).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from microsweep.errors import SpaceError, SpaceWarning
from microsweep.policy import GROUP_METHODS, LayerPolicy, Policy
from microsweep.spaces._knobs import Bits, Knob, Rank, Sparsity
from microsweep.spaces._layers import LayerInfo, Unit
from microsweep.spaces._rules import Rule

if TYPE_CHECKING:
    import optuna

__all__ = [
    "SpaceView",
    "layer_policy",
    "params_for",
    "params_from_policy",
    "policy_for",
    "suggest",
]


class SpaceView(Protocol):
    """What the mapping reads of a `Space`: each controlled layer's rule in model order, the
    plain hyperparameters, layer descriptions and the allocation units."""

    assignment: dict[str, Rule]
    hyper: dict[str, Knob]

    def info(self, name: str) -> LayerInfo:
        """The description of compressible layer `name`."""
        ...

    def units(self) -> list[Unit]:
        """The allocation units in model order."""
        ...


def resolve_rank(value: float | int, info: LayerInfo, block: tuple[int, int] | None) -> int | None:
    """`Rank.resolve` for a layer, rounded down to whole blocks (at least one) when the layer
    is pruned in `block`s; None (dense) when that reaches the break-even or the full rank."""
    rank = Rank.resolve(value, info.out_features, info.in_features)
    if rank is None or block is None:
        return rank
    step = math.lcm(block[0] or 1, block[1] or 1)
    rank = max(step, rank // step * step)
    if rank > info.full_rank or rank >= Rank.break_even(info.out_features, info.in_features):
        return None
    return rank


def layer_policy(
    info: LayerInfo, knobs: Mapping[str, Knob], values: Mapping[str, Any], group: str
) -> LayerPolicy:
    """The `LayerPolicy` of one layer for knob values in Optuna units (rank fractions resolve to
    the layer's rank; knobs not given stay at identity). `group` names the unit (the tied
    rule's key, or the layer) that a grouped rank method compresses together. With block
    sparsity a rank is rounded down to a whole number of blocks (at least one), so both factors
    tile."""
    sparsity = float(values.get("sparsity", 0.0))
    knob = knobs.get("sparsity")
    block = knob.block if isinstance(knob, Sparsity) and sparsity > 0 else None
    rank_knob = knobs.get("rank")
    method = rank_knob.method if isinstance(rank_knob, Rank) else "plain"
    value = values.get("rank")
    rank = None if value is None else resolve_rank(value, info, block)
    bits_knob = knobs.get("bits")
    return LayerPolicy(
        sparsity=sparsity,
        block=block,
        bits=int(values.get("bits", 32)),
        act_bits=int(values.get("act_bits", 32)),
        rank=rank,
        rank_method=method,
        group=group if method in GROUP_METHODS else None,
        prune_method=(knob.method if isinstance(knob, Sparsity) else None) or "magnitude",
        quant_method=(bits_knob.method if isinstance(bits_knob, Bits) else None) or "rtn",
        act_order=bits_knob.act_order if isinstance(bits_knob, Bits) else False,
        quant_group=bits_knob.group if isinstance(bits_knob, Bits) else None,
        band=info.band,
    )


def _rule_layer_policy(info: LayerInfo, rule: Rule, values: Mapping[str, Any]) -> LayerPolicy:
    """`layer_policy` for a layer under `rule` (a tied rule's layers form one group)."""
    return layer_policy(info, rule.settings, values, rule.key if rule.tied else info.name)


def suggest(space: SpaceView, trial: optuna.trial.BaseTrial) -> Policy:
    """Ask `trial` for every knob (one parameter per layer and knob, or per tied rule and knob)
    and return the plain `Policy` it describes."""
    tied_values: dict[tuple[str, str], Any] = {}
    layers: dict[str, LayerPolicy] = {}
    for name, rule in space.assignment.items():
        values: dict[str, Any] = {}
        for key, knob in rule.settings.items():
            if rule.tied:
                if (rule.key, key) not in tied_values:
                    tied_values[(rule.key, key)] = knob.suggest(trial, f"{rule.key}:{key}")
                values[key] = tied_values[(rule.key, key)]
            else:
                values[key] = knob.suggest(trial, f"{name}:{key}")
        layers[name] = _rule_layer_policy(space.info(name), rule, values)
    hyper = {key: knob.suggest(trial, key) for key, knob in space.hyper.items()}
    return Policy(layers=layers, hyper=hyper)


def policy_for(
    space: SpaceView, choices: Mapping[str, Mapping[str, Any]], hyper: Mapping[str, Any] | None
) -> Policy:
    """The policy that gives each unit (by key) its knob values, in the units Optuna sees
    (fractions for fractional ranks); knobs not given take their constant value."""
    layers: dict[str, LayerPolicy] = {}
    unknown = set(choices) - {u.key for u in space.units()}
    if unknown:
        raise SpaceError(
            f"unknown unit(s) {sorted(unknown)[:3]}; units are layer names or tied rules"
        )
    for name, rule in space.assignment.items():
        given = choices.get(rule.key if rule.tied else name, {})
        values = {}
        for key, knob in rule.settings.items():
            if key in given:
                values[key] = given[key]
            elif knob.is_constant:
                values[key] = knob.suggest(None, key)  # type: ignore[arg-type]
            else:
                raise SpaceError(f"unit of layer {name!r} has no value for knob {key!r}")
        layers[name] = _rule_layer_policy(space.info(name), rule, values)
    return Policy(layers=layers, hyper=dict(hyper or {}))


def params_for(
    space: SpaceView, choices: Mapping[str, Mapping[str, Any]], hyper: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Optuna parameter values that make `suggest` return `policy_for(choices, hyper)`
    (for `study.enqueue_trial`)."""
    params: dict[str, Any] = {}
    for unit in space.units():
        given = choices.get(unit.key, {})
        for knob, pname in unit.params.items():
            if knob not in given:
                raise SpaceError(f"unit {unit.key!r} has no value for knob {knob!r}")
            params[pname] = given[knob]
    params.update(hyper or {})
    return params


def _rank_candidates(
    knob: Rank, wanted: list[tuple[int | None, LayerInfo]], block: tuple[int, int] | None
) -> list[float | int]:
    """Rank knob values worth trying for the wanted ranks: the knob's explicit ranks, or the
    middle of the fractions that round to every layer's rank, the range's ends and each
    layer's own fraction."""
    if knob.values is not None:
        return list(knob.values)
    low, high = float(knob.low), float(knob.high)
    lo, hi = low, high
    step = math.lcm(block[0] or 1, block[1] or 1) if block else 1
    for rank, info in wanted:  # every raw rank in [r, r + step) rounds to r
        if rank is not None:
            lo = max(lo, (rank - 0.5) / info.full_rank)
            hi = min(hi, (rank + step - 0.5) / info.full_rank)
    candidates: list[float | int] = [(lo + hi) / 2] if lo < hi else []
    candidates += [low, high]
    for rank, info in wanted:
        if rank is not None:
            candidates.append(min(max(rank / info.full_rank, low), high))
    return candidates


def rank_param(
    knob: Rank, wanted: list[tuple[int | None, LayerInfo]], block: tuple[int, int] | None = None
) -> float | int:
    """The rank knob's value (a fraction or an explicit rank) that resolves to each layer's
    wanted rank (one value for all layers of a tied rule); the first layer's best guess when
    none does (the check that follows names the mismatch)."""
    for value in _rank_candidates(knob, wanted, block):
        if all(resolve_rank(value, i, block) == r for r, i in wanted):
            return value
    rank, info = wanted[0]
    if knob.values is not None:
        return rank if rank is not None else knob.values[-1]
    return float(knob.high) if rank is None else rank / info.full_rank


def _layer_params(space: SpaceView, policy: Policy) -> dict[str, Any]:
    """Each searched layer knob's parameter value read off `policy` (ranks inverted)."""
    params: dict[str, Any] = {}
    for unit in space.units():
        lp = policy.layers.get(unit.layers[0].name, LayerPolicy())
        for knob, pname in unit.params.items():
            if knob == "rank":
                wanted = [(policy.layers.get(i.name, LayerPolicy()).rank, i) for i in unit.layers]
                params[pname] = rank_param(unit.knobs["rank"], wanted, lp.block)
            else:
                params[pname] = getattr(lp, knob)
    return params


def _replay(space: SpaceView, params: Mapping[str, Any]) -> Policy:
    """The policy `suggest` makes from `params`, hyperparameters it lacks filled with any
    valid value (only the layers are compared); a value out of range is refused."""
    import optuna

    fixed = dict(params)
    for key, knob in space.hyper.items():
        if key not in fixed:
            choices = getattr(knob, "choices", None)
            fixed[key] = choices[0] if choices else getattr(knob, "low", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FixedTrial only warns on a value out of range
        try:
            return suggest(space, optuna.trial.FixedTrial(fixed))
        except (UserWarning, ValueError) as exc:
            raise SpaceError(f"the policy does not fit this space: {exc}") from None


def params_from_policy(space: SpaceView, policy: Policy) -> dict[str, Any]:
    """Optuna parameter values that make `suggest` return `policy` (a warm start). A layer the
    policy leaves out is taken as uncompressed; a policy this space cannot produce is refused,
    naming the first layer or knob that differs. Hyperparameters the policy lacks are left to
    the sampler."""
    unknown = [n for n in policy.layers if n not in space.assignment]
    if unknown:
        raise SpaceError(
            f"the policy names layer(s) this space does not search: {', '.join(unknown[:3])}"
            f"{' ...' if len(unknown) > 3 else ''}; was it written for another model?"
        )
    params = _layer_params(space, policy)
    params.update({key: policy.hyper[key] for key in space.hyper if key in policy.hyper})
    got = _replay(space, params)
    other_methods = []
    for name in space.assignment:
        want = policy.layers.get(name, LayerPolicy())
        have = got.layers[name]
        if want != have and _with_methods_of(want, have) == have:
            other_methods.append(name)
        elif want != have:
            raise SpaceError(
                f"the policy gives layer {name!r} {want}, which this space cannot produce "
                f"(its rule gives {have}); check the policy was written for this space"
            )
    if other_methods:  # methods are the space's, not parameters: the values carry over
        warnings.warn(
            f"the policy's pruning or rounding methods differ from this space's on "
            f"{len(other_methods)} layer(s) (first {other_methods[0]!r}); its values run "
            "with the space's methods",
            SpaceWarning,
            stacklevel=2,
        )
    return params


def _with_methods_of(policy: LayerPolicy, other: LayerPolicy) -> LayerPolicy:
    """`policy` with `other`'s pruning and rounding methods (its values unchanged)."""
    from dataclasses import replace

    return replace(
        policy,
        prune_method=other.prune_method,
        quant_method=other.quant_method,
        act_order=other.act_order,
    )
