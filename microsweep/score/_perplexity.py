"""Perplexity on fixed, non-overlapping token windows, so that every trial is measured alike."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from microsweep.errors import UsageError
from microsweep.models._build import logits_of

__all__ = [
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


def check_windows(windows: torch.Tensor, batch_size: int) -> None:
    """Refuse windows that are not a non-empty (n, window + 1) tensor, or a bad batch size."""
    _positive_int(batch_size, "batch_size")
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise UsageError("windows must be a (n, window + 1) tensor of ids, from eval_windows()")
    if windows.shape[0] == 0:
        raise UsageError("windows is empty: there is nothing to evaluate")


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


def batch_logits(
    model: nn.Module, windows: torch.Tensor, batch_size: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first window of the batch, float32 logits (B, T, V), targets (B, T)) per batch of
    `windows`, on the model's device; call inside `evaluating(model)`."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else windows.device
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = logits_of(model(inputs))
        if not (
            isinstance(logits, torch.Tensor)
            and logits.dim() == 3
            and logits.shape[:2] == inputs.shape
        ):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise UsageError(
                f"the model must map ids {tuple(inputs.shape)} to logits (B, T, V), got {got}"
            )
        yield start, logits.float(), targets


def window_nll(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each window, float64 of shape (n,).

    `model` maps ids (B, T) to logits (B, T, V), or to an output holding them (`logits_of`).
    Runs under ``torch.no_grad`` in eval mode and restores each submodule's training flag.
    Non-finite values are returned as they are.
    """
    check_windows(windows, batch_size)
    sums = []
    with evaluating(model):
        for _, logits, targets in batch_logits(model, windows, batch_size):
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            )
            sums.append(nll.to(torch.float64).view(targets.shape).sum(dim=1).cpu())
    return torch.cat(sums)


def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 32) -> float:
    """exp(mean next-token negative log-likelihood) over every position of every window.

    `model` maps ids (B, T) to logits (B, T, V); see `window_nll`. NLLs are summed in float64.
    A non-finite result (NaN or inf) is returned as it is, for the caller to mark the trial
    failed.
    """
    nll = window_nll(model, windows, batch_size=batch_size)
    return nll_to_perplexity(float(nll.sum()), nll.numel() * (windows.shape[1] - 1))


def nll_to_perplexity(total_nll: float, tokens: int) -> float:
    """exp(total / tokens), or inf when that overflows."""
    try:
        return math.exp(total_nll / tokens)
    except OverflowError:
        return math.inf
