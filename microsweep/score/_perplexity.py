"""Perplexity on fixed, non-overlapping token windows, so that every trial is measured alike.

Evaluation reads the windows in batches that fit a memory limit: one batch of logits is
windows x tokens x vocabulary floats (823 MB for 32 windows of 128 tokens at GPT-2's 50,257),
so the batch is chosen from the limit (`batch_for_memory`) unless the caller fixes it, and a
window whose logits alone pass the limit is read in runs of positions through the model's output
layer (`Plan`). Per-window NLL sums do not depend on the batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from microsweep.errors import UsageError
from microsweep.models._build import logits_of

__all__ = [
    "ACTIVATION_BYTES",
    "DEFAULT_EVAL_MEMORY",
    "NLL_BYTES_PER_LOGIT",
    "Plan",
    "batch_for_memory",
    "eval_memory_limit",
    "eval_windows",
    "mean_context",
    "nll_to_perplexity",
    "perplexity",
    "window_nll",
]


def _positive_int(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{what}={value!r} must be a positive int")
    return value


def eval_windows(tokens: torch.Tensor, *, window: int, max_tokens: int) -> torch.Tensor:
    """(n, window + 1) ids cut from the start of `tokens`: window i is
    ``tokens[i*window : (i+1)*window + 1]``, so the predicted tokens never overlap.

    n = min(max_tokens // window, (len - 1) // window); the same tokens always give the same
    windows, so perplexities of different trials are comparable.
    """
    window = _positive_int(window, "window")
    max_tokens = _positive_int(max_tokens, "max_tokens")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise UsageError("tokens must be a 1-D tensor of token ids")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise UsageError(f"tokens must hold integer ids, got dtype {tokens.dtype}")
    n = min(max_tokens // window, (tokens.numel() - 1) // window)
    if n < 1:
        raise UsageError(
            f"too few tokens for one window of {window}: {tokens.numel()} tokens and "
            f"max_tokens={max_tokens} (need at least {window + 1} and {window})"
        )
    return tokens[: n * window + 1].unfold(0, window + 1, window).to(torch.long).contiguous()


def mean_context(window: int) -> float:
    """Mean attended positions per token when a window of `window` tokens is read causally
    from its start: (window + 1) / 2, the `context` to pass to `count()`."""
    return (_positive_int(window, "window") + 1) / 2


DEFAULT_EVAL_MEMORY = 1 << 30
"""The evaluation memory limit when none is given: 1 GiB, or a quarter of the memory available
on the model's device when that is less (`eval_memory_limit`)."""

NLL_BYTES_PER_LOGIT = 12
"""Working bytes per logit of a per-window NLL: the float32 logits, the log-softmax copy the loss
makes, and one more float32 as margin for the loss's own temporaries."""

ACTIVATION_BYTES = 32
"""Bytes per token per unit of the widest layer output seen in the model (8 float32 copies):
the margin for the activations alive during a forward pass without gradients."""


def check_windows(windows: torch.Tensor, batch_size: int | None) -> None:
    """Refuse windows that are not a non-empty (n, window + 1) tensor, or a bad batch size
    (None, the batch chosen from memory, is good)."""
    if batch_size is not None:
        _positive_int(batch_size, "batch_size")
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise UsageError("windows must be a (n, window + 1) tensor of ids, from eval_windows()")
    if windows.shape[0] == 0:
        raise UsageError("windows is empty: there is nothing to evaluate")


def _check_memory(memory_bytes: int | None) -> None:
    if memory_bytes is not None:
        _positive_int(memory_bytes, "memory_bytes")


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the block; each submodule's training flag is put back."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.train(flag)


def _device(model: nn.Module, windows: torch.Tensor) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else windows.device


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Free bytes on `device`: the GPU's free memory for a CUDA device, else the system's
    available memory (psutil when installed, else /proc/meminfo); None when unknown."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            return None
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def eval_memory_limit(device: torch.device | str | None = None) -> int:
    """The default evaluation memory limit on `device`: `DEFAULT_EVAL_MEMORY` (1 GiB), or a
    quarter of the memory available there when that is less."""
    free = available_memory(device)
    if free is None:
        return DEFAULT_EVAL_MEMORY
    return max(1, min(DEFAULT_EVAL_MEMORY, free // 4))


def _logits_or_refuse(output: object, inputs: torch.Tensor) -> torch.Tensor:
    """The logits (B, T, V) in a model's output for `inputs` (B, T), or a one-line refusal."""
    logits = logits_of(output)
    if not (
        isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[:2] == inputs.shape
    ):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise UsageError(
            f"the model must map ids {tuple(inputs.shape)} to logits (B, T, V), got {got}"
        )
    return logits


@dataclass(frozen=True)
class _Probe:
    """What one forward pass of one short window shows: the vocabulary, the widest per-token
    output of any layer other than the logits, and the output layer when the logits are its
    output as they are, position by position (else None)."""

    vocab: int
    width: int
    head: nn.Module | None


def _probe(model: nn.Module, windows: torch.Tensor, device: torch.device) -> _Probe:
    """One forward pass of the first window cut to two tokens (the whole window when the model
    refuses so short a one), with every layer's output watched; inside `evaluating(model)`."""
    try:
        return _probe_at(model, windows[:1, : min(2, windows.shape[1] - 1)], device)
    except UsageError:
        raise
    except Exception:  # a model that needs its whole window
        return _probe_at(model, windows[:1, :-1], device)


def _probe_at(model: nn.Module, inputs: torch.Tensor, device: torch.device) -> _Probe:
    seen: list[tuple[nn.Module, tuple, dict, object]] = []
    calls: dict[nn.Module, int] = {}

    def watch(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        calls[module] = calls.get(module, 0) + 1
        seen.append((module, args, kwargs, output))

    handles = [
        m.register_forward_hook(watch, with_kwargs=True) for m in model.modules() if m is not model
    ]
    inputs = inputs.to(device=device, dtype=torch.long)
    try:
        logits = _logits_or_refuse(model(inputs), inputs)
    finally:
        for h in handles:
            h.remove()
    tokens = inputs.numel()
    width = 0
    for _, _, _, output in seen:
        outs = output if isinstance(output, (tuple, list)) else (output,)
        for t in outs:
            if isinstance(t, torch.Tensor) and t is not logits:
                width = max(width, t.numel() // tokens)
    producers = [(m, a, k) for m, a, k, out in seen if out is logits]
    head = None
    if producers:  # the outermost layer whose output the model returns as its logits
        module, args, kwargs = producers[-1]
        if calls[module] == 1 and not kwargs and _positionwise(module, args, logits):
            head = module
    return _Probe(int(logits.shape[-1]), width, head)


def _positionwise(module: nn.Module, args: tuple, logits: torch.Tensor) -> bool:
    """Whether `module` maps its one input (B, T, d) to `logits` position by position, so that
    runs of positions of its input give the matching runs of logits."""
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return False
    hidden = args[0]
    if hidden.dim() != 3 or hidden.shape[:2] != logits.shape[:2]:
        return False
    scale = float(logits.abs().max()) if logits.numel() else 0.0
    for t in sorted({0, hidden.shape[1] - 1}):  # first and last position
        part = module(hidden[:, t : t + 1])
        if not (
            isinstance(part, torch.Tensor)
            and part.shape == logits[:, t : t + 1].shape
            and torch.allclose(part, logits[:, t : t + 1], rtol=1e-5, atol=1e-6 * max(scale, 1.0))
        ):
            return False
    return True


@dataclass(frozen=True)
class Plan:
    """How evaluation reads the windows: `batch` windows per forward pass and, when one
    window's logits alone pass the memory limit and the model's output layer can be run apart
    (`head`), `positions` logits at a time from that window's hidden states (else None: whole
    windows)."""

    batch: int
    positions: int | None = None
    head: nn.Module | None = None


def bytes_per_window(tokens: int, vocab: int, width: int, bytes_per_logit: int) -> int:
    """Estimated working bytes of one window of `tokens` predicted tokens: `bytes_per_logit`
    per logit over the vocabulary, and `ACTIVATION_BYTES` per unit of the widest layer output
    (`width`) for the forward pass."""
    return tokens * (bytes_per_logit * vocab + ACTIVATION_BYTES * width)


def plan_reading(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int | None,
    memory_bytes: int | None,
    bytes_per_logit: int = NLL_BYTES_PER_LOGIT,
) -> Plan:
    """The `Plan` for reading `windows`; inside `evaluating(model)`.

    An int `batch_size` without `memory_bytes` is taken as it is (no probe). Otherwise one
    forward pass of one short window measures the model (vocabulary, widest layer) and the batch
    is the most windows whose estimated bytes fit the limit (`memory_bytes`, default
    `eval_memory_limit`), at least 1, at most `batch_size` when given, at most every window.
    """
    if batch_size is not None and memory_bytes is None:
        return Plan(batch_size)
    device = _device(model, windows)
    probe = _probe(model, windows, device)
    limit = memory_bytes if memory_bytes is not None else eval_memory_limit(device)
    tokens = windows.shape[1] - 1
    per_window = bytes_per_window(tokens, probe.vocab, probe.width, bytes_per_logit)
    batch = max(1, min(windows.shape[0], limit // per_window))
    if batch_size is not None:
        batch = min(batch, batch_size)
    if per_window <= limit or probe.head is None:
        return Plan(batch)
    hidden = tokens * ACTIVATION_BYTES * probe.width
    positions = max(1, (limit - hidden) // (bytes_per_logit * probe.vocab))
    return Plan(1, min(positions, tokens), probe.head)


def batch_for_memory(
    model: nn.Module,
    windows: torch.Tensor,
    limit_bytes: int | None = None,
    *,
    bytes_per_logit: int = NLL_BYTES_PER_LOGIT,
) -> int:
    """Windows per forward pass that fit `limit_bytes` (default `eval_memory_limit` of the
    model's device): floor(limit / bytes per window) between 1 and the number of windows,
    bytes per window being tokens x (`bytes_per_logit` x vocabulary + `ACTIVATION_BYTES` x
    the widest layer output), both read from one forward pass of one window at length 2."""
    check_windows(windows, None)
    _check_memory(limit_bytes)
    with evaluating(model):
        return plan_reading(model, windows, None, limit_bytes, bytes_per_logit).batch


class _HiddenReady(Exception):
    """Stops a forward pass once the output layer's input is known."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("hidden states captured")
        self.hidden = hidden


def _hidden_states(model: nn.Module, head: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The input of `head` when the model reads `inputs`, without computing the logits."""

    def capture(module: nn.Module, args: tuple) -> None:
        raise _HiddenReady(args[0])

    handle = head.register_forward_pre_hook(capture)
    try:
        model(inputs)
    except _HiddenReady as ready:
        return ready.hidden
    finally:
        handle.remove()
    raise UsageError(
        "the model's output layer was not called on this window; evaluate with a fixed "
        "batch_size instead"
    )


Reader = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""Called per piece read: (first window of the piece, first position, float32 logits (B, t, V),
targets (B, t)). The logits are freed when it returns: keep only what is reduced from them."""


def read_logits(model: nn.Module, windows: torch.Tensor, plan: Plan, read: Reader) -> None:
    """Run `windows` through `model` as `plan` says, calling `read` on each piece of logits on
    the model's device; inside `evaluating(model)`. Only one piece of logits is alive at a time:
    this function drops its own before the next forward pass (a generator could not: the
    caller's loop variable would hold the last batch through the next one's forward pass)."""
    device = _device(model, windows)
    for start in range(0, windows.shape[0], plan.batch):
        batch = windows[start : start + plan.batch].to(device=device, dtype=torch.long)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if plan.head is None or plan.positions is None:
            logits = _logits_or_refuse(model(inputs), inputs).float()
            read(start, 0, logits, targets)
            del logits
            continue
        hidden = _hidden_states(model, plan.head, inputs)
        for pos in range(0, inputs.shape[1], plan.positions):
            part = plan.head(hidden[:, pos : pos + plan.positions]).float()
            read(start, pos, part, targets[:, pos : pos + plan.positions])
            del part
        del hidden


def window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int | None = None,
    memory_bytes: int | None = None,
) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each window, float64 of shape (n,).

    `model` maps ids (B, T) to logits (B, T, V), or to an output holding them (`logits_of`).
    `batch_size` windows go through at a time; None (the default) chooses the batch from
    `memory_bytes` (default `eval_memory_limit`; see `plan_reading`), reading a window too large
    for it in runs of positions through the model's output layer (whole windows one at a time
    when the model's logits are not one layer's output). The sums do not depend on the batch.
    Runs under ``torch.no_grad`` in eval mode and restores each submodule's training flag.
    Non-finite values are returned as they are.
    """
    check_windows(windows, batch_size)
    _check_memory(memory_bytes)
    sums = torch.zeros(windows.shape[0], dtype=torch.float64)

    def read(start: int, pos: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        )
        part = nll.to(torch.float64).view(targets.shape).sum(dim=1).cpu()
        sums[start : start + part.numel()] += part

    with evaluating(model):
        plan = plan_reading(model, windows, batch_size, memory_bytes)
        read_logits(model, windows, plan, read)
    return sums


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int | None = None,
    memory_bytes: int | None = None,
) -> float:
    """exp(mean next-token negative log-likelihood) over every position of every window.

    `model` maps ids (B, T) to logits (B, T, V); see `window_nll` (and for `batch_size` and
    `memory_bytes`). NLLs are summed in float64. A non-finite result (NaN or inf) is returned as
    it is, for the caller to mark the trial failed.
    """
    nll = window_nll(model, windows, batch_size=batch_size, memory_bytes=memory_bytes)
    return nll_to_perplexity(float(nll.sum()), nll.numel() * (windows.shape[1] - 1))


def nll_to_perplexity(total_nll: float, tokens: int) -> float:
    """exp(total / tokens), or inf when that overflows."""
    try:
        return math.exp(total_nll / tokens)
    except OverflowError:
        return math.inf
