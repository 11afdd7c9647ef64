"""A small LSTM language model in one readable file, with an analytic parameter count.

Token embedding, a stack of LSTM layers, and an output head. With `tie_weights` the head reuses
the embedding table (counted once by the MicroNet rules); when the hidden size differs from the
embedding size, a bias-free linear projection maps the LSTM output down to it first, as in the
challenge's baseline (Rae et al. 2018: 2048 hidden units projected to a tied 512 softmax).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from microsweep.errors import UsageError

__all__ = ["LSTMLM", "LSTMConfig"]


@dataclass(frozen=True)
class LSTMConfig:
    """Shape of the model; `asdict(config)` is its construction recipe.

    `block_size` is the window the model is trained and evaluated on (an LSTM reads any length;
    the sweep driver uses it as the default evaluation window, as for the GPT).
    """

    vocab_size: int
    n_embd: int = 64
    n_hidden: int = 128
    n_layer: int = 1
    tie_weights: bool = True
    block_size: int = 64

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_embd", "n_hidden", "n_layer", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"LSTMConfig.{name}={value!r} must be a positive int")
        if not isinstance(self.tie_weights, bool):
            raise UsageError(f"LSTMConfig.tie_weights={self.tie_weights!r} must be True or False")


class LSTMLM(nn.Module):
    """`LSTMLM(config)(idx)` maps token ids (B, T) to next-token logits (B, T, vocab_size).

    Each call starts from a zero state; the count is per token, as if the state were carried.
    """

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        e, h = config.n_embd, config.n_hidden
        self.wte = nn.Embedding(config.vocab_size, e)
        self.lstm = nn.LSTM(e, h, num_layers=config.n_layer, batch_first=True)
        project = config.tie_weights and h != e
        self.proj = nn.Linear(h, e, bias=False) if project else None
        self.head = nn.Linear(e if config.tie_weights else h, config.vocab_size)
        nn.init.uniform_(self.wte.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)
        if config.tie_weights:
            self.head.weight = self.wte.weight  # tied: one stored matrix
        else:
            nn.init.uniform_(self.head.weight, -0.1, 0.1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)  # (B, T, n_embd)
        y, _ = self.lstm(x)  # (B, T, n_hidden)
        if self.proj is not None:
            y = self.proj(y)  # (B, T, n_embd)
        return self.head(y)  # (B, T, vocab_size)

    def recipe(self) -> dict:
        """What `microsweep.models.build` needs to make an empty model of the same shape."""
        return {"builder": "lstm", "config": asdict(self.config)}

    @staticmethod
    def analytic_num_params(config: LSTMConfig) -> int:
        """Distinct parameters (a tied head counted once), from the shapes alone."""
        v, e, h = config.vocab_size, config.n_embd, config.n_hidden
        lstm = 0
        for layer in range(config.n_layer):
            n_in = e if layer == 0 else h
            lstm += 4 * h * (n_in + h) + 2 * 4 * h  # W_ih, W_hh, b_ih, b_hh
        if config.tie_weights:
            head = (h * e if h != e else 0) + v  # projection, bias (weight is the embedding)
        else:
            head = h * v + v
        return v * e + lstm + head
