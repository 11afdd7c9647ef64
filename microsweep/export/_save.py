"""`save`: write a compressed model as exactly the bits `microsweep.score.count` counts.

The stored tensors, their widths, the mask decision and the constants are read from the same
counting rules the counter calls, and shared tensors are resolved by the counter's own identity
and precedence, so the payload follows the count tensor by tensor.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from microsweep.compress import form_for
from microsweep.policy import Policy
from microsweep.score import (
    FREEBIE_BITS,
    CountConfig,
    RuleContext,
    Stored,
    block_grid,
    count,
    find_rule,
    storage_key,
    store_priority,
)

from ._bits import pack_mask, pack_signed
from ._format import FORMAT_VERSION, ExportError, write_container
from ._layers import canonical, layer_specs, skeleton
from ._scales import expand_scale

__all__ = ["ExportInfo", "save"]


@dataclass(frozen=True)
class ExportInfo:
    """What `save` wrote: payload and header sizes in bytes, the counted parameters
    (32-bit equivalents), ``ratio = payload_bytes / (counted_params * 4)``, the number of
    stored tensors, whether the 16-bit allowance applied, whether every value was stored
    without rounding (`exact`), and the bytes of tensors the count leaves out (folded ones)."""

    path: str
    payload_bytes: int
    header_bytes: int
    counted_params: float
    ratio: float
    tensors: int
    freebie: bool
    exact: bool
    uncounted_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


@dataclass
class _Entry:
    """One tensor to store: where it lives, how its values and mask are encoded."""

    key: tuple[Any, ...]
    tensor: torch.Tensor
    refs: list[str]
    values: str  # "f32", "f16", "int" (on a scale's grid) or "uint" (plain indices)
    bits: int
    mask: str | None = None  # None, "element" or "block"
    block: tuple[int, int] | None = None
    keep: torch.Tensor | None = None  # the pruning mask of a CompressedLinear weight, if any
    scale_key: tuple[Any, ...] | None = None  # the weight_scale entry of an "int" weight
    counted: bool = True


def _tensor_refs(model: nn.Module) -> dict[tuple[Any, ...], list[str]]:
    """Every name under which the model holds each parameter or buffer (ties give several)."""
    refs: dict[tuple[Any, ...], list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for field, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None:
                continue
            name = f"{mname}.{field}" if mname else field
            names = refs.setdefault(storage_key(t), [])
            if name not in names:
                names.append(name)
    return refs


_Cost = tuple[str, nn.Module, Any]
"""(module name, module, the `Cost` its rule reports)."""


def _plan(model: nn.Module, config: CountConfig, freebie: bool) -> list[_Entry]:
    """The tensors to store, resolved exactly as `count` resolves them."""
    ctx = RuleContext(model, config, 1.0)
    costs: list[_Cost] = []
    for name, module in model.named_modules():
        rule = find_rule(type(module))
        if rule is not None:
            costs.append((name, module, rule(module, name, ctx)))
    owners: dict[tuple[Any, ...], tuple[int, Stored]] = {}
    for i, (_, _, cost) in enumerate(costs):
        for stored in cost.stores:
            key = storage_key(stored.tensor)
            held = owners.get(key)
            if held is None or store_priority(stored) > store_priority(held[1]):
                owners[key] = (i, stored)
    refs = _tensor_refs(model)
    entries = [
        _entry(key, costs[i], stored, refs, config, freebie) for key, (i, stored) in owners.items()
    ]
    entries += _constants(costs, refs, freebie)
    _check_buffers(model, {e.key for e in entries})
    return entries


def _raw(bits: int, what: str, freebie: bool) -> str:
    """The raw float format of a value counted at `bits`."""
    if bits == 32:
        return "f32"
    if bits == 16 and freebie:
        return "f16"
    raise ExportError(f"{what} is counted at {bits} bits, which the exporter cannot store")


def _names(refs: dict[tuple[Any, ...], list[str]], key: tuple[Any, ...], what: str) -> list[str]:
    """Every name the model holds the tensor `key` under."""
    found = refs.get(key)
    if not found:
        raise ExportError(f"{what} is not a parameter or buffer of any module; cannot export")
    return found


def _entry(
    key: tuple[Any, ...],
    owner: _Cost,
    stored: Stored,
    refs: dict[tuple[Any, ...], list[str]],
    config: CountConfig,
    freebie: bool,
) -> _Entry:
    """How one stored tensor is written: its values (raw, or an integer grid the module's form
    holds) and its mask, as its owning rule declared it."""
    name, module, _ = owner
    where = _names(refs, key, f"a tensor stored by {name or '<model>'!r}")
    what = where[0]
    t = stored.tensor.detach()
    if stored.index:  # integers (a vocabulary's band order) at exactly their counted width
        return _Entry(key, t, where, "uint", stored.bits)
    if t.dtype != torch.float32:
        raise ExportError(f"{what} is {t.dtype}; the exporter stores float32 models only")
    entry = _Entry(key, t, where, "f32", 32)
    if stored.folded:
        entry.counted = False
        entry.values, entry.bits = ("f16", 16) if freebie else ("f32", 32)
        return entry
    bits = FREEBIE_BITS if freebie else stored.bits
    form = form_for(type(module))
    grid = form.int_grid(module, stored.tensor) if form is not None else None
    if bits < 32 and not freebie:
        if grid is None:
            raise ExportError(
                f"{what} is counted at {bits} bits but is not a CompressedLinear weight; "
                "only those have integer grids to store"
            )
        entry.values, entry.bits = "int", bits
        entry.scale_key = storage_key(grid)
    else:
        entry.values, entry.bits = _raw(bits, what, freebie), bits
    if stored.sparse or config.mask == "always":
        entry.block = stored.block if stored.sparse else None
        entry.mask = "block" if entry.block is not None else "element"
        if form is not None:
            entry.keep = form.keep_mask(module, stored.tensor)
    return entry


def _constants(
    costs: list[_Cost], refs: dict[tuple[Any, ...], list[str]], freebie: bool
) -> list[_Entry]:
    """The constants (quantizer scales) each module's form says inference needs, checked
    against what its rule declared."""
    width = FREEBIE_BITS if freebie else 32
    entries = []
    for name, module, cost in costs:
        form = form_for(type(module))
        expected: list[torch.Tensor] = form.constants(module) if form is not None else []
        if sorted(cost.consts) != sorted((t.numel(), 32) for t in expected):
            raise ExportError(
                f"{name or '<model>'!r} ({type(module).__name__}) declares constants the exporter "
                "does not know how to store; register an exporter-aware layer or drop them"
            )
        for t in expected:
            key = storage_key(t)
            where = _names(refs, key, f"a constant of {name!r}")
            if t.dtype != torch.float32:
                raise ExportError(f"{where[0]} is {t.dtype}; the exporter stores float32 only")
            entries.append(_Entry(key, t.detach(), where, _raw(width, where[0], freebie), width))
    return entries


def _check_buffers(model: nn.Module, stored_keys: set[tuple[Any, ...]]) -> None:
    """Every buffer is stored or derived from what is stored (a form's `derived_buffers`)."""
    for mname, module in model.named_modules():
        for field, buf in module._buffers.items():
            form = form_for(type(module))
            derived = form is not None and field in form.derived_buffers()
            if buf is not None and not derived and storage_key(buf) not in stored_keys:
                raise ExportError(
                    f"buffer {mname}.{field} is neither counted nor known to the exporter; "
                    "remove it or register a counting rule that stores it"
                )


def _block_keep(entry: _Entry) -> torch.Tensor:
    """(ceil(rows/br), ceil(cols/bc)) bool: the blocks the count charges for (any non-zero)."""
    if entry.tensor.dim() != 2 or entry.block is None:
        raise ExportError(f"{entry.refs[0]} is block-sparse but not a 2-D matrix")
    return block_grid(entry.tensor, entry.block)


def expand_blocks(
    blocks: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]
) -> torch.Tensor:
    """A per-block bool grid stretched to a (rows, cols) element mask."""
    br, bc = block
    full = blocks.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)
    return full[: shape[0], : shape[1]]


