"""Option tables: every combination of a unit's knob levels with its exact cost and how its
knobs interact.

Cost is exact: each option's layer is really compressed and counted alone by the MicroNet
counter, in both counting modes (the 16-bit allowance applies only when no width anywhere is
below 16 bits, so a policy is counted in one mode or the other as a whole). A layer's count
depends on nothing but the layer (a shared weight is stored once, by the compressed side), so
the score of any policy is the dense model's plus the sum of its options' deltas; a test checks
this against the counter on whole compressed models. Options are built with the plain methods
(`_plain`): for GPTQ layers the cost misses the exact zeros round-to-nearest makes.

Interaction: the sensitivity pass measures each knob alone. How knobs combine inside a layer is
read from a proxy, the relative output error ||(W' - W) X||^2 / ||W X||^2 on calibration
inputs X (the quantity post-training compression methods minimise), plus the error the input
quantizer adds. `rho` = error of the combination / sum of the errors of its knobs alone; the
predicted loss of a combination is `rho` times the sum of its knobs' measured losses, exact at
every measured point.

A rank on a tied table or head builds both sides (the factorized tied pair): such an option
is counted as the pair against the dense table and head together (their shared weight once),
so its delta is exact too; a data-aware rank reads the table's token frequencies with the
head's inputs, so the partner's inputs travel with the unit's.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from microsweep.allocate._levels import KNOBS, identity_level, layer_setting, level_key
from microsweep.compress import (
    BandSlot,
    CompressedLinear,
    InputStats,
    LowRankEmbedding,
    LowRankLinear,
    TiedLowRankEmbedding,
    TTEmbedding,
    TTLinear,
    band_reads,
    build_group,
    compress_layer,
    compress_tied,
    factorize,
    fake_quantize_symmetric,
    frequency_rows,
    layer_inputs,
    magnitude_masks,
    parse_band,
    rank_transform,
    tensor_scale,
    token_order,
    weight_svd,
)
from microsweep.errors import SpaceError
from microsweep.score import Baseline, CountConfig, Counts, count, op_weight
from microsweep.spaces import GROUP_METHODS, LayerInfo, LayerPolicy, Unit

__all__ = [
    "MODES",
    "OptionTask",
    "UnitOptions",
    "build_options",
    "build_unit_options",
    "option_tasks",
    "unit_options_on",
]

MODES = ("quantized", "freebie")
"""Counting modes: below 16 bits somewhere (real widths), or the 16-bit allowance for all."""


@dataclass
class UnitOptions:
    """Every level combination of one unit.

    - `combos` (K, n_knobs): level index per knob (`knobs` order), 0 = least compressed;
    - `cost` (K, 2): the score delta against the dense model in each of `MODES` (NaN where the
      combination rules the mode out);
    - `rho` (K, n_layers): interaction ratio per member layer;
    - `keys[(m, knob, i)]`: the sensitivity-table key of member m's knob at level i (None for
      the identity level);
    - `proxy[(m, knob, i)]`: member m's relative output error with only that knob at level i
      (the proxy `rho` is built from; empty without calibration inputs), which gives a probe the
      sensitivity pass leaves unmeasured a prior (`search._sensitivity.interpolate`).
    """

    unit: Unit
    knobs: tuple[str, ...]
    levels: dict[str, list[Any]]
    combos: np.ndarray
    cost: np.ndarray
    rho: np.ndarray
    keys: dict[tuple[int, str, int], str | None]
    proxy: dict[tuple[int, str, int], float] = field(default_factory=dict)
    _index: dict[tuple[int, ...], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {tuple(int(v) for v in row): k for k, row in enumerate(self.combos)}

    def __len__(self) -> int:
        return len(self.combos)

    def values(self, k: int) -> dict[str, Any]:
        """Knob values (Optuna units) of combination `k`."""
        return {
            kn: self.levels[kn][int(i)] for kn, i in zip(self.knobs, self.combos[k], strict=True)
        }

    def index_of(self, levels: tuple[int, ...]) -> int | None:
        """The combination with these level indices, if it exists."""
        return self._index.get(tuple(levels))

    def locate(self, values: Mapping[str, Any]) -> int | None:
        """The combination whose knob values equal `values` (floats to 1e-9), if any."""
        idx = []
        for kn in self.knobs:
            if kn not in values:
                return None
            found = _find(self.levels[kn], values[kn])
            if found is None:
                return None
            idx.append(found)
        return self.index_of(tuple(idx))

    def nearest(self, knob: str, value: Any) -> int:
        """Index of the level of `knob` nearest to `value` (ties: the less compressed). A rank
        given as an explicit rank for a unit of fractions (or the other way) is converted with
        the unit's first layer's full rank."""
        levels = self.levels[knob]
        if knob == "rank":
            full = self.unit.layers[0].full_rank
            value = _rank_like(value, levels[-1], full)
        order = [(abs(float(v) - float(value)), i) for i, v in enumerate(levels)]
        return min(order)[1]


def _find(levels: list[Any], value: Any) -> int | None:
    for i, level in enumerate(levels):
        if level is None or value is None:
            if level is value:
                return i
        elif abs(float(level) - float(value)) < 1e-9 and isinstance(level, int) == isinstance(
            value, int
        ):
            return i
    return None


def _rank_like(value: Any, like: Any, full: int) -> Any:
    """`value` (an explicit rank or a fraction) in the unit of `like`."""
    if isinstance(value, int) and not isinstance(like, int):
        return value / full
    if not isinstance(value, int) and isinstance(like, int):
        return round(float(value) * full)
    return value


def _effective_weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, TiedLowRankEmbedding):  # A (V, r) times B (r, d)
        return (module.table.detach() @ module.proj.detach()).to(torch.float64)
    if isinstance(module, TTLinear):
        return module.weight_matrix().detach().to(torch.float64)
    if isinstance(module, TTEmbedding):
        return module.table().detach().to(torch.float64)
    if isinstance(module, LowRankEmbedding):  # table (V, r) times projection (d, r)^T
        return _effective_weight(module.first) @ _effective_weight(module.second).T
    if isinstance(module, LowRankLinear):
        return _effective_weight(module.second) @ _effective_weight(module.first)
    return module.weight.detach().to(torch.float64)


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def _score(module: nn.Module, context: float, config: CountConfig, baseline: Baseline):
    counts = count(_Holder(module), context=context, config=config)
    return counts.params / baseline.params + counts.ops / baseline.ops, counts.freebie


def build_unit_options(
    unit: Unit,
    model: nn.Module,
    levels: dict[str, list[Any]],
    *,
    context: float,
    config: CountConfig,
    baseline: Baseline,
    inputs: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    bands: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> UnitOptions:
    """Compress and count every combination of `levels` for each layer of `unit`. A frequency
    band (kind ``"band"``) is compressed as the Linear of its rows and counted as its layer
    (with a tied partner) banded with only this band changed, against the layer as it is;
    `bands` gives each banded layer's word order and counts (`token_order`)."""
    knobs = tuple(k for k in KNOBS if k in levels)
    grid = [range(len(levels[k])) for k in knobs]
    rows = list(itertools.product(*grid))  # one empty combination when the unit has no knob
    combos = np.array(rows, dtype=np.int64).reshape(len(rows), len(knobs))
    n, m = len(combos), len(unit.layers)
    cost = np.zeros((n, len(MODES)))
    rho = np.ones((n, m))
    keys: dict[tuple[int, str, int], str | None] = {}
    singles: dict[tuple[int, str, int], float] = {}
    quantized = replace(config, freebie=False)
    freebie_on = config.freebie
    joint = _joint_groups(unit, model, levels, knobs, combos)
    for k, modules in joint.items():  # a group's shared basis or decoder, counted once
        score_q, _ = _score(nn.ModuleList(modules.values()), context, quantized, baseline)
        cost[k, 0] += score_q
        if freebie_on:
            score_f, applied = _score(nn.ModuleList(modules.values()), context, config, baseline)
            cost[k, 1] += score_f if applied else np.nan
        else:
            cost[k, 1] = np.nan
    with torch.no_grad():
        for mi, info in enumerate(unit.layers):
            slot = _band_slot(model, info, bands)
            linear = model.get_submodule(info.name) if slot is None else slot.linear
            dense = linear if slot is None else slot.dense()
            dense_q, _ = _score(dense, context, quantized, baseline)
            dense_f = _score(dense, context, config, baseline)[0] if freebie_on else np.nan
            layer_in = inputs.get(info.name) if inputs else None
            if slot is not None and layer_in is not None:
                layer_in = _band_inputs(slot, layer_in)
            proxy = _Proxy(linear, layer_in)
            tied = _tied_pair(unit, info, model, inputs)
            builder = _LayerBuilder(linear, list(levels.get("sparsity", [])), proxy.stats, tied)
            tied_dense = None
            if tied is not None:
                pair = nn.ModuleList([tied.table, tied.head])
                tied_dense = (
                    _score(pair, context, quantized, baseline)[0],
                    _score(pair, context, config, baseline)[0] if freebie_on else np.nan,
                )
            for kn in knobs:
                for i, value in enumerate(levels[kn]):
                    setting = layer_setting(info, dict(unit.knobs), {kn: value}, unit.key)
                    keys[(mi, kn, i)] = level_key(kn, setting)
                    if layer_in is not None and keys[(mi, kn, i)] is not None:
                        singles[(mi, kn, i)] = proxy.single_error(kn, _plain(setting), builder)
            built: dict[LayerPolicy, nn.Module] = {}  # per weight setting, its latest build
            first: dict[LayerPolicy, tuple[Counts, int]] = {}  # and its first count
            for k, row in enumerate(combos):
                values = {kn: levels[kn][int(i)] for kn, i in zip(knobs, row, strict=True)}
                setting = _plain(layer_setting(info, dict(unit.knobs), values, unit.key))
                if k in joint and info.name in joint[k]:
                    cost[k, 0] -= dense_q
                    cost[k, 1] -= dense_f
                    if layer_in is not None:
                        rho[k, mi] = proxy.ratio(setting, builder, joint[k][info.name])
                    continue
                act_scale = proxy.act_scale(setting.act_bits)
                base_q, base_f = (dense_q, dense_f)
                if tied is not None or slot is not None:  # counted with a partner or as a band
                    module, counted = builder.build_counted(setting, act_scale)
                    if counted is not module and tied_dense is not None:  # the pair, both sides
                        base_q, base_f = tied_dense
                    if slot is not None:  # an unchanged band stays in the layer's dense rest
                        counted = dense if setting.is_identity else slot.banded(module)
                    score_q, _ = _score(counted, context, quantized, baseline)
                else:
                    weights = replace(setting, act_bits=32)
                    module = _with_act_bits(built.get(weights), setting.act_bits, act_scale)
                    score_q = None
                    if module is None:
                        module = builder.build(setting, act_scale)
                    elif weights in first:  # the same weights: only the input width differs
                        score_q = _score_at_act(*first[weights], setting.act_bits, baseline)
                    built[weights] = module
                    if score_q is None:
                        counts = count(_Holder(module), context=context, config=quantized)
                        first.setdefault(weights, (counts, setting.act_bits))
                        score_q = counts.params / baseline.params + counts.ops / baseline.ops
                    counted = module
                cost[k, 0] += score_q - base_q
                if freebie_on and min(setting.bits, setting.act_bits) >= 16:
                    score_f, applied = _score(counted, context, config, baseline)
                    cost[k, 1] += (score_f - base_f) if applied else np.nan
                else:
                    cost[k, 1] = np.nan
                if layer_in is not None:
                    rho[k, mi] = proxy.ratio(setting, builder, module)
    return UnitOptions(unit, knobs, levels, combos, cost, rho, keys, singles)


