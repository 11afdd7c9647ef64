"""The compressible layers of a model, found by reading it (never changing it): Linear layers,
embedding tables and the gate matrices of `nn.LSTM`s, plus the allocation `Unit`s they form."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from microsweep.spaces._knobs import Knob

__all__ = ["LayerInfo", "Unit", "find_layers"]


@dataclass(frozen=True)
class LayerInfo:
    """A compressible layer: its name, shape (an embedding table (V, d) is V "out" rows of d
    "in" columns, as a tied output head sees it), the other modules that share its weight, and
    its `kind`: ``"linear"``, ``"embedding"``, ``"lstm_gate"`` (a gate matrix of an LSTM) or
    ``"band"`` (a frequency band of a table or head: V_b rows of d)."""

    name: str
    out_features: int
    in_features: int
    shared_with: tuple[str, ...] = ()
    kind: str = "linear"
    band: tuple[int, int] | None = None
    """A frequency band (kind ``"band"``, named ``"head@1"``): its rows' [start, stop) in the
    vocabulary ranked by frequency."""

    @property
    def full_rank(self) -> int:
        """The largest rank the layer's matrix can have."""
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


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """Every parameter's dotted names by identity, so a tied weight lists all its holders."""
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return owners


def find_layers(model: nn.Module) -> dict[str, tuple[nn.Module, LayerInfo]]:
    """Every compressible matrix by name with the module a rule matches it through: Linear
    layers, embedding tables, and the gate matrices of `nn.LSTM`s (named as torch names the
    weight, ``"lstm.weight_hh_l0"``, and matched through their LSTM), in model order."""
    from microsweep.models import gate_names

    owners = _owners(model)

    def shared(weight: nn.Parameter, own: str) -> tuple[str, ...]:
        """The other modules holding `weight`."""
        return tuple(o.rsplit(".", 1)[0] for o in owners[id(weight)] if o != own)

    layers: dict[str, tuple[nn.Module, LayerInfo]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            tied = shared(module.weight, f"{name}.weight")
            layers[name] = (module, LayerInfo(name, module.out_features, module.in_features, tied))
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
