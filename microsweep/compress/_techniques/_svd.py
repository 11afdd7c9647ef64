"""Truncated SVD to a rank (`plain`) and its data-aware variants (`activation`, `whiten`): the
layer becomes a `LowRankLinear` pair (a table a `LowRankEmbedding`), each factor then pruned and
quantized by the matrix techniques. The counting rules of both pair modules are here: nothing
of their own (each factor counts as the linear or table it is); the row shows the rank.

A table and the head tied to it (one (V, d) weight W) factorize together (`build_tied`): W ~= A B
with A (V, r) and B (r, d); the head becomes a `LowRankLinear` (first factor B, second A, logits
``(h B^T) A^T``) and the table a `TiedLowRankEmbedding` looking up A and projecting by B through
the same two Parameters, which the head's factors store, prune, quantize and count once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from microsweep.errors import SpaceError
from microsweep.policy import LayerPolicy
from microsweep.score import FLOAT_BITS, Cost, RuleContext, matvec, register_rule

from .._lowrank import InputStats, factorize, rank_transform
from .._modules import LowRankEmbedding, LowRankLinear, TiedLowRankEmbedding
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

__all__ = ["LOW_RANK", "TIED", "ActivationSVD", "PlainSVD", "WhitenSVD", "compress_pair"]


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


def _proj_block(module: TiedLowRankEmbedding) -> tuple[int, int] | None:
    """The block of the projection as it runs (B^T, (d, r)): B's block transposed."""
    block = module.proj_block if module.proj_sparse else None
    return (block[1], block[0]) if block is not None else None


@register_rule(TiedLowRankEmbedding)
def _tied_low_rank_embedding(module: TiedLowRankEmbedding, name: str, ctx: RuleContext) -> Cost:
    """The r -> d projection of the looked-up row (B^T times it: B's non-zeros multiplied at
    B's width, the dot-product adds); the lookup is indexing. Nothing stored here: A and B are
    the tied head's factors, which store and count them."""
    bits = int(module.proj_bits)
    cost = Cost("tied_low_rank_embedding", bits=bits, act_bits=FLOAT_BITS, rank=module.rank)
    matvec(cost, module.proj.T, None, ctx, bits=bits, block=_proj_block(module))
    return cost


class TiedForm(Form):
    """`TiedLowRankEmbedding` ("tied_low_rank_embedding"): the table side of a factorized tied
    pair. Its two Parameters are stored once, under the head's factors' names too, and filled
    as one Parameter at every name at load (the tie is rebuilt)."""

    types = (TiedLowRankEmbedding,)
    spec_types = ("tied_low_rank_embedding",)

    def spec(self, module: nn.Module, ctx: SpecContext) -> dict[str, Any]:
        """Rows, width, rank, padding index and how the projection factor is stored."""
        block = module.proj_block
        return {
            "type": "tied_low_rank_embedding",
            "in": int(module.embedding_dim),
            "out": int(module.num_embeddings),
            "rank": int(module.rank),
            "padding_idx": module.padding_idx,
            "proj_bits": int(module.proj_bits),
            "proj_sparse": bool(module.proj_sparse),
            "proj_block": list(block) if block is not None else None,
        }

    def rebuild(self, spec: Mapping[str, Any], ctx: RebuildContext) -> nn.Module:
        """An empty table side of the spec's shapes (its Parameters are filled, tied, at load)."""
        pad, block = spec["padding_idx"], spec["proj_block"]
        return TiedLowRankEmbedding(
            int(spec["out"]), int(spec["in"]), int(spec["rank"]),
            padding_idx=None if pad is None else int(pad), proj_bits=int(spec["proj_bits"]),
            proj_sparse=bool(spec["proj_sparse"]),
            proj_block=None if block is None else (int(block[0]), int(block[1])),
        )  # fmt: skip

    def sides(self, spec: Mapping[str, Any]) -> tuple[int, int]:
        """A table's (d, V)."""
        return int(spec["in"]), int(spec["out"])

    def replaces_table(self, spec: Mapping[str, Any]) -> bool:
        """It stands for a table."""
        return True


TIED = TiedForm()


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
    forms = (LOW_RANK, TIED)
    factorizes = True
    ties = True

    def build(self, layer: nn.Module, settings: LayerPolicy, given: Given) -> nn.Module:
        """Factorize (or take the given factors), then prune and quantize each factor."""
        pair = given.factors if given.factors is not None else factorize(layer, settings.rank)
        return compress_pair(
            pair, settings, given.act_scale, given.masks, layer.training, given.gram
        )

    def build_tied(
        self, table: nn.Embedding, head: nn.Linear, settings: LayerPolicy, given: Given
    ) -> tuple[nn.Module, nn.Module]:
        """The head factorized as `build` does (B first, A second, each pruned and quantized
        with the head's inputs), and the table side reading the same A and B."""
        pair = self.build(head, settings, given)
        side = TiedLowRankEmbedding.tied_to(pair, table.padding_idx)
        return side.train(table.training), pair


class _DataAwareSVD(PlainSVD):
    """The SVD of W T, T from the layer's calibration inputs (see `transform`)."""

    takes_tables = False

    def check_layer(self, layer: LayerCheck) -> None:
        """A table's input is token ids (a tied table reads its head's inputs and its own row
        frequencies); the inputs come from calibration tokens."""
        on_table = None
        if layer.partner is None:
            on_table = (
                f"layer {layer.name!r} is an embedding, which factorizes by plain SVD or as a "
                "tensor-train only; use Rank(..., method='plain') or method='tt' for it"
            )
        check_inputs(
            layer,
            f"layer {layer.name!r} factorizes with {self.name!r} SVD, which reads the "
            "layer's inputs; pass calib=token ids of shape (B, T)",
            on_table=on_table,
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