INPUT_ROWS = ("layer", "layer.first")
"""The counter's rows (under `_Holder`) of the matrix that reads a layer's input."""


def _score_at_act(counts: Counts, act_from: int, act_to: int, baseline: Baseline) -> float | None:
    """The quantized-mode score of the layer counted in `counts` with its input at `act_to`
    bits instead of `act_from` (the same weights: `_with_act_bits`): the count's one input
    row has its multiplies reweighted, max(bits, act) / 32 each, as the counter weighs them;
    the input scale is one fp32 constant at either width. None where the count has not exactly
    one such row at `act_from` (count the module instead)."""
    rows = [lc for lc in counts.layers if lc.name in INPUT_ROWS and lc.act_bits is not None]
    if len(rows) != 1 or rows[0].act_bits != act_from or rows[0].bits is None:
        return None
    if counts.freebie or max(act_from, act_to) >= 32:
        return None
    row = rows[0]
    ops = counts.ops + row.mults * (op_weight(row.bits, act_to) - op_weight(row.bits, act_from))
    return counts.params / baseline.params + ops / baseline.ops


def _with_act_bits(
    module: nn.Module | None, act_bits: int, act_scale: torch.Tensor | None
) -> nn.Module | None:
    """`module` with its input quantized at `act_bits` instead, sharing every weight: the
    input width changes no weight, so the options of one weight setting at several input
    widths share one build (and its pruning and rounding). None where the input quantizer is
    not a `CompressedLinear`'s at under 32 bits both before and after (build it instead)."""
    if module is None or act_scale is None:
        return None
    if isinstance(module, LowRankLinear) and not isinstance(module, LowRankEmbedding):
        first = _with_act_bits(module.first, act_bits, act_scale)
        return None if first is None else type(module)(first, module.second)
    if type(module) is not CompressedLinear or module.act_scale is None:
        return None
    twin = copy.copy(module)  # a new module over the same parameters and buffers
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    twin._modules = dict(module._modules)
    twin.act_bits = act_bits
    twin.act_scale = act_scale.to(module.weight.device)
    return twin


