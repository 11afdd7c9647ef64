"""`Space`: which layers of a model may be compressed, with which knobs, and how rules match.

Rules map a selector to settings. A selector is a glob over dotted layer names
(``"blocks.*.mlp.*"``), a regular expression prefixed ``re:`` (full match), or a module type
(``nn.Linear``). Precedence: a rule whose selector is the exact layer name wins; otherwise the first
matching rule in order wins. ``tied=True`` in a rule makes its layers share one value per knob.
Everything is checked when the space is built, before any trial runs.
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from microsweep.errors import SpaceError, SpaceWarning
from microsweep.spaces._knobs import Bits, Knob, Rank, Sparsity
from microsweep.spaces._policy import (
    DENSE_METHODS,
    GROUP_METHODS,
    VALID_BITS,
    LayerPolicy,
    Policy,
    concrete_block,
)

if TYPE_CHECKING:
    import optuna

__all__ = ["LayerInfo", "Space", "Unit", "layer_policy"]

LAYER_KNOBS = ("sparsity", "bits", "act_bits", "rank")
_RULE_KEYS = frozenset([*LAYER_KNOBS, "tied"])


@dataclass(frozen=True)
class LayerInfo:
    """A compressible layer: its name, shape (an embedding table (V, d) is V "out" rows of d
    "in" columns, as a tied output head sees it), the other modules that share its weight, and
    its `kind`: ``"linear"``, ``"embedding"`` or ``"lstm_gate"`` (a gate matrix of an LSTM)."""

    name: str
    out_features: int
    in_features: int
    shared_with: tuple[str, ...] = ()
    kind: str = "linear"

    @property
    def full_rank(self) -> int:
        return min(self.out_features, self.in_features)


@dataclass(frozen=True)
class Unit:
    """Layers that take one setting together: a single layer, or all layers of a tied rule.

    `knobs` maps each layer knob of the rule to its knob (constants included); `params` maps the
    knobs that are searched to their Optuna parameter names.
    """

    key: str
    layers: tuple[LayerInfo, ...]
    knobs: Mapping[str, Knob]
    params: Mapping[str, str]


@dataclass(frozen=True)
class _Rule:
    key: str  # how the rule was written, for messages and parameter names
    selector: str | type
    settings: Mapping[str, Any]
    tied: bool

    def matches(self, name: str, module: nn.Module) -> bool:
        if isinstance(self.selector, type):
            return isinstance(module, self.selector)
        if self.selector.startswith("re:"):
            return re.fullmatch(self.selector[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.selector)


def _linear_layers(model: nn.Module) -> dict[str, tuple[nn.Module, LayerInfo]]:
    """Every compressible matrix by name: Linear layers, embedding tables and the gate
    matrices of `nn.LSTM`s (matched by rules through their LSTM module), in model order."""
    from microsweep.models import gate_names

    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)

    def shared(weight: nn.Parameter, own: str) -> tuple[str, ...]:
        return tuple(o.rsplit(".", 1)[0] for o in owners[id(weight)] if o != own)

    layers: dict[str, tuple[nn.Module, LayerInfo]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            tied = shared(module.weight, f"{name}.weight")
            info = LayerInfo(name, module.out_features, module.in_features, tied)
            layers[name] = (module, info)
        elif type(module) is nn.Embedding:
            v, d = module.weight.shape
            info = LayerInfo(name, v, d, shared(module.weight, f"{name}.weight"), "embedding")
            layers[name] = (module, info)
        elif type(module) is nn.LSTM:
            for gate in gate_names(module.num_layers, module.bidirectional, module.proj_size):
                out_f, in_f = getattr(module, gate).shape
                full = f"{name}.{gate}" if name else gate
                layers[full] = (module, LayerInfo(full, out_f, in_f, (), "lstm_gate"))
    return layers


def _resolve_rank(value: float | int, info: LayerInfo, block: tuple[int, int] | None) -> int | None:
    """`Rank.resolve` for a layer, rounded down to whole blocks (at least one) when the layer
    is pruned in `block`s; None (dense) when that reaches the break-even or the full rank."""
    rank = Rank.resolve(value, info.out_features, info.in_features)
    if rank is None or block is None:
        return rank
    step = math.lcm(block[0] or 1, block[1] or 1)
    rank = max(step, rank // step * step)
    if rank > info.full_rank or rank >= Rank.break_even(info.out_features, info.in_features):
        return None
    return rank


def _misfit(rule: _Rule, info: LayerInfo) -> str | None:
    """Why a pattern rule's settings cannot apply to embedding table `info`, or None."""
    act = rule.settings.get("act_bits")
    if isinstance(act, Bits) and any(b < 32 for b in act.choices):
        return "its input is token ids, so act_bits does not apply"
    rank = rule.settings.get("rank")
    if isinstance(rank, Rank):
        if rank.method not in ("plain", "tt"):
            return f"a table takes Rank(..., method='plain' or 'tt') only, not {rank.method!r}"
        if info.shared_with:
            return f"it is tied to {info.shared_with[0]!r} and rank would untie it"
    return None


