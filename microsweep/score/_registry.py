"""The rule registry: how each module type is counted, and what a rule reports.

A rule is ``rule(module, name, ctx) -> Cost`` for one module, excluding its children (the counter
walks those separately). It declares the tensors the module stores (`Cost.store`), the constants
inference needs (`Cost.const`) and its per-token ops (`Cost.mul`, `Cost.add`, `Cost.other`) with
their raw input widths. The counter resolves shared tensors, the 16-bit freebie and the op weights
afterwards, so a rule never needs to know about the rest of the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from microsweep.errors import UsageError
from microsweep.score._config import CountConfig

__all__ = ["Cost", "Rule", "RuleContext", "Stored", "find_rule", "register_rule", "rules_on_need"]

FLOAT_BITS = 32
"""Width of an unquantized value (fp32) before the freebie is applied."""


def _check_bits(bits: int, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise UsageError(f"{what} bit-width {bits!r} must be a positive int such as 8 or 32")
    return bits


def _check_count(n: float, what: str) -> float:
    value = float(n)
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{what} count {n!r} must be a finite number >= 0")
    return value


@dataclass(frozen=True, eq=False)
class Stored:
    """One tensor a module claims to store, and how: `bits` per value, `sparse` (non-zeros plus a
    bitmask, one bit per element or per `block`), `compressed` (this spec wins over plain claims
    on the same tensor), `folded` (claimed but not stored: merged into a neighbouring layer),
    `index` (integers of exactly `bits` bits, such as a permutation of the vocabulary: stored
    data, but not a weight, so the 16-bit allowance neither rounds them nor is ruled out by
    them)."""

    tensor: torch.Tensor
    bits: int = FLOAT_BITS
    sparse: bool = False
    block: tuple[int, int] | None = None
    compressed: bool = False
    folded: bool = False
    index: bool = False


@dataclass(frozen=True)
class Mults:
    """`n` multiplies per token whose inputs are `a_bits` and `b_bits` wide."""

    n: float
    a_bits: int
    b_bits: int


@dataclass
class Cost:
    """What a rule reports for one module: stored tensors, constants and raw per-token ops.

    `kind` is a short type name for tables ("linear", "gelu", ...); `sparsity`, `bits`,
    `act_bits` and `rank` describe the layer where meaningful and are copied to its row.
    """

    kind: str
    sparsity: float | None = None
    bits: int | None = None
    act_bits: int | None = None
    rank: int | None = None
    stores: list[Stored] = field(default_factory=list)
    consts: list[tuple[int, int]] = field(default_factory=list)
    mults: list[Mults] = field(default_factory=list)
    adds: float = 0.0
    others: float = 0.0

    def store(
        self,
        tensor: torch.Tensor,
        *,
        bits: int = FLOAT_BITS,
        sparse: bool = False,
        block: tuple[int, int] | None = None,
        compressed: bool = False,
    ) -> None:
        """Declare a stored tensor (a tensor shared with another module is counted once)."""
        if not isinstance(tensor, torch.Tensor):
            raise UsageError(f"store() needs a tensor, got {type(tensor).__name__}")
        _check_bits(bits, "stored")
        if block is not None:
            block = (int(block[0]), int(block[1]))
            if block[0] < 1 or block[1] < 1:
                raise UsageError(f"block {block!r} must be two positive ints such as (4, 4)")
        self.stores.append(Stored(tensor, bits, bool(sparse), block, bool(compressed)))

    def index(self, tensor: torch.Tensor, bits: int) -> None:
        """Declare a stored integer tensor of `bits` bits per entry (indices, not weights:
        counted at exactly `bits` with or without the 16-bit allowance)."""
        if not isinstance(tensor, torch.Tensor) or tensor.is_floating_point():
            raise UsageError(f"index() needs an integer tensor, got {tensor!r:.60}")
        _check_bits(bits, "index")
        self.stores.append(Stored(tensor, bits, compressed=True, index=True))

    def fold(self, tensor: torch.Tensor) -> None:
        """Declare a parameter that inference does not store because it is merged elsewhere."""
        if not isinstance(tensor, torch.Tensor):
            raise UsageError(f"fold() needs a tensor, got {type(tensor).__name__}")
        self.stores.append(Stored(tensor, folded=True))

    def const(self, numel: int, *, bits: int = FLOAT_BITS) -> None:
        """Declare `numel` inference-time constants of `bits` each (quantizer scales, ...)."""
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise UsageError(f"constant count {numel!r} must be an int >= 0")
        self.consts.append((numel, _check_bits(bits, "constant")))

    def mul(self, n: float, a_bits: int = FLOAT_BITS, b_bits: int = FLOAT_BITS) -> None:
        """Add `n` multiplies per token of an `a_bits` by a `b_bits` input."""
        a, b = _check_bits(a_bits, "input"), _check_bits(b_bits, "input")
        self.mults.append(Mults(_check_count(n, "multiply"), a, b))

    def add(self, n: float) -> None:
        """Add `n` additions per token (accumulated at 32 bits, so weighted 1)."""
        self.adds += _check_count(n, "add")

    def other(self, n: float) -> None:
        """Add `n` other ops per token (exp, divide, compare...: 1 each at full precision)."""
        self.others += _check_count(n, "other-op")


class RuleContext:
    """What a rule may ask about the count in progress.

    `config` and `context` (mean attended positions per token) are the `count()` arguments;
    `elements(name)` and `shapes(name)` describe the outputs of a submodule per token, measured
    once per count with a one-token forward pass (only when some rule asks for them).
    """

    def __init__(self, model: nn.Module, config: CountConfig, context: float) -> None:
        self.model = model
        self.config = config
        self.context = context
        self._shapes: dict[str, list[tuple[int, ...]]] | None = None

    def shapes(self, name: str) -> list[tuple[int, ...]]:
        """Shapes of the tensors module `name` output in a one-token forward, one per tensor and
        call (a module that returns a tuple contributes each tensor in it)."""
        if self._shapes is None:
            self._shapes = _trace_shapes(self.model)
        return list(self._shapes.get(name, []))

    def elements(self, name: str) -> float:
        """Output elements per token of module `name`, summed over all its calls."""
        return float(sum(math.prod(shape) for shape in self.shapes(name)))


def _tensor_shapes(output: Any) -> list[tuple[int, ...]]:
    if isinstance(output, torch.Tensor):
        return [tuple(output.shape)]
    if isinstance(output, (tuple, list)):
        return [shape for o in output for shape in _tensor_shapes(o)]
    return []


def _trace_shapes(model: nn.Module) -> dict[str, list[tuple[int, ...]]]:
    """Run the model on one token id (batch 1) and record the shapes every module outputs."""
    seen: dict[str, list[tuple[int, ...]]] = {}
    handles = []
    for name, module in model.named_modules():

        def hook(_m: nn.Module, _inp: Any, out: Any, name: str = name) -> None:
            seen.setdefault(name, []).extend(_tensor_shapes(out))

        handles.append(module.register_forward_hook(hook))
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, 1), dtype=torch.long, device=device))
    except Exception as exc:  # any failure means the model does not take token ids
        raise UsageError(
            "cannot size the activations: a one-token forward (ids of shape (1, 1)) failed with "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.train(flag)
    return seen


Rule = Callable[[Any, str, RuleContext], Cost]
"""``rule(module, name, ctx) -> Cost``: the count of one module, excluding its children."""

_RULES: dict[type, Rule] = {}

R = TypeVar("R", bound=Rule)


def register_rule(module_type: type[nn.Module]) -> Callable[[R], R]:
    """Decorator: count modules of `module_type` (and subclasses without their own rule) with
    the decorated function. A later registration for the same type replaces the earlier one."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise UsageError(f"register_rule needs an nn.Module subclass, got {module_type!r}")

    def decorate(rule: R) -> R:
        if not callable(rule):
            raise UsageError(f"the rule for {module_type.__name__} must be callable")
        _RULES[module_type] = rule
        return rule

    return decorate


