"""The opening trial of a planned sampler: a policy chosen without the planner, so a new sweep's
first result comes while the planner still works.

Quantization is the knob that is nearly lossless at its mildest widths on any model, but under
the MicroNet rules a partly quantized model loses the 16-bit allowance everywhere, so the mildest
width may count more than the dense model. The opening therefore walks uniform quantization
settings from the mildest (weights first, then activations, one level at a time) and takes the
first whose exact count is below the dense model's; each is counted on the driver after a
round-to-nearest compression of a copy (a count needs no data, and rounding is a few passes over
the weights). A space with no quantization knob, or none that counts below dense, opens with
the mildest compressing level of every knob.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from microsweep.score import Baseline, CountConfig
    from microsweep.spaces import Policy, Space, Unit

__all__ = ["opening_choices"]

QUANT_KNOBS = ("bits", "act_bits")
MAX_COUNTED = 8
"""The most candidate settings the opening counts (each a compression and a count of a copy)."""


def opening_choices(
    space: Space,
    model: nn.Module,
    *,
    context: float,
    config: CountConfig,
    baseline: Baseline,
    dense_score: float,
    calib: torch.Tensor | None = None,
) -> tuple[dict[str, dict[str, Any]], float | None]:
    """Unit key -> knob values (on the planner's levels) of the opening trial, and its counted
    score (None when the fallback was not counted). `calib`'s first row calibrates the input
    quantizers of the copies counted (a count reads no scale, only that there is one)."""
    from microsweep.allocate import plan_levels
    from microsweep.errors import SpaceError

    units = space.units()
    levels = {u.key: plan_levels(u) for u in units}
    steps = {k: _depth(units, levels, k) for k in QUANT_KNOBS}
    walk = sorted(
        (
            (w, a)
            for w, a in itertools.product(range(steps["bits"] + 1), range(steps["act_bits"] + 1))
            if w + a > 0
        ),
        key=lambda p: (p[0] + p[1], p[1]),
    )
    for w, a in walk[:MAX_COUNTED]:
        choices = {u.key: _quantized(u, levels[u.key], {"bits": w, "act_bits": a}) for u in units}
        try:
            score = _count(
                space, model, choices, context=context, config=config, baseline=baseline,
                calib=None if calib is None else calib[:1],
            )  # fmt: skip
        except SpaceError:  # e.g. input quantizers and no calibration tokens: not this one
            continue
        if score < dense_score:
            return choices, score
    return {u.key: _mildest_all(u, levels[u.key]) for u in units}, None


def _compressing(unit: Unit, knob: str, levels: list[Any]) -> list[Any]:
    """The levels of `knob` that change some layer of `unit`, least compressed first."""
    from microsweep.allocate import level_key
    from microsweep.allocate._levels import layer_setting

    return [
        v
        for v in levels
        if any(
            level_key(knob, layer_setting(info, dict(unit.knobs), {knob: v}, unit.key)) is not None
            for info in unit.layers
        )
    ]


def _depth(units: list[Unit], levels: dict[str, dict[str, list[Any]]], knob: str) -> int:
    """How many compressing levels the unit with the most of them has for `knob`."""
    return max(
        (len(_compressing(u, knob, levels[u.key][knob])) for u in units if knob in levels[u.key]),
        default=0,
    )


def _quantized(unit: Unit, own: dict[str, list[Any]], steps: dict[str, int]) -> dict[str, Any]:
    """Each quantization knob at its `steps[knob]`-th compressing level (0: uncompressed; past a
    unit's last, its last), every other knob at its least compressed level."""
    out = {k: v[0] for k, v in own.items()}
    for knob, step in steps.items():
        if knob in own and step > 0:
            levels = _compressing(unit, knob, own[knob])
            if levels:
                out[knob] = levels[min(step, len(levels)) - 1]
    return out


def _mildest_all(unit: Unit, own: dict[str, list[Any]]) -> dict[str, Any]:
    """Every knob at its mildest compressing level (its only level when none compresses)."""
    out = {}
    for knob, values in own.items():
        levels = _compressing(unit, knob, values)
        out[knob] = levels[0] if levels else values[0]
    return out


def _count(
    space: Space,
    model: nn.Module,
    choices: dict[str, dict[str, Any]],
    *,
    context: float,
    config: CountConfig,
    baseline: Baseline,
    calib: torch.Tensor | None,
) -> float:
    """The score of `choices` as counted after rounding a copy to its widths (the count does not
    depend on how the rounding was chosen, only on widths, shapes and zeros)."""
    import torch

    from microsweep.compress import compress
    from microsweep.score import count, micronet_score

    policy = _plain(space.policy_for(choices))
    with torch.no_grad():
        compressed = compress(model, policy, calib=calib)
    counts = count(compressed, context=context, config=config)
    return micronet_score(counts.params, counts.ops, baseline)


def _plain(policy: Policy) -> Policy:
    """`policy` with round-to-nearest in place of data-aware quantization (same widths)."""
    layers = {
        name: replace(lp, quant_method="rtn", act_order=False) for name, lp in policy.layers.items()
    }
    return replace(policy, layers=layers)
