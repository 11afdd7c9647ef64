"""The `CompressedLinear` form that pruning and quantization produce, and the matrix pipeline.

`compress_matrix` runs every registered `MatrixTechnique` that a layer's settings ask for, in
pipeline order (prune, round weights, quantize inputs), on one weight matrix and wraps the
result as a `CompressedLinear` (or `CompressedEmbedding` for a table). The counting rules of
both modules are registered here: the weight at `bits` (sparse or block-sparse when `sparse`),
an fp32 bias, fp32 scales; a lookup is indexing (0 ops).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from microsweep.policy import LayerPolicy, concrete_block
from microsweep.score import (
    FLOAT_BITS,
    Cost,
    RuleContext,
    block_pattern,
    linear_ops,
    register_rule,
)

from .._modules import CompressedEmbedding, CompressedLinear
from ._base import Form, Matrix, MatrixTechnique, RebuildContext, SpecContext, techniques

__all__ = ["COMPRESSED", "compress_matrix"]


@register_rule(CompressedLinear)
def _compressed_linear(module: CompressedLinear, name: str, ctx: RuleContext) -> Cost:
    """Weight at `bits` (sparse or block-sparse when `sparse`), fp32 bias, fp32 scales."""
    bits, act_bits = int(module.bits), int(module.act_bits)
    cost = Cost("compressed_linear", bits=bits, act_bits=act_bits)
    block = module.block if module.sparse else None
    cost.store(module.weight, bits=bits, sparse=module.sparse, block=block, compressed=True)
    if module.bias is not None:
        cost.store(module.bias, compressed=True)
    if bits < FLOAT_BITS and module.weight_scale is not None:
        cost.const(module.weight_scale.numel())
    if act_bits < FLOAT_BITS and module.act_scale is not None:
        cost.const(module.act_scale.numel())
    nnz, numel = linear_ops(cost, module, ctx, bits=bits, act_bits=act_bits)
    cost.sparsity = 1 - nnz / numel if numel else 0.0
    return cost


@register_rule(CompressedEmbedding)
def _compressed_embedding(module: CompressedEmbedding, name: str, ctx: RuleContext) -> Cost:
    """The table at `bits` (sparse or block-sparse when `sparse`) with fp32 per-row scales; a
    lookup is indexing (0 ops)."""
    bits = int(module.bits)
    cost = Cost("compressed_embedding", bits=bits, act_bits=FLOAT_BITS)
    block = module.block if module.sparse else None
    cost.store(module.weight, bits=bits, sparse=module.sparse, block=block, compressed=True)
    if bits < FLOAT_BITS and module.weight_scale is not None:
        cost.const(module.weight_scale.numel())
    weight = module.weight.detach()
    kept = block_pattern(weight, block) if block is not None else weight != 0
    cost.sparsity = 1 - int(kept.sum()) / weight.numel() if weight.numel() else 0.0
    return cost


def _group_spec(module: nn.Module) -> dict[str, Any]:
    """The scale group in a spec, written only when set (older artifacts read unchanged)."""
    group = getattr(module, "group", None)
    return {} if group is None else {"group": int(group)}


def _group(spec: Mapping[str, Any]) -> int | None:
    group = spec.get("group")
    return None if group is None else int(group)


def _block(spec: Mapping[str, Any]) -> tuple[int, int] | None:
    block = spec["block"]
    return (int(block[0]), int(block[1])) if block is not None else None


class CompressedForm(Form):
    """`CompressedLinear` ("compressed") and `CompressedEmbedding` ("compressed_embedding"):
    values on a per-row integer grid, an element or block mask derived from the values."""

    types = (CompressedEmbedding, CompressedLinear)
    spec_types = ("compressed", "compressed_embedding")

    def spec(self, module: nn.Module, ctx: SpecContext) -> dict[str, Any]:
        """Sides, widths, sparsity flag and block (a table also its padding index)."""
        block = list(module.block) if module.block is not None else None
        if isinstance(module, CompressedEmbedding):
            return {
                "type": "compressed_embedding",
                "in": int(module.embedding_dim),
                "out": int(module.num_embeddings),
                "bits": int(module.bits),
                "sparse": bool(module.sparse),
                "block": block,
                "padding_idx": module.padding_idx,
                **_group_spec(module),
            }
        return {
            "type": "compressed",
            "in": int(module.in_features),
            "out": int(module.out_features),
            "bias": module.bias is not None,
            "bits": int(module.bits),
            "act_bits": int(module.act_bits),
            "sparse": bool(module.sparse),
            "block": block,
            **_group_spec(module),
        }

    def rebuild(self, spec: Mapping[str, Any], ctx: RebuildContext) -> nn.Module:
        """An empty module of the spec's sides and widths."""
        bits, sparse = int(spec["bits"]), bool(spec["sparse"])
        if spec["type"] == "compressed_embedding":
            pad = spec["padding_idx"]
            return CompressedEmbedding(
                int(spec["out"]), int(spec["in"]), bits=bits, sparse=sparse, block=_block(spec),
                padding_idx=None if pad is None else int(pad), group=_group(spec),
            )  # fmt: skip
        return CompressedLinear(
            int(spec["in"]), int(spec["out"]), bias=bool(spec["bias"]), bits=bits,
            act_bits=int(spec["act_bits"]), sparse=sparse, block=_block(spec),
            group=_group(spec),
        )  # fmt: skip

    def sides(self, spec: Mapping[str, Any]) -> tuple[int, int]:
        """(in, out) as written."""
        return int(spec["in"]), int(spec["out"])

    def replaces_table(self, spec: Mapping[str, Any]) -> bool:
        """A compressed_embedding spec stands for a table."""
        return spec.get("type") == "compressed_embedding"

    def int_grid(self, module: nn.Module, tensor: torch.Tensor) -> torch.Tensor | None:
        """The weight's scales when it is quantized: (out,), or (out, in / group)."""
        return module.weight_scale if tensor is module.weight else None

    def constants(self, module: nn.Module) -> list[torch.Tensor]:
        """Weight scales below 32 bits, and the input scale below 32 bits."""
        out = []
        if module.bits < FLOAT_BITS and module.weight_scale is not None:
            out.append(module.weight_scale)
        if module.act_bits < FLOAT_BITS and module.act_scale is not None:
            out.append(module.act_scale)
        return out

    def keep_mask(self, module: nn.Module, tensor: torch.Tensor) -> torch.Tensor | None:
        """The module's mask of kept entries, for its weight."""
        return module.mask.detach() if tensor is module.weight and module.mask is not None else None

    def derived_buffers(self) -> tuple[str, ...]:
        """The mask is rebuilt from the stored mask (or the non-zeros)."""
        return ("mask",)

    def restore(self, module: nn.Module, keep: torch.Tensor | None) -> None:
        """A sparse module's mask: the stored one, else its weight's non-zeros."""
        if module.sparse:
            module.mask = keep.clone() if keep is not None else module.weight.detach() != 0


