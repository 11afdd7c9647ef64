"""Which layers a compressed model replaced, as plain specs, and how to rebuild them.

A spec is a JSON dict: ``{"type": "compressed", in, out, bias, bits, act_bits, sparse, block}``,
``{"type": "linear", in, out, bias}``, ``{"type": "low_rank", "first": spec, "second": spec}``,
for embedding tables ``{"type": "compressed_embedding", in (dim), out (rows), bits, sparse,
block, padding_idx}``, ``{"type": "embedding", in, out, padding_idx}`` and
``{"type": "low_rank_embedding", "first": table spec, "second": projection spec}``,
``{"type": "tied_low_rank_embedding", in, out, rank, padding_idx, proj_bits, proj_sparse,
proj_block}`` for the table side of a factorized tied pair (its two tensors are the tied
head's factors, stored once under both names), and
``{"type": "linear_lstm", ...}`` for an LSTM run with Linear gate matrices (listed before its
gates, which follow as layers of their own), the tensor-train layers' own specs
(``"tt_linear"``, ``"tt_embedding"``), and ``{"type": "decoded", ..., "decoder": spec}`` for a
layer stored as codes (``"decoder_at"``: the path of the layer whose decoder it shares).
The compressed forms' specs are written and read by the `Form` of the technique that produced the
module (`microsweep.compress.form_for`, `form_of_spec`); plain layers and `LinearLSTM` here.
The skeleton is the recipe's model with those layers swapped in, built on the meta device so
that no memory is filled and no random numbers are drawn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from microsweep.compress import RebuildContext, SpecContext, form_for, form_of_spec
from microsweep.errors import MicrosweepError
from microsweep.models import LinearLSTM

from ._format import ExportError

__all__ = ["canonical", "layer_specs", "skeleton"]


def canonical(value: Any) -> str:
    """A JSON text that compares equal for equal contents (sorted keys, tuples as lists)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _spec(module: nn.Module, ctx: SpecContext | None = None) -> dict[str, Any]:
    """The spec of `module`: its technique's form writes it (`microsweep.compress.form_for`);
    plain Linear and Embedding layers and `LinearLSTM` are written here."""
    form = form_for(type(module))
    if form is not None:
        return form.spec(module, ctx or SpecContext(_spec, ""))
    if type(module) is nn.Embedding:
        return {
            "type": "embedding",
            "in": int(module.embedding_dim),
            "out": int(module.num_embeddings),
            "padding_idx": module.padding_idx,
        }
    if isinstance(module, LinearLSTM):
        return {"type": "linear_lstm", **_lstm_shape(module)}
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


def _lstm_shape(module: nn.Module) -> dict[str, Any]:
    """What an LSTM's structure is made of (nn.LSTM and LinearLSTM alike)."""
    return {
        "input_size": int(module.input_size),
        "hidden_size": int(module.hidden_size),
        "num_layers": int(module.num_layers),
        "bias": bool(module.bias),
        "batch_first": bool(module.batch_first),
        "dropout": float(module.dropout),
        "bidirectional": bool(module.bidirectional),
        "proj_size": int(module.proj_size),
    }


def layer_specs(model: nn.Module) -> list[list[Any]]:
    """[path, spec] for every layer a technique produced, outermost only, in module order;
    a `LinearLSTM` comes before its gate matrices."""
    out: list[list[Any]] = []
    inside: list[str] = []
    first: dict[int, str] = {}  # shared parts (a group's decoder): the first path that wrote it
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, LinearLSTM):
            if not name:
                raise ExportError("the model itself is an LSTM; export a whole model")
            out.append([name, _spec(module)])
        elif form_for(type(module)) is not None:
            if not name:
                raise ExportError("the model itself is a compressed layer; export a whole model")
            out.append([name, _spec(module, SpecContext(_spec, name, first))])
            inside.append(name)
    return out


def _make(spec: Mapping[str, Any], find: Any = None) -> nn.Module:
    """An empty module of `spec` (a technique's form, or a plain layer or `LinearLSTM`);
    `find(path)` returns a module already placed (a shared part)."""
    kind = spec["type"]
    form = form_of_spec(kind)
    if form is not None:
        return form.rebuild(spec, RebuildContext(lambda s: _make(s, find), find))
    if kind == "linear_lstm":
        shape = {k: spec[k] for k in _LSTM_KEYS}
        return LinearLSTM(int(shape.pop("input_size")), int(shape.pop("hidden_size")), **shape)
    if kind == "embedding":
        pad = spec["padding_idx"]
        pad = None if pad is None else int(pad)
        return nn.Embedding(int(spec["out"]), int(spec["in"]), padding_idx=pad)
    if kind == "linear":
        return nn.Linear(int(spec["in"]), int(spec["out"]), bias=bool(spec["bias"]))
    raise ValueError(f"unknown layer type {kind!r}")


_LSTM_KEYS = (
    "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
    "bidirectional", "proj_size",
)  # fmt: skip


def _sides(spec: Mapping[str, Any]) -> tuple[int, int]:
    form = form_of_spec(spec["type"])
    if form is not None:
        return form.sides(spec)
    return int(spec["in"]), int(spec["out"])


def _replaceable(old: nn.Module | None, spec: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """What kind of layer `spec` must replace, and the sides it must have (in, out), or the
    LSTM's shape; ("", ()) when `old` is not of that kind."""
    kind = spec.get("type")
    if kind == "linear_lstm":
        if type(old) is nn.LSTM or isinstance(old, LinearLSTM):
            return "LSTM", tuple(_lstm_shape(old).items())
        return "", ()
    form = form_of_spec(str(kind))
    if kind == "embedding" or (form is not None and form.replaces_table(spec)):
        if type(old) is nn.Embedding:
            return "Embedding", (old.embedding_dim, old.num_embeddings)
        return "", ()
    if isinstance(old, nn.Linear):
        return "Linear", (old.in_features, old.out_features)
    return "", ()


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
            what, have = _replaceable(old, spec) if isinstance(spec, Mapping) else ("", ())
            if not what:
                raise ExportError(
                    f"{where} is for another model: {path!r} is not a layer of the file's kind "
                    "in the recipe's model"
                )
            try:
                new = _make(spec, model.get_submodule)
                sides = tuple(_lstm_shape(new).items()) if what == "LSTM" else _sides(spec)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                raise ExportError(
                    f"{where} is corrupt: bad layer spec for {path!r} ({exc})"
                ) from None
            if sides != have:
                raise ExportError(
                    f"{where} is for another model: {path!r} is {sides} in the file but "
                    f"{have} in the recipe's model"
                )
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model