def _grid(entry: _Entry, scale: torch.Tensor) -> torch.Tensor:
    """The integers q with weight == q * scale (per row, or per row and group of columns),
    checked exactly."""
    t = entry.tensor
    s = expand_scale(scale, t.shape)
    q = torch.round(t / s)
    qmax = 2 ** (entry.bits - 1) - 1
    if bool((q.abs() > qmax).any()) or not torch.equal(q * s, t):
        raise ExportError(
            f"{entry.refs[0]} is off its {entry.bits}-bit grid; call "
            "microsweep.compress.project_(model) after changing a compressed model"
        )
    return q.to(torch.int64)


def _encode(entries: list[_Entry]) -> tuple[bytes, list[dict[str, Any]], bool, int]:
    """Payload bytes, the per-tensor table, whether all values were exact, uncounted bytes."""
    chunks: list[bytes] = []
    offset = 0
    exact = True
    uncounted = 0
    index = {e.key: i for i, e in enumerate(entries)}
    table: list[dict[str, Any]] = []

    def put(data: bytes) -> list[int]:
        nonlocal offset
        chunks.append(data)
        where = [offset, len(data)]
        offset += len(data)
        return where

    for entry in entries:
        t = entry.tensor.cpu()
        flat = t.reshape(-1)
        row: dict[str, Any] = {
            "refs": entry.refs,
            "shape": list(t.shape),
            "values": entry.values,
            "bits": entry.bits,
            "mask": entry.mask,
            "block": list(entry.block) if entry.block is not None else None,
            "counted": entry.counted,
        }
        start = offset
        keep = None
        if entry.mask == "element":
            keep = flat != 0
            row["mask_at"] = put(pack_mask(keep))
        elif entry.mask == "block":
            blocks = _block_keep(entry)
            row["mask_at"] = put(pack_mask(blocks))
            keep = expand_blocks(blocks, entry.block, tuple(t.shape)).reshape(-1)
        if entry.values == "uint":  # 0 .. 2^b - 1, shifted onto the signed packer's range
            vals = flat.to(torch.int64)
            data = pack_signed(vals - (1 << (entry.bits - 1)), entry.bits)
        elif entry.values == "int":
            scale_entry = entries[index[entry.scale_key]]
            q = _grid(entry, scale_entry.tensor.cpu()).reshape(-1)
            row["scale"] = index[entry.scale_key]
            vals = q if keep is None else q[keep]
            data = pack_signed(vals, entry.bits)
        else:
            vals = flat if keep is None else flat[keep]
            if entry.values == "f16":
                half = vals.to(torch.float16)
                exact = exact and torch.equal(half.to(torch.float32), vals)
                data = half.numpy().astype("<f2").tobytes()
            else:
                data = vals.numpy().astype("<f4").tobytes()
        row["count"] = int(vals.numel())
        row["values_at"] = put(data)
        if not entry.counted:
            uncounted += offset - start
        table.append(row)
    return b"".join(chunks), table, exact, uncounted


