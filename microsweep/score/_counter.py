"""`count()`: MicroNet parameters (32-bit equivalents) and ops per token of a PyTorch model.

The counter walks ``model.named_modules()``, asks each module's rule for its `Cost`, then
resolves what no single rule can know: which module's storage spec a shared tensor follows (a
compressed layer's spec wins, and the tensor is counted once), whether the 16-bit freebie applies
(nothing anywhere below 16 bits), and the 32-bit-equivalent weight of every op.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from numbers import Real
from typing import Any

import torch
from torch import nn

import microsweep.score._rules  # noqa: F401  (registers the built-in rules)
from microsweep.errors import UsageError
from microsweep.score._config import CountConfig
from microsweep.score._formulas import block_pattern, mask_bits, op_weight, tensor_bits
from microsweep.score._registry import Cost, RuleContext, Stored, find_rule, rules_on_need
from microsweep.score._trace import check_uncounted

__all__ = ["FREEBIE_BITS", "Counts", "LayerCount", "count", "storage_key", "store_priority"]

FREEBIE_BITS = 16
_CONTAINERS = (nn.ParameterList, nn.ParameterDict)
"""Parameter holders counted by their parent module's rule, never on their own."""


def _hf_rules() -> bool:
    """Register the rules for transformers' GPT-2 and Llama modules (on first need)."""
    from microsweep.score._hf_rules import register_hf_rules

    return register_hf_rules()


rules_on_need("transformers.", _hf_rules)


@dataclass(frozen=True)
class LayerCount:
    """The count of one module, excluding its children.

    Storage in raw bits (`value_bits` for stored values, `mask_bits` for bitmasks, `const_bits`
    for quantizer constants) and `params` = their sum / 32. Ops per token raw (`mults`, `adds`,
    `others`) and weighted to 32-bit equivalents (`*_w`); `ops` is the weighted sum.
    """

    name: str
    kind: str
    params: float = 0.0
    value_bits: int = 0
    mask_bits: int = 0
    const_bits: int = 0
    mults: float = 0.0
    adds: float = 0.0
    others: float = 0.0
    mults_w: float = 0.0
    adds_w: float = 0.0
    others_w: float = 0.0
    sparsity: float | None = None
    bits: int | None = None
    act_bits: int | None = None
    rank: int | None = None
    ops: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", self.mults_w + self.adds_w + self.others_w)

    def to_json(self) -> dict[str, Any]:
        """A plain dict (JSON-ready) of every field, for storage rows and reports."""
        return asdict(self)


@dataclass(frozen=True)
class Counts:
    """A whole-model count: per-layer rows, 32-bit-equivalent totals `params` and `ops` (per
    token), raw op totals, whether the 16-bit `freebie` was applied, and the inputs used."""

    layers: list[LayerCount]
    params: float
    ops: float
    mults: float
    adds: float
    others: float
    freebie: bool
    config: CountConfig
    context: float

    def to_json(self) -> dict[str, Any]:
        """Totals, the inputs of the count and one dict per layer, all JSON-ready."""
        return {
            "params": self.params,
            "ops": self.ops,
            "mults": self.mults,
            "adds": self.adds,
            "others": self.others,
            "freebie": self.freebie,
            "context": self.context,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }

    def table(self) -> str:
        """An aligned text table, one row per counted module (stored parameters in 32-bit
        equivalents, bitmask bits, weighted ops, raw ops by kind), the totals and the settings."""
        head = (
            "layer",
            "kind",
            "params",
            "mask bits",
            "ops",
            "mults",
            "adds",
            "others",
            "bits",
            "sparsity",
        )
        rows = [head]
        for lc in self.layers:
            width = "" if lc.bits is None else f"w{lc.bits}"
            if lc.act_bits is not None:
                width += f"/a{lc.act_bits}"
            if lc.rank is not None:
                width += f"r{lc.rank}"
            rows.append(
                (
                    lc.name or "<model>",
                    lc.kind,
                    f"{lc.params:,.2f}",
                    f"{lc.mask_bits:,}",
                    f"{lc.ops:,.2f}",
                    f"{lc.mults:,.1f}",
                    f"{lc.adds:,.1f}",
                    f"{lc.others:,.1f}",
                    width,
                    "" if lc.sparsity is None else f"{lc.sparsity:.3f}",
                )
            )
        total = (
            "total",
            "",
            f"{self.params:,.2f}",
            f"{sum(lc.mask_bits for lc in self.layers):,}",
            f"{self.ops:,.2f}",
            f"{self.mults:,.1f}",
            f"{self.adds:,.1f}",
            f"{self.others:,.1f}",
            "",
            "",
        )
        widths = [max(len(r[i]) for r in [*rows, total]) for i in range(len(head))]
        left = {0, 1, 8}

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        rule = "-" * len(line(head))
        cfg = self.config
        footer = (
            f"context {self.context:g} positions/token; 16-bit freebie "
            f"{'applied' if self.freebie else 'not applied'}; mask={cfg.mask}, "
            f"adds={cfg.adds}, fold_layernorm={cfg.fold_layernorm}, "
            f"attention={cfg.attention}, relu={cfg.relu}"
        )
        return "\n".join([line(head), rule, *map(line, rows[1:]), rule, line(total), footer])


def storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Identity of the stored data: views of the same memory with the same layout are one."""
    if tensor.device.type != "meta" and tensor.numel() > 0:
        return (
            "data",
            tensor.device.type,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
    return ("id", id(tensor))


def store_priority(stored: Stored) -> tuple[bool, bool]:
    """Which of several claims on one tensor decides how it is stored: a compressed module's
    spec beats a plain one, and a stored claim beats a folded one (larger wins)."""
    return (stored.compressed, not stored.folded)


def count(
    model: nn.Module,
    *,
    context: float,
    config: CountConfig = CountConfig(),  # noqa: B008
    example: torch.Tensor | None = None,
    uncounted_tolerance: float | None = None,
) -> Counts:
    """Count `model` by the MicroNet rules: parameters in 32-bit equivalents and ops per token,
    as if inference ran online at batch size 1.

    `context` is the mean number of positions each token attends to (for non-overlapping
    windows of T tokens, (T+1)/2: see `mean_context`). Raises `UsageError` for a module with
    its own parameters and no rule, or a parameter that no rule stores.

    Math the forward pass runs in a module no rule covers (a hand-written attention) would
    count as zero. Given `example` token ids (B, T), or an `uncounted_tolerance`, the forward
    runs once (8 zero ids without `example`) and such work past that fraction of the counted
    ops (default 0) is refused with a `UsageError` naming the module, as ``microsweep count``
    and ``run`` refuse it; within it, an `UncountedWarning`. Without either, a model with
    modules that could hide math (no rule, a forward of their own) is run on 8 zero ids the
    first time its structure is counted in a process, and uncounted work is reported with an
    `UncountedWarning`.
    """
    context = _checked(model, config, context)
    ctx = RuleContext(model, config, context)
    costs = _costs(model, ctx)
    owners = _owners(model, costs)
    widths = [s.bits for _, s in owners.values() if not (s.folded or s.index)]
    for _, cost in costs:
        widths += [b for _, b in cost.consts]
        widths += [b for m in cost.mults for b in (m.a_bits, m.b_bits)]
    freebie = config.freebie and all(w >= FREEBIE_BITS for w in widths)
    owned: dict[int, list[Stored]] = {}
    for i, stored in owners.values():
        if not stored.folded:
            owned.setdefault(i, []).append(stored)
    layers = [
        _layer_count(name, cost, owned.get(i, []), config, freebie)
        for i, (name, cost) in enumerate(costs)
    ]
    counts = Counts(
        layers=layers,
        params=sum(lc.value_bits + lc.mask_bits + lc.const_bits for lc in layers) / 32,
        ops=sum(lc.ops for lc in layers),
        mults=sum(lc.mults for lc in layers),
        adds=sum(lc.adds for lc in layers),
        others=sum(lc.others for lc in layers),
        freebie=freebie,
        config=config,
        context=context,
    )
    check_uncounted(model, counts.ops, example=example, tolerance=uncounted_tolerance)
    return counts


def _checked(model: nn.Module, config: CountConfig, context: float) -> float:
    """`count`'s arguments checked; the context as a float."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"count() needs an nn.Module, got {type(model).__name__}")
    if not isinstance(config, CountConfig):
        raise UsageError(f"config must be a CountConfig, got {type(config).__name__}")
    if isinstance(context, bool) or not isinstance(context, Real):
        raise UsageError(f"context {context!r} must be a number of attended positions")
    context = float(context)
    if not math.isfinite(context) or context < 1:
        raise UsageError(f"context {context!r} must be a finite number of positions >= 1")
    return context


