"""Which layers a compressed model replaced, as plain specs, and how to rebuild them.

A spec is a JSON dict: ``{"type": "compressed", in, out, bias, bits, act_bits, sparse, block}``,
``{"type": "linear", in, out, bias}`` or ``{"type": "low_rank", "first": spec, "second": spec}``.
The skeleton is the recipe's model with those layers swapped in, built on the meta device so
that no memory is filled and no random numbers are drawn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from microsweep.compress import CompressedLinear, LowRankLinear
from microsweep.errors import MicrosweepError

from ._format import ExportError

__all__ = ["canonical", "layer_specs", "skeleton"]


def canonical(value: Any) -> str:
    """A JSON text that compares equal for equal contents (sorted keys, tuples as lists)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _spec(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, CompressedLinear):
        return {
            "type": "compressed",
            "in": int(module.in_features),
            "out": int(module.out_features),
            "bias": module.bias is not None,
            "bits": int(module.bits),
            "act_bits": int(module.act_bits),
            "sparse": bool(module.sparse),
            "block": list(module.block) if module.block is not None else None,
        }
    if isinstance(module, LowRankLinear):
        return {"type": "low_rank", "first": _spec(module.first), "second": _spec(module.second)}
    if type(module) is nn.Linear:
        return {
            "type": "linear",
            "in": int(module.in_features),
            "out": int(module.out_features),
            "bias": module.bias is not None,
        }
    raise ExportError(
        f"a low-rank factor is a {type(module).__name__}; only Linear and CompressedLinear "
        "factors can be exported"
    )


def layer_specs(model: nn.Module) -> list[list[Any]]:
    """[path, spec] for every compressed or low-rank layer, outermost only, in module order."""
    out: list[list[Any]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, (CompressedLinear, LowRankLinear)):
            if not name:
                raise ExportError("the model itself is a compressed layer; export a whole model")
            out.append([name, _spec(module)])
            inside.append(name)
    return out


def _make(spec: Mapping[str, Any]) -> nn.Module:
    kind = spec["type"]
    if kind == "low_rank":
        return LowRankLinear(_make(spec["first"]), _make(spec["second"]))
    in_f, out_f, bias = int(spec["in"]), int(spec["out"]), bool(spec["bias"])
    if kind == "linear":
        return nn.Linear(in_f, out_f, bias=bias)
    if kind == "compressed":
        block = spec["block"]
        return CompressedLinear(
            in_f,
            out_f,
            bias=bias,
            bits=int(spec["bits"]),
            act_bits=int(spec["act_bits"]),
            sparse=bool(spec["sparse"]),
            block=(int(block[0]), int(block[1])) if block is not None else None,
        )
    raise ValueError(f"unknown layer type {kind!r}")


def _sides(spec: Mapping[str, Any]) -> tuple[int, int]:
    if spec["type"] == "low_rank":
        return int(spec["first"]["in"]), int(spec["second"]["out"])
    return int(spec["in"]), int(spec["out"])


def custom_recipe(model: nn.Module) -> dict[str, Any]:
    """The recipe of a model outside `microsweep.models`: its class, for the error that asks
    `load` for an instance built as when the sweep ran."""
    kind = type(model)
    return {"builder": "custom", "class": f"{kind.__module__}.{kind.__qualname__}"}


def skeleton(
    recipe: Mapping[str, Any],
    layers: list[list[Any]],
    where: str,
    base: nn.Module | None = None,
) -> nn.Module:
    """The recipe's model on the meta device with `layers` swapped in; `where` names the file
    or model in error messages. A ``"custom"`` recipe takes the structure from `base`, a dense
    instance of the model (its copy goes to the meta device; `base` is not changed)."""
    import copy

    from microsweep.models import build

    if recipe.get("builder") == "custom":
        if base is None:
            raise ExportError(
                f"{where} holds a custom model ({recipe.get('class')}); pass "
                "load(path, model=<an instance built as when the sweep ran>)"
            )
        kind = f"{type(base).__module__}.{type(base).__qualname__}"
        if type(base).__qualname__ != str(recipe.get("class", "")).rsplit(".", 1)[-1]:
            raise ExportError(f"{where} is for another model: {recipe.get('class')}, not {kind}")
    with torch.device("meta"):
        try:
            if recipe.get("builder") == "custom":
                model = copy.deepcopy(base).to("meta")
            else:
                model = build(dict(recipe))
        except MicrosweepError:
            raise
        except Exception as exc:
            raise ExportError(f"{where}: its recipe cannot be built ({exc})") from None
        for path, spec in layers:
            try:
                old = model.get_submodule(path)
            except AttributeError:
                old = None
            if not isinstance(old, nn.Linear):
                raise ExportError(
                    f"{where} is for another model: {path!r} is not a Linear in the recipe's model"
                )
            try:
                new = _make(spec)
                sides = _sides(spec)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise ExportError(
                    f"{where} is corrupt: bad layer spec for {path!r} ({exc})"
                ) from None
            if sides != (old.in_features, old.out_features):
                raise ExportError(
                    f"{where} is for another model: {path!r} is {sides[0]}->{sides[1]} in the "
                    f"file but {old.in_features}->{old.out_features} in the recipe's model"
                )
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model