def _band_slot(
    model: nn.Module,
    info: LayerInfo,
    bands: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
) -> BandSlot | None:
    """A band layer's `BandSlot` (None for any other layer)."""
    if info.kind != "band" or info.band is None:
        return None
    layer = (parse_band(info.name) or (info.name, 0))[0]
    order = (bands or {}).get(layer)
    if order is None:
        raise SpaceError(
            f"band {info.name!r} takes its words by frequency in the calibration tokens; plan "
            "with calib tokens"
        )
    return BandSlot(model, info.name, info.band, order)


def _band_inputs(
    slot: BandSlot, layer_in: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A band's share of its layer's calibration inputs: a head's rows as they are; a table's
    token ids kept where they are the band's words, as the band's row numbers."""
    rows, amax = layer_in
    if rows is None or rows.is_floating_point():
        return layer_in
    words = slot.rows().to(rows.device)
    local = torch.full((slot.plan.vocab,), -1, dtype=torch.int64, device=rows.device)
    local[words] = torch.arange(len(words), device=rows.device)
    picked = local[rows.reshape(-1)]
    return picked[picked >= 0].reshape(-1, 1), amax


MAX_ROWS = 4096
"""Calibration input rows per layer the proxy reads (the first ones of the calibration pass)."""

MapRunners = Callable[[Callable[..., Any], Sequence[tuple[Any, ...]]], list[Any]]
"""`fn(runner, *args)` for each args tuple on workers, results in order
(`microsweep.workers.WorkerPool.map_runners`)."""


@dataclass(frozen=True)
class OptionTask:
    """One unit's share of the planner's work, plain data that travels to a worker: the unit,
    its levels, how to count, and its layers' calibration inputs (rows and max |x|, from one
    calibration pass on the driver: a few MiB per unit, cheaper than a pass per unit)."""

    unit: Unit
    levels: dict[str, list[Any]]
    context: float
    config: CountConfig
    baseline: Baseline
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    bands: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    """Each banded layer's word order and counts (`token_order` of the calibration tokens)."""

    @property
    def work(self) -> int:
        """Estimated cost, to send the largest first: options x weights of the unit."""
        options = math.prod(len(v) for v in self.levels.values())
        return options * sum(i.out_features * i.in_features for i in self.unit.layers)

    def build(self, model: nn.Module) -> UnitOptions:
        """The unit's options on `model` (the layers' device is where the work runs)."""
        return build_unit_options(
            self.unit,
            model,
            self.levels,
            context=self.context,
            config=self.config,
            baseline=self.baseline,
            inputs=self.inputs,
            bands=self.bands,
        )


