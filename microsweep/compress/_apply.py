"""`compress_`, `compress` and `project_`: apply a `Policy` to a model's Linear layers.

Every layer is checked before anything changes, so a bad policy raises `SpaceError` and leaves
the model as it was. Per layer the steps run in this order: calibrate input scales on the
unchanged model, factorize (rank), prune (sparsity, block), quantize weights (bits), and attach
the input quantizer (act_bits).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from microsweep.errors import SpaceError
from microsweep.spaces._policy import LayerPolicy, Policy

from ._lowrank import factorize
from ._modules import CompressedLinear, LowRankLinear
from ._prune import check_block, magnitude_mask
from ._quantize import quantize_rows, tensor_scale

__all__ = ["compress", "compress_", "project_"]


@dataclass(frozen=True)
class _Step:
    """One validated layer to compress: its name, the Linear found there and its settings."""

    name: str
    linear: nn.Linear
    settings: LayerPolicy


def compress_(model: nn.Module, policy: Policy, *, calib: torch.Tensor | None = None) -> nn.Module:
    """Compress the Linear layers named in `policy` in place and return `model`.

    Order per layer: factorize to `rank` (truncated SVD), prune each resulting weight to
    `sparsity` (by magnitude, unstructured or in `block`s), round weights to `bits` with
    per-output-channel scales (pruned zeros kept), then quantize inputs to `act_bits` with a
    static scale calibrated by running `calib` token ids through the model before any change.
    """
    if not isinstance(policy, Policy):
        raise SpaceError(
            f"policy is a {type(policy).__name__}, not a microsweep Policy; "
            "build one with Policy(layers={name: LayerPolicy(...)})"
        )
    steps = _plan(model, policy, calib)
    act_scales = _calibrate(model, [s for s in steps if s.settings.act_bits < 32], calib)
    with torch.no_grad():
        for step in steps:
            _set_submodule(model, step.name, _compress_layer(step, act_scales.get(step.name)))
    return model


def compress(model: nn.Module, policy: Policy, *, calib: torch.Tensor | None = None) -> nn.Module:
    """A compressed deep copy of `model`; the original is left untouched (ties kept in the copy)."""
    return compress_(copy.deepcopy(model), policy, calib=calib)


def project_(model: nn.Module) -> nn.Module:
    """Put every `CompressedLinear` back on its mask and grid, e.g. after a fine-tuning step.

    Pruned entries return to zero and weights are re-rounded to their `bits` with per-row scales
    recomputed from the current values; `weight_scale` is updated to match.
    """
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, CompressedLinear):
                continue
            weight = module.weight
            mask = module.mask if module.sparse else None
            if mask is not None:
                weight.mul_(mask)
            if module.bits < 32:
                q, scale = quantize_rows(weight, module.bits, mask)
                weight.copy_(q)
                module.weight_scale = scale.to(weight.dtype)
    return model


def _plan(model: nn.Module, policy: Policy, calib: torch.Tensor | None) -> list[_Step]:
    """Check every non-identity layer setting against the model; raise before changing anything."""
    module_names: dict[int, list[str]] = {}
    param_owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(mod), []).append(mod_name)
        for _, param in mod.named_parameters(recurse=False, remove_duplicate=False):
            param_owners.setdefault(id(param), []).append(mod_name)
    weight_users: dict[int, str] = {}
    steps = []
    for name, settings in policy.layers.items():
        if not isinstance(settings, LayerPolicy):
            raise SpaceError(
                f"layer {name!r} has settings of type {type(settings).__name__}; "
                "use a LayerPolicy(sparsity=..., bits=...)"
            )
        if settings.is_identity:
            continue
        linear = _find_linear(model, name)
        aliases = [n for n in module_names[id(linear)] if n != name]
        if aliases:
            raise SpaceError(
                f"layer {name!r} is the same module as {aliases[0]!r}; compressing one name "
                "would leave the other uncompressed, so give each use its own Linear"
            )
        wid = id(linear.weight)
        if wid in weight_users:
            raise SpaceError(
                f"layers {weight_users[wid]!r} and {name!r} share one weight; "
                "give compression settings to only one of them"
            )
        weight_users[wid] = name
        out_f, in_f = linear.weight.shape
        shapes = [(f"layer {name!r}", (out_f, in_f))]
        if settings.rank is not None:
            limit = min(out_f, in_f)
            if settings.rank > limit:
                raise SpaceError(
                    f"rank {settings.rank} for layer {name!r} is above min(out, in) = {limit} "
                    f"of its {out_f}x{in_f} weight; use a rank in 1..{limit}"
                )
            others = [n for n in param_owners[wid] if n != name]
            if others:
                raise SpaceError(
                    f"layer {name!r} shares its weight with {others[0]!r}; low-rank "
                    "factorization would untie it, so drop rank for this layer"
                )
            r = settings.rank
            shapes = [
                (f"layer {name!r} first factor", (r, in_f)),
                (f"layer {name!r} second factor", (out_f, r)),
            ]
        if settings.sparsity > 0 and settings.block is not None:
            for what, shape in shapes:
                check_block(shape, settings.block, what)
        if settings.act_bits < 32 and calib is None:
            raise SpaceError(
                f"layer {name!r} quantizes its inputs (act_bits={settings.act_bits}); "
                "pass calib=token ids of shape (B, T) to calibrate the input scale"
            )
        steps.append(_Step(name, linear, settings))
    if calib is not None and not isinstance(calib, torch.Tensor):
        raise SpaceError(
            f"calib is a {type(calib).__name__}; pass a LongTensor of token ids of shape (B, T)"
        )
    return steps


def _find_linear(model: nn.Module, name: str) -> nn.Linear:
    """The `nn.Linear` at dotted `name`, or a `SpaceError` listing a few that exist."""
    try:
        module = model.get_submodule(name) if name else None
    except AttributeError:
        module = None
    if isinstance(module, nn.Linear):
        return module
    found = "no such submodule" if module is None else f"found {type(module).__name__}"
    examples = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:3]
    hint = f"such as {', '.join(map(repr, examples))}" if examples else "(the model has none)"
    raise SpaceError(
        f"layer {name!r} is not a Linear in this model ({found}); name an nn.Linear submodule "
        f"{hint}"
    )


def _calibrate(
    model: nn.Module, steps: list[_Step], calib: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Static input scales: max|x| / qmax seen by each layer over one no-grad pass of `calib`.

    The pass runs in eval mode (so dropout does not move the scale); training flags are restored.
    """
    if not steps or calib is None:
        return {}
    amax: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            seen = args[0].detach().abs().amax()
            amax[name] = seen if name not in amax else torch.maximum(amax[name], seen)

        return hook

    handles = [s.linear.register_forward_pre_hook(recorder(s.name)) for s in steps]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(calib)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    scales = {}
    for step in steps:
        if step.name not in amax:
            raise SpaceError(
                f"layer {step.name!r} saw no input while calibrating; pass calib tokens "
                "whose forward pass runs through it, or set its act_bits to 32"
            )
        scales[step.name] = tensor_scale(amax[step.name], step.settings.act_bits)
    return scales