def _costs(model: nn.Module, ctx: RuleContext) -> list[tuple[str, Cost]]:
    """Each module's `Cost` by its rule, in module order; a module with parameters of its own
    and no rule is an error."""
    costs: list[tuple[str, Cost]] = []
    for name, module in model.named_modules():
        rule = find_rule(type(module))
        if rule is None:
            if isinstance(module, _CONTAINERS):
                continue  # the parent's rule stores these; unclaimed ones are caught below
            if next(iter(module.named_parameters(recurse=False)), None) is not None:
                raise UsageError(
                    f"no MicroNet counting rule for {name or '<model>'!r} "
                    f"({type(module).__name__}); register one with microsweep.score.register_rule"
                )
            continue
        cost = rule(module, name, ctx)
        if not isinstance(cost, Cost):
            raise UsageError(
                f"the rule for {type(module).__name__} returned {type(cost).__name__}, not a Cost"
            )
        costs.append((name, cost))
    return costs


def _owners(
    model: nn.Module, costs: list[tuple[str, Cost]]
) -> dict[tuple[Any, ...], tuple[int, Stored]]:
    """Per stored tensor, the claim that decides how it is stored (and by which cost); every
    parameter of the model must be claimed."""
    owners: dict[tuple[Any, ...], tuple[int, Stored]] = {}
    for i, (_, cost) in enumerate(costs):
        for stored in cost.stores:
            key = storage_key(stored.tensor)
            held = owners.get(key)
            if held is None or store_priority(stored) > store_priority(held[1]):
                owners[key] = (i, stored)
    for pname, param in model.named_parameters():
        if storage_key(param) not in owners:
            mname = pname.rpartition(".")[0]
            mtype = type(model.get_submodule(mname)).__name__
            raise UsageError(
                f"parameter {pname!r} of {mname or '<model>'!r} ({mtype}) is stored by no rule; "
                "make re-parametrizations permanent or register a rule for its module"
            )
    return owners


def _layer_count(
    name: str, cost: Cost, owned: list[Stored], config: CountConfig, freebie: bool
) -> LayerCount:
    """One module's row: the bits of the tensors it owns, its constants and weighted ops."""

    def width(bits: int) -> int:
        return FREEBIE_BITS if freebie else bits

    value = mask = 0
    for stored in owned:
        t = stored.tensor.detach()
        if stored.index:  # integers at their own width: no mask, no allowance
            value += t.numel() * stored.bits
            continue
        as_sparse = stored.sparse or config.mask == "always"
        if stored.sparse and stored.block is not None:
            nz = int(block_pattern(t, stored.block).sum())  # kept blocks, whole
        else:
            nz = int(torch.count_nonzero(t)) if as_sparse else t.numel()
        value += tensor_bits(t.numel(), nz, width(stored.bits))
        if as_sparse:
            mask += mask_bits(t.shape, stored.block if stored.sparse else None)
    const = sum(n * width(b) for n, b in cost.consts)
    mults_w = sum(
        m.n * (FREEBIE_BITS / 32 if freebie else op_weight(m.a_bits, m.b_bits)) for m in cost.mults
    )
    return LayerCount(
        name=name,
        kind=cost.kind,
        params=(value + mask + const) / 32,
        value_bits=value,
        mask_bits=mask,
        const_bits=const,
        mults=float(sum(m.n for m in cost.mults)),
        adds=cost.adds,
        others=cost.others,
        mults_w=float(mults_w),
        adds_w=cost.adds,
        others_w=cost.others,
        sparsity=cost.sparsity,
        bits=cost.bits,
        act_bits=cost.act_bits,
        rank=cost.rank,
    )