def option_tasks(
    units: Sequence[Unit],
    levels: Mapping[str, dict[str, list[Any]]],
    model: nn.Module,
    *,
    context: float,
    config: CountConfig,
    baseline: Baseline,
    calib: torch.Tensor | None = None,
) -> list[OptionTask]:
    """One task per unit (`levels` by unit key), each with its layers' inputs from one pass of
    `calib` through `model`."""
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    orders: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if calib is not None:
        reads: dict[str, str] = {}  # whose inputs an option reads -> the module giving them
        for u in units:
            for info in u.layers:
                if info.kind == "band":  # a band reads its layer's (or head's) inputs
                    layer = (parse_band(info.name) or (info.name, 0))[0]
                    reads[info.name] = band_reads(model, layer)
                else:
                    reads.update((n, n) for n in _reads(u, info))
        modules = {layer: model.get_submodule(layer) for layer in set(reads.values())}
        seen = layer_inputs(model, modules, calib, max_rows=MAX_ROWS)
        inputs = {name: seen[layer] for name, layer in reads.items() if layer in seen}
        for u in units:
            for info in u.layers:
                layer = (parse_band(info.name) or (info.name, 0))[0]
                if info.kind == "band" and layer not in orders:
                    vocab = int(model.get_submodule(layer).weight.shape[0])
                    orders[layer] = token_order(calib, vocab)
    tasks = []
    for u in units:
        own = {n: inputs[n] for i in u.layers for n in _reads(u, i) if n in inputs}
        mine = {
            layer: order
            for layer, order in orders.items()
            if any(i.name.startswith(f"{layer}@") for i in u.layers)
        }
        tasks.append(
            OptionTask(u, levels[u.key], context, config, baseline, own or None, mine or None)
        )
    return tasks


def _reads(unit: Unit, info: LayerInfo) -> list[str]:
    """The layers whose inputs an option of `info` reads: itself, and for a rank on a tied
    layer the module sharing its weight (head inputs and table frequencies go together)."""
    if "rank" in unit.knobs and info.shared_with:
        return [info.name, info.shared_with[0]]
    return [info.name]


