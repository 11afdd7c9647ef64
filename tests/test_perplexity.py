"""Perplexity on fixed windows: window cutting, known perplexities, errors and model state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from microsweep.errors import UsageError
from microsweep.score import eval_windows, mean_context, perplexity

V = 50


class Uniform(nn.Module):
    """Equal logits over V tokens: perplexity exactly V. Records the mode it was called in."""

    def __init__(self, fill: float = 0.0) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.child = nn.Linear(1, 1)
        self.fill = fill
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return torch.full((*idx.shape, V), self.fill) + self.dummy


class NextToken(nn.Module):
    """Knows the stream is ``t, t+1, t+2, ... (mod V)``: a huge logit on the true next token."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return 100.0 * F.one_hot((idx + 1) % V, V).float() + self.dummy


def test_windows_are_fixed_and_non_overlapping() -> None:
    tokens = torch.arange(100)
    w = eval_windows(tokens, window=10, max_tokens=1_000)
    assert w.shape == (9, 11) and w.dtype == torch.long  # (100 - 1) // 10 windows
    for i in range(9):
        assert torch.equal(w[i], torch.arange(10 * i, 10 * i + 11))
    targets = w[:, 1:].reshape(-1)
    assert torch.equal(targets, torch.arange(1, 91))  # every target once, in order
    assert torch.equal(w, eval_windows(tokens, window=10, max_tokens=1_000))
    assert eval_windows(tokens, window=10, max_tokens=35).shape == (3, 11)
    short = eval_windows(torch.arange(21, dtype=torch.int32), window=10, max_tokens=99)
    assert short.shape == (2, 11) and short.dtype == torch.long


def test_too_few_tokens_and_bad_input_raise() -> None:
    with pytest.raises(UsageError, match="too few tokens"):
        eval_windows(torch.arange(10), window=10, max_tokens=100)
    with pytest.raises(UsageError, match="too few tokens"):
        eval_windows(torch.arange(100), window=10, max_tokens=9)
    with pytest.raises(UsageError):
        eval_windows(torch.arange(100).view(10, 10), window=5, max_tokens=50)
    with pytest.raises(UsageError):
        eval_windows(torch.rand(100), window=5, max_tokens=50)
    with pytest.raises(UsageError):
        eval_windows(torch.arange(100), window=0, max_tokens=50)
    with pytest.raises(UsageError):
        perplexity(Uniform(), torch.arange(10), batch_size=4)
    with pytest.raises(UsageError):
        perplexity(
            Uniform(), eval_windows(torch.arange(100), window=9, max_tokens=99), batch_size=0
        )


def test_uniform_model_has_perplexity_vocab_size() -> None:
    windows = eval_windows(torch.arange(1_000) % V, window=16, max_tokens=400)
    assert windows.shape[0] == 25
    for batch_size in (4, 32):  # 25 windows: a ragged last batch, and a single batch
        assert perplexity(Uniform(), windows, batch_size=batch_size) == pytest.approx(V, rel=1e-6)


def test_perfect_model_has_perplexity_one() -> None:
    windows = eval_windows(torch.arange(500) % V, window=16, max_tokens=400)
    assert perplexity(NextToken(), windows) == pytest.approx(1.0, abs=1e-6)


def test_eval_mode_no_grad_and_training_flags_restored() -> None:
    model = Uniform()
    model.train()
    model.child.eval()
    windows = eval_windows(torch.arange(200) % V, window=8, max_tokens=64)
    perplexity(model, windows, batch_size=3)
    assert model.calls and all(call == (False, False) for call in model.calls)
    assert model.training and not model.child.training
    assert torch.is_grad_enabled()


def test_non_finite_loss_is_returned_not_hidden() -> None:
    windows = eval_windows(torch.arange(200) % V, window=8, max_tokens=64)
    assert math.isnan(perplexity(Uniform(fill=float("nan")), windows))


def test_wrong_output_shape_raises() -> None:
    class Flat(nn.Module):
        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return torch.zeros(idx.numel(), V)

    windows = eval_windows(torch.arange(200) % V, window=8, max_tokens=64)
    with pytest.raises(UsageError, match="logits"):
        perplexity(Flat(), windows)


def test_mean_context() -> None:
    assert mean_context(64) == 32.5
    assert mean_context(1) == 1.0
    with pytest.raises(UsageError):
        mean_context(0)