def layer_policy(
    info: LayerInfo, knobs: Mapping[str, Knob], values: Mapping[str, Any], group: str
) -> LayerPolicy:
    """The `LayerPolicy` of one layer for knob values in Optuna units (rank fractions resolve to
    the layer's rank; knobs not given stay at identity). `group` names the unit (the tied
    rule's key, or the layer) that a grouped rank method compresses together. With block
    sparsity a rank is rounded down to a whole number of blocks (at least one), so both factors
    tile."""
    sparsity = float(values.get("sparsity", 0.0))
    knob = knobs.get("sparsity")
    block = knob.block if isinstance(knob, Sparsity) and sparsity > 0 else None
    rank_knob = knobs.get("rank")
    method = rank_knob.method if isinstance(rank_knob, Rank) else "plain"
    value = values.get("rank")
    rank = None if value is None else _resolve_rank(value, info, block)
    return LayerPolicy(
        sparsity=sparsity,
        block=block,
        bits=int(values.get("bits", 32)),
        act_bits=int(values.get("act_bits", 32)),
        rank=rank,
        rank_method=method,
        group=group if method in GROUP_METHODS else None,
    )


def _check_setting(rule: str, key: str, value: Any) -> Any:
    """Validate a constant or a knob given for a layer setting."""
    if isinstance(value, Knob):
        expected = {"sparsity": Sparsity, "bits": Bits, "act_bits": Bits, "rank": Rank}[key]
        if not isinstance(value, expected):
            raise SpaceError(f"rule {rule!r}: {key} takes {expected.__name__}(...), not {value!r}")
        return value
    if key == "sparsity":
        return (
            Sparsity(float(value), float(value))
            if isinstance(value, (int, float))
            else _bad(rule, key, value)
        )
    if key in ("bits", "act_bits"):
        if isinstance(value, int) and value in VALID_BITS:
            return Bits(value)
        return _bad(rule, key, value)
    if key == "rank":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return Rank(value)
        return _bad(rule, key, value)
    raise AssertionError(key)  # unreachable: keys are checked by the caller


def _bad(rule: str, key: str, value: Any) -> Any:
    raise SpaceError(f"rule {rule!r}: {key}={value!r} is not valid; use a knob such as Bits(4, 8)")