@dataclass
class _Tied:
    """A tied table and head a rank on one of them builds together, and their inputs."""

    table: nn.Embedding
    head: nn.Linear
    table_in: tuple[torch.Tensor, torch.Tensor] | None
    head_in: tuple[torch.Tensor, torch.Tensor] | None


def _tied_pair(
    unit: Unit,
    info: LayerInfo,
    model: nn.Module,
    inputs: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
) -> _Tied | None:
    """The tied pair a rank on layer `info` builds, or None (no rank knob, or untied)."""
    names = _reads(unit, info)
    if len(names) < 2:
        return None
    a, b = (model.get_submodule(n) for n in names)
    if isinstance(a, nn.Embedding):
        (table, t_name), (head, h_name) = (a, names[0]), (b, names[1])
    else:
        (table, t_name), (head, h_name) = (b, names[1]), (a, names[0])
    got = inputs or {}
    return _Tied(table, head, got.get(t_name), got.get(h_name))


def _stats_of(layer_in: tuple[torch.Tensor, torch.Tensor] | None, rows: int) -> InputStats | None:
    """The input statistics of sampled inputs (`_Proxy.stats`), for a layer of `rows` outputs
    (a table's: the frequencies of its `rows` tokens)."""
    if layer_in is None:
        return None
    x = layer_in[0]
    if not x.is_floating_point():
        ids = x.reshape(-1)
        counts = torch.bincount(ids, minlength=rows).to(torch.float64)
        freq = counts / max(float(counts.sum()), 1.0)
        return InputStats(freq, freq, ids.numel())
    x = x.double()
    n = max(x.shape[0], 1)
    return InputStats(x.T @ x / n, x.abs().sum(0) / n, x.shape[0])


def unit_options_on(runner: Any, task: OptionTask) -> UnitOptions:
    """A task's options built by a worker (`TrialRunner.call`) on its runner's base model, on
    the runner's device; what comes back is numpy arrays and plain data."""
    return task.build(runner.base)


def build_options(
    tasks: Sequence[OptionTask], model: nn.Module, map_runners: MapRunners | None = None
) -> list[UnitOptions]:
    """Every task's options in order: in this process on `model`, or spread over workers by
    `map_runners`, the costliest units sent first so no worker ends long after the others."""
    if map_runners is None:
        return [task.build(model) for task in tasks]
    order = sorted(range(len(tasks)), key=lambda i: -tasks[i].work)
    built = map_runners(unit_options_on, [(tasks[i],) for i in order])
    out: list[UnitOptions | None] = [None] * len(tasks)
    for i, options in zip(order, built, strict=True):
        out[i] = options
    return [o for o in out if o is not None]


def _plain(setting: LayerPolicy) -> LayerPolicy:
    """`setting` with magnitude pruning and round-to-nearest: what an option is built, counted
    and proxied with. The interaction ratio `rho` is a ratio of proxy errors (the combination's
    over its knobs' alone), taken with one method throughout; the measured losses it scales are
    the data-aware levels' own. A data-aware build per combination (thousands per sweep) cost
    the demo minutes of planning; counted on the plain build, a GPTQ layer's cost misses only
    the exact zeros round-to-nearest makes and GPTQ does not (its trials count them exactly)."""
    if not setting.data_aware:
        return setting
    return replace(setting, prune_method="magnitude", quant_method="rtn", act_order=False)


def _joint_groups(
    unit: Unit,
    model: nn.Module,
    levels: dict[str, list[Any]],
    knobs: tuple[str, ...],
    combos: np.ndarray,
) -> dict[int, dict[str, nn.Module]]:
    """For a unit of several layers under a grouped rank method (one basis or one decoder for
    the group), each combination's modules built together as a trial builds them, so their
    count stores the shared tensors once: combination index -> layer name -> module."""
    rank_knob = unit.knobs.get("rank")
    method = getattr(rank_knob, "method", "plain")
    if len(unit.layers) < 2 or method not in GROUP_METHODS:
        return {}
    out: dict[int, dict[str, nn.Module]] = {}
    for k, row in enumerate(combos):
        values = {kn: levels[kn][int(i)] for kn, i in zip(knobs, row, strict=True)}
        by_rank: dict[int, dict[str, nn.Module]] = {}
        for info in sorted(unit.layers, key=lambda i: i.name):  # as a trial groups them
            st = layer_setting(info, dict(unit.knobs), values, unit.key)
            if st.rank is not None:  # a member left dense is counted on its own (as zero)
                by_rank.setdefault(int(st.rank), {})[info.name] = model.get_submodule(info.name)
        modules: dict[str, nn.Module] = {}
        for rank, members in by_rank.items():  # members whose ranks differ form groups apart
            modules.update(build_group(method, rank, members))
        if modules:
            out[k] = modules
    return out


