"""Tensor-train: the layer's weight as a chain of small cores (`TTLinear`, `TTEmbedding`).

Counting: both store their cores (and a TTLinear its bias) dense at fp32, claimed as compressed
so their spec wins over any other claim on the same tensors; a tied table and head hold the
same core Parameters, counted once. Ops per token are what each `forward` runs (counted step
by step in `microsweep.compress._tt`): a TTLinear's chain of core contractions in the order it
was built with (the cheapest for its shapes) plus the bias adds, fp32 inputs; or, in its dense
order, the product of the weight reconstructed from the cores at load, counted as a Linear of
that weight (the reconstruction runs once: no per-token ops); a TTEmbedding's product of the
looked-up core slices (unlike a dense table, whose lookup is plain indexing and costs nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from microsweep.errors import SpaceError
from microsweep.policy import LayerPolicy
from microsweep.score import FLOAT_BITS, Cost, RuleContext, matvec, register_rule

from .._tt import DENSE, TTEmbedding, TTLinear
from ._base import Form, Given, RankTechnique, RebuildContext, SpecContext

__all__ = ["TT", "TensorTrain", "tensor_train", "tensor_train_tied"]


def _tt_cost(kind: str, module: TTLinear | TTEmbedding) -> Cost:
    """Cores stored dense at fp32, claimed as compressed (a tied pair's are one set: the
    counter counts them once)."""
    cost = Cost(kind, bits=FLOAT_BITS, act_bits=FLOAT_BITS, sparsity=0.0)
    cost.rank = max(module.ranks) if module.ranks else None
    for core in module.cores:
        cost.store(core, compressed=True)
    return cost


def _ops(cost: Cost, ops: tuple[int, int]) -> None:
    mults, adds = ops
    cost.mul(mults, FLOAT_BITS, FLOAT_BITS)
    cost.add(adds)


@register_rule(TTLinear)
def _tt_linear(module: TTLinear, name: str, ctx: RuleContext) -> Cost:
    """Cores and bias stored fp32. A chain order: `TTLinear.matvec_ops()` multiplies and adds
    at fp32. The dense order: the product of the weight reconstructed once at load (no
    per-token ops for that), counted as ``nn.Linear`` counts that weight."""
    cost = _tt_cost("tt_linear", module)
    if module.bias is not None:
        cost.store(module.bias, compressed=True)
    if module.order == DENSE:
        with torch.no_grad():
            weight = module.dense_weight()
        nnz = matvec(cost, weight, module.bias, ctx)
        cost.sparsity = 1 - nnz / weight.numel()
    else:
        _ops(cost, module.matvec_ops())
    return cost


@register_rule(TTEmbedding)
def _tt_embedding(module: TTEmbedding, name: str, ctx: RuleContext) -> Cost:
    """Cores stored fp32; `TTEmbedding.lookup_ops()` per token to rebuild the looked-up row."""
    cost = _tt_cost("tt_embedding", module)
    _ops(cost, module.lookup_ops())
    return cost


class TTForm(Form):
    """`TTLinear` ("tt_linear") and `TTEmbedding` ("tt_embedding"): the modules' own specs."""

    types = (TTLinear, TTEmbedding)
    spec_types = ("tt_linear", "tt_embedding")

    def spec(self, module: nn.Module, ctx: SpecContext) -> dict[str, Any]:
        """Every shape (`TTLinear.spec`, `TTEmbedding.spec`)."""
        return module.spec()

    def rebuild(self, spec: Mapping[str, Any], ctx: RebuildContext) -> nn.Module:
        """Zero cores of the spec's shapes."""
        if spec["type"] == "tt_embedding":
            return TTEmbedding.from_spec(spec)
        return TTLinear.from_spec(spec)

    def sides(self, spec: Mapping[str, Any]) -> tuple[int, int]:
        """(in, out); a table's (dim, rows)."""
        if spec["type"] == "tt_embedding":
            return int(spec["embedding_dim"]), int(spec["num_embeddings"])
        return int(spec["in"]), int(spec["out"])

    def replaces_table(self, spec: Mapping[str, Any]) -> bool:
        """A tt_embedding spec stands for a table."""
        return spec.get("type") == "tt_embedding"


TT = TTForm()


def tensor_train(layer: nn.Linear | nn.Embedding, rank: int) -> TTLinear | TTEmbedding:
    """`layer` as a tensor-train of TT-rank `rank` (TT-SVD, reshaping factors from its shape),
    built from copies of its tensors."""
    with torch.no_grad():
        if isinstance(layer, nn.Embedding):
            return TTEmbedding.from_embedding(layer, rank).train(layer.training)
        return TTLinear.from_linear(layer, rank).train(layer.training)


def tensor_train_tied(
    table: nn.Embedding, head: nn.Linear, rank: int
) -> tuple[TTEmbedding, TTLinear]:
    """A tied table and head as one tensor-train of their (V, d) weight at TT-rank `rank`: the
    `TTEmbedding` looks rows up and the `TTLinear` (d -> V) multiplies by the same core
    Parameters (stored, counted and exported once); the head keeps its own bias."""
    if not isinstance(table, nn.Embedding) or not isinstance(head, nn.Linear):
        raise SpaceError(
            f"a tied TT pair needs an nn.Embedding and an nn.Linear, got "
            f"{type(table).__name__} and {type(head).__name__}"
        )
    shape = tuple(table.weight.shape)
    if tuple(head.weight.shape) != shape or (
        head.weight is not table.weight and not torch.equal(head.weight, table.weight)
    ):
        raise SpaceError(
            f"the head's weight {tuple(head.weight.shape)} is not the table's {shape}: a tied "
            "TT pair needs one shared weight; compress the table and the head apart"
        )
    with torch.no_grad():
        lookup = TTEmbedding.from_embedding(table, rank).train(table.training)
        product = TTLinear(
            lookup.embedding_dim,
            lookup.num_embeddings,
            lookup.row_factors,
            lookup.col_factors,
            lookup.ranks,
            bias=head.bias is not None,
            device=table.weight.device,
            dtype=table.weight.dtype,
        ).train(head.training)
        for k, core in enumerate(lookup.cores):
            product.cores[k] = core  # the same Parameter: one set of cores
        if head.bias is not None:
            product.bias.copy_(head.bias)
    return lookup, product


class TensorTrain(RankTechnique):
    """A TT-matrix of TT-rank ``rank``: the module contracts inputs with the cores in its
    cheapest order (or multiplies by the weight rebuilt once, where every contraction costs
    more than the dense product); stored dense at fp32. A tied table and head share one set of
    cores (`build_tied`)."""

    name = "tt"
    forms = (TT,)
    ties: ClassVar[bool] = True
    """A tied table and head take one tensor-train together (`build_tied`)."""

    def build(self, layer: nn.Module, settings: LayerPolicy, given: Given) -> nn.Module:
        """TT-SVD of the layer's weight (copies: the layer is left as it is)."""
        return tensor_train(layer, settings.rank)

    def build_tied(
        self, table: nn.Embedding, head: nn.Linear, settings: LayerPolicy, given: Given
    ) -> tuple[nn.Module, nn.Module]:
        """The (table, head) pair as one tensor-train of the shared (V, d) weight at
        ``settings.rank`` (`tensor_train_tied`): the lookup and the head's product read the
        same core Parameters."""
        return tensor_train_tied(table, head, settings.rank)
