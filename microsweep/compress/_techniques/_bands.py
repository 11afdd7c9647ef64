"""Frequency bands (adaptive embedding and softmax): counting rules, export forms, technique.

Counting follows the MicroNet winner's conventions (scoring reference 3.4), conservatively:
- a banded head computes every band's logits for every token: each band's products are counted
  as the linear layers they are (dense rows h W_b^T, or (h P_b^T) T_b^T for a factorized band),
  at the band's widths and non-zeros; the softmax over the whole vocabulary stays the model's;
- a banded table's lookup is indexing (0 ops); a factorized band's r -> d projection is
  counted as a linear layer weighted by the band's share of the calibration tokens;
- each changed band stores its words, V_b integers of ceil(log2 V) bits (`Cost.index`), outside
  the 16-bit allowance; the rest band's words are the others and cost nothing;
- each `Band` counts its own operations and words (so the counter's rows give each band's
  cost); its tensors are counted by their own modules (`nn.Embedding` or `CompressedEmbedding`),
  once however many banded modules hold the `BandSet`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from microsweep.policy import LayerPolicy
from microsweep.score import FLOAT_BITS, Cost, RuleContext, matvec, register_rule

from .._banded import Band, BandedEmbedding, BandedHead, BandSet, index_bits
from ._base import Form, RebuildContext, SpecContext, Technique

__all__ = ["BANDS", "FrequencyBands"]


def _bits(matrix: nn.Module) -> int:
    return int(getattr(matrix, "bits", FLOAT_BITS))


def _block(matrix: nn.Module) -> tuple[int, int] | None:
    return getattr(matrix, "block", None) if getattr(matrix, "sparse", False) else None


def _products(
    cost: Cost,
    matrix: nn.Module,
    bias: torch.Tensor | None,
    ctx: RuleContext,
    act_bits: int = FLOAT_BITS,
) -> None:
    """``W x + b`` with W the matrix's (rows, cols) weight, at its widths and non-zeros."""
    matvec(
        cost, matrix.weight, bias, ctx, bits=_bits(matrix), act_bits=act_bits,
        block=_block(matrix),
    )  # fmt: skip


@register_rule(Band)
def _band(module: Band, name: str, ctx: RuleContext) -> Cost:
    """A band's own cost: its words (ceil(log2 V) bits each, none for the rest band), a head's
    bias for them, and its operations: for a head its logits every token (dense h W_b^T, or
    h P_b^T then T_b^T), for a table a factorized band's projection weighted by its share. Its
    matrices are stored by their own modules."""
    widths = [_bits(m) for m in module.matrices()]
    act = int(module.act_bits)
    cost = Cost("band", bits=min(widths), act_bits=act, rank=module.rank)
    if module.words is not None:
        cost.index(module.words, index_bits(module.vocab))
    if module.bias is not None:
        cost.store(module.bias, compressed=True)
    if act < FLOAT_BITS and module.act_scale is not None:
        cost.const(module.act_scale.numel())
    if "head" in module.roles:
        if module.rows is not None:
            _products(cost, module.rows, module.bias, ctx, act)
        else:  # the input quantizer acts on h; P_b h enters T_b at fp32
            _products(cost, module.proj, None, ctx, act)
            _products(cost, module.table, module.bias, ctx)
    if "table" in module.roles and module.proj is not None and module.share > 0:
        part = Cost("projection")
        block = _block(module.proj)
        matvec(
            part, module.proj.weight.T, None, ctx, bits=_bits(module.proj),
            act_bits=FLOAT_BITS, block=None if block is None else (block[1], block[0]),
        )  # fmt: skip
        for mults in part.mults:
            cost.mul(mults.n * module.share, mults.a_bits, mults.b_bits)
        cost.add(part.adds * module.share)
    return cost


@register_rule(BandSet)
def _band_set(module: BandSet, name: str, ctx: RuleContext) -> Cost:
    """Nothing of its own: each band counts its words and operations."""
    return Cost("band_set")


@register_rule(BandedHead)
def _banded_head(module: BandedHead, name: str, ctx: RuleContext) -> Cost:
    """Nothing of its own: each band counts its logits (gathering them is indexing)."""
    return Cost("banded_head")


@register_rule(BandedEmbedding)
def _banded_embedding(module: BandedEmbedding, name: str, ctx: RuleContext) -> Cost:
    """Nothing of its own: lookups are indexing; each factorized band counts its projection."""
    return Cost("banded_embedding")


