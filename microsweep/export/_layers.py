"""Which layers a compressed model replaced, as plain specs, and how to rebuild them.

A spec is a JSON dict: ``{"type": "compressed", in, out, bias, bits, act_bits, sparse, block}``,
``{"type": "linear", in, out, bias}``, ``{"type": "low_rank", "first": spec, "second": spec}``,
for embedding tables ``{"type": "compressed_embedding", in (dim), out (rows), bits, sparse,
block, padding_idx}``, ``{"type": "embedding", in, out, padding_idx}`` and
``{"type": "low_rank_embedding", "first": table spec, "second": projection spec}``, and
``{"type": "linear_lstm", ...}`` for an LSTM run with Linear gate matrices (listed before its
gates, which follow as layers of their own), the tensor-train layers' own specs
(``"tt_linear"``, ``"tt_embedding"``), and ``{"type": "decoded", ..., "decoder": spec}`` for a
layer stored as codes (``"decoder_at"``: the path of the layer whose decoder it shares).
The skeleton is the recipe's model with those layers swapped in, built on the meta device so
that no memory is filled and no random numbers are drawn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from microsweep.compress import (
    CompressedEmbedding,
    CompressedLinear,
    LowRankEmbedding,
    LowRankLinear,
    TTEmbedding,
    TTLinear,
)
from microsweep.compress._autoencoder import AutoDecoder, DecodedLinear
from microsweep.errors import MicrosweepError
from microsweep.models import LinearLSTM

from ._format import ExportError

__all__ = ["canonical", "layer_specs", "skeleton"]


def canonical(value: Any) -> str:
    """A JSON text that compares equal for equal contents (sorted keys, tuples as lists)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _spec(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, CompressedEmbedding):
        return {
            "type": "compressed_embedding",
            "in": int(module.embedding_dim),
            "out": int(module.num_embeddings),
            "bits": int(module.bits),
            "sparse": bool(module.sparse),
            "block": list(module.block) if module.block is not None else None,
            "padding_idx": module.padding_idx,
        }
    if type(module) is nn.Embedding:
        return {
            "type": "embedding",
            "in": int(module.embedding_dim),
            "out": int(module.num_embeddings),
            "padding_idx": module.padding_idx,
        }
    if isinstance(module, LowRankEmbedding):
        return {
            "type": "low_rank_embedding",
            "first": _spec(module.first),
            "second": _spec(module.second),
        }
    if isinstance(module, LinearLSTM):
        return {"type": "linear_lstm", **_lstm_shape(module)}
    if isinstance(module, (TTLinear, TTEmbedding)):
        return module.spec()
    if isinstance(module, DecodedLinear):
        return {**module.spec(), "decoder": module.decoder.spec()}
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
    """[path, spec] for every compressed or low-rank layer, outermost only, in module order;
    a `LinearLSTM` comes before its gate matrices."""
    out: list[list[Any]] = []
    inside: list[str] = []
    decoders: dict[int, str] = {}
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, LinearLSTM):
            if not name:
                raise ExportError("the model itself is an LSTM; export a whole model")
            out.append([name, _spec(module)])
        elif isinstance(module, DecodedLinear):
            spec = _spec(module)
            first = decoders.setdefault(id(module.decoder), name)
            if first != name:  # one decoder for the group: rebuilt once, then shared
                spec["decoder_at"] = first
            out.append([name, spec])
            inside.append(name)
        elif isinstance(module, (CompressedLinear, LowRankLinear, TTLinear, TTEmbedding)):
            if not name:
                raise ExportError("the model itself is a compressed layer; export a whole model")
            out.append([name, _spec(module)])
            inside.append(name)
    return out


def _make(spec: Mapping[str, Any], decoder: AutoDecoder | None = None) -> nn.Module:
    kind = spec["type"]
    if kind == "tt_linear":
        return TTLinear.from_spec(spec)
    if kind == "tt_embedding":
        return TTEmbedding.from_spec(spec)
    if kind == "decoded":
        if decoder is None:
            decoder = AutoDecoder.from_spec(spec["decoder"])
        return DecodedLinear.from_spec(spec, decoder)
    if kind == "low_rank":
        return LowRankLinear(_make(spec["first"]), _make(spec["second"]))
    if kind == "low_rank_embedding":
        return LowRankEmbedding(_make(spec["first"]), _make(spec["second"]))
    if kind == "linear_lstm":
        shape = {k: spec[k] for k in _LSTM_KEYS}
        return LinearLSTM(int(shape.pop("input_size")), int(shape.pop("hidden_size")), **shape)
    if kind in ("embedding", "compressed_embedding"):
        pad = spec["padding_idx"]
        pad = None if pad is None else int(pad)
        num, dim = int(spec["out"]), int(spec["in"])
        if kind == "embedding":
            return nn.Embedding(num, dim, padding_idx=pad)
        block = spec["block"]
        return CompressedEmbedding(
            num,
            dim,
            bits=int(spec["bits"]),
            sparse=bool(spec["sparse"]),
            block=(int(block[0]), int(block[1])) if block is not None else None,
            padding_idx=pad,
        )
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


_LSTM_KEYS = (
    "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
    "bidirectional", "proj_size",
)  # fmt: skip


def _sides(spec: Mapping[str, Any]) -> tuple[int, int]:
    if spec["type"] == "low_rank":
        return int(spec["first"]["in"]), int(spec["second"]["out"])
    if spec["type"] == "low_rank_embedding":
        return int(spec["second"]["out"]), int(spec["first"]["out"])
    if spec["type"] == "tt_embedding":
        return int(spec["embedding_dim"]), int(spec["num_embeddings"])
    return int(spec["in"]), int(spec["out"])


def _replaceable(old: nn.Module | None, spec: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """What kind of layer `spec` must replace, and the sides it must have (in, out), or the
    LSTM's shape; ("", ()) when `old` is not of that kind."""
    kind = spec.get("type")
    if kind == "linear_lstm":
        if type(old) is nn.LSTM or isinstance(old, LinearLSTM):
            return "LSTM", tuple(_lstm_shape(old).items())
        return "", ()
    if kind in ("embedding", "compressed_embedding", "low_rank_embedding", "tt_embedding"):
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
                shared = None
                if spec.get("decoder_at") is not None:
                    shared = model.get_submodule(str(spec["decoder_at"])).decoder
                new = _make(spec, shared)
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
