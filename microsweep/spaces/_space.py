"""`Space`: which layers of a model may be compressed, with which knobs, and how rules match.

Rules map a selector to settings. A selector is a glob over dotted layer names
(``"blocks.*.mlp.*"``), a regular expression prefixed ``re:`` (full match), or a module type
(``nn.Linear``). Precedence: a rule whose selector is the exact layer name wins; otherwise the first
matching rule in order wins. ``tied=True`` in a rule makes its layers share one value per knob.
Everything is checked when the space is built, before any trial runs. A space describes the
model and never changes it.

The rooms: `_layers` finds the compressible layers, `_rules` parses rules and assigns layers,
`_checks` refuses what a rule cannot do, `_notes` says what is valid but wasteful, `_params`
goes between policies and Optuna parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from microsweep.errors import SpaceError, SpaceWarning
from microsweep.policy import GROUP_METHODS, Policy
from microsweep.spaces import _params
from microsweep.spaces._bands import check_band_rule, expand_bands
from microsweep.spaces._checks import check_gate_owners, check_rule
from microsweep.spaces._knobs import Bits, Knob, Rank, Sparsity
from microsweep.spaces._layers import LayerInfo, Unit, find_layers
from microsweep.spaces._notes import hygiene, table_notes
from microsweep.spaces._params import layer_policy
from microsweep.spaces._rules import Rule, assign, parse_hyper, parse_rule

if TYPE_CHECKING:
    import optuna

__all__ = ["LayerInfo", "Space", "Unit", "layer_policy"]


class Space:
    """A search space over a model's Linear layers, embedding tables and LSTM gate matrices,
    plus plain hyperparameters.

    A gate matrix of an `nn.LSTM` is named as torch names the parameter
    (``"lstm.weight_hh_l0"``); the space only describes it. Preparing the model for a sweep
    (`microsweep.prepare`) or compressing it runs that LSTM as a `microsweep.models.LinearLSTM`
    sharing its parameters, so its gate matrices compress like Linear layers.

    ``Space(model, rules={"blocks.*.mlp.*": dict(sparsity=Sparsity(0, 0.9), bits=Bits(4, 8))},
    hyper={"finetune_lr": Float(1e-5, 1e-3, log=True)})``

    ``bands=Bands(0.1, 0.3)`` in a rule cuts each table or output head it takes into frequency
    bands, each a layer of its own (``"head@0"``, ``"head@1"``, ...; see `Bands`).
    """

    def __init__(
        self,
        model: nn.Module,
        rules: Mapping[str | type, Mapping[str, Any]],
        hyper: Mapping[str, Knob] | None = None,
    ) -> None:
        """Find the model's layers, parse and assign the rules, check them and give the notes
        (as `SpaceWarning`s and in `notes`); the model itself is left as it is."""
        if not isinstance(model, nn.Module):
            raise SpaceError(f"Space: model must be a torch.nn.Module, got {type(model).__name__}")
        if not rules:
            raise SpaceError("Space: rules is empty; name at least one layer pattern to compress")
        self.model = model
        found = find_layers(model)
        if not found:
            raise SpaceError(
                "Space: the model has no nn.Linear, nn.Embedding or nn.LSTM layers to compress"
            )
        self._layers = {name: info for name, (_, info) in found.items()}
        self.rules: list[Rule] = [parse_rule(sel, settings) for sel, settings in rules.items()]
        self.hyper: dict[str, Knob] = parse_hyper(hyper)
        self.assignment, tables = assign(self.rules, found, model)
        for rule in self.rules:
            if rule.bands is not None:
                check_band_rule(rule, self.layers_of(rule), self.assignment)
            else:
                check_rule(rule, self.layers_of(rule), self.assignment, self._layers)
        check_gate_owners(self.layers)
        self.assignment = expand_bands(self.assignment, self._layers)
        self.notes = table_notes(tables) + hygiene(self.rules, self.layers_of)
        for note in self.notes:
            warnings.warn(note, SpaceWarning, stacklevel=2)
        # knobs that name no method, as given: `use_default_methods` fills them in
        self._left_out: list[tuple[Rule, str, Sparsity | Bits]] = [
            (rule, key, knob)
            for rule in self.rules
            for key, knob in rule.settings.items()
            if key in ("sparsity", "bits") and knob.method is None
        ]

    # -- methods left out -------------------------------------------------------------------
    def use_default_methods(self, calibrated: bool) -> None:
        """Give every Sparsity and Bits knob that names no method the default: with
        calibration tokens SparseGPT and GPTQ (act-order), which lose far less than magnitude
        and round-to-nearest at equal size; without them magnitude and round-to-nearest. A
        rule the data-aware methods do not fit (a tensor-train or grouped rank) keeps the
        plain ones; a table reads its token frequencies."""
        for rule, key, knob in self._left_out:
            aware = calibrated and self._fits_data_aware(rule)
            if isinstance(knob, Sparsity):
                rule.settings[key] = knob.with_method("sparsegpt" if aware else "magnitude")
            else:
                rule.settings[key] = knob.with_method("gptq" if aware else "rtn", aware)

    def pin_methods(self, stored: Mapping[str, Any]) -> None:
        """Give each knob that names no method the method a stored sweep's space description
        (`to_json`) records for it, so a sweep resumes and exports with the methods it ran
        with; a knob the description gives none had the plain method."""
        rules = stored.get("rules", []) if isinstance(stored, Mapping) else []
        for rule, key, knob in self._left_out:
            index = self.rules.index(rule)
            saved = rules[index].get("settings", {}).get(key, {}) if index < len(rules) else {}
            if isinstance(knob, Sparsity):
                rule.settings[key] = knob.with_method(saved.get("method", "magnitude"))
            else:
                method = saved.get("method", "rtn")
                rule.settings[key] = knob.with_method(method, bool(saved.get("act_order", False)))

    def _fits_data_aware(self, rule: Rule) -> bool:
        """Whether the data-aware methods apply to the layers of `rule` at every rank."""
        rank = rule.settings.get("rank")
        return rule.bands is None and not (
            isinstance(rank, Rank) and (rank.method == "tt" or rank.method in GROUP_METHODS)
        )

    # -- queries ----------------------------------------------------------------------------
    @property
    def layers(self) -> list[LayerInfo]:
        """The layers some rule controls, in model order."""
        return [self._layers[name] for name in self.assignment]

    def info(self, name: str) -> LayerInfo:
        """The description of compressible layer `name` (controlled by a rule or not)."""
        return self._layers[name]

    def layers_of(self, rule: Rule) -> list[LayerInfo]:
        """The layers `rule` controls, in model order."""
        return [self._layers[n] for n, r in self.assignment.items() if r is rule]

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
            info = self._layers[name]
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

    # -- policies and Optuna parameters -----------------------------------------------------
    def policy_for(
        self, choices: Mapping[str, Mapping[str, Any]], hyper: Mapping[str, Any] | None = None
    ) -> Policy:
        """The policy that gives each unit (by key) its knob values, in the units Optuna sees
        (fractions for fractional ranks); knobs not given take their constant value."""
        return _params.policy_for(self, choices, hyper)

    def params_for(
        self, choices: Mapping[str, Mapping[str, Any]], hyper: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Optuna parameter values that make `suggest` return `policy_for(choices, hyper)`
        (for `study.enqueue_trial`)."""
        return _params.params_for(self, choices, hyper)

    def params_from_policy(self, policy: Policy) -> dict[str, Any]:
        """Optuna parameter values that make `suggest` return `policy` (a warm start, e.g. the
        policy file 'microsweep show --json' writes). A layer the policy leaves out is taken as
        uncompressed; a policy this space cannot produce is refused, naming the first layer or
        knob that differs. Hyperparameters the policy lacks are left to the sampler."""
        return _params.params_from_policy(self, policy)

    def suggest(self, trial: optuna.trial.BaseTrial) -> Policy:
        """Ask `trial` for every knob and return the plain `Policy` it describes."""
        return _params.suggest(self, trial)

    # -- description ------------------------------------------------------------------------
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
                    **({} if r.bands is None else {"bands": r.bands.to_json()}),
                }
                for r in self.rules
            ],
            "hyper": {k: v.to_json() for k, v in self.hyper.items()},
        }

    def __repr__(self) -> str:
        """How many layers, rules and hyperparameters the space has."""
        n_layers, n_rules, n_hyper = len(self.assignment), len(self.rules), len(self.hyper)
        return f"Space({n_layers} layers, {n_rules} rules, {n_hyper} hyper)"