class _LayerBuilder:
    """Builds compressed variants of one Linear, reusing factorizations and magnitude masks;
    with `tied`, a rank builds the tied table and head together (factorizing the head)."""

    def __init__(
        self,
        linear: nn.Linear,
        sparsities: list[float],
        stats: Callable[[], InputStats | None] | None = None,
        tied: _Tied | None = None,
    ) -> None:
        self.named = linear
        self.tied = tied
        self.linear = tied.head if tied is not None else linear  # the matrix factorized
        if tied is not None:  # a data-aware rank reads the head's inputs
            stats = functools.partial(_stats_of, tied.head_in, tied.head.weight.shape[0])
        self.sparsities = [s for s in sparsities if s > 0]
        self.stats = stats  # the calibration inputs' moments, asked only for a data-aware rank
        self._factors: dict[tuple[int, str], LowRankLinear] = {}
        self._transforms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._svds: dict[str, tuple[torch.Tensor, ...]] = {}
        self._masks: dict[tuple[int | None, float, tuple[int, int] | None], tuple] = {}
        self._stats_value: InputStats | None = None
        self._stats_done = False

    def _input_stats(self) -> InputStats | None:
        """The calibration inputs' moments, computed on first need and kept."""
        if not self._stats_done:
            self._stats_value = self.stats() if self.stats else None
            self._stats_done = True
        return self._stats_value

    def _rows(self, method: str) -> torch.Tensor | None:
        """D's diagonal for a data-aware rank on a tied pair (the table's token frequencies)."""
        if self.tied is None or method == "plain":
            return None
        table_stats = _stats_of(self.tied.table_in, self.tied.table.weight.shape[0])
        if table_stats is None:
            raise ValueError(f"rank method {method!r} on a tied pair needs the table's inputs")
        return frequency_rows(table_stats.gram)

    def factors(self, rank: int, method: str = "plain") -> LowRankLinear:
        if (rank, method) not in self._factors:
            transform = None
            if method != "plain":
                if method not in self._transforms:  # one per method, for every rank
                    self._transforms[method] = rank_transform(method, self._input_stats())
                transform = self._transforms[method]
            rows = self._rows(method)
            if method not in self._svds:  # one decomposition serves every rank, as in a trial
                self._svds[method] = weight_svd(self.linear.weight, transform, rows=rows)
            self._factors[(rank, method)] = factorize(
                self.linear, rank, svd=self._svds[method], transform=transform, rows=rows
            )
        return self._factors[(rank, method)]

    def build_counted(
        self, setting: LayerPolicy, act_scale: torch.Tensor | None
    ) -> tuple[nn.Module, nn.Module]:
        """The named layer's module under `setting`, and what to count for it: the module
        itself, or for a rank on a tied layer both sides of the pair together."""
        if self.tied is None or setting.rank is None:
            module = self.build(setting, act_scale)
            return module, module
        pair = self._pair(setting, act_scale)
        named = pair[0] if isinstance(self.named, nn.Embedding) else pair[1]
        return named, nn.ModuleList(pair)

    def _pair(
        self, setting: LayerPolicy, act_scale: torch.Tensor | None
    ) -> tuple[nn.Module, nn.Module]:
        """Both sides of the tied pair under `setting` (the SVD family from this builder's
        kept decomposition and masks; another method that ties builds its own)."""
        tied = self.tied
        if tied is None:
            raise ValueError("not a tied layer")
        if setting.rank_method == "tt" or setting.rank_method in GROUP_METHODS:
            return compress_tied(tied.table, tied.head, setting, act_scale=act_scale)
        factors = self.factors(setting.rank, setting.rank_method)
        return compress_tied(
            tied.table,
            tied.head,
            setting,
            act_scale=act_scale,
            factors=factors,
            masks=self._factor_masks(setting, factors),
            stats=self._input_stats() if setting.data_aware else None,
        )

    def _factor_masks(self, setting: LayerPolicy, factors: LowRankLinear | None) -> tuple | None:
        if not (setting.sparsity > 0 and setting.prune_method == "magnitude"):
            return None
        key = (setting.rank, setting.sparsity, setting.block)
        if key not in self._masks:
            mats = [self.linear] if factors is None else [factors.first, factors.second]
            per_matrix = [
                magnitude_masks(mat.weight, self.sparsities, setting.block) for mat in mats
            ]
            for i, s in enumerate(self.sparsities):
                self._masks[(setting.rank, s, setting.block)] = tuple(m[i] for m in per_matrix)
        return self._masks[key]

    def build(self, setting: LayerPolicy, act_scale: torch.Tensor | None) -> nn.Module:
        if self.tied is not None and setting.rank is not None:
            return self.build_counted(setting, act_scale)[0]
        if setting.rank_method == "tt" or setting.rank_method in GROUP_METHODS:
            return compress_layer(self.linear, setting)  # alone: a group of one
        factors = (
            self.factors(setting.rank, setting.rank_method) if setting.rank is not None else None
        )
        masks = self._factor_masks(setting, factors)
        stats = self._input_stats() if setting.data_aware else None
        return compress_layer(
            self.linear, setting, act_scale=act_scale, factors=factors, masks=masks, stats=stats
        )