class BandedForm(Form):
    """`BandedHead` ("banded_head") and `BandedEmbedding` ("banded_embedding"): the `BandSet`
    spec, or ``bands_at``, the path of the tied layer whose bands it shares."""

    types = (BandedHead, BandedEmbedding)
    spec_types = ("banded_head", "banded_embedding")

    def spec(self, module: nn.Module, ctx: SpecContext) -> dict[str, Any]:
        """Sides, and the bands (or where they were written first)."""
        head = isinstance(module, BandedHead)
        out: dict[str, Any] = {
            "type": "banded_head" if head else "banded_embedding",
            "in": int(module.in_features if head else module.embedding_dim),
            "out": int(module.bands.vocab),
        }
        if not head:
            out["padding_idx"] = module.padding_idx
        first = ctx.first.get(id(module.bands))
        if first is not None:
            out["bands_at"] = first
        else:
            ctx.first[id(module.bands)] = ctx.path
            out["bands"] = ctx.spec_of(module.bands)
        return out

    def rebuild(self, spec: Mapping[str, Any], ctx: RebuildContext) -> nn.Module:
        """The layer around its rebuilt (or shared) bands."""
        if "bands_at" in spec:
            bands = ctx.find(str(spec["bands_at"])).bands
            if not isinstance(bands, BandSet):
                raise ValueError(f"bands_at {spec['bands_at']!r} holds no bands")
        else:
            bands = ctx.make(spec["bands"])
        if int(spec["out"]) != bands.vocab:
            raise ValueError("the bands cover another vocabulary")
        if spec["type"] == "banded_head":
            return BandedHead(bands, int(spec["in"]))
        pad = spec.get("padding_idx")
        return BandedEmbedding(bands, int(spec["in"]), None if pad is None else int(pad))

    def sides(self, spec: Mapping[str, Any]) -> tuple[int, int]:
        """(d, V) for both: a head's (in, out), a table's (dim, rows)."""
        return int(spec["in"]), int(spec["out"])

    def replaces_table(self, spec: Mapping[str, Any]) -> bool:
        """A banded_embedding spec stands for a table."""
        return spec.get("type") == "banded_embedding"


class BandSetForm(Form):
    """`BandSet` ("band_set"): its bands' keys and specs; the lookups are derived from the
    bands' stored words at load."""

    types = (BandSet,)
    spec_types = ("band_set",)

    def spec(self, module: nn.Module, ctx: SpecContext) -> dict[str, Any]:
        """Vocabulary and each band's key and spec."""
        return {
            "type": "band_set",
            "vocab": int(module.vocab),
            "bands": [[key, ctx.spec_of(band)] for key, band in module.bands.items()],
        }

    def rebuild(self, spec: Mapping[str, Any], ctx: RebuildContext) -> nn.Module:
        """Rebuilt bands (their words filled at load)."""
        bands = {str(key): ctx.make(band) for key, band in spec["bands"]}
        return BandSet(int(spec["vocab"]), bands)

    def sides(self, spec: Mapping[str, Any]) -> tuple[int, int]:
        """(0, V): a band set is never a layer of its own."""
        return 0, int(spec["vocab"])

    def derived_buffers(self) -> tuple[str, ...]:
        """The lookups follow from the word order."""
        return ("order", "inverse", "band_of", "row_of")

    def restore(self, module: nn.Module, keep: torch.Tensor | None) -> None:
        """Rebuild the lookups from the loaded word order."""
        module.restore_index()


class BandForm(Form):
    """`Band` ("band"): the specs of its rows (or table and projection) and whether it holds
    a head's bias."""

    types = (Band,)
    spec_types = ("band",)

    def spec(self, module: nn.Module, ctx: SpecContext) -> dict[str, Any]:
        """Its matrices' specs."""
        parts = {"rows": module.rows, "table": module.table, "proj": module.proj}
        out: dict[str, Any] = {
            "type": "band",
            "bias": module.bias is not None,
            "words": module.words is not None,
            "share": float(module.share),
        }
        if module.act_bits < FLOAT_BITS:
            out["act_bits"] = int(module.act_bits)
        out.update({k: ctx.spec_of(m) for k, m in parts.items() if m is not None})
        return out

    def rebuild(self, spec: Mapping[str, Any], ctx: RebuildContext) -> nn.Module:
        """Rebuilt matrices (and an empty bias and word list)."""
        parts = {k: ctx.make(spec[k]) for k in ("rows", "table", "proj") if k in spec}
        size = int(spec["rows" if "rows" in spec else "table"]["out"])
        bias = nn.Parameter(torch.empty(size)) if spec["bias"] else None
        words = torch.empty(size, dtype=torch.int64) if spec["words"] else None
        act_bits = int(spec.get("act_bits", FLOAT_BITS))
        return Band(**parts, bias=bias, words=words, share=float(spec["share"]), act_bits=act_bits)

    def constants(self, module: nn.Module) -> list[torch.Tensor]:
        """The input scale of a head band quantizing its input."""
        if module.act_bits < FLOAT_BITS and module.act_scale is not None:
            return [module.act_scale]
        return []

    def sides(self, spec: Mapping[str, Any]) -> tuple[int, int]:
        """(d, V_b) of the rows it stands for."""
        if "rows" in spec:
            return int(spec["rows"]["in"]), int(spec["rows"]["out"])
        return int(spec["proj"]["in"]), int(spec["table"]["out"])


BANDS = BandedForm()


class FrequencyBands(Technique):
    """A table or output head cut into frequency bands (layers named ``"head@1"``), each band
    compressed by the other techniques; built per vocabulary by `compress_` (not per layer)."""

    name = "bands"
    reads = ("band",)
    forms = (BANDS, BandSetForm(), BandForm())

    def applies(self, settings: LayerPolicy) -> bool:
        """Never per layer: `compress_` gathers a layer's bands and builds them together."""
        return False
