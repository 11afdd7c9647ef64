"""Truncated SVD to a rank (`plain`) and its data-aware variants (`activation`, `whiten`): the
layer becomes a `LowRankLinear` pair (a table a `LowRankEmbedding`), each factor then pruned and
quantized by the matrix techniques. The counting rules of both pair modules are here: nothing
of their own (each factor counts as the linear or table it is); the row shows the rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from microsweep.errors import SpaceError
from microsweep.policy import LayerPolicy
from microsweep.score import Cost, RuleContext, register_rule

from .._lowrank import InputStats, factorize, rank_transform
from .._modules import LowRankEmbedding, LowRankLinear
from ._base import (
    Form,
    Given,
    LayerCheck,
    RankTechnique,
    RebuildContext,
    SpecContext,
    check_inputs,
)
from ._matrix import compress_matrix

__all__ = ["LOW_RANK", "ActivationSVD", "PlainSVD", "WhitenSVD", "compress_pair"]


@register_rule(LowRankLinear)
def _low_rank(module: LowRankLinear, name: str, ctx: RuleContext) -> Cost:
    """Nothing of its own: `first` and `second` are counted as linears; the row shows the rank."""
    return Cost("low_rank", rank=int(module.rank))


@register_rule(LowRankEmbedding)
def _low_rank_embedding(module: LowRankEmbedding, name: str, ctx: RuleContext) -> Cost:
    """Nothing of its own: the (V, r) table is counted as an embedding and the r -> d
    projection as a linear (r x d multiplies a token); the row shows the rank."""
    return Cost("low_rank_embedding", rank=int(module.rank))


class LowRankForm(Form):
    """`LowRankLinear` ("low_rank") and `LowRankEmbedding` ("low_rank_embedding"): two factor
    specs, each a plain or compressed Linear (a table's first factor is a table)."""

    types = (LowRankEmbedding, LowRankLinear)
    spec_types = ("low_rank", "low_rank_embedding")

    def spec(self, module: nn.Module, ctx: SpecContext) -> dict[str, Any]:
        """The two factors' specs."""
        kind = "low_rank_embedding" if isinstance(module, LowRankEmbedding) else "low_rank"
        return {
            "type": kind,
            "first": ctx.spec_of(module.first),
            "second": ctx.spec_of(module.second),
        }

    def rebuild(self, spec: Mapping[str, Any], ctx: RebuildContext) -> nn.Module:
        """The pair of rebuilt factors."""
        pair = LowRankEmbedding if spec["type"] == "low_rank_embedding" else LowRankLinear
        return pair(ctx.make(spec["first"]), ctx.make(spec["second"]))

    def sides(self, spec: Mapping[str, Any]) -> tuple[int, int]:
        """A pair's input is its first factor's, its output the second's (a table: (d, V))."""
        if spec["type"] == "low_rank_embedding":
            return int(spec["second"]["out"]), int(spec["first"]["out"])
        return int(spec["first"]["in"]), int(spec["second"]["out"])

    def replaces_table(self, spec: Mapping[str, Any]) -> bool:
        """A low_rank_embedding spec stands for a table."""
        return spec.get("type") == "low_rank_embedding"


LOW_RANK = LowRankForm()


def compress_pair(
    pair: LowRankLinear,
    settings: LayerPolicy,
    act_scale: torch.Tensor | None,
    masks: tuple[torch.Tensor | None, ...],
    training: bool,
    gram: torch.Tensor | None = None,
) -> nn.Module:
    """Prune and quantize each factor of `pair` in place (inputs are quantized at the first
    factor only) and return the pair of results. With the layer's input `gram` G, the first
    factor A reads G and the second reads A G A^T (its input is A x). A table's G is its token
    frequencies f (a vector) and its first factor the (V, r) table T, so the projection reads
    T^T diag(f) T (its input is the looked-up row)."""
    second_gram = None
    if gram is not None and settings.data_aware:
        a = pair.first.weight.detach().to(torch.float64)
        g = gram.to(torch.float64)
        second_gram = a.T @ (g[:, None] * a) if g.dim() == 1 else a @ g @ a.T
    first = compress_matrix(pair.first, settings, act_scale, masks[0], gram)
    second_settings = replace(settings, act_bits=32)
    second = compress_matrix(pair.second, second_settings, None, masks[-1], second_gram)
    return type(pair)(first, second).train(training)


class PlainSVD(RankTechnique):
    """W ~= (U_r sqrt(S_r)) (sqrt(S_r) Vh_r): the best rank-r approximation of the weight."""

    name = "plain"
    forms = (LOW_RANK,)
    factorizes = True

    def build(self, layer: nn.Module, settings: LayerPolicy, given: Given) -> nn.Module:
        """Factorize (or take the given factors), then prune and quantize each factor."""
        pair = given.factors if given.factors is not None else factorize(layer, settings.rank)
        return compress_pair(
            pair, settings, given.act_scale, given.masks, layer.training, given.gram
        )


class _DataAwareSVD(PlainSVD):
    """The SVD of W T, T from the layer's calibration inputs (see `transform`)."""

    takes_tables = False

    def check_layer(self, layer: LayerCheck) -> None:
        """A table's input is token ids; the inputs come from calibration tokens."""
        check_inputs(
            layer,
            f"layer {layer.name!r} factorizes with {self.name!r} SVD, which reads the "
            "layer's inputs; pass calib=token ids of shape (B, T)",
            on_table=f"layer {layer.name!r} is an embedding, which factorizes by plain SVD or "
            "as a tensor-train only; use Rank(..., method='plain') or method='tt' for it",
        )

    def transform(self, stats: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(T, T^-1) from the inputs' statistics (`InputStats`)."""
        if stats is not None and not isinstance(stats, InputStats):
            raise SpaceError(f"{self.name!r} SVD needs InputStats, got {type(stats).__name__}")
        return rank_transform(self.name, stats)


class ActivationSVD(_DataAwareSVD):
    """Columns scaled by the square root of the inputs' mean |x| (activation-aware SVD)."""

    name = "activation"


class WhitenSVD(_DataAwareSVD):
    """Columns whitened by the Cholesky factor of the inputs' Gram matrix (whitened SVD)."""

    name = "whiten"
