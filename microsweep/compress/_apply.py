"""`compress_`, `compress` and `project_`: apply a `Policy` to a model's Linear layers.

Every layer is checked before anything changes, so a bad policy raises `SpaceError` and leaves
the model's layers as they were (an `nn.LSTM` named by a gate may already run as the equivalent
`LinearLSTM`). Per layer the steps run in this order: calibrate input scales on the
unchanged model, factorize (rank), prune (sparsity, block), quantize weights (bits), and attach
the input quantizer (act_bits). A rank on a weight one table and one Linear share (a tied
embedding and head) builds both together as the factorized tied pair (`compress_tied`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from microsweep.errors import SpaceError
from microsweep.policy import GROUP_METHODS, METHODS, LayerPolicy, Policy

from ._banding import build_bands, head_name, plan_bands, split_bands
from ._checks import check_shared_weight, check_tied_rank
from ._groups import grouped
from ._lowrank import InputStats, factorize, frequency_rows
from ._modules import CompressedLinear, LowRankLinear
from ._obs import quantize_groups
from ._quantize import quantize_rows, tensor_scale
from ._techniques import (
    Given,
    LayerCheck,
    RankTechnique,
    compress_matrix,
    technique,
    techniques,
    tensor_train,
)

__all__ = [
    "compress",
    "compress_",
    "compress_layer",
    "compress_tied",
    "group_modules",
    "input_stats",
    "layer_inputs",
    "project_",
    "tensor_train",
]


@dataclass(frozen=True)
class _Step:
    """One validated layer to compress: its name, the Linear (or Embedding) found there and
    its settings; with a rank on a tied weight, the module sharing it (`partner`, by name)."""

    name: str
    linear: nn.Linear | nn.Embedding
    settings: LayerPolicy
    partner_name: str | None = None
    partner: nn.Module | None = None

    def tied(self) -> tuple[str, nn.Embedding, str, nn.Linear]:
        """(table name, table, head name, head) of a tied step."""
        if self.partner is None or self.partner_name is None:
            raise ValueError(f"layer {self.name!r} is not a tied pair")
        if isinstance(self.linear, nn.Embedding):
            return self.name, self.linear, self.partner_name, self.partner  # type: ignore[return-value]
        return self.partner_name, self.partner, self.name, self.linear  # type: ignore[return-value]

    @property
    def key(self) -> str:
        """What the step's variant is filed under: its name, or a tied pair's two names."""
        if self.partner is None:
            return self.name
        table, _, head, _ = self.tied()
        return f"{table}+{head}"


def compress_(model: nn.Module, policy: Policy, *, calib: torch.Tensor | None = None) -> nn.Module:
    """Compress the Linear layers named in `policy` in place and return `model`.

    Order per layer: factorize to `rank` (truncated SVD), prune each resulting weight to
    `sparsity` (by magnitude, unstructured or in `block`s), round weights to `bits` with
    per-output-channel scales (pruned zeros kept), then quantize inputs to `act_bits` with a
    static scale calibrated by running `calib` token ids through the model before any change.

    Layers named ``"X@b"`` are frequency bands of table or head ``X`` (see `LayerPolicy.band`):
    their words are ranked by frequency in `calib`, each changed band is compressed as above,
    and ``X`` (with a table or head tied to it) becomes a banded module.
    """
    if not isinstance(policy, Policy):
        raise SpaceError(
            f"policy is a {type(policy).__name__}, not a microsweep Policy; "
            "build one with Policy(layers={name: LayerPolicy(...)})"
        )
    policy, banded = split_bands(policy)
    steps = _plan(model, policy, calib)
    bands = plan_bands(model, banded, calib, policy.layers) if banded else []
    act_scales = _calibrate(model, [s for s in steps if s.settings.act_bits < 32], calib)
    band_amax = _band_amax(model, bands, calib)
    aware = {s.name: s.linear for s in steps if METHODS[s.settings.rank_method].reads_inputs}
    reads = {s.name: s.linear for s in steps if s.settings.data_aware} | aware
    for step in steps:  # a tied pair reads its head's inputs (and, data-aware, its table's)
        if step.partner is not None and step.name in reads:
            table_name, table, head_name, head = step.tied()
            reads[head_name] = head
            if step.name in aware:
                reads[table_name] = table
    stats = input_stats(model, reads, calib) if reads else {}
    built: dict[str, nn.Module] = {}
    for (method, _, rank), members in grouped(steps).items():
        built.update(build_group(method, rank, {s.name: s.linear for s in members}))
    with torch.no_grad():
        for step in steps:
            if step.name in built:
                _set_submodule(model, step.name, built[step.name])
                continue
            if step.partner is not None:
                scale = act_scales.get(step.name)
                _compress_tied_step(model, step, scale, stats, step.name in aware)
                continue
            factors = None
            if step.name in aware:
                if step.name not in stats:
                    raise SpaceError(
                        f"layer {step.name!r} saw no input while calibrating; its data-aware "
                        "rank needs calib tokens whose forward pass runs through it"
                    )
                transform = _rank_technique(step.settings).transform(stats[step.name])
                factors = factorize(step.linear, step.settings.rank, transform=transform)
            gram = _gram(step, stats)
            module = _compress_layer(
                step.linear, step.settings, act_scales.get(step.name), factors, gram=gram
            )
            _set_submodule(model, step.name, module)
        build_bands(model, bands, _compress_layer, band_amax)
    return model


def compress_layer(
    linear: nn.Linear,
    settings: LayerPolicy,
    *,
    act_scale: torch.Tensor | None = None,
    factors: LowRankLinear | None = None,
    masks: tuple[torch.Tensor | None, ...] | None = None,
    stats: InputStats | None = None,
) -> nn.Module:
    """The module `linear` becomes under `settings`, built from copies (nothing is modified).

    For evaluating many settings of one layer: `factors` is `linear` already factorized at
    ``settings.rank`` (see `factorize`) and `masks` the magnitude masks of each matrix (one, or
    one per factor), so neither is computed again. `act_scale` is the input scale for
    ``settings.act_bits`` (calibrated by `compress_` on real inputs); `stats` the layer's input
    statistics, which data-aware pruning and quantization read (see `input_stats`).
    """
    if settings.rank is not None and METHODS[settings.rank_method].dense_only:
        return _compress_layer(linear, settings, None)  # built from copies, never in place
    gram = stats.gram if stats is not None and settings.data_aware else None
    if settings.data_aware and gram is None:
        raise SpaceError(
            "data-aware pruning or quantization reads the layer's inputs; pass stats= (see "
            "input_stats)"
        )
    with torch.no_grad():
        if settings.rank is not None and factors is not None:
            if factors.rank != settings.rank:
                raise SpaceError(f"factors of rank {factors.rank} given for rank {settings.rank}")
            pair = type(factors)(_clone(factors.first), _clone(factors.second))
            pair = pair.train(factors.training)
            return _compress_layer(linear, settings, act_scale, pair, masks, gram=gram)
        return _compress_layer(_clone(linear), settings, act_scale, None, masks, gram=gram)


def compress_tied(
    table: nn.Embedding,
    head: nn.Linear,
    settings: LayerPolicy,
    *,
    act_scale: torch.Tensor | None = None,
    factors: LowRankLinear | None = None,
    masks: tuple[torch.Tensor | None, ...] | None = None,
    stats: InputStats | None = None,
) -> tuple[nn.Module, nn.Module]:
    """The (table, head) modules a table and the Linear tied to it become under `settings` (a
    rank by a method that ties), built from copies (nothing is modified).

    As `compress_layer` for the head: `factors` is the head factorized at the rank (see
    `tied_factors` for the data-aware methods), `masks` the magnitude masks of both factors,
    `stats` the head's input statistics (data-aware pruning and quantization read them)."""
    if settings.rank is None:
        raise SpaceError("a tied pair is built at a rank; give the layer's settings one")
    gram = stats.gram if stats is not None and settings.data_aware else None
    if settings.data_aware and gram is None:
        raise SpaceError(
            "data-aware pruning or quantization reads the head's inputs; pass stats= (see "
            "input_stats)"
        )
    with torch.no_grad():
        if factors is not None:
            if factors.rank != settings.rank:
                raise SpaceError(f"factors of rank {factors.rank} given for rank {settings.rank}")
            factors = type(factors)(_clone(factors.first), _clone(factors.second))
            factors = factors.train(head.training)
        else:
            head = _clone(head)
        given = Given(act_scale, factors, masks or (None, None), gram)
        return _rank_technique(settings).build_tied(table, head, settings, given)


