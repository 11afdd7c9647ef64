"""`load` and `read_header`: check a model file completely, decode every tensor, then build.

Nothing is built until the container's magic, version, lengths and checksums are verified, the
declared shapes match the recipe's model (built on the meta device) and every tensor has been
decoded; a model is returned only when every parameter and buffer of the
rebuilt structure has been filled from the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from microsweep.compress import form_for
from microsweep.errors import MicrosweepError

from ._bits import packed_len, unpack_mask, unpack_signed
from ._format import ExportError, read_container
from ._layers import canonical, skeleton
from ._save import expand_blocks
from ._scales import expand_scale, scale_fits

__all__ = ["load", "read_header"]


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified JSON header of a model file (recipe, policy, count config, tensor table,
    extra metadata) plus ``header_bytes``; the payload is checked but not decoded."""
    header, _, header_bytes = read_container(path)
    return {**header, "header_bytes": header_bytes}


def _segment(payload: bytes, at: Any, expected: int, where: str) -> bytes:
    offset, length = int(at[0]), int(at[1])
    if length != expected or offset < 0 or offset + length > len(payload):
        raise ExportError(f"{where} is corrupt: a tensor segment has the wrong size or offset")
    return payload[offset : offset + length]


def _decode(
    row: Mapping[str, Any], payload: bytes, scales: list[torch.Tensor | None], where: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One table row to its float32 tensor, and the element mask it was stored under (if any)."""
    shape = tuple(int(s) for s in row["shape"])
    n = math.prod(shape)
    keep = None
    if row["mask"] == "element":
        keep = unpack_mask(_segment(payload, row["mask_at"], packed_len(n, 1), where), n)
    elif row["mask"] == "block":
        br, bc = (int(b) for b in row["block"])
        if len(shape) != 2:
            raise ValueError("a block mask on a tensor that is not 2-D")
        gr, gc = math.ceil(shape[0] / br), math.ceil(shape[1] / bc)
        blocks = unpack_mask(
            _segment(payload, row["mask_at"], packed_len(gr * gc, 1), where), gr * gc
        ).view(gr, gc)
        keep = expand_blocks(blocks, (br, bc), shape).reshape(-1)
    elif row["mask"] is not None:
        raise ValueError(f"unknown mask kind {row['mask']!r}")
    stored = n if keep is None else int(keep.sum())
    if int(row["count"]) != stored:
        raise ExportError(f"{where} is corrupt: a mask and its value count disagree")
    kind, bits = row["values"], int(row["bits"])
    if kind == "f32":
        raw = _segment(payload, row["values_at"], 4 * stored, where)
        vals = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))
    elif kind == "f16":
        raw = _segment(payload, row["values_at"], 2 * stored, where)
        vals = torch.from_numpy(np.frombuffer(raw, dtype="<f2").astype(np.float32))
    elif kind == "int":
        raw = _segment(payload, row["values_at"], packed_len(stored, bits), where)
        vals = unpack_signed(raw, bits, stored).to(torch.float32)
    elif kind == "uint":
        if keep is not None:
            raise ValueError("indices stored under a mask")
        raw = _segment(payload, row["values_at"], packed_len(stored, bits), where)
        return (unpack_signed(raw, bits, stored) + (1 << (bits - 1))).view(shape), None
    else:
        raise ValueError(f"unknown value encoding {kind!r}")
    if keep is None:
        full = vals
    else:
        full = torch.zeros(n, dtype=torch.float32)
        full[keep] = vals
    full = full.view(shape)
    if kind == "int":
        scale = scales[int(row["scale"])]
        if scale is None or not shape or not scale_fits(scale, shape):
            raise ValueError("an integer tensor without a matching per-row (or group) scale")
        full = full * expand_scale(scale, shape)
    return full.contiguous(), None if keep is None else keep.view(shape)


def _decode_all(
    header: Mapping[str, Any], payload: bytes, where: str
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    table = header["tensors"]
    out: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(table)
    scales: list[torch.Tensor | None] = [None] * len(table)
    for stage in ("raw", "int"):  # integer weights need their scales decoded first
        for i, row in enumerate(table):
            if (row["values"] == "int") != (stage == "int"):
                continue
            out[i] = _decode(row, payload, scales, where)
            scales[i] = out[i][0]
    return [item for item in out if item is not None]


def _slot(
    model: nn.Module, ref: str, shape: tuple[int, ...], where: str
) -> tuple[str, nn.Module, str]:
    """The (module path, module, field) a stored name refers to, when it exists in `model`
    with `shape`; otherwise the file is for another model."""
    mpath, _, field = ref.rpartition(".")
    try:
        module = model.get_submodule(mpath)
    except AttributeError:
        raise ExportError(f"{where} is for another model: it stores {ref!r}") from None
    current = module._parameters.get(field, module._buffers.get(field))
    if current is None or tuple(current.shape) != shape:
        raise ExportError(f"{where} is for another model: {ref!r} does not fit the rebuilt model")
    return mpath, module, field


def _check_shapes(model: nn.Module, table: list[Mapping[str, Any]], where: str) -> None:
    """Every row's names exist in the rebuilt (meta) model with the row's shape, so a file
    cannot make `load` allocate more than the model it claims to be."""
    for row in table:
        shape = tuple(int(s) for s in row["shape"])
        for ref in row["refs"]:
            _slot(model, str(ref), shape, where)
        if row.get("mask") == "block":
            br, bc = (int(b) for b in row["block"])
            if len(shape) != 2 or not (0 < br <= shape[0] and 0 < bc <= shape[1]):
                raise ExportError(f"{where} is corrupt: block {br}x{bc} for shape {shape}")


def _fill(
    model: nn.Module,
    table: list[Mapping[str, Any]],
    decoded: list[tuple[torch.Tensor, torch.Tensor | None]],
    where: str,
) -> None:
    """Put every decoded tensor at each of its names (one Parameter for tied names)."""
    masks: dict[str, torch.Tensor] = {}
    for row, (tensor, keep) in zip(table, decoded, strict=True):
        param: nn.Parameter | None = None
        for ref in row["refs"]:
            mpath, module, field = _slot(model, str(ref), tuple(tensor.shape), where)
            if field in module._parameters:
                param = param if param is not None else nn.Parameter(tensor)
                setattr(module, field, param)
            else:
                setattr(module, field, tensor)
            if keep is not None and field == "weight":
                masks[mpath] = keep
    for name, module in model.named_modules():
        form = form_for(type(module))
        if form is not None:
            form.restore(module, masks.get(name))
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ExportError(f"{where} is for another model: it has no values for {empty[0]!r}")


def load(
    path: str | os.PathLike[str],
    *,
    expect_recipe: Mapping[str, Any] | None = None,
    model: nn.Module | None = None,
) -> nn.Module:
    """Rebuild the model saved at `path` on the CPU, in eval mode.

    The file is verified (magic, format version, lengths, checksums) and every tensor decoded
    before a module is built; `expect_recipe` refuses a file made for another model. A file of
    a custom model (outside `microsweep.models`) needs `model`, a dense instance built as when
    the sweep ran; it is copied, not changed. Raises
    `ExportError` with what is wrong; never returns a partially filled model.
    """
    where = os.fspath(path)
    if expect_recipe is not None and not isinstance(expect_recipe, Mapping):
        raise ExportError(
            f"expect_recipe is a {type(expect_recipe).__name__}; pass a recipe dict such as "
            "model.recipe()"
        )
    header, payload, _ = read_container(path)
    try:
        recipe, table, layers = header["recipe"], header["tensors"], header["layers"]
        if not isinstance(recipe, dict) or not isinstance(table, list):
            raise TypeError("recipe or tensor table has the wrong type")
    except (KeyError, TypeError) as exc:
        raise ExportError(f"{where} is corrupt: malformed header ({exc})") from None
    if expect_recipe is not None and canonical(recipe) != canonical(dict(expect_recipe)):
        raise ExportError(
            f"{where} is for another model: its recipe {canonical(recipe)[:120]} differs from "
            "the expected one"
        )
    try:
        model = skeleton(recipe, layers, where, model)  # on the meta device: allocates nothing
        _check_shapes(model, table, where)  # declared shapes fit before anything is decoded
        decoded = _decode_all(header, payload, where)
        _fill(model, table, decoded, where)
    except MicrosweepError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        raise ExportError(f"{where} is corrupt: bad tensor table or layer list ({exc})") from None
    return model.eval()
