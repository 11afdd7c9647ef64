"""`VariantCache`: compressed models that share every unchanged tensor with their base.

A worker runs trial after trial on one base model, and most trials repeat layer settings an
earlier trial already built. The cache keeps each compressed layer by (layer name, settings),
the SVD of each factorized weight and the calibrated input ranges, so a trial's model is the
base's module tree with the policy's layers swapped in: no full copy, and a repeated setting
costs a lookup. The result is the same model `compress` builds, value for value.

Entries live in two tiers under one byte budget: what every level of a layer shares (magnitude
orders as int32, SVDs as float32 truncated to the largest rank the layer can take, input
statistics) and the compressed variants. Variants go first, least recently used first, and
nothing the model being built reads is evicted while it is built: a new entry that would need
that is not kept. A trial walks the layers in order, so plain LRU under a budget smaller than
one policy evicted each layer just before the repeat needed it (no hit at all); here the
layers that fit stay and a repeat finds them.

A rank on a tied table or head builds both sides together (the factorized tied pair): the
pair is one variant, filed under both names (``"wte+head"``) and its settings, and both
modules are swapped in together.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from microsweep.errors import SpaceError
from microsweep.policy import METHODS, LayerPolicy, Policy

from ._apply import (
    _plan,
    _set_submodule,
    _Step,
    build_group,
    compress_layer,
    compress_tied,
    input_stats,
    layer_inputs,
)
from ._banding import (
    BandPlan,
    band_module,
    bands_modules,
    head_name,
    plan_bands,
    rest_band,
    split_bands,
)
from ._groups import grouped
from ._levels import LevelStore
from ._lowrank import InputStats, factorize, frequency_rows, weight_svd
from ._prune import magnitude_order, mask_from_order
from ._quantize import tensor_scale
from ._techniques import RankTechnique, technique

__all__ = ["VariantCache"]


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _largest_useful_rank(weight: torch.Tensor) -> int:
    """The largest rank below a matrix's break-even (r * (out + in) < out * in): a space leaves
    the layer dense at any rank from there on, so an SVD kept for it needs no more triples."""
    out_f, in_f = weight.shape
    return max(1, -(-(out_f * in_f) // (out_f + in_f)) - 1)


def _readers(step: _Step) -> dict[str, nn.Module]:
    """The modules whose inputs a step's data-aware methods read: the layer, or for a tied
    pair its head (and the table, whose token frequencies a data-aware rank weighs rows by)."""
    if step.partner is None:
        return {step.name: step.linear}
    table_name, table, head_name, head = step.tied()
    out: dict[str, nn.Module] = {head_name: head}
    if METHODS[step.settings.rank_method].reads_inputs:
        out[table_name] = table
    return out


class VariantCache:
    """Builds `policy`'s model from `base` with cached layer variants and decompositions, within
    `max_bytes` (see the module's note on the two tiers and what is evicted first).

    `max_rank` names, per layer, the largest rank its SVD is kept for (default: the largest
    rank below the layer's break-even); a policy asking for more recomputes it.

    The models it returns share tensors with the base and with each other: treat them as
    read-only (evaluate and count them; copy one with `copy.deepcopy` before training it).
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        calib: torch.Tensor | None = None,
        max_bytes: int = 512 * 2**20,
        stats: Mapping[str, InputStats] | None = None,
        store: LevelStore | None = None,
        max_rank: Mapping[str, int] | None = None,
    ) -> None:
        self.base = base
        self.calib = calib
        self.max_bytes = max_bytes
        self.store = store
        self.max_rank = dict(max_rank or {})
        self._given_stats = dict(stats or {})  # the sweep's, computed once: kept outside the tiers
        self._shared: dict[int, Any] = {}
        for t in [*base.parameters(), *base.buffers()]:
            self._shared[id(t)] = t
        # least recently used first in each tier: variants, then what every level shares
        self._variants: OrderedDict[tuple[str, Any], tuple[Any, int]] = OrderedDict()
        self._common: OrderedDict[tuple[str, Any], tuple[Any, int]] = OrderedDict()
        self._in_use: set[tuple[str, Any]] = set()  # keys the model being built reads
        self._bytes = 0
        self._amax: dict[str, torch.Tensor] | None = None
        self._pending: dict[str, nn.Module] = {}
        self._rounded_base: dict[int, torch.Tensor] = {}  # base tensor id -> its fp16 copy
        self._band_order: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._band_linears: dict[tuple[str, int, int], nn.Linear] = {}
        self.hits = 0
        self.misses = 0
        self.builds = 0  # layer variants built here (not found in memory or in `store`)

    def model(self, policy: Policy) -> nn.Module:
        """`policy` applied to the base: the base's modules copied, its tensors shared, and each
        changed layer a cached variant (built on first use). Raises `SpaceError` as `compress`."""
        policy, banded = split_bands(policy)
        steps = _plan(self.base, policy, self.calib)
        bands = (
            plan_bands(
                self.base,
                banded,
                self.calib,
                policy.layers,
                order=self._band_order,
                linears=self._band_linears,
            )  # fmt: skip
            if banded
            else []
        )
        # data-aware ranks read the layers' inputs: one calibration pass for all that lack them
        self._pending = {}
        for s in steps:
            if (
                (s.key, s.settings) not in self._variants  # a cached variant needs no inputs
                and not (s.settings.data_aware and self.store and self.store.has(s.key, s.settings))
                and (
                    s.settings.data_aware
                    or (
                        METHODS[s.settings.rank_method].reads_inputs
                        and (s.key, ("svd", s.settings.rank_method)) not in self._common
                    )
                )
            ):
                self._pending.update(
                    (n, m) for n, m in _readers(s).items() if n not in self._given_stats
                )
        self._in_use = set()
        try:
            return self._assemble(steps, bands)
        finally:
            self._pending = {}
            self._in_use = set()

    def _assemble(self, steps: list[Any], bands: list[BandPlan] = ()) -> nn.Module:
        """The base's module tree with each step's layer swapped for its variant, and each
        banded layer (and its tied partner) for its banded module."""
        model = copy.deepcopy(self.base, dict(self._shared))
        retie: dict[int, nn.Parameter] = {}
        placed: set[int] = set()
        built: dict[str, nn.Module] = {}
        for (method, group, rank), members in grouped(steps).items():
            built.update(self._group(method, group, rank, {s.name: s.linear for s in members}))
        for step in steps:
            if step.partner is not None:  # the factorized tied pair: both sides at once
                table_name, _, head_name, _ = step.tied()
                pair = self._tied_variant(step)
                for name, module in zip((table_name, head_name), pair, strict=True):
                    _set_submodule(model, name, module)
                    placed.update(id(m) for m in module.modules())
                continue
            variant = built.get(step.name)
            if variant is None:
                variant = self._variant(step.name, step.linear, step.settings)
            _set_submodule(model, step.name, variant)
            placed.update(id(m) for m in variant.modules())
            weight = getattr(variant, "weight", None)
            if isinstance(weight, nn.Parameter) and weight is not step.linear.weight:
                retie[id(step.linear.weight)] = weight  # a tie (head = embedding) follows it
        if retie:
            for module in model.modules():
                if id(module) in placed:
                    continue
                for key, param in module._parameters.items():
                    if param is not None and id(param) in retie:
                        module._parameters[key] = retie[id(param)]
        for plan in bands:
            for name, module in self._banded(plan).items():
                _set_submodule(model, name, module)
        return model

    def _banded(self, plan: BandPlan) -> dict[str, nn.Module]:
        """The banded modules of one layer: each touched band a cached variant (keyed by the
        band's rows, so its decompositions follow them), the rest band cached by which rows
        the touched bands take."""
        built = {}
        for index, settings in plan.bands.items():
            start, stop = settings.band
            name = f"{plan.name}@{index}:{start}-{stop}"
            if settings.act_bits < 32:  # the band quantizes its head's input
                amax = self._input_amax(head_name(plan) or plan.name)
                self._amax[name] = amax  # type: ignore[index]
            built[index] = band_module(self._variant(name, plan.linear(index), settings))
        ranges = tuple(sorted(s.band for s in plan.bands.values()))
        key = (plan.name, ("rest", ranges))
        rest = self._cached(key)
        if rest is None:
            rest = rest_band(plan)
            self._put(key, rest, _nbytes([*rest.parameters()]), common=False)
        return bands_modules(plan, built, rest)

    def rounded(self, model: nn.Module) -> nn.Module:
        """A copy of a model from `model()` whose float tensors hold fp16-rounded values (what
        a 16-bit artifact stores); nothing shared is written, and the base's rounded tensors
        are made once."""
        memo: dict[int, Any] = {}
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) in memo:
                continue
            if not t.is_floating_point():
                memo[id(t)] = t
                continue
            rounded = self._rounded_base.get(id(t))
            if rounded is None:
                with torch.no_grad():
                    rounded = t.detach().to(torch.float16).to(t.dtype)
                if isinstance(t, nn.Parameter):
                    rounded = nn.Parameter(rounded, requires_grad=False)
                if id(t) in self._shared:
                    self._rounded_base[id(t)] = rounded
            memo[id(t)] = rounded
        return copy.deepcopy(model, memo)

    def _cached(self, key: tuple[str, Any]) -> Any:
        """A cached layer (or group) by key, counted as a hit or a miss; None when missing."""
        entry = self._variants.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._variants.move_to_end(key)
        self._in_use.add(key)
        self.hits += 1
        return entry[0]

    def _common_entry(self, key: tuple[str, Any]) -> Any:
        """An entry every level of a layer shares (order, SVD, statistics), or None."""
        entry = self._common.get(key)
        if entry is None:
            return None
        self._common.move_to_end(key)
        self._in_use.add(key)
        return entry[0]

    def _variant(self, name: str, linear: nn.Linear, settings: LayerPolicy) -> nn.Module:
        key = (name, settings)
        found = self._cached(key)
        if found is not None:
            return found
        if self.store is not None and settings.data_aware:  # built once, by any worker
            build = functools.partial(self._build, name, linear, settings)
            module = self.store.get_or_build(name, settings, build, linear.weight.device)
        else:
            module = self._build(name, linear, settings)
        self._keep(key, module)
        return module

    def _build(self, name: str, linear: nn.Linear, settings: LayerPolicy) -> nn.Module:
        """Layer `name` under `settings`, from its cached decompositions and statistics."""
        act_scale = None
        if settings.act_bits < 32:
            act_scale = tensor_scale(self._input_amax(name), settings.act_bits)
        factors, masks = None, None
        rank_tech = technique(settings.rank_method) if settings.rank is not None else None
        if isinstance(rank_tech, RankTechnique) and rank_tech.factorizes:
            svd, transform = self._svd(name, linear, settings.rank_method, settings.rank)
            factors = factorize(linear, settings.rank, svd=svd, transform=transform)
        if settings.sparsity > 0 and settings.prune_method == "magnitude":
            if factors is None:
                matrices = {name: linear.weight}
            else:
                prefix = f"{name}@{settings.rank}"
                matrices = {f"{prefix}.first": factors.first.weight}
                matrices[f"{prefix}.second"] = factors.second.weight
            masks = self._masks(matrices, settings)
        stats = self._stats(name) if settings.data_aware else None
        module = compress_layer(
            linear, settings, act_scale=act_scale, factors=factors, masks=masks, stats=stats
        )
        self.builds += 1
        return module

    def _masks(
        self, matrices: Mapping[str, torch.Tensor], settings: LayerPolicy
    ) -> tuple[torch.Tensor, ...]:
        """Each matrix's magnitude mask at the settings' sparsity, from its cached order."""
        return tuple(
            mask_from_order(
                self._order(key, weight, settings.block),
                weight.shape,
                settings.sparsity,
                settings.block,
            )
            for key, weight in matrices.items()
        )

    def _tied_variant(self, step: _Step) -> nn.ModuleList:
        """A tied step's (table, head) pair, cached under both names and its settings (and,
        data-aware, in the level store as one module holding both, ties kept)."""
        key = (step.key, step.settings)
        found = self._cached(key)
        if found is not None:
            return found
        build = functools.partial(self._build_tied, step)
        if self.store is not None and step.settings.data_aware:
            device = step.linear.weight.device
            pair = self.store.get_or_build(step.key, step.settings, build, device)
        else:
            pair = build()
        self._keep(key, pair)
        return pair

    def _build_tied(self, step: _Step) -> nn.ModuleList:
        """A tied step's pair from the cached SVD of the head's weight (of D W T for the
        data-aware methods), magnitude orders and the head's input statistics."""
        settings = step.settings
        table_name, table, head_name, head = step.tied()
        act_scale = None
        if settings.act_bits < 32:
            act_scale = tensor_scale(self._input_amax(step.name), settings.act_bits)
        factors, masks = None, None
        rank_tech = technique(settings.rank_method)
        if isinstance(rank_tech, RankTechnique) and rank_tech.factorizes:
            svd, transform, rows = self._tied_svd(step, settings.rank)
            factors = factorize(head, settings.rank, svd=svd, transform=transform, rows=rows)
        if factors is not None and settings.sparsity > 0 and settings.prune_method == "magnitude":
            prefix = f"{step.key}/{settings.rank_method}@{settings.rank}"
            matrices = {f"{prefix}.first": factors.first.weight}
            matrices[f"{prefix}.second"] = factors.second.weight
            masks = self._masks(matrices, settings)
        stats = self._stats(head_name) if settings.data_aware else None
        pair = compress_tied(
            table, head, settings, act_scale=act_scale, factors=factors, masks=masks, stats=stats
        )
        self.builds += 1
        return nn.ModuleList(pair)

    def _tied_svd(
        self, step: _Step, rank: int
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor] | None, Any]:
        """The SVD of a tied pair's weight W (plain), or of D W T (data-aware: T from the
        head's inputs, D from the table's token frequencies), with T's pair and D's diagonal;
        kept once per pair and method for every rank up to its largest useful one."""
        method = step.settings.rank_method
        table_name, _, head_name, head = step.tied()
        key = (step.key, ("svd", method))
        full = min(head.weight.shape)
        found = self._common_entry(key)
        if found is not None and found[0][1].numel() >= min(rank, full):
            return found
        transform, rows = None, None
        if method != "plain":
            tech = technique(method)
            if isinstance(tech, RankTechnique):
                transform = tech.transform(self._stats(head_name))
            if transform is None:
                raise SpaceError(f"rank method {method!r} does not factorize on calibration inputs")
            rows = frequency_rows(self._stats(table_name).gram)
        limit = self.max_rank.get(step.name) or _largest_useful_rank(head.weight)
        keep = min(max(rank, limit), full)
        svd = weight_svd(head.weight, transform, keep=keep, rows=rows)
        self._drop(key)
        held = [*svd, *(transform or ()), *([] if rows is None else [rows])]
        self._put(key, (svd, transform, rows), _nbytes(held), common=True)
        return svd, transform, rows

    def _keep(self, key: tuple[str, Any], module: nn.Module) -> None:
        """Hold a layer variant in memory, counted by the tensors it does not share."""
        own = [
            t
            for t in [*module.parameters(), *module.buffers()]
            if id(t) not in self._shared  # a bias the variant still shares costs nothing
        ]
        self._put(key, module, _nbytes(own), common=False)

    def _group(
        self, method: str, group: str, rank: int, linears: dict[str, nn.Module]
    ) -> dict[str, nn.Module]:
        """The modules of one group of a grouped rank method (a shared basis, or codes with one
        decoder), built once per (group, method, rank, members)."""
        key = (group, ("group", method, rank, tuple(linears)))
        found = self._cached(key)
        if found is not None:
            return found
        modules = build_group(method, rank, linears)
        own = [
            t
            for m in modules.values()
            for t in [*m.parameters(), *m.buffers()]
            if id(t) not in self._shared
        ]
        self._put(key, modules, _nbytes(own), common=False)
        return modules

    def _order(
        self, matrix: str, weight: torch.Tensor, block: tuple[int, int] | None
    ) -> torch.Tensor:
        """The magnitude order of one weight matrix (a layer's, or a factor's at a rank), sorted
        once for every sparsity."""
        key = (matrix, ("order", block))
        order = self._common_entry(key)
        if order is None:
            order = magnitude_order(weight, block)
            self._put(key, order, _nbytes([order]), common=True)
        return order

    def _svd(
        self, name: str, linear: nn.Linear, method: str = "plain", rank: int = 1
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor] | None]:
        """The SVD `factorize` truncates (of W, or of W T for a data-aware `method`; as
        `weight_svd` keeps it) and T's pair, computed once per layer and method for every rank
        up to the layer's `max_rank` (again, for more, when `rank` asks for more)."""
        key = (name, ("svd", method))
        full = min(linear.weight.shape)
        found = self._common_entry(key)
        if found is not None and found[0][1].numel() >= min(rank, full):
            return found
        transform = None
        if method != "plain":
            tech = technique(method)
            transform = (
                tech.transform(self._stats(name)) if isinstance(tech, RankTechnique) else None
            )
            if transform is None:
                raise SpaceError(f"rank method {method!r} does not factorize on calibration inputs")
        keep = max(rank, self.max_rank.get(name) or _largest_useful_rank(linear.weight))
        svd = weight_svd(linear.weight, transform, keep=min(keep, full))
        self._drop(key)  # kept for fewer ranks than this policy asks for
        self._put(key, (svd, transform), _nbytes([*svd, *(transform or ())]), common=True)
        return svd, transform

    def _stats(self, name: str) -> InputStats:
        """Layer `name`'s input statistics on the unchanged base, kept in the cache (they
        depend on nothing but the base and the calibration tokens): one calibration pass for
        every data-aware layer of the current policy that lacks them."""
        given = self._given_stats.get(name)
        if given is not None:
            return given
        key = (name, ("stats",))
        kept = self._common_entry(key)
        if kept is not None:
            return kept
        stored = self._stored_stats(name)
        if stored is not None:
            return stored
        if self.calib is None:  # _plan refuses data-aware methods without calib first
            raise SpaceError("a data-aware method needs calib token ids")
        wanted = {
            n: m
            for n, m in self._pending.items()
            if (n, ("stats",)) not in self._common and not (self.store and self.store.has_stats(n))
        }
        wanted[name] = self.base.get_submodule(name)
        found = input_stats(self.base, wanted, self.calib)
        for layer, stats in found.items():
            size = _nbytes([stats.gram, stats.abs_mean])
            self._put((layer, ("stats",)), stats, size, common=True)
        if name not in found:
            raise SpaceError(
                f"layer {name!r} saw no input while calibrating; its data-aware method needs "
                "calib tokens whose forward pass runs through it"
            )
        return found[name]

    def _stored_stats(self, name: str) -> InputStats | None:
        """Layer `name`'s statistics read from the level store's folder, on the base's device,
        for the build at hand only: builds are rare once their results are cached, so the
        statistics are not worth a place in the cache (a worker holds one layer's Gram matrix
        at a time, read again by each step of a build that needs it)."""
        if self.store is None:
            return None
        found = self.store.load_stats([name]).get(name)
        if found is None:
            return None
        device = next((t.device for t in self.base.parameters()), None)
        if device is not None and found.gram.device != device:
            found = InputStats(found.gram.to(device), found.abs_mean.to(device), found.rows)
        return found

    def _input_amax(self, name: str) -> torch.Tensor:
        """max |input| of layer `name` over one pass of the calibration tokens through the
        unchanged base (one pass for every Linear, on first need)."""
        if self._amax is None:
            if self.calib is None:  # _plan refuses act_bits without calib before this
                raise SpaceError("act_bits needs calib token ids to calibrate input scales")
            linears = {n: m for n, m in self.base.named_modules() if isinstance(m, nn.Linear)}
            seen = layer_inputs(self.base, linears, self.calib)
            self._amax = {n: amax for n, (_, amax) in seen.items()}
        if name not in self._amax:
            raise SpaceError(
                f"layer {name!r} saw no input while calibrating; pass calib tokens "
                "whose forward pass runs through it, or set its act_bits to 32"
            )
        return self._amax[name]

    def _put(self, key: tuple[str, Any], value: Any, size: int, *, common: bool) -> None:
        """Keep an entry in its tier (`common`: shared by every level of a layer) once the
        bytes fit: variants not in use go first, least recently used first, then shared entries
        not in use. An entry that would need more is not kept, unless the cache is otherwise
        empty (one entry larger than the budget alone stays, the latest)."""
        self._drop(key)
        for tier in (self._variants, self._common):
            for old in [k for k in tier if k not in self._in_use]:
                if self._bytes + size <= self.max_bytes:
                    break
                self._drop(old)
        if self._bytes + size > self.max_bytes and (self._variants or self._common):
            return
        (self._common if common else self._variants)[key] = (value, size)
        self._bytes += size
        self._in_use.add(key)

    def _drop(self, key: tuple[str, Any]) -> None:
        for tier in (self._variants, self._common):
            entry = tier.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1]

    def __len__(self) -> int:
        """Entries held: layer variants, groups, orders, SVDs and statistics."""
        return len(self._variants) + len(self._common)

    @property
    def nbytes(self) -> int:
        """Bytes the cached variants and decompositions hold (at most `max_bytes`, unless one
        entry alone is larger); the sweep's given statistics are not counted."""
        return self._bytes

    @property
    def common_bytes(self) -> int:
        """Of `nbytes`, what every level of a layer shares: orders, SVDs, statistics."""
        return sum(size for _, size in self._common.values())

    def clear(self) -> None:
        """Forget every cached layer and decomposition."""
        self._variants.clear()
        self._common.clear()
        self._bytes = 0