def tied_factors(
    head: nn.Linear,
    rank: int,
    method: str,
    head_stats: InputStats | None,
    table_stats: InputStats | None,
    *,
    svd: tuple[torch.Tensor, ...] | None = None,
) -> LowRankLinear:
    """The tied head's weight W (V, d) factorized for a data-aware rank `method`: the truncated
    SVD of D W T, T from the head's inputs (as the method's `transform` makes it) and D the
    table's row frequencies (`frequency_rows`), so A B minimizes ||D (W - A B) T||."""
    if head_stats is None or table_stats is None:
        raise SpaceError(
            f"rank method {method!r} on a tied table and head reads the head's inputs and the "
            "table's token frequencies; pass calib tokens whose forward pass runs through both"
        )
    transform = _rank_technique_named(method).transform(head_stats)
    if not table_stats.diagonal:
        raise SpaceError("table_stats must be a table's token frequencies (see input_stats)")
    rows = frequency_rows(table_stats.gram)
    return factorize(head, rank, svd=svd, transform=transform, rows=rows)


def _compress_tied_step(
    model: nn.Module,
    step: _Step,
    act_scale: torch.Tensor | None,
    stats: dict[str, InputStats],
    aware: bool,
) -> None:
    """Build a tied step's pair in place of both its modules."""
    table_name, table, head_name, head = step.tied()
    settings = step.settings
    needed = [head_name] if aware or settings.data_aware else []
    for name in needed + ([table_name] if aware else []):
        if name not in stats:
            raise SpaceError(
                f"layer {name!r} saw no input while calibrating; the data-aware methods on its "
                "tied pair need calib tokens whose forward pass runs through it"
            )
    factors = None
    if aware:
        factors = tied_factors(
            head, settings.rank, settings.rank_method, stats[head_name], stats[table_name]
        )
    gram = stats[head_name].gram if settings.data_aware else None
    given = Given(act_scale, factors, (None, None), gram)
    new_table, new_head = _rank_technique(settings).build_tied(table, head, settings, given)
    _set_submodule(model, table_name, new_table)
    _set_submodule(model, head_name, new_head)