def find_rule(module_type: type) -> Rule | None:
    """The rule for the nearest class in `module_type`'s MRO that has one, or None. Rules for a
    library's modules (transformers') register on first need (`rules_on_need`), in whichever
    process counts."""
    for cls in module_type.__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    home = str(getattr(module_type, "__module__", ""))
    for prefix, load in _ON_NEED.items():
        if home.startswith(prefix) and load():
            for cls in module_type.__mro__:
                if cls in _RULES:
                    return _RULES[cls]
    return None


_ON_NEED: dict[str, Callable[[], bool]] = {}


def rules_on_need(prefix: str, load: Callable[[], bool]) -> None:
    """Call `load` (which registers rules and says whether it did) the first time `find_rule`
    meets a type from a module under `prefix` with no rule, such as ``"transformers."``."""
    _ON_NEED[prefix] = load


def rules_defined_in(module_name: str) -> dict[type, Rule]:
    """The rules registered by code of module `module_name` (a space file), so a worker process
    that never ran that file can register the same ones (`register_rules`)."""
    return {t: r for t, r in _RULES.items() if getattr(r, "__module__", None) == module_name}


def register_rules(rules: dict[type, Rule]) -> None:
    """Register each (module type, rule) pair, as `register_rule` does."""
    for module_type, rule in rules.items():
        register_rule(module_type)(rule)