def _compress_layer(step: _Step, act_scale: torch.Tensor | None) -> nn.Module:
    """Factorize if asked, then prune/quantize each weight matrix; the module to put in place."""
    settings = step.settings
    if settings.rank is None:
        return _compress_matrix(step.linear, settings, act_scale)
    pair = factorize(step.linear, settings.rank)
    first = _compress_matrix(pair.first, settings, act_scale)
    second = _compress_matrix(pair.second, replace(settings, act_bits=32), None)
    return LowRankLinear(first, second).train(step.linear.training)


def _compress_matrix(
    linear: nn.Linear, settings: LayerPolicy, act_scale: torch.Tensor | None
) -> nn.Module:
    """Prune, then quantize one Linear's weight in place (ties hold); wrap it as CompressedLinear.

    Returns `linear` itself when nothing but rank applies to it.
    """
    sparse = settings.sparsity > 0
    if not sparse and settings.bits == 32 and settings.act_bits == 32:
        return linear
    weight = linear.weight
    mask = magnitude_mask(weight, settings.sparsity, settings.block) if sparse else None
    values = weight.detach() if mask is None else weight.detach() * mask
    scale = None
    if settings.bits < 32:
        values, scale = quantize_rows(values, settings.bits, mask)
    weight.copy_(values)
    out_f, in_f = weight.shape
    layer = CompressedLinear(
        in_f,
        out_f,
        bias=linear.bias is not None,
        bits=settings.bits,
        act_bits=settings.act_bits,
        sparse=sparse,
        block=settings.block if sparse else None,
    )
    layer.weight = weight  # the same Parameter object: a tie with an embedding is kept
    layer.bias = linear.bias
    if scale is not None:
        layer.weight_scale = scale.to(weight.dtype)
    if mask is not None:
        layer.mask = mask
    if act_scale is not None:
        layer.act_scale = act_scale.to(weight.device)
    return layer.train(linear.training)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