def _clone(linear: nn.Module) -> nn.Module:
    """A copy of a Linear with its own weight and bias (a plain Linear is rebuilt directly,
    much faster than a deep copy; anything else is deep-copied)."""
    if type(linear) is not nn.Linear:
        return copy.deepcopy(linear)
    out = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(out)
    out.in_features, out.out_features = linear.in_features, linear.out_features
    out.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    bias = linear.bias
    out.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
    return out.train(linear.training)


def compress(model: nn.Module, policy: Policy, *, calib: torch.Tensor | None = None) -> nn.Module:
    """A compressed deep copy of `model`; the original is left untouched (ties kept in the copy)."""
    return compress_(copy.deepcopy(model), policy, calib=calib)


def project_(model: nn.Module) -> nn.Module:
    """Put every `CompressedLinear` back on its mask and grid, e.g. after a fine-tuning step.

    Pruned entries return to zero and weights are re-rounded to their `bits` with per-row (or
    per-row-and-group) scales recomputed from the current values; `weight_scale` is updated.
    """
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, CompressedLinear):
                continue
            weight = module.weight
            mask = module.mask if module.sparse else None
            if mask is not None:
                weight.mul_(mask)
            if module.bits < 32:
                group = getattr(module, "group", None)
                if group is None:
                    q, scale = quantize_rows(weight, module.bits, mask)
                else:
                    q, scale = quantize_groups(weight, module.bits, group, mask)
                weight.copy_(q)
                module.weight_scale = scale.to(weight.dtype)
    return model