GRAM_TAIL = 1e-6
"""Share of the input Gram matrix's trace the proxy's factor may leave out (see `gram_factor`)."""
PROXY_RANK = 128
"""The most directions of the input Gram matrix the proxy keeps exactly (see `gram_factor`):
an error costs O(out x in x (rank + sketch)), so a wide layer's proxy stays a few thin matrix
products per option however many calibration rows it reads."""
PROXY_SKETCH = 64
"""Random directions that stand for the rest of the Gram matrix past `PROXY_RANK`."""


def gram_factor(
    rows: torch.Tensor,
    tail: float = GRAM_TAIL,
    max_rank: int = PROXY_RANK,
    sketch: int = PROXY_SKETCH,
) -> torch.Tensor:
    """L (in, k) with L L^T = G = rows^T rows, so an output error ||D X^T||^2 =
    trace(D G D^T) is ||D L||^2 at O(out x in x k) instead of O(out x in^2).

    With no more rows than inputs and `max_rank + sketch` L is rows^T itself (exact);
    otherwise the top eigenvectors of G scaled by the roots of their eigenvalues, as few as
    carry all but `tail` of its trace (the error left out is at most `tail` x trace(G) x
    ||D||_2^2). When that takes more than `max_rank + sketch`, `max_rank` are kept and the rest
    R of G (the rows off the kept directions) is stood for by `sketch` Gaussian combinations of
    those rows, drawn from a seed of the rows' shape (the same on every worker): E[L L^T] = G
    exactly, and an error's rest term trace(D R D^T) is estimated within a relative standard
    deviation of sqrt(2 / sketch) at worst (far less for an error spread over many directions,
    as rounding and pruning errors are)."""
    n, d = rows.shape
    if n <= d and n <= max_rank + sketch:
        return rows.T.to(torch.float32).contiguous()
    x = rows.to(torch.float64)
    if n < d:  # G's nonzero spectrum from the smaller n x n side: L = X^T U
        values, small = torch.linalg.eigh(x @ x.T)
        values, small = values.clamp_min(0.0).flip(0), small.flip(1)
        vectors = None
    else:
        values, vectors = torch.linalg.eigh(x.T @ x)  # ascending
        values, vectors = values.clamp_min(0.0).flip(0), vectors.flip(1)
    total = float(values.sum())
    if total <= 0.0:
        return rows.new_zeros((d, 1), dtype=torch.float32)
    # the tail beyond k: total - cumsum[k-1]; keep the fewest k whose tail is within budget
    left = total - torch.cumsum(values, 0)
    need = int((left > tail * total).sum()) + 1
    k = need if need <= max_rank + sketch else max_rank  # exact when that is no wider
    if vectors is None:
        factor = x.T @ small[:, :k]
    else:
        factor = vectors[:, :k] * values[:k].sqrt()[None, :]
    if need > k:  # the rest, sketched: rest_rows^T S / sqrt(s), E[.. ..^T] = rest^T rest
        if vectors is None:  # the rows with the kept directions taken out
            rest_rows = x - small[:, :k] @ (small[:, :k].T @ x)
        else:
            rest_rows = x - (x @ vectors[:, :k]) @ vectors[:, :k].T
        gen = torch.Generator().manual_seed(n * 1_000_003 + d)
        mix = torch.randn(n, sketch, generator=gen, dtype=torch.float64) / sketch**0.5
        mix = mix.to(x.device)  # drawn on the CPU: the same numbers on every device
        factor = torch.cat([factor, rest_rows.T @ mix], dim=1)
    return factor.to(torch.float32).contiguous()


