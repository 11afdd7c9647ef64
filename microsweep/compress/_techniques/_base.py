"""The contract every compression technique keeps, the forms its modules take, and the registry.

A `Technique` is one way of changing a layer (pruning, quantizing, a way of reaching a rank).
It names the `LayerPolicy` settings it reads, checks what a Space rule or a policy asks of it,
and builds (or transforms) the layer. The modules it produces are `Form`s: each form registers
its counting rule with `microsweep.score.register_rule` where it is defined, and tells the
exporter what the `.msz` header stores for the module and how to rebuild it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from microsweep.errors import SpaceError, UsageError
from microsweep.policy import METHODS, LayerPolicy, RankMethod

__all__ = [
    "Form",
    "Given",
    "GroupTechnique",
    "LayerCheck",
    "LayerShape",
    "Matrix",
    "MatrixTechnique",
    "RankTechnique",
    "RebuildContext",
    "RuleCheck",
    "SpecContext",
    "Technique",
    "check_inputs",
    "form_for",
    "form_of_spec",
    "forms",
    "register_technique",
    "technique",
    "techniques",
]


class LayerShape(Protocol):
    """A layer as a Space describes it: plain data, no module (`spaces.LayerInfo` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def out_features(self) -> int: ...
    @property
    def in_features(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def shared_with(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class RuleCheck:
    """What a Space rule asks of a technique at definition time: its key (for messages), its
    knobs by setting (duck-typed: ``is_constant``, ``suggest(None, key)``, ``choices``,
    ``method``), the layers it takes, and whether they share one value (``tied``)."""

    rule_key: str
    settings: Mapping[str, Any]
    members: Sequence[LayerShape]
    tied: bool


@dataclass(frozen=True)
class LayerCheck:
    """What a policy asks of a technique for one layer of a model: the layer's name, the
    module found there, its settings and whether calibration tokens were given; `partner`
    is the module sharing its weight when a rank builds a factorized tied pair (the head for
    a table, the table for a head), else None."""

    name: str
    layer: nn.Module
    settings: LayerPolicy
    calibrated: bool
    partner: nn.Module | None = None


@dataclass
class Matrix:
    """One weight matrix on its way to a `CompressedLinear`: its current values, the mask of
    kept entries (None: dense), the per-row weight scales and the input scale found so far."""

    values: torch.Tensor
    settings: LayerPolicy
    mask: torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None
    act_scale: torch.Tensor | None = None
    given_mask: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    """The Gram matrix of this matrix's inputs on calibration tokens (data-aware methods); for
    a table, the (V,) frequencies of its rows' tokens, the diagonal of its one-hot inputs'."""
    table: bool = False
    """Whether the matrix is an embedding table (V, d): as a Linear it is values^T, from V
    one-hot inputs to d outputs, while its format keeps one scale per row of `values`."""
    quantized: bool = False
    """Set by a pass that already put the values on their bit grid (SparseGPT with GPTQ)."""


@dataclass(frozen=True)
class Given:
    """What a caller may already hold for building one layer: its input scale (calibrated on
    the unchanged model), the layer factorized at the rank, magnitude masks per matrix, and
    the Gram matrix of its inputs (for data-aware pruning and quantization; a table's token
    frequencies, see `InputStats`)."""

    act_scale: torch.Tensor | None = None
    factors: nn.Module | None = None
    masks: tuple[torch.Tensor | None, ...] = (None, None)
    gram: torch.Tensor | None = None


@dataclass
class SpecContext:
    """What a form may ask while writing a spec: `spec_of` for a child module, the layer's
    `path`, and `first` (object id -> the first path that wrote it, for shared parts)."""

    spec_of: Callable[[nn.Module], dict[str, Any]]
    path: str
    first: dict[int, str] = field(default_factory=dict)


@dataclass
class RebuildContext:
    """What a form may ask while rebuilding: `make` for a child spec and `find` for a module
    already placed at a path of the model (a shared part)."""

    make: Callable[[Mapping[str, Any]], nn.Module]
    find: Callable[[str], nn.Module]


class Form(abc.ABC):
    """A module type some technique produces, as counting and export see it.

    `types` are the module classes (subclasses first: the nearest in a module's MRO wins) and
    `spec_types` the ``"type"`` values of the specs this form writes.
    """

    types: ClassVar[tuple[type[nn.Module], ...]] = ()
    spec_types: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def spec(self, module: nn.Module, ctx: SpecContext) -> dict[str, Any]:
        """The JSON dict the `.msz` header stores for `module` (shapes, widths, flags)."""

    @abc.abstractmethod
    def rebuild(self, spec: Mapping[str, Any], ctx: RebuildContext) -> nn.Module:
        """An empty module of `spec`'s shapes (safe under the meta device), to be filled."""

    @abc.abstractmethod
    def sides(self, spec: Mapping[str, Any]) -> tuple[int, int]:
        """(in, out) of the layer `spec` replaces, as the dense Linear (or table, (dim, rows))
        reads them."""

    def replaces_table(self, spec: Mapping[str, Any]) -> bool:
        """Whether `spec` stands for an embedding table (else a Linear)."""
        return False

    def int_grid(self, module: nn.Module, tensor: torch.Tensor) -> torch.Tensor | None:
        """The per-row scales of `tensor` when `module` stores it on an integer grid."""
        return None

    def constants(self, module: nn.Module) -> list[torch.Tensor]:
        """The constants (scales) inference needs, as the counting rule declares them."""
        return []

    def keep_mask(self, module: nn.Module, tensor: torch.Tensor) -> torch.Tensor | None:
        """The kept entries of a sparse stored `tensor`, when the module holds them."""
        return None

    def derived_buffers(self) -> tuple[str, ...]:
        """Buffers rebuilt from the stored values at load (never stored themselves)."""
        return ()

    def restore(self, module: nn.Module, keep: torch.Tensor | None) -> None:
        """Rebuild the derived buffers of a filled `module` (`keep`: the stored mask)."""
        return None


class Technique(abc.ABC):
    """One compression technique: what it reads, what it checks and what it builds.

    `name` is how policies and the registry call it (a rank technique's name is its
    `LayerPolicy.rank_method`), `reads` the `LayerPolicy` fields it reads, `forms` the module
    forms it produces (their counting rules register where the forms are defined).
    """

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()
    forms: ClassVar[tuple[Form, ...]] = ()
    takes_tables: ClassVar[bool] = True
    """Whether an embedding table may take it (its input is token ids)."""

    @abc.abstractmethod
    def applies(self, settings: LayerPolicy) -> bool:
        """Whether `settings` ask this technique to act on the layer."""

    def check_rule(self, rule: RuleCheck) -> None:
        """Refuse, with a one-line `SpaceError`, a Space rule this technique cannot serve (its
        knobs, its layers, ``tied``); runs when the Space is built. Default: nothing."""
        return None

    def check_layer(self, layer: LayerCheck) -> None:
        """Refuse, with a one-line `SpaceError`, a layer of a policy this technique cannot
        apply (before any layer of the model changes). Default: nothing."""
        return None

    def table_misfit(self, rule: RuleCheck) -> str | None:
        """Why this technique, as the rule sets it, cannot apply to an embedding table, or
        None (a pattern rule then leaves the table alone; a rule naming it is refused)."""
        return None


class MatrixTechnique(Technique):
    """A technique that changes one weight matrix in place of the layer's (or of each
    factor's) `CompressedLinear`: pruning and quantization."""

    order: ClassVar[int] = 0
    """Where in the pipeline it runs: prune (0) before weight rounding (1) before inputs (2)."""

    @abc.abstractmethod
    def apply(self, matrix: Matrix) -> None:
        """Change `matrix` (values, mask, scales) as the technique does."""


class RankTechnique(Technique):
    """A way of reaching `LayerPolicy.rank`: the layer becomes another module (factors, cores,
    codes). Its vocabulary entry (`microsweep.policy.METHODS`) gives its traits."""

    reads: ClassVar[tuple[str, ...]] = ("rank", "rank_method")
    factorizes: ClassVar[bool] = False
    """Whether the layer becomes a `LowRankLinear` from an SVD (so precomputed `factors` and a
    mask per factor apply)."""
    ties: ClassVar[bool] = False
    """Whether `build_tied` builds a table and the head tied to it together (a rank on a tied
    weight is allowed exactly for these methods)."""

    @property
    def traits(self) -> RankMethod:
        """The method's entry in the policy vocabulary (tag, reads inputs, grouped, dense)."""
        return METHODS[self.name]

    def applies(self, settings: LayerPolicy) -> bool:
        """A rank method acts where the policy gives a rank by this method."""
        return settings.rank is not None and settings.rank_method == self.name

    @abc.abstractmethod
    def build(self, layer: nn.Module, settings: LayerPolicy, given: Given) -> nn.Module:
        """The module `layer` becomes at ``settings.rank`` (in place where it may reuse the
        layer's tensors: callers pass copies), using what the caller already holds (`given`)."""

    def check_rule(self, rule: RuleCheck) -> None:
        """A method whose factors stay dense fp32 refuses a rule that may prune or quantize."""
        if not self.traits.dense_only:
            return
        for key in ("sparsity", "bits", "act_bits"):
            knob = rule.settings.get(key)
            if knob is not None and not (knob.is_constant and knob.suggest(None, key) in (
                0.0, 32)):  # fmt: skip
                raise SpaceError(
                    f"rule {rule.rule_key!r}: Rank(..., method={self.name!r}) keeps its factors "
                    f"dense at fp32; drop {key} from this rule"
                )

    def table_misfit(self, rule: RuleCheck) -> str | None:
        """A method that cannot take a table names the methods that can."""
        if self.takes_tables:
            return None
        able = [t.name for t in techniques() if isinstance(t, RankTechnique) and t.takes_tables]
        names = " or ".join(repr(n) for n in able)
        return f"a table takes Rank(..., method={names}) only, not {self.name!r}"

    def build_tied(
        self, table: nn.Embedding, head: nn.Linear, settings: LayerPolicy, given: Given
    ) -> tuple[nn.Module, nn.Module]:
        """The (table, head) modules a table and the Linear sharing its (V, d) weight become
        together at ``settings.rank``, sharing what they store (methods with `ties` only;
        callers pass copies). `given` is as for `build`, for the head's side."""
        raise SpaceError(self.tie_refusal())

    def tie_refusal(self) -> str:
        """The one line refusing a rank by this method on a tied weight."""
        able = [t.name for t in techniques() if isinstance(t, RankTechnique) and t.ties]
        names = ", ".join(repr(n) for n in able) or "none"
        return (
            f"Rank(..., method={self.name!r}) cannot factorize a table and the head tied to it; "
            f"use method {names} there, or drop rank"
        )

    def build_group(
        self, rank: int, layers: Mapping[str, nn.Module], *, seed: int = 0
    ) -> dict[str, nn.Module]:
        """The modules a group of layers becomes together (grouped methods only)."""
        raise SpaceError(f"rank method {self.name!r} does not compress layers as a group")

    def transform(self, stats: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(T, T^-1) that a data-aware factorization truncates the SVD of W T with; None for
        methods that do not read calibration inputs."""
        return None


class GroupTechnique(RankTechnique):
    """A rank method that compresses the layers of a group together (`build_group`); a layer
    alone is a group of one."""

    reads: ClassVar[tuple[str, ...]] = ("rank", "rank_method", "group")
    takes_tables = False

    def build(self, layer: nn.Module, settings: LayerPolicy, given: Given) -> nn.Module:
        """A group of one."""
        return self.build_group(settings.rank, {"": layer})[""]


def check_inputs(layer: LayerCheck, uncalibrated: str, *, on_table: str | None = None) -> None:
    """The checks of a technique that reads a layer's inputs: they come from calibration
    tokens (`uncalibrated`), and, where the technique has `on_table` to say, a table's input
    (token ids) is not what it reads."""
    if on_table is not None and isinstance(layer.layer, nn.Embedding):
        raise SpaceError(on_table)
    if not layer.calibrated:
        raise SpaceError(uncalibrated)


_TECHNIQUES: dict[str, Technique] = {}
_FORMS: dict[type, Form] = {}
_SPECS: dict[str, Form] = {}


def register_technique(tech: Technique) -> Technique:
    """Add `tech` (and its forms) to the registry under ``tech.name``; returns it. A rank
    technique's name must be in the policy vocabulary (`microsweep.policy.METHODS`)."""
    if not isinstance(tech, Technique):
        raise UsageError(f"register_technique needs a Technique instance, got {tech!r}")
    if isinstance(tech, RankTechnique) and tech.name not in METHODS:
        raise UsageError(
            f"rank technique {tech.name!r} has no entry in microsweep.policy.METHODS; add one"
        )
    _TECHNIQUES[tech.name] = tech
    for form in tech.forms:
        for kind in form.types:
            _FORMS[kind] = form
        for spec_type in form.spec_types:
            _SPECS[spec_type] = form
    return tech


def technique(name: str) -> Technique:
    """The registered technique called `name` (a rank method's name, or a pruning or
    quantization technique's)."""
    found = _TECHNIQUES.get(name)
    if found is None:
        raise SpaceError(f"no compression technique {name!r}; known: {', '.join(_TECHNIQUES)}")
    return found


def techniques() -> list[Technique]:
    """Every registered technique, in registration order."""
    return list(_TECHNIQUES.values())


def forms() -> list[Form]:
    """Every distinct form the registered techniques produce."""
    return list({id(f): f for f in _FORMS.values()}.values())


def form_for(module_type: type) -> Form | None:
    """The form of the nearest class in `module_type`'s MRO that some technique produces."""
    for cls in module_type.__mro__:
        found = _FORMS.get(cls)
        if found is not None:
            return found
    return None


def form_of_spec(spec_type: str) -> Form | None:
    """The form that writes specs of ``"type"`` `spec_type`, or None."""
    return _SPECS.get(spec_type)


def matrices_of(layer: LayerCheck) -> list[tuple[str, tuple[int, int]]]:
    """The weight matrices a layer is stored as under its settings, named for messages: the
    weight itself, or both factors of a rank (a table's (V, r) table and (d, r) projection; a
    tied pair's (r, d) first and (V, r) second factor, as its head stores them)."""
    name, settings = layer.name, layer.settings
    out_f, in_f = layer.layer.weight.shape
    if settings.rank is None:
        return [(f"layer {name!r}", (out_f, in_f))]
    r = settings.rank
    if isinstance(layer.layer, nn.Embedding) and layer.partner is None:
        return [
            (f"embedding {name!r} table factor", (out_f, r)),
            (f"embedding {name!r} projection factor", (in_f, r)),
        ]
    return [
        (f"layer {name!r} first factor", (r, in_f)),
        (f"layer {name!r} second factor", (out_f, r)),
    ]


def check_groups(layer: LayerCheck) -> None:
    """Refuse a scale group that does not divide the input columns of a matrix the layer is
    stored as (the weight, or each factor at a rank)."""
    group = layer.settings.quant_group
    if group is None:
        return
    for what, (_, cols) in matrices_of(layer):
        if cols % group:
            raise SpaceError(
                f"{what} has {cols} input columns, which group={group} does not divide; use "
                "a group that divides them"
            )