def _plan(model: nn.Module, policy: Policy, calib: torch.Tensor | None) -> list[_Step]:
    """Check every non-identity layer setting against the model; raise before changing any
    layer. An `nn.LSTM` whose gate matrices the policy names is swapped for a `LinearLSTM`
    first (the same parameters and outputs; kept even when a later check refuses the policy).
    Each technique the settings ask for checks the layer too (`Technique.check_layer`)."""
    _gate_lstms_(model, [n for n, lp in policy.layers.items() if not lp.is_identity])
    module_names: dict[int, list[str]] = {}
    param_owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(mod), []).append(mod_name)
        for _, param in mod.named_parameters(recurse=False, remove_duplicate=False):
            param_owners.setdefault(id(param), []).append(mod_name)
    weight_users: dict[int, str] = {}
    steps = []
    for name, settings in policy.layers.items():
        if not isinstance(settings, LayerPolicy):
            raise SpaceError(
                f"layer {name!r} has settings of type {type(settings).__name__}; "
                "use a LayerPolicy(sparsity=..., bits=...)"
            )
        if settings.is_identity:
            continue
        linear = _find_linear(model, name)
        aliases = [n for n in module_names[id(linear)] if n != name]
        if aliases:
            raise SpaceError(
                f"layer {name!r} is the same module as {aliases[0]!r}; compressing one name "
                "would leave the other uncompressed, so give each use its own Linear"
            )
        wid = id(linear.weight)
        check_shared_weight(weight_users.get(wid, name), [name] if wid in weight_users else [])
        weight_users[wid] = name
        others = [n for n in param_owners[wid] if n != name]
        _check_rank(name, linear, settings, [(n, _kind(model.get_submodule(n))) for n in others])
        partner_name = others[0] if others and settings.rank is not None else None
        partner = model.get_submodule(partner_name) if partner_name is not None else None
        layer = LayerCheck(name, linear, settings, calib is not None, partner)
        for tech in techniques():
            if tech.applies(settings):
                tech.check_layer(layer)
        steps.append(_Step(name, linear, settings, partner_name, partner))
    if calib is not None and not isinstance(calib, torch.Tensor):
        raise SpaceError(
            f"calib is a {type(calib).__name__}; pass a LongTensor of token ids of shape (B, T)"
        )
    return steps


def _kind(module: nn.Module) -> str:
    """How the tied-weight check names a module holding a weight."""
    if type(module) is nn.Embedding:
        return "embedding"
    return "linear" if isinstance(module, nn.Linear) else type(module).__name__


def _check_rank(
    name: str,
    linear: nn.Linear | nn.Embedding,
    settings: LayerPolicy,
    others: list[tuple[str, str]],
) -> None:
    """What every rank method needs of a layer: a rank it has, and a weight no other module
    holds unless the method builds the factorized tied pair of one table and one Linear
    (`others`: (name, kind) of the other holders); a table must also keep torch's plain
    lookups."""
    if isinstance(linear, nn.Embedding) and (linear.max_norm is not None or linear.sparse):
        raise SpaceError(
            f"embedding {name!r} uses max_norm or sparse gradients, which compression does not "
            "keep; build it without them"
        )
    if settings.rank is None:
        return
    out_f, in_f = linear.weight.shape
    limit = min(out_f, in_f)
    if settings.rank > limit:
        raise SpaceError(
            f"rank {settings.rank} for layer {name!r} is above min(out, in) = {limit} "
            f"of its {out_f}x{in_f} weight; use a rank in 1..{limit}"
        )
    check_tied_rank(name, _kind(linear), others, settings.rank_method)


def _gate_lstms_(model: nn.Module, names: list[str]) -> None:
    """Run each `nn.LSTM` that owns one of `names` as a gate matrix as a `LinearLSTM`."""
    from microsweep.models import gate_names, linear_gates_

    owners = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(parent)
        except AttributeError:
            continue
        if type(module) is nn.LSTM:
            if leaf not in gate_names(module.num_layers, module.bidirectional, module.proj_size):
                continue  # not a gate matrix: _find_linear names the problem
            owners.append(parent)
    if owners:
        linear_gates_(model, owners)


