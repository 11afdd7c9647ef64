"""Building frequency bands from a policy: which layers are banded, which words each band
takes, each band compressed as a Linear of its rows, and the banded modules put in place.

A policy names a band of layer ``X`` as ``"X@b"`` with ``LayerPolicy.band = (start, stop)``:
the rows at those positions of the vocabulary ranked by falling frequency in the calibration
tokens (ties by token id, so the ranking is deterministic). Each band the policy changes is
built by the ordinary pipeline (factorize, prune, quantize) from a Linear holding its rows,
and becomes a `Band`; the untouched bands are one dense rest band. Every module holding the
layer's weight (a tied table and head) is replaced by a banded module over the same `BandSet`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import skip_init

from microsweep.errors import SpaceError
from microsweep.policy import LayerPolicy, Policy

from ._banded import REST, Band, BandedEmbedding, BandedHead, BandSet, band_key
from ._modules import CompressedEmbedding, CompressedLinear, LowRankLinear
from ._quantize import tensor_scale
from ._techniques import LayerCheck, techniques

__all__ = [
    "BandPlan",
    "BandSlot",
    "band_module",
    "band_reads",
    "band_name",
    "bands_modules",
    "parse_band",
    "plan_bands",
    "rest_band",
    "split_bands",
    "token_order",
]

SEPARATOR = "@"


def band_name(layer: str, index: int) -> str:
    """The name of band `index` of `layer`: ``"head@1"``."""
    return f"{layer}{SEPARATOR}{index}"


def parse_band(name: str) -> tuple[str, int] | None:
    """(layer, band index) of a band's name, or None for any other layer name."""
    layer, sep, index = name.rpartition(SEPARATOR)
    if not sep or not layer or not index.isdigit():
        return None
    return layer, int(index)


def split_bands(policy: Policy) -> tuple[Policy, dict[str, dict[int, LayerPolicy]]]:
    """The policy without its bands, and each banded layer's bands by index."""
    plain: dict[str, LayerPolicy] = {}
    banded: dict[str, dict[int, LayerPolicy]] = {}
    for name, settings in policy.layers.items():
        parts = parse_band(name)
        band = getattr(settings, "band", None)
        if parts is None:
            if band is not None:
                raise SpaceError(
                    f"layer {name!r} gives band={band} but is not named as a band; name it "
                    f"'{name}@0', '{name}@1', ..."
                )
            plain[name] = settings
            continue
        if band is None:
            raise SpaceError(
                f"layer {name!r} names a frequency band but its settings give no band=(start, "
                "stop); build the policy from a Space with Bands(...)"
            )
        banded.setdefault(parts[0], {})[parts[1]] = settings
    if not banded:
        return policy, {}
    return Policy(layers=plain, hyper=dict(policy.hyper)), banded


def token_order(calib: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts): the vocabulary's rows by falling count in `calib` (ties by token id),
    and each token's count."""
    ids = calib.reshape(-1).to(torch.int64).cpu()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise SpaceError(
            f"calib holds token ids outside the banded vocabulary of {vocab} words; pass token "
            "ids of this model's vocabulary"
        )
    counts = torch.bincount(ids, minlength=vocab)
    order = torch.sort(-counts, stable=True).indices
    return order, counts


@dataclass
class BandPlan:
    """One banded layer: the modules holding its weight (a tied table and head), the weight
    and a head's bias, the word order and counts, and the bands the policy changes."""

    name: str
    holders: list[tuple[str, nn.Module]]
    weight: torch.Tensor
    bias: torch.Tensor | None
    order: torch.Tensor
    counts: torch.Tensor
    bands: dict[int, LayerPolicy]
    linears: dict[int, nn.Linear] = field(default_factory=dict)

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    def rows(self, index: int) -> torch.Tensor:
        """The words of band `index`, most frequent first."""
        start, stop = self.bands[index].band
        return self.order[start:stop]

    def linear(self, index: int) -> nn.Linear:
        """Band `index`'s rows as a d -> V_b Linear (copies), what its compression starts from."""
        if index not in self.linears:
            self.linears[index] = band_linear(self.weight, self.bias, self.rows(index))
        return self.linears[index]