COMPRESSED = CompressedForm()


def compress_matrix(
    linear: nn.Module,
    settings: LayerPolicy,
    act_scale: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> nn.Module:
    """Run the matrix techniques `settings` ask for on one Linear's (or table's) weight in
    place (ties hold) and wrap it as a `CompressedLinear`; `linear` itself when none apply.

    `mask`, when given, is the magnitude mask for ``settings.sparsity`` (computed ahead);
    `gram` is the Gram matrix of the matrix's inputs, which data-aware methods read (a
    table's: its token frequencies).
    """
    steps = sorted(
        (t for t in techniques() if isinstance(t, MatrixTechnique) and t.applies(settings)),
        key=lambda t: t.order,
    )
    if not steps:
        return linear
    weight = linear.weight
    table = isinstance(linear, nn.Embedding)
    matrix = Matrix(
        weight.detach(), settings, act_scale=act_scale, given_mask=mask, gram=gram, table=table
    )
    for step in steps:
        step.apply(matrix)
    weight.copy_(matrix.values)
    return _wrap(linear, matrix)


def _wrap(linear: nn.Module, matrix: Matrix) -> CompressedLinear:
    """The `CompressedLinear` (or `CompressedEmbedding`) holding `matrix`, sharing `linear`'s
    weight Parameter (a tie with an embedding is kept) and bias."""
    settings, weight = matrix.settings, linear.weight
    sparse = matrix.mask is not None
    out_f, in_f = weight.shape
    block = concrete_block(settings.block, weight.shape) if sparse and settings.block else None
    group = settings.quant_group
    if isinstance(linear, nn.Embedding):
        layer: CompressedLinear = CompressedEmbedding(
            out_f, in_f, bits=settings.bits, sparse=sparse, block=block,
            padding_idx=linear.padding_idx, group=group,
        )  # fmt: skip
    else:
        layer = CompressedLinear(
            in_f, out_f, bias=linear.bias is not None, bits=settings.bits,
            act_bits=settings.act_bits, sparse=sparse, block=block, group=group,
        )  # fmt: skip
        layer.bias = linear.bias
    layer.weight = weight
    if matrix.weight_scale is not None:
        layer.weight_scale = matrix.weight_scale.to(weight.dtype)
    if matrix.mask is not None:
        layer.mask = matrix.mask
    if matrix.act_scale is not None:
        layer.act_scale = matrix.act_scale.to(weight.device)
    return layer.train(linear.training)
