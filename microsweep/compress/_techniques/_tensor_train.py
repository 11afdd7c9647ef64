"""Tensor-train: the layer's weight as a chain of small cores (`TTLinear`, `TTEmbedding`).

Counting: both store their cores (and a TTLinear its bias) dense at fp32, claimed as compressed
so their spec wins over any other claim on the same tensors. Ops per token are what each
`forward` runs (counted step by step in `microsweep.compress._tt`): a TTLinear's chain of core
contractions plus the bias adds, fp32 inputs; a TTEmbedding's product of the looked-up core
slices (unlike a dense table, whose lookup is plain indexing and costs nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from microsweep.policy import LayerPolicy
from microsweep.score import FLOAT_BITS, Cost, RuleContext, register_rule

from .._tt import TTEmbedding, TTLinear
from ._base import Form, Given, RankTechnique, RebuildContext, SpecContext

__all__ = ["TT", "TensorTrain", "tensor_train"]


def _tt_cost(kind: str, module: TTLinear | TTEmbedding, ops: tuple[int, int]) -> Cost:
    cost = Cost(kind, bits=FLOAT_BITS, act_bits=FLOAT_BITS, sparsity=0.0)
    cost.rank = max(module.ranks) if module.ranks else None
    for core in module.cores:
        cost.store(core, compressed=True)
    mults, adds = ops
    cost.mul(mults, FLOAT_BITS, FLOAT_BITS)
    cost.add(adds)
    return cost


@register_rule(TTLinear)
def _tt_linear(module: TTLinear, name: str, ctx: RuleContext) -> Cost:
    """Cores and bias stored fp32; `TTLinear.matvec_ops()` multiplies and adds at fp32."""
    cost = _tt_cost("tt_linear", module, module.matvec_ops())
    if module.bias is not None:
        cost.store(module.bias, compressed=True)
    return cost


@register_rule(TTEmbedding)
def _tt_embedding(module: TTEmbedding, name: str, ctx: RuleContext) -> Cost:
    """Cores stored fp32; `TTEmbedding.lookup_ops()` per token to rebuild the looked-up row."""
    return _tt_cost("tt_embedding", module, module.lookup_ops())


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


class TensorTrain(RankTechnique):
    """A TT-matrix of TT-rank ``rank``: the module contracts inputs with the cores and never
    rebuilds W; stored dense at fp32."""

    name = "tt"
    forms = (TT,)

    def build(self, layer: nn.Module, settings: LayerPolicy, given: Given) -> nn.Module:
        """TT-SVD of the layer's weight (copies: the layer is left as it is)."""
        return tensor_train(layer, settings.rank)
