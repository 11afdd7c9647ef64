"""`uncounted_work`: the math a forward pass really executes that no counting rule covers.

The counter walks modules and trusts each rule to count its module's own forward. A module
without a rule and without parameters would count as zero, silently. Here one short forward pass
runs under a `TorchFunctionMode`. Each matmul, normalization, softmax or element-wise call is
charged to the innermost module running at that moment. Whatever lands on a module that has no
rule is reported, with a rough count per token, so `count` never returns a silent zero.

The forward is the user's code: when it raises, `ForwardError` says in one line which module it
raised in (`forward_failure`) and what it raised, instead of a traceback through the recorder.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name

from microsweep.errors import UsageError
from microsweep.score._registry import find_rule

__all__ = [
    "ForwardError",
    "UncountedWarning",
    "UncountedWork",
    "check_uncounted",
    "forward_failure",
    "may_hide_work",
    "uncounted_line",
    "uncounted_work",
]

_MATMUL = {"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "bilinear"}
_CONV = {"conv1d", "conv2d", "conv3d"}
_WEIGHTED = {
    "softmax": 3,
    "log_softmax": 4,
    "_softmax": 3,
    "layer_norm": 8,
    "rms_norm": 5,
    "group_norm": 8,
    "batch_norm": 4,
    "gelu": 5,
    "silu": 4,
    "sigmoid": 3,
    "tanh": 5,
    "erf": 1,
}
_ELEMENTWISE = set(
    """add sub mul div true_divide floor_divide pow sqrt rsqrt exp log relu neg reciprocal abs
    maximum minimum clamp clip mean sum var std cumsum logsumexp addcmul addcdiv square rsub
    hardtanh leaky_relu elu softplus mish hardswish round lerp""".split()
)


@dataclass(frozen=True)
class UncountedWork:
    """Math executed in the forward of module `name` (type `kind`), which has no counting rule:
    `ops` maps each operation to its rough count per token."""

    name: str
    kind: str
    ops: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.ops.values())


def _op_name(func: Any) -> str:
    """`torch.Tensor.__iadd__` -> "add", `torch.nn.functional.linear` -> "linear"."""
    try:
        name = resolve_name(func) or getattr(func, "__name__", "")
    except Exception:  # a callable torch cannot name
        name = getattr(func, "__name__", "")
    name = name.rsplit(".", 1)[-1]
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name[:1] in ("r", "i") and name[1:] in _ELEMENTWISE | {"truediv", "matmul"}:
            name = name[1:]
    name = name.rstrip("_") if not name.startswith("_") else name
    return {"truediv": "div", "scaled_dot_product_attention": "attention"}.get(name, name)


def _numel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (tuple, list)):
        return sum(_numel(v) for v in value)
    return 0


def _estimate(op: str, args: tuple[Any, ...], out: Any) -> float:
    """Rough operations of one call: 2k per output element of a product over k terms, a few per
    element for normalizations and softmax, one per element otherwise."""
    n = _numel(out)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if op in _MATMUL and tensors:
        return 2.0 * n * max(tensors[0].shape[-1] if tensors[0].dim() else 1, 1)
    if op in _CONV and len(tensors) > 1:
        return 2.0 * n * math.prod(tensors[1].shape[1:])
    if op == "attention" and len(tensors) >= 3:
        q, k = tensors[0], tensors[1]
        scores = q.numel() // max(q.shape[-1], 1) * k.shape[-2]
        return 4.0 * scores * q.shape[-1] + 3.0 * scores
    return float(_WEIGHTED.get(op, 1) * n)


_COUNTED = _MATMUL | _CONV | set(_WEIGHTED) | _ELEMENTWISE | {"attention"}


class _Recorder(TorchFunctionMode):
    def __init__(self, stack: list[nn.Module]) -> None:
        super().__init__()
        self.stack = stack
        self.work: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        op = _op_name(func)
        floating = isinstance(out, torch.Tensor) and out.is_floating_point()
        if self.stack and op in _COUNTED and floating:  # integer position bookkeeping is free
            self.work[id(self.stack[-1])][op] += _estimate(op, args, out)
        return out


class ForwardError(UsageError):
    """The model's own forward raised while microsweep ran it (the message names the module it
    raised in and the exception, on one line): the model breaks the custom-model contract."""


def forward_failure(model: nn.Module, exc: BaseException) -> str:
    """One line on an exception `model`'s forward raised: the innermost of the model's modules
    whose code was running (read from the traceback, so a module that caught an error of its
    own earlier is not blamed) and the exception's type and first line, e.g. ``module 'inp'
    (Linear) raised RuntimeError: mat1 and mat2 must have the same dtype``."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    where: Any = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            where = owner
        tb = tb.tb_next
    if where is None or where is model:
        module = f"the model ({type(model).__name__})"
    else:
        module = f"module {names[id(where)]!r} ({type(where).__name__})"
    text = str(exc).strip()
    detail = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return f"{module} raised {detail}"