def _config(count_config: CountConfig | Mapping[str, Any] | None) -> CountConfig:
    if count_config is None:
        return CountConfig()
    if isinstance(count_config, CountConfig):
        return count_config
    if isinstance(count_config, Mapping):
        return CountConfig.from_json(count_config)
    raise ExportError(
        f"count_config is a {type(count_config).__name__}; pass a CountConfig or its to_json()"
    )


def _policy_json(policy: Policy | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(policy, Policy):
        return policy.to_json()
    if isinstance(policy, Mapping):
        return Policy.from_json(policy).to_json()
    raise ExportError(f"policy is a {type(policy).__name__}; pass a Policy or its to_json()")


def _json_object(value: Any, what: str) -> dict[str, Any]:
    import json

    if not isinstance(value, Mapping):
        raise ExportError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{what} is not JSON-serializable ({exc}); pass plain values") from None


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    policy: Policy | Mapping[str, Any],
    recipe: Mapping[str, Any],
    count_config: CountConfig | Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    base: nn.Module | None = None,
) -> ExportInfo:
    """Write compressed `model` to `path` (atomically) and return what was written.

    `recipe` is what `microsweep.models.build` rebuilds the uncompressed model from (for the
    built-in GPT, ``model.recipe()``); `policy` and `extra` are kept as metadata. Values are
    stored at the widths `count(model, config=count_config)` counts them at; with the 16-bit
    allowance every value is stored as fp16, so call `round_to_storage` first to make the
    saved model exactly the one you evaluated (`ExportInfo.exact` says whether it was). For a
    model outside `microsweep.models`, pass ``recipe=custom_recipe(base)`` and the dense `base`.
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"save() needs an nn.Module, got {type(model).__name__}")
    config = _config(count_config)
    policy_json = _policy_json(policy)
    recipe_json = _json_object(recipe, "recipe")
    extra_json = _json_object(extra if extra is not None else {}, "extra")
    own = getattr(model, "recipe", None)
    if callable(own) and canonical(_json_object(own(), "model.recipe()")) != canonical(recipe_json):
        raise ExportError("recipe describes another model than the one given; pass model.recipe()")
    layers = layer_specs(model)
    shell = skeleton(recipe_json, layers, "the recipe", base)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    expected = {n: tuple(t.shape) for n, t in shell.state_dict(keep_vars=True).items()}
    if shapes != expected:
        diff = sorted(set(shapes.items()) ^ set(expected.items()))[:1]
        raise ExportError(
            f"the model does not match its recipe (first difference: {diff[0][0]}); "
            "pass the recipe the model was built from"
        )
    counts = count(model, context=1.0, config=config)
    entries = _plan(model, config, counts.freebie)
    with torch.no_grad():
        payload, table, exact, uncounted = _encode(entries)
    header = {
        "format": FORMAT_VERSION,
        "microsweep": _version(),
        "recipe": recipe_json,
        "policy": policy_json,
        "count_config": config.to_json(),
        "freebie": counts.freebie,
        "counted_params": counts.params,
        "extra": extra_json,
        "layers": layers,
        "tensors": table,
    }
    header_bytes = write_container(path, header, payload)
    params = counts.params
    return ExportInfo(
        path=os.fspath(path),
        payload_bytes=len(payload),
        header_bytes=header_bytes,
        counted_params=params,
        ratio=len(payload) / (params * 4) if params > 0 else math.inf,
        tensors=len(table),
        freebie=counts.freebie,
        exact=exact,
        uncounted_bytes=uncounted,
    )


def _version() -> str:
    from microsweep._version import __version__

    return __version__
