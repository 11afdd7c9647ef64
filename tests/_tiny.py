"""A tiny per-position MLP language model shared by the fine-tuning and group-lasso tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class TinyLM(nn.Module):
    """ids (B, T) -> logits (B, T, V) through a per-position MLP: the two Linears carry all of
    the prediction, so a penalty cannot empty them without a cost in cross-entropy."""

    def __init__(self, vocab: int, width: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(self.emb(ids)))))


def pretrained(corpus, window: int = 32) -> TinyLM:
    """TinyLM pretrained for 200 steps on the training split (about 1.5 s on one thread), its
    parameters frozen as a runner holds its base (training turns them on and back off)."""
    from microsweep.models import pretrain

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyLM(corpus.vocab_size)
    pretrain(model, corpus.train, steps=200, block_size=window, batch_size=16, lr=1e-2, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread: these models are tiny, and on a busy machine a second thread spins
    (150 steps take 0.4 s on one thread and over 20 s on two beside another busy process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