def uncounted_work(model: nn.Module, ids: torch.Tensor) -> list[UncountedWork]:
    """Run `model(ids)` once and return the math executed directly in the forward of modules
    that no counting rule covers (largest first), per token of `ids`. Modules with a rule are
    trusted to count their own forward; containers that only call children report nothing.
    A forward that raises is a `ForwardError` naming the module it raised in."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    stack: list[nn.Module] = []

    def enter(module: nn.Module, _args: Any) -> None:
        stack.append(module)

    def leave(module: nn.Module, _args: Any, _out: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave)
    recorder = _Recorder(stack)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), recorder:
            model(ids)
    except Exception as exc:  # the user's code: one line on where it failed, not a traceback
        raise ForwardError(
            f"the model's forward fails on token ids of shape {tuple(ids.shape)}: "
            f"{forward_failure(model, exc)}; it must take token ids (B, T), a LongTensor"
        ) from None
    finally:
        pre.remove()
        post.remove()
        for module, flag in flags:
            module.train(flag)
    tokens = max(ids.numel(), 1)
    modules = {id(m): m for m in model.modules()}
    out = []
    for key, ops in recorder.work.items():
        module = modules.get(key)
        if module is None or find_rule(type(module)) is not None:
            continue
        per_token = {op: value / tokens for op, value in sorted(ops.items())}
        out.append(
            UncountedWork(names.get(key, "?") or "<model>", type(module).__name__, per_token)
        )
    return sorted(out, key=lambda w: -w.total)


class UncountedWarning(UserWarning):
    """Math a forward pass runs in modules no counting rule covers, reported by `count`."""


_PASS_THROUGH = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity)


def may_hide_work(model: nn.Module) -> list[tuple[str, type]]:
    """The modules of `model` (name, type) that could run math no rule counts: no rule, and a
    `forward` of their own (pass-through containers excepted). Empty: nothing can hide."""
    return [
        (name or "<model>", type(module))
        for name, module in model.named_modules()
        if find_rule(type(module)) is None
        and not isinstance(module, _PASS_THROUGH)
        and type(module).forward is not nn.Module.forward
    ]


_SEEN: set[tuple[Any, ...]] = set()
"""The structures (rule-less modules by name and type) an unasked check already ran on: the
compressed variants of one model share them, so the forward runs and warns once per process."""


def uncounted_line(work: list[UncountedWork], counted_ops: float) -> tuple[str, float]:
    """One line naming the largest uncounted module, its top ops and how much the uncounted
    work is beside the counted operations; and that fraction."""
    total = sum(w.total for w in work)
    top = work[0]
    ops = ", ".join(
        f"{op} ~{value:,.0f}" for op, value in sorted(top.ops.items(), key=lambda kv: -kv[1])[:4]
    )
    fraction = total / max(counted_ops, 1e-9)
    more = f" (and {len(work) - 1} more modules)" if len(work) > 1 else ""
    line = (
        f"module {top.name!r} ({top.kind}) executes {ops} ops per token that no MicroNet rule "
        f"counts{more}: about {fraction:.1%} of the counted operations"
    )
    return line, fraction


def check_uncounted(
    model: nn.Module,
    counted_ops: float,
    *,
    example: torch.Tensor | None,
    tolerance: float | None,
) -> None:
    """What `count` does about uncounted work. Asked (an `example` or a `tolerance` given):
    run `example` (default: 8 zero token ids), raise `UsageError` past `tolerance` (default 0)
    of the counted ops and warn within it. Not asked: when some module could hide math, run 8
    zero token ids and warn (`UncountedWarning`), once per model structure and process; a
    model that does not take token ids is not checked."""
    asked = example is not None or tolerance is not None
    if not asked:
        hiding = may_hide_work(model)
        key = (type(model), *hiding)
        if not hiding or key in _SEEN:
            return
        _SEEN.add(key)
    if tolerance is not None and not (0.0 <= float(tolerance) < 1.0):
        raise UsageError(f"uncounted_tolerance {tolerance!r} must be a fraction in [0, 1)")
    ids = example
    if ids is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        ids = torch.zeros((1, 8), dtype=torch.long, device=device)
    try:
        work = uncounted_work(model, ids)
    except ForwardError:
        if asked:
            raise
        return
    if not work:
        return
    line, fraction = uncounted_line(work, counted_ops)
    if asked and fraction > (tolerance or 0.0):
        raise UsageError(
            f"{line}; register a rule for {work[0].kind} with microsweep.score.register_rule, "
            "or accept it with count(..., uncounted_tolerance=...)"
        )
    where = "within uncounted_tolerance" if asked else "pass example= to refuse it"
    warnings.warn(f"{line} ({where})", UncountedWarning, stacklevel=3)