class Space:
    """A search space over a model's Linear layers, embedding tables and LSTM gate matrices,
    plus plain hyperparameters.

    An `nn.LSTM` whose gate matrices a rule names (``"lstm.weight_hh_l0"``, as torch names the
    parameter) is swapped in the model for a `microsweep.models.LinearLSTM` sharing its
    parameters (the same numbers, one Linear per gate matrix), so those matrices compress like
    Linear layers.

    ``Space(model, rules={"blocks.*.mlp.*": dict(sparsity=Sparsity(0, 0.9), bits=Bits(4, 8))},
    hyper={"finetune_lr": Float(1e-5, 1e-3, log=True)})``
    """

    def __init__(
        self,
        model: nn.Module,
        rules: Mapping[str | type, Mapping[str, Any]],
        hyper: Mapping[str, Knob] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise SpaceError(f"Space: model must be a torch.nn.Module, got {type(model).__name__}")
        if not rules:
            raise SpaceError("Space: rules is empty; name at least one layer pattern to compress")
        self.model = model
        self._layers = _linear_layers(model)
        if not self._layers:
            raise SpaceError(
                "Space: the model has no nn.Linear, nn.Embedding or nn.LSTM layers to compress"
            )
        self.rules = [self._parse_rule(sel, settings) for sel, settings in rules.items()]
        self.hyper: dict[str, Knob] = {}
        for key, knob in (hyper or {}).items():
            if not isinstance(knob, Knob) or isinstance(knob, (Sparsity, Bits, Rank)):
                raise SpaceError(f"hyper {key!r}: use Choice, Float or Int, not {knob!r}")
            if ":" in key:
                raise SpaceError(f"hyper {key!r}: names may not contain ':'")
            self.hyper[key] = knob
        self.assignment = self._assign()
        for rule in self.rules:
            self._validate(rule)
        self._gate_lstms()
        self.notes = self._taken + self._hygiene()
        for note in self.notes:
            warnings.warn(note, SpaceWarning, stacklevel=2)

    # -- definition-time checks -------------------------------------------------------------
    def _parse_rule(self, selector: str | type, settings: Mapping[str, Any]) -> _Rule:
        if isinstance(selector, type):
            if not issubclass(selector, nn.Module):
                raise SpaceError(f"rule {selector!r}: a type selector must be an nn.Module class")
            key = f"{selector.__module__}.{selector.__qualname__}"
        elif isinstance(selector, str) and selector:
            key = selector
            if selector.startswith("re:"):
                try:
                    re.compile(selector[3:])
                except re.error as exc:
                    raise SpaceError(f"rule {selector!r}: bad regular expression ({exc})") from None
        else:
            raise SpaceError(f"rule {selector!r}: use a name pattern string or an nn.Module type")
        if not isinstance(settings, Mapping):
            raise SpaceError(f"rule {key!r}: settings must be a dict like dict(bits=Bits(4, 8))")
        unknown = set(settings) - _RULE_KEYS
        if unknown:
            raise SpaceError(
                f"rule {key!r}: unknown setting(s) {sorted(unknown)}; use {sorted(_RULE_KEYS)}"
            )
        tied = bool(settings.get("tied", False))
        checked = {k: _check_setting(key, k, v) for k, v in settings.items() if k != "tied"}
        return _Rule(key, selector, checked, tied)

    def _assign(self) -> dict[str, _Rule]:
        assignment: dict[str, _Rule] = {}
        self._taken: list[str] = []  # notes on embedding tables that patterns took or left
        for name, (module, info) in self._layers.items():
            exact = [r for r in self.rules if r.selector == name]
            matching = exact or [r for r in self.rules if r.matches(name, module)]
            if matching:
                why = None if exact or info.kind != "embedding" else _misfit(matching[0], info)
                if why:
                    self._taken.append(
                        f"rule {matching[0].key!r} leaves embedding {name!r} alone: {why}"
                    )
                    continue
                assignment[name] = matching[0]
        for name in list(assignment):  # a tied table a pattern took: its head keeps the weight
            info, rule = self._layers[name][1], assignment[name]
            if info.kind != "embedding" or rule.selector == name:
                continue
            partner = next((p for p in info.shared_with if p in assignment), None)
            if partner is not None:
                del assignment[name]
                self._taken.append(
                    f"rule {rule.key!r} leaves embedding {name!r} alone: its weight is tied to "
                    f"{partner!r}, which the rules compress"
                )
            else:
                self._taken.append(
                    f"rule {rule.key!r} also takes embedding table {name!r}; name Linear "
                    "layers only to leave it dense"
                )
        for rule in self.rules:
            if not any(r is rule for r in assignment.values()):
                matched_any = any(rule.matches(n, m) for n, (m, _) in self._layers.items())
                names = ", ".join(list(self._layers)[:6])
                if matched_any:
                    raise SpaceError(
                        f"rule {rule.key!r} is shadowed: exact names or earlier patterns "
                        "take all its layers"
                    )
                conv1d = any(type(m).__name__ == "Conv1D" for m in self.model.modules())
                hint = (
                    "; this model has transformers Conv1D layers (GPT-2): pass "
                    "microsweep.models.hf(model) to Space, which makes them Linear"
                    if conv1d
                    else ""
                )
                raise SpaceError(
                    f"rule {rule.key!r} matches no Linear, Embedding or LSTM gate matrix; "
                    f"layer names are like: {names}{hint}"
                )
        return assignment

    def _gate_lstms(self) -> None:
        """Swap each `nn.LSTM` with an assigned gate matrix for a `LinearLSTM` (same
        parameters), and point the gate entries at their Linears."""
        from microsweep.models import linear_gates_

        owners = {n.rpartition(".")[0] for n in self.assignment if self._layers[n][1].kind
                  == "lstm_gate"}  # fmt: skip
        if not owners:
            return
        linear_gates_(self.model, sorted(owners))
        for name, (_, info) in list(self._layers.items()):
            if info.kind == "lstm_gate" and name.rpartition(".")[0] in owners:
                self._layers[name] = (self.model.get_submodule(name), info)

    def _validate(self, rule: _Rule) -> None:
        rank_knob = rule.settings.get("rank")
        method = rank_knob.method if isinstance(rank_knob, Rank) else "plain"
        if method in DENSE_METHODS:
            for key in ("sparsity", "bits", "act_bits"):
                knob = rule.settings.get(key)
                if knob is not None and not (knob.is_constant and knob.suggest(None, key) in (
                    0.0, 32)):  # fmt: skip
                    raise SpaceError(
                        f"rule {rule.key!r}: Rank(..., method={method!r}) keeps its factors "
                        f"dense at fp32; drop {key} from this rule"
                    )
        if method == "shared":
            members = self.layers_of(rule)
            if not rule.tied:
                raise SpaceError(
                    f"rule {rule.key!r}: Rank(..., method='shared') shares one basis across "
                    "the rule's layers; add tied=True"
                )
            if len({i.in_features for i in members}) > 1:
                raise SpaceError(
                    f"rule {rule.key!r}: a shared basis needs layers with one input size; "
                    f"{members[0].name!r} and others differ"
                )
        if method in GROUP_METHODS:
            if method == "autoencoder" and rule.tied:
                if len({i.in_features for i in self.layers_of(rule)}) > 1:
                    raise SpaceError(
                        f"rule {rule.key!r}: a joint decoder (tied=True) needs layers with one "
                        "input size; split the rule or drop tied"
                    )
        for info in self.layers_of(rule):
            if info.kind == "embedding":
                self._validate_embedding(rule, info)
            both = [n for n in info.shared_with if n in self.assignment]
            if both:
                raise SpaceError(
                    f"layers {info.name!r} and {both[0]!r} share one weight (tied); give "
                    "compression settings to only one of them"
                )
            rank = rule.settings.get("rank")
            if rank is not None and info.shared_with:
                raise SpaceError(
                    f"layer {info.name!r} shares its weight with {info.shared_with[0]!r}; "
                    "low-rank factorization would untie it: drop rank from its rule"
                )
            if isinstance(rank, Rank) and rank.values is not None:
                too_big = [v for v in rank.values if v > info.full_rank]
                if too_big:
                    raise SpaceError(
                        f"rule {rule.key!r}: rank {too_big[0]} is above layer {info.name!r}'s "
                        f"full rank {info.full_rank}; use ranks in 1..{info.full_rank}"
                    )
            sparsity = rule.settings.get("sparsity")
            if isinstance(sparsity, Sparsity) and sparsity.block is not None:
                shape = (info.out_features, info.in_features)
                br, bc = concrete_block(sparsity.block, shape)
                if shape[0] % br or shape[1] % bc:
                    raise SpaceError(
                        f"rule {rule.key!r}: block {sparsity.block} does not tile layer "
                        f"{info.name!r} of shape ({info.out_features}, {info.in_features})"
                    )
                if rank is not None and info.kind == "embedding" and shape[1] % br:
                    raise SpaceError(  # its projection factor is (d, rank)
                        f"rule {rule.key!r}: block {sparsity.block} with rank needs its row "
                        f"side to divide embedding {info.name!r}'s width {shape[1]}"
                    )

    @staticmethod
    def _validate_embedding(rule: _Rule, info: LayerInfo) -> None:
        """A rule that names a table (pattern rules skip it, see `_assign`) must fit it."""
        why = _misfit(rule, info)
        if why:
            raise SpaceError(
                f"rule {rule.key!r}: layer {info.name!r} is an embedding table and {why}; give "
                "it a rule of its own without that setting"
            )

    def _hygiene(self) -> list[str]:
        """Levels the scoring rules make wasteful, one note per rule and knob."""
        notes = []
        for rule in self.rules:
            sparsity, bits = rule.settings.get("sparsity"), rule.settings.get("bits")
            if isinstance(sparsity, Sparsity) and sparsity.high > 0:
                per_value = 1.0
                if sparsity.block is not None:
                    first = self.layers_of(rule)[0]
                    br, bc = concrete_block(sparsity.block, (first.out_features, first.in_features))
                    per_value = 1.0 / (br * bc)
                widths = sorted(bits.choices) if isinstance(bits, Bits) else [32]
                # sparse storage is (1 - s) * b + (mask bits per value) against b for dense
                even = [(b, per_value / b) for b in widths]
                below = [f"{e:.3g} at w{b}" for b, e in even if 0 < e and sparsity.low < e]
                if below:
                    notes.append(
                        f"rule {rule.key!r}: sparsity below the mask break-even "
                        f"({', '.join(below)}) stores more bits than the dense layer; it still "
                        "saves operations"
                    )
            rank = rule.settings.get("rank")
            if isinstance(rank, Rank):
                dense: dict[str, list[str]] = {}
                for info in self.layers_of(rule):
                    even = Rank.break_even(info.out_features, info.in_features)
                    if rank.values is not None:
                        if any(v >= even for v in rank.values):
                            dense.setdefault(f"ranks >= {even}", []).append(info.name)
                    elif rank.high is not None and round(rank.high * info.full_rank) >= even:
                        frac = f"fractions >= {even / info.full_rank:.3g}"
                        dense.setdefault(frac, []).append(info.name)
                if dense:
                    parts = []
                    for what, names in dense.items():
                        more = f" and {len(names) - 2} more" if len(names) > 2 else ""
                        parts.append(f"{what} on {', '.join(names[:2])}{more}")
                    notes.append(
                        f"rule {rule.key!r}: ranks at or past the break-even leave the layer "
                        f"dense ({'; '.join(parts)})"
                    )
        return notes

    # -- queries ----------------------------------------------------------------------------
    @property
    def layers(self) -> list[LayerInfo]:
        """The layers some rule controls, in model order."""
        return [self._layers[name][1] for name in self.assignment]

    def layers_of(self, rule: _Rule) -> list[LayerInfo]:
        return [self._layers[n][1] for n, r in self.assignment.items() if r is rule]

    def param_name(self, layer: str, knob: str) -> str:
        """The Optuna parameter that sets `knob` of `layer` (the rule's name when tied)."""
        rule = self.assignment.get(layer)
        if rule is None or knob not in rule.settings:
            raise SpaceError(f"layer {layer!r} has no knob {knob!r} in this space")
        return f"{rule.key}:{knob}" if rule.tied else f"{layer}:{knob}"

    def units(self) -> list[Unit]:
        """The allocation units in model order: each untied layer alone, each tied rule whole."""
        units: dict[str, Unit] = {}
        for name, rule in self.assignment.items():
            info = self._layers[name][1]
            key = rule.key if rule.tied else name
            if key in units:
                old = units[key]
                units[key] = Unit(key, (*old.layers, info), old.knobs, old.params)
                continue
            params = {
                knob: self.param_name(name, knob)
                for knob, value in rule.settings.items()
                if not value.is_constant
            }
            units[key] = Unit(key, (info,), dict(rule.settings), params)
        return list(units.values())

    def policy_for(
        self, choices: Mapping[str, Mapping[str, Any]], hyper: Mapping[str, Any] | None = None
    ) -> Policy:
        """The policy that gives each unit (by key) its knob values, in the units Optuna sees
        (fractions for fractional ranks); knobs not given take their constant value."""
        layers: dict[str, LayerPolicy] = {}
        known = {u.key for u in self.units()}
        unknown = set(choices) - known
        if unknown:
            raise SpaceError(
                f"unknown unit(s) {sorted(unknown)[:3]}; units are layer names or tied rules"
            )
        for name, rule in self.assignment.items():
            info = self._layers[name][1]
            given = choices.get(rule.key if rule.tied else name, {})
            values = {}
            for key, knob in rule.settings.items():
                if key in given:
                    values[key] = given[key]
                elif knob.is_constant:
                    values[key] = knob.suggest(None, key)  # type: ignore[arg-type]
                else:
                    raise SpaceError(f"unit of layer {name!r} has no value for knob {key!r}")
            layers[name] = self._layer_policy(info, rule, values)
        return Policy(layers=layers, hyper=dict(hyper or {}))

    def params_for(
        self, choices: Mapping[str, Mapping[str, Any]], hyper: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Optuna parameter values that make `suggest` return `policy_for(choices, hyper)`
        (for `study.enqueue_trial`)."""
        params: dict[str, Any] = {}
        for unit in self.units():
            given = choices.get(unit.key, {})
            for knob, pname in unit.params.items():
                if knob not in given:
                    raise SpaceError(f"unit {unit.key!r} has no value for knob {knob!r}")
                params[pname] = given[knob]
        params.update(hyper or {})
        return params

    def params_from_policy(self, policy: Policy) -> dict[str, Any]:
        """Optuna parameter values that make `suggest` return `policy` (a warm start, e.g. the
        policy file 'microsweep show --json' writes). A layer the policy leaves out is taken as
        uncompressed; a policy this space cannot produce is refused, naming the first layer or
        knob that differs. Hyperparameters the policy lacks are left to the sampler."""
        import warnings

        import optuna

        unknown = [n for n in policy.layers if n not in self.assignment]
        if unknown:
            raise SpaceError(
                f"the policy names layer(s) this space does not search: {', '.join(unknown[:3])}"
                f"{' ...' if len(unknown) > 3 else ''}; was it written for another model?"
            )
        params: dict[str, Any] = {}
        for unit in self.units():
            lp = policy.layers.get(unit.layers[0].name, LayerPolicy())
            for knob, pname in unit.params.items():
                if knob == "rank":
                    wanted = [
                        (policy.layers.get(i.name, LayerPolicy()).rank, i) for i in unit.layers
                    ]
                    params[pname] = self._rank_param(unit.knobs["rank"], wanted, lp.block)
                else:
                    params[pname] = getattr(lp, knob)
        for key in self.hyper:
            if key in policy.hyper:
                params[key] = policy.hyper[key]
        fixed = dict(params)
        for key, knob in self.hyper.items():  # only the layers are checked: any value does here
            if key not in fixed:
                choices = getattr(knob, "choices", None)
                fixed[key] = choices[0] if choices else getattr(knob, "low", None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # FixedTrial only warns on a value out of range
            try:
                got = self.suggest(optuna.trial.FixedTrial(fixed))
            except (UserWarning, ValueError) as exc:
                raise SpaceError(f"the policy does not fit this space: {exc}") from None
        for name in self.assignment:
            want = policy.layers.get(name, LayerPolicy())
            have = got.layers[name]
            if want != have:
                raise SpaceError(
                    f"the policy gives layer {name!r} {want}, which this space cannot produce "
                    f"(its rule gives {have}); check the policy was written for this space"
                )
        return params

    @staticmethod
    def _rank_param(
        knob: Rank,
        wanted: list[tuple[int | None, LayerInfo]],
        block: tuple[int, int] | None = None,
    ) -> float | int:
        """The rank knob's value (a fraction or an explicit rank) that resolves to each
        layer's wanted rank (one value for all layers of a tied rule); the first layer's best
        guess when none does (the check that follows names the mismatch)."""

        def fits(value: float | int) -> bool:
            return all(_resolve_rank(value, i, block) == r for r, i in wanted)

        if knob.values is not None:
            candidates: list[float | int] = list(knob.values)
        else:
            low, high = float(knob.low), float(knob.high)
            # the fractions that round to every layer's rank: the middle of the intervals'
            # intersection, then each layer's own fraction and the range's ends
            lo, hi = low, high
            step = math.lcm(block[0] or 1, block[1] or 1) if block else 1
            for rank, info in wanted:  # every raw rank in [r, r + step) rounds to r
                if rank is not None:
                    lo = max(lo, (rank - 0.5) / info.full_rank)
                    hi = min(hi, (rank + step - 0.5) / info.full_rank)
            candidates = [(lo + hi) / 2] if lo < hi else []
            candidates += [low, high]
            for rank, info in wanted:
                if rank is not None:
                    candidates.append(min(max(rank / info.full_rank, low), high))
        for value in candidates:
            if fits(value):
                return value
        rank, info = wanted[0]
        if knob.values is not None:
            return rank if rank is not None else knob.values[-1]
        return float(knob.high) if rank is None else rank / info.full_rank

    # -- suggestion -------------------------------------------------------------------------
    def suggest(self, trial: optuna.trial.BaseTrial) -> Policy:
        """Ask `trial` for every knob and return the plain `Policy` it describes."""
        tied_values: dict[tuple[str, str], Any] = {}
        layers: dict[str, LayerPolicy] = {}
        for name, rule in self.assignment.items():
            info = self._layers[name][1]
            values: dict[str, Any] = {}
            for key, knob in rule.settings.items():
                if rule.tied:
                    if (rule.key, key) not in tied_values:
                        tied_values[(rule.key, key)] = knob.suggest(trial, f"{rule.key}:{key}")
                    values[key] = tied_values[(rule.key, key)]
                else:
                    values[key] = knob.suggest(trial, f"{name}:{key}")
            layers[name] = self._layer_policy(info, rule, values)
        hyper = {key: knob.suggest(trial, key) for key, knob in self.hyper.items()}
        return Policy(layers=layers, hyper=hyper)

    @staticmethod
    def _layer_policy(info: LayerInfo, rule: _Rule, values: Mapping[str, Any]) -> LayerPolicy:
        return layer_policy(info, rule.settings, values, rule.key if rule.tied else info.name)

    def to_json(self) -> dict[str, Any]:
        """A description for the store: rules with their knobs, layers, hyperparameters."""
        return {
            "rules": [
                {
                    "selector": r.key,
                    "tied": r.tied,
                    "settings": {k: v.to_json() for k, v in r.settings.items()},
                    "layers": [i.name for i in self.layers_of(r)],
                    "shapes": [[i.out_features, i.in_features] for i in self.layers_of(r)],
                }
                for r in self.rules
            ],
            "hyper": {k: v.to_json() for k, v in self.hyper.items()},
        }

    def __repr__(self) -> str:
        n_layers, n_rules, n_hyper = len(self.assignment), len(self.rules), len(self.hyper)
        return f"Space({n_layers} layers, {n_rules} rules, {n_hyper} hyper)"