def _find_linear(model: nn.Module, name: str) -> nn.Linear | nn.Embedding:
    """The `nn.Linear` (or `nn.Embedding`) at dotted `name`, or a `SpaceError` listing a few
    that exist."""
    try:
        module = model.get_submodule(name) if name else None
    except AttributeError:
        module = None
    if type(module) is nn.Embedding or isinstance(module, nn.Linear):
        return module
    found = "no such submodule" if module is None else f"found {type(module).__name__}"
    examples = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:3]
    hint = f"such as {', '.join(map(repr, examples))}" if examples else "(the model has none)"
    raise SpaceError(
        f"layer {name!r} is not a Linear, Embedding or LSTM gate matrix in this model ({found}); "
        f"name a compressible layer {hint}"
    )


def _observe(
    model: nn.Module,
    modules: dict[str, nn.Module],
    calib: torch.Tensor,
    record: Callable[[str, torch.Tensor], None],
) -> None:
    """Run `calib` through `model` once, calling `record(name, input)` for each of `modules`
    it passes through; eval mode (dropout does not move the statistics), no gradients, and
    the training flags restored."""

    def recorder(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            record(name, args[0].detach())

        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in modules.items()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(calib)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training


def layer_inputs(
    model: nn.Module, modules: dict[str, nn.Module], calib: torch.Tensor, *, max_rows: int = 0
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """What each of `modules` (name -> module of `model`) sees when `calib` runs through the
    model once: name -> (up to `max_rows` input rows as (n, in) float32, or None when
    `max_rows` is 0; max |input| over every row). An embedding's rows are its token ids,
    (n, 1) int64."""
    seen: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def record(name: str, x: torch.Tensor) -> None:
        if not x.is_floating_point():  # an embedding's token ids: kept as one (n, 1) column
            x = x.reshape(-1, 1)
        amax = x.abs().amax()
        rows = x.reshape(-1, x.shape[-1]) if max_rows else None
        if rows is not None and rows.is_floating_point():
            rows = rows.to(torch.float32)
        if name in seen:
            old_rows, old_amax = seen[name]
            amax = torch.maximum(old_amax, amax)
            if rows is not None and old_rows is not None:
                rows = torch.cat([old_rows, rows])
        seen[name] = (rows[:max_rows] if rows is not None else None, amax)

    _observe(model, modules, calib, record)
    return seen


def input_stats(
    model: nn.Module, modules: dict[str, nn.Module], calib: torch.Tensor
) -> dict[str, InputStats]:
    """The Gram matrix and mean |x| of each of `modules`' inputs over one pass of `calib`
    (float64), for data-aware factorization, pruning and quantization. An embedding's inputs
    are one-hot tokens: its statistics are the (V,) frequencies of its token ids, the diagonal
    of their Gram matrix (see `InputStats`)."""
    acc: dict[str, list[Any]] = {}

    def record(name: str, x: torch.Tensor) -> None:
        if not x.is_floating_point():  # token ids: count them, the one-hot Gram's diagonal
            ids = x.reshape(-1)
            table = modules[name].weight.shape[0]
            counts = torch.bincount(ids, minlength=table).to(torch.float64)
            entry = acc.setdefault(name, [torch.zeros(table, dtype=torch.float64), None, 0])
            entry[0] += counts
            entry[2] += ids.numel()
            return
        rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
        if name not in acc:
            n = rows.shape[1]
            zeros = rows.new_zeros
            acc[name] = [zeros((n, n)), zeros(n), 0]
        entry = acc[name]
        entry[0] += rows.T @ rows
        entry[1] += rows.abs().sum(0)
        entry[2] += rows.shape[0]

    _observe(model, modules, calib, record)
    stats = {}
    for name, (gram, abs_sum, n) in acc.items():
        gram = gram / max(n, 1)
        stats[name] = InputStats(gram, gram if abs_sum is None else abs_sum / max(n, 1), n)
    return stats


def _calibrate(
    model: nn.Module, steps: list[_Step], calib: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Static input scales: max|x| / qmax seen by each layer over one pass of `calib`."""
    if not steps or calib is None:
        return {}
    seen = layer_inputs(model, {s.name: s.linear for s in steps}, calib)
    scales = {}
    for step in steps:
        if step.name not in seen:
            raise SpaceError(
                f"layer {step.name!r} saw no input while calibrating; pass calib tokens "
                "whose forward pass runs through it, or set its act_bits to 32"
            )
        scales[step.name] = tensor_scale(seen[step.name][1], step.settings.act_bits)
    return scales


def _band_amax(
    model: nn.Module, plans: list[Any], calib: torch.Tensor | None
) -> Callable[[str], torch.Tensor]:
    """max |input| of each head whose bands quantize its input, from one pass of `calib` on
    the unchanged model (before any band is built)."""
    heads = {
        head_name(p) or p.name for p in plans if any(s.act_bits < 32 for s in p.bands.values())
    }
    seen = layer_inputs(model, {h: model.get_submodule(h) for h in heads}, calib) if heads else {}

    def amax(head: str) -> torch.Tensor:
        if head not in seen:
            raise SpaceError(
                f"head {head!r} saw no input while calibrating; pass calib tokens whose forward "
                "pass runs through it, or set its bands' act_bits to 32"
            )
        return seen[head][1]

    return amax


def _rank_technique(settings: LayerPolicy) -> RankTechnique:
    """The registered technique of ``settings.rank_method``."""
    return _rank_technique_named(settings.rank_method)


def _rank_technique_named(method: str) -> RankTechnique:
    """The registered rank technique called `method`."""
    tech = technique(method)
    if not isinstance(tech, RankTechnique):
        raise SpaceError(f"{method!r} is not a rank method")
    return tech


def _compress_layer(
    linear: nn.Linear,
    settings: LayerPolicy,
    act_scale: torch.Tensor | None,
    factors: LowRankLinear | None = None,
    masks: tuple[torch.Tensor | None, ...] | None = None,
    *,
    gram: torch.Tensor | None = None,
) -> nn.Module:
    """The module `linear` becomes: the rank technique of its settings builds it (taking
    `factors` where given), or the matrix techniques prune and quantize its weight in place
    (optionally with precomputed `masks`, and the input `gram` for data-aware methods)."""
    masks = masks or (None, None)
    if settings.rank is None:
        return compress_matrix(linear, settings, act_scale, masks[0], gram)
    given = Given(act_scale, factors, masks, gram)
    return _rank_technique(settings).build(linear, settings, given)


def _gram(step: _Step, stats: dict[str, InputStats]) -> torch.Tensor | None:
    """The Gram matrix of a data-aware step's inputs, refused when calibration missed it."""
    if not step.settings.data_aware:
        return None
    if step.name not in stats:
        raise SpaceError(
            f"layer {step.name!r} saw no input while calibrating; data-aware pruning or "
            "quantization needs calib tokens whose forward pass runs through it"
        )
    return stats[step.name].gram


def group_modules(
    method: str, rank: int, linears: dict[str, nn.Module], *, seed: int = 0
) -> dict[str, nn.Module]:
    """The modules a group's layers become under a grouped rank `method` (see GROUP_METHODS)."""
    for name, lin in linears.items():
        if not isinstance(lin, nn.Linear):
            raise SpaceError(
                f"layer {name!r} is a {type(lin).__name__}; rank method {method!r} takes Linear "
                "layers (and LSTM gate matrices) only"
            )
    if method not in GROUP_METHODS:
        raise SpaceError(f"rank method {method!r} is not one of {', '.join(GROUP_METHODS)}")
    tech = technique(method)
    if not isinstance(tech, RankTechnique):
        raise SpaceError(f"{method!r} is not a rank method")
    return tech.build_group(rank, linears, seed=seed)


def build_group(method: str, rank: int, linears: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """`group_modules`, built from copies (the technique turns gradients on where it trains)."""
    return group_modules(method, rank, linears)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