def band_linear(weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor) -> nn.Linear:
    """A Linear (d -> len(rows)) holding copies of `weight`'s `rows` (and `bias`'s)."""
    rows = rows.to(weight.device)
    kw = {"device": weight.device, "dtype": weight.dtype}
    out = skip_init(nn.Linear, weight.shape[1], len(rows), bias=bias is not None, **kw)
    out.weight = nn.Parameter(weight.detach()[rows].clone(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach()[rows].clone(), requires_grad=False)
    return out


def _holders(model: nn.Module, weight: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """Every module (by name) whose own ``weight`` is `weight`."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if module._parameters.get("weight") is weight and id(module) not in seen:
            seen.add(id(module))
            out.append((name, module))
    return out


def _layer(
    model: nn.Module, name: str
) -> tuple[list[tuple[str, nn.Module]], torch.Tensor, torch.Tensor | None]:
    """The modules holding banded layer `name`'s weight (a tied table and head), the weight
    and a head's bias; refused unless each is a plain Linear or Embedding."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not (isinstance(module, nn.Linear) or type(module) is nn.Embedding):
        raise SpaceError(
            f"band layer {name!r} is not a Linear head or an Embedding table of this model; "
            "bands cut a vocabulary's rows"
        )
    holders = _holders(model, module.weight)
    for holder, kind in holders:
        if not (type(kind) is nn.Linear or type(kind) is nn.Embedding):
            raise SpaceError(
                f"{holder!r} shares {name!r}'s weight and is a {type(kind).__name__}; bands "
                "replace plain Linear heads and Embedding tables only"
            )
    biases = {id(m.bias): m.bias for _, m in holders if isinstance(m, nn.Linear)}
    biases.pop(id(None), None)
    if len(biases) > 1:
        raise SpaceError(f"the heads sharing {name!r}'s weight have different biases")
    return holders, module.weight, next(iter(biases.values()), None)


def band_reads(model: nn.Module, layer: str) -> str:
    """The module whose inputs banded layer `layer`'s bands read: its head (a tied table's
    partner) where it has one, else the table itself (its token ids)."""
    holders, _, _ = _layer(model, layer)
    return next((n for n, m in holders if isinstance(m, nn.Linear)), layer)


class BandSlot:
    """One band of a layer, for costing its options alone (the planner): the band's Linear
    to compress, the layer's modules as they are (`dense`) and as they are with only this band
    changed (`banded`): the difference of their counts is the band's exact cost."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        band: tuple[int, int],
        order: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        layer, index = parse_band(name) or (name, 0)
        holders, weight, bias = _layer(model, layer)
        settings = {index: LayerPolicy(band=tuple(band))}
        self.index = index
        self.plan = BandPlan(layer, holders, weight, bias, order[0], order[1], settings)
        self.linear = self.plan.linear(index)
        self._rest: Band | None = None

    def rows(self) -> torch.Tensor:
        """The band's words, most frequent first."""
        return self.plan.rows(self.index)

    def dense(self) -> nn.Module:
        """The modules holding the layer's weight, as they are."""
        return nn.ModuleList([m for _, m in self.plan.holders])

    def banded(self, built: nn.Module) -> nn.Module:
        """Those modules banded, with the band as `built` (what its Linear became)."""
        if self._rest is None:
            self._rest = rest_band(self.plan)
        modules = bands_modules(self.plan, {self.index: built}, self._rest)
        return nn.ModuleList(list(modules.values()))


def _check_settings(name: str, settings: LayerPolicy, size: int, dim: int, head: bool) -> None:
    """What a band's settings may ask: plain SVD, magnitude or RTN, input quantization only of
    a head's input, a rank within the band."""
    if settings.act_bits != 32 and not head:
        raise SpaceError(
            f"band {name!r} sets act_bits, but only a head's input is quantized and this table "
            "has no head; drop act_bits"
        )
    if settings.data_aware or settings.rank_method != "plain":
        raise SpaceError(
            f"band {name!r} asks for a data-aware or non-SVD method; bands take plain SVD, "
            "magnitude pruning and round-to-nearest only"
        )
    if settings.rank is not None and settings.rank > min(size, dim):
        raise SpaceError(
            f"rank {settings.rank} for band {name!r} is above min(rows, dim) = "
            f"{min(size, dim)}; use a rank in 1..{min(size, dim)}"
        )


def plan_bands(
    model: nn.Module,
    banded: Mapping[str, Mapping[int, LayerPolicy]],
    calib: torch.Tensor | None,
    others: Mapping[str, LayerPolicy],
    *,
    order: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    linears: dict[tuple[str, int, int], nn.Linear] | None = None,
) -> list[BandPlan]:
    """Check every banded layer of a policy against `model` (before anything changes) and
    plan it; layers whose bands are all untouched are left as they are. `others` is the rest
    of the policy (a tied partner may not be compressed there too). `order` keeps each layer's
    (order, counts) and `linears` each band's Linear by (layer, start, stop), for a caller that
    builds many policies on one model (filled here when missing)."""
    plans = []
    for name, bands in banded.items():
        touched = {i: s for i, s in sorted(bands.items()) if not s.is_identity}
        if not touched:
            continue
        holders, weight, bias = _layer(model, name)
        for holder, _ in holders:
            settings = others.get(holder)
            if settings is not None and not settings.is_identity:
                raise SpaceError(
                    f"layers {name!r} (banded) and {holder!r} share one weight (tied); give "
                    "compression settings to only one of them"
                )
        vocab, dim = weight.shape
        if order is not None and name in order:
            ranked, counts = order[name]
        elif calib is None:
            raise SpaceError(
                f"layer {name!r} is cut into frequency bands, ranked by how often the "
                "calibration tokens use each word; pass calib=token ids of shape (B, T)"
            )
        else:
            ranked, counts = token_order(calib, int(vocab))
            if order is not None:
                order[name] = (ranked, counts)
        plan = BandPlan(name, holders, weight, bias, ranked, counts, touched)
        used = torch.zeros(int(vocab), dtype=torch.bool)
        for index, settings in touched.items():
            start, stop = settings.band
            what = f"{name}@{index}"
            if stop > vocab or bool(used[start:stop].any()):
                raise SpaceError(
                    f"band {what!r} takes rows [{start}, {stop}), outside the {vocab} words or "
                    "over another band's; build the policy from this model's Space"
                )
            used[start:stop] = True
            head = any(isinstance(m, nn.Linear) for _, m in holders)
            _check_settings(what, settings, stop - start, int(dim), head)
            if settings.act_bits < 32 and calib is None:
                raise SpaceError(
                    f"band {what!r} quantizes its head's input; pass calib=token ids of shape "
                    "(B, T) to calibrate the input scale"
                )
            if linears is not None:
                key = (name, start, stop)
                if key not in linears:
                    linears[key] = plan.linear(index)
                plan.linears[index] = linears[key]
            layer = LayerCheck(what, plan.linear(index), settings, calib is not None)
            for tech in techniques():
                if tech.applies(settings):
                    tech.check_layer(layer)
        plans.append(plan)
    return plans


def _as_table(matrix: nn.Module) -> nn.Module:
    """A band matrix built as a Linear, as the table-shaped module a `Band` holds (its tensors
    shared): an ``nn.Embedding`` or a `CompressedEmbedding` (rows with per-row scales)."""
    rows, cols = matrix.weight.shape
    if type(matrix) is nn.Linear:
        table = skip_init(nn.Embedding, rows, cols, device="meta")
        table.weight = matrix.weight
        return table
    if type(matrix) is CompressedLinear:  # its input quantizer goes to the `Band`
        with torch.device("meta"):
            table = CompressedEmbedding(
                rows, cols, bits=matrix.bits, sparse=matrix.sparse, block=matrix.block,
                group=matrix.group,
            )  # fmt: skip
        table.weight = matrix.weight
        table.weight_scale = matrix.weight_scale
        table.mask = matrix.mask
        return table.train(matrix.training)
    raise SpaceError(f"a band cannot hold a {type(matrix).__name__}")


def band_module(built: nn.Module) -> Band:
    """The `Band` a band's Linear became (dense, compressed, or a factor pair), tensors shared;
    the input quantizer of its (first) matrix becomes the band's."""
    if isinstance(built, LowRankLinear):
        first = built.first
        band = Band(
            table=_as_table(built.second), proj=_as_table(first), bias=built.second.bias,
            act_bits=getattr(first, "act_bits", 32),
        )  # fmt: skip
    else:
        first = built
        band = Band(rows=_as_table(built), bias=built.bias, act_bits=getattr(built, "act_bits", 32))
    if band.act_bits < 32:
        band.act_scale = first.act_scale
    return band


def rest_band(plan: BandPlan) -> Band:
    """The dense band of every word the plan's touched bands leave, in vocabulary order."""
    taken = torch.zeros(plan.vocab, dtype=torch.bool)
    for index in plan.bands:
        taken[plan.rows(index)] = True
    rest = band_linear(plan.weight, plan.bias, (~taken).nonzero().reshape(-1))
    return Band(rows=_as_table(rest), bias=rest.bias)


def bands_modules(
    plan: BandPlan, built: Mapping[int, nn.Module], rest: Band | None = None
) -> dict[str, nn.Module]:
    """The banded module each holder of the layer's weight becomes, over one `BandSet` of the
    bands `built` (index -> what each touched band's Linear became, or its `Band`) and a dense
    rest band (`rest_band`, given when already built)."""
    total = max(float(plan.counts.sum()), 1.0)
    device = plan.weight.device
    bands: dict[str, Band] = {}
    taken = 0
    for index in sorted(built):
        rows = plan.rows(index)
        band = built[index] if isinstance(built[index], Band) else band_module(built[index])
        band.words = rows.clone().to(device)
        band.share = float(plan.counts[rows].sum()) / total
        taken += len(rows)
        bands[band_key(plan.name, index)] = band
    if taken < plan.vocab:
        rest = rest if rest is not None else rest_band(plan)
        rest.share = max(0.0, 1.0 - sum(b.share for b in bands.values()))
        bands[REST] = rest
    bandset = BandSet(plan.vocab, bands)
    out: dict[str, nn.Module] = {}
    dim = int(plan.weight.shape[1])
    for name, holder in plan.holders:
        if isinstance(holder, nn.Linear):
            out[name] = BandedHead(bandset, dim).train(holder.training)
        else:
            out[name] = BandedEmbedding(bandset, dim, holder.padding_idx).train(holder.training)
    return out


def head_name(plan: BandPlan) -> str | None:
    """The name of the head among the layer's holders (whose input a band may quantize)."""
    return next((n for n, m in plan.holders if isinstance(m, nn.Linear)), None)


def build_bands(
    model: nn.Module,
    plans: list[BandPlan],
    build: Callable[[nn.Linear, LayerPolicy, torch.Tensor | None], nn.Module],
    amax: Callable[[str], torch.Tensor],
) -> None:
    """Compress every touched band with `build` (its Linear, settings and input scale) and put
    the banded modules in place; `amax(head)` is max |input| of a head on calibration tokens."""
    for plan in plans:
        built = {}
        for index, settings in plan.bands.items():
            scale = None
            if settings.act_bits < 32:
                scale = tensor_scale(amax(head_name(plan) or plan.name), settings.act_bits)
            built[index] = build(plan.linear(index), settings, scale)
        for name, module in bands_modules(plan, built).items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