class _Proxy:
    """Relative output error of compressed variants of one layer on its calibration inputs.

    The error of a weight change D on inputs X (rows) is ||D X^T||^2 = ||D L||^2 with L the
    factor of the inputs' Gram matrix (`gram_factor`); a low-rank pair B A is projected as
    B (A L), never formed."""

    def __init__(
        self,
        linear: nn.Linear,
        layer_in: tuple[torch.Tensor, torch.Tensor] | None,
        tail: float = GRAM_TAIL,
    ) -> None:
        self.weight = linear.weight.detach().to(torch.float32)
        self._weight_err: dict[tuple[int | None, float, int], float] = {}
        self._act_err: dict[int, float] = {}
        self.rows, self.amax = layer_in if layer_in is not None else (None, None)
        if self.rows is not None:  # inputs sent from elsewhere: onto the layer's device
            self.rows = self.rows.to(self.weight.device)
            self.amax = self.amax.to(self.weight.device)
        self.row_weight: torch.Tensor | None = None
        self.factor: torch.Tensor | None = None
        self.tokens = 0
        if self.rows is not None and not self.rows.is_floating_point():
            # an embedding: the output error of a lookup is its row's error, so rows weigh by
            # how often the calibration tokens look them up
            ids = self.rows.reshape(-1)
            self.tokens = ids.numel()
            counts = torch.bincount(ids, minlength=self.weight.shape[0]).to(torch.float32)
            self.row_weight = counts / max(float(counts.sum()), 1.0)
            self.rows = None
            self.ref = max(float((self.row_weight[:, None] * self.weight**2).sum()), 1e-30)
        if self.rows is not None:
            self.factor = gram_factor(self.rows, tail)
            self.projected = self.weight @ self.factor  # W L: every error subtracts it
            self.ref = max(float((self.projected.double() ** 2).sum()), 1e-30)

    def stats(self) -> InputStats | None:
        """The sampled inputs' moments (what a data-aware method reads), or None; for a table
        its token frequencies (the diagonal of a one-hot input's Gram matrix)."""
        if self.row_weight is not None:
            return InputStats(self.row_weight.double(), self.row_weight.double(), self.tokens)
        if self.rows is None:
            return None
        rows = self.rows.double()
        n = max(rows.shape[0], 1)
        return InputStats(rows.T @ rows / n, rows.abs().sum(0) / n, rows.shape[0])

    def act_scale(self, act_bits: int) -> torch.Tensor | None:
        if act_bits >= 32:
            return None
        amax = self.amax if self.amax is not None else torch.tensor(1.0)
        return tensor_scale(amax, act_bits)

    def weight_error(
        self, setting: LayerPolicy, builder: _LayerBuilder, module: nn.Module | None = None
    ) -> float:
        """Relative output error of the weights alone (`module`: already built for `setting`)."""
        key = (setting.rank, setting.sparsity, setting.bits)
        if key not in self._weight_err:
            if setting.rank is None and setting.sparsity == 0 and setting.bits == 32:
                self._weight_err[key] = 0.0
            else:
                if module is None:
                    module = builder.build(replace(setting, act_bits=32), None)
                if self.row_weight is not None:
                    diff = _effective_weight(module).to(torch.float32) - self.weight
                    err = float((self.row_weight[:, None] * diff**2).sum())
                else:
                    err = float((self._project_diff(module).double() ** 2).sum())
                self._weight_err[key] = err / self.ref
        return self._weight_err[key]

    def _project_diff(self, module: nn.Module) -> torch.Tensor:
        """(W' - W) L for the module's effective weight W' (a low-rank pair as B (A L))."""
        if isinstance(module, LowRankLinear) and not isinstance(module, LowRankEmbedding):
            first = _effective_weight(module.first).to(torch.float32)
            second = _effective_weight(module.second).to(torch.float32)
            return second @ (first @ self.factor) - self.projected
        diff = _effective_weight(module).to(torch.float32) - self.weight
        return diff @ self.factor

    def act_error(self, act_bits: int) -> float:
        if act_bits >= 32:
            return 0.0
        if act_bits not in self._act_err:
            scale = self.act_scale(act_bits)
            delta = (
                fake_quantize_symmetric(self.rows, scale.to(torch.float64), act_bits) - self.rows
            )
            self._act_err[act_bits] = float(((delta @ self.weight.T) ** 2).sum()) / self.ref
        return self._act_err[act_bits]

    def single_error(self, knob: str, setting: LayerPolicy, builder: _LayerBuilder) -> float:
        """Relative output error of `setting`'s `knob` alone (the other knobs at identity)."""
        if knob == "act_bits":
            return self.act_error(setting.act_bits)
        value = getattr(setting, knob)
        if value == identity_level(knob):
            return 0.0
        single = LayerPolicy(
            **{knob: value, "block": setting.block if knob == "sparsity" else None}
        )
        return self.weight_error(single, builder)

    def ratio(self, setting: LayerPolicy, builder: _LayerBuilder, module: nn.Module) -> float:
        """Error of the combination over the sum of its knobs' errors alone (1 if all zero)."""
        whole = self.weight_error(setting, builder, module) + self.act_error(setting.act_bits)
        alone = sum(
            self.single_error(knob, setting, builder)
            for knob in ("act_bits", "sparsity", "bits", "rank")
        )
        return whole / alone if alone > 1e-15 else 1.0
