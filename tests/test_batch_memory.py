"""Evaluation that fits in memory: the batch chosen from a memory limit, per-window values that do
not depend on it, long windows on a 50k vocabulary read in runs of positions, and never more than
one batch of logits alive."""

from __future__ import annotations

import copy
import math
import weakref

import pytest
import torch
from torch import nn

from microsweep.errors import UsageError
from microsweep.models import GPT, GPTConfig
from microsweep.score import (
    DEFAULT_EVAL_MEMORY,
    batch_for_memory,
    eval_memory_limit,
    eval_windows,
    kl_reference,
    perplexity,
    window_nll,
    window_nll_kl,
)
from microsweep.score._perplexity import ACTIVATION_BYTES, NLL_BYTES_PER_LOGIT

MiB = 1 << 20


class Watched(nn.Module):
    """Embedding then a Linear head. Records each forward's batch shape and, at each forward,
    how many earlier outputs (logits) are still alive."""

    def __init__(self, vocab: int, width: int, scale: float = 1.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)
        with torch.no_grad():
            self.emb.weight.copy_(scale * torch.randn(vocab, width, generator=gen))
        self.shapes: list[tuple[int, ...]] = []
        self.outputs: list[weakref.ref] = []
        self.most_alive = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        alive = sum(ref() is not None for ref in self.outputs)
        self.most_alive = max(self.most_alive, alive)
        self.shapes.append(tuple(idx.shape))
        out = self.head(self.emb(idx))
        self.outputs.append(weakref.ref(out))
        return out


def _windows(vocab: int, n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, tokens + 1), generator=gen)


def test_batch_size_adapts_to_a_memory_limit() -> None:
    """bytes per window = tokens x (12 x V + 32 x widest other output); here the widest other
    output is the embedding's width d = 16."""
    assert (NLL_BYTES_PER_LOGIT, ACTIVATION_BYTES) == (12, 32)
    model = Watched(1000, 16)
    w32 = _windows(1000, 50, 32)
    per_window = 32 * (12 * 1000 + 32 * 16)
    assert per_window == 400_384
    assert batch_for_memory(model, w32, 1 << 30) == 50  # 2681 fit: every window, no more
    assert batch_for_memory(model, w32, 4 * MiB) == 10  # 4,194,304 / 400,384 = 10.5
    assert batch_for_memory(model, w32, 1 * MiB) == 2  # 2.6
    assert batch_for_memory(model, w32, per_window) == 1
    assert batch_for_memory(model, w32, 300_000) == 1  # not one window: never below 1
    assert batch_for_memory(model, w32, 1) == 1
    # a wider vocabulary or a longer window: fewer windows at the same limit
    assert batch_for_memory(Watched(2000, 16), _windows(2000, 50, 32), 4 * MiB) == 5  # 784,384
    assert batch_for_memory(model, _windows(1000, 50, 64), 4 * MiB) == 5  # 800,768
    assert batch_for_memory(model, _windows(1000, 50, 128), 4 * MiB) == 2  # 1,601,536
    # shrinking limits never raise the batch
    batches = [batch_for_memory(model, w32, limit) for limit in (64 * MiB, 8 * MiB, MiB, 1000)]
    assert batches == sorted(batches, reverse=True) and batches[-1] == 1
    # the probe is one forward pass of one window at length 2
    assert model.shapes[-1] == (1, 2)
    with pytest.raises(UsageError, match="memory_bytes"):
        batch_for_memory(model, w32, 0)


def test_the_default_limit_is_at_most_1_gib_and_a_quarter_of_what_is_free() -> None:
    limit = eval_memory_limit()
    assert 1 <= limit <= DEFAULT_EVAL_MEMORY
    with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    # the machine's free memory moves between the two reads: compare loosely
    assert limit == DEFAULT_EVAL_MEMORY or abs(limit - free // 4) < 0.25 * free


def test_window_nll_is_the_same_whatever_the_batch(tiny_gpt, corpus) -> None:
    windows = eval_windows(corpus.val, window=32, max_tokens=20 * 32)  # 20 windows
    one = window_nll(tiny_gpt, windows, batch_size=1)
    auto = window_nll(tiny_gpt, windows)  # every window in one batch at the default limit
    assert auto.shape == (20,) and auto.dtype == torch.float64
    assert batch_for_memory(tiny_gpt, windows) == 20
    assert 1 < batch_for_memory(tiny_gpt, windows, MiB) < 10
    for other in (
        window_nll(tiny_gpt, windows, batch_size=3),  # batches of 3 and a last of 2
        auto,
        window_nll(tiny_gpt, windows, memory_bytes=MiB),  # a few windows a batch
        window_nll(tiny_gpt, windows, memory_bytes=1),  # one window, in runs of one position
        window_nll(tiny_gpt, windows, batch_size=4, memory_bytes=1 << 30),  # 4 caps the batch
    ):
        assert other.tolist() == pytest.approx(one.tolist(), rel=1e-6)
    ppl = perplexity(tiny_gpt, windows, memory_bytes=1)
    assert ppl == pytest.approx(perplexity(tiny_gpt, windows, batch_size=1), rel=1e-6)
    assert 1 < ppl < corpus.vocab_size


def test_kl_reads_the_same_whatever_the_batch(tiny_gpt, corpus) -> None:
    windows = eval_windows(corpus.val, window=32, max_tokens=12 * 32)
    noisy = copy.deepcopy(tiny_gpt)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    for top_k in (None, 8):  # exact (V = 65) and top-k with a tail
        ref = kl_reference(tiny_gpt, windows, top_k=top_k, batch_size=1)
        nll, kl = window_nll_kl(noisy, windows, ref, batch_size=1)
        for limit in (None, 1):  # every window at once; one position at a time
            other = kl_reference(tiny_gpt, windows, top_k=top_k, memory_bytes=limit)
            assert torch.allclose(other.logp, ref.logp, rtol=1e-5, atol=1e-5)
            if top_k is not None:
                assert torch.equal(other.ids, ref.ids)
                assert torch.allclose(other.log_tail, ref.log_tail, rtol=1e-5, atol=1e-5)
            nll2, kl2 = window_nll_kl(noisy, windows, ref, memory_bytes=limit)
            assert nll2.tolist() == pytest.approx(nll.tolist(), rel=1e-6)
            assert kl2.tolist() == pytest.approx(kl.tolist(), rel=1e-4, abs=1e-6)
        assert float(kl.min()) > 0


def test_long_windows_on_a_50k_vocabulary_fit_the_limit() -> None:
    """GPT-2's vocabulary, 1,024-token windows: one window's logits (1024 x 50,257 floats,
    206 MB, and their log-softmax) pass 256 MiB, so the batch is 1 and the window is read in
    runs of positions through the output layer, with the NLL of a run without a limit."""
    torch.manual_seed(0)
    vocab, tokens, limit = 50_257, 1024, 256 * MiB
    model = GPT(GPTConfig(vocab_size=vocab, block_size=tokens, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.wte.weight.mul_(40.0)  # logits far from uniform: a misplaced target would show
    windows = _windows(vocab, 2, tokens)
    assert batch_for_memory(model, windows, limit) == 1
    runs: list[int] = []
    hook = model.head.register_forward_hook(lambda m, a, out: runs.append(out.shape[1]))
    try:
        limited = window_nll(model, windows, memory_bytes=limit)
    finally:
        hook.remove()
    # after the probe's (2 positions, then each alone), each window in runs that fit the limit
    assert runs[:3] == [2, 1, 1]
    assert len(runs) > 5 and sum(runs[3:]) == 2 * tokens
    assert max(runs[3:]) * vocab * NLL_BYTES_PER_LOGIT <= limit
    unlimited = window_nll(model, windows, batch_size=2)  # both windows whole, one batch
    assert limited.tolist() == pytest.approx(unlimited.tolist(), rel=1e-6)
    per_token = float(unlimited.sum()) / (2 * tokens)
    assert abs(per_token - math.log(vocab)) > 0.5, per_token  # far from the uniform model's

    ref = kl_reference(model, windows, memory_bytes=limit)  # top 64 of 50,257
    assert ref.k == 64 and ref.logp.shape == (2, tokens, 64)
    whole = kl_reference(model, windows, batch_size=1)
    assert torch.equal(ref.ids, whole.ids)
    assert torch.allclose(ref.logp, whole.logp, rtol=1e-5, atol=1e-5)
    nll, kl = window_nll_kl(model, windows, ref, memory_bytes=limit)
    assert nll.tolist() == pytest.approx(unlimited.tolist(), rel=1e-6)
    assert float(kl.abs().max()) <= 1e-3  # the model's KL from itself


def test_logits_that_are_no_layers_output_are_read_one_whole_window_at_a_time() -> None:
    """A model that scales its head's output: the output layer cannot be run apart, so a window
    over the limit is read whole, at batch 1 (the documented fallback)."""

    class Scaled(Watched):
        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return 2.0 * super().forward(idx)

    model = Scaled(300, 8, scale=3.0)
    windows = _windows(300, 5, 16)
    values = window_nll(model, windows, memory_bytes=1)
    assert model.shapes[1:] == [(1, 16)] * 5  # after the probe: whole windows, one at a time
    assert values.tolist() == pytest.approx(
        window_nll(model, windows, batch_size=5).tolist(), rel=1e-6
    )


def test_only_one_batch_of_logits_is_alive_at_a_time() -> None:
    model = Watched(500, 8, scale=2.0)
    windows = _windows(500, 9, 16)
    limit = 2 * 16 * (NLL_BYTES_PER_LOGIT * 500 + ACTIVATION_BYTES * 8)  # two windows a batch
    window_nll(model, windows, memory_bytes=limit)
    assert model.shapes[1:] == [(2, 16)] * 4 + [(1, 16)]
    ref = kl_reference(model, windows, batch_size=2)
    window_nll_kl(model, windows, ref, batch_size=2)
    assert len(model.shapes) == 1 + 5 + 5 + 5  # the probe, then three reads of 5 batches
    assert model.most_alive == 0  # no earlier batch's logits alive at any forward pass


def test_bad_batch_or_memory_is_refused_in_one_line() -> None:
    model = Watched(50, 4)
    windows = _windows(50, 3, 8)
    with pytest.raises(UsageError, match="memory_bytes"):
        window_nll(model, windows, memory_bytes=-5)
    with pytest.raises(UsageError, match="batch_size"):
        window_nll(model, windows, batch_size=0)
    ref = kl_reference(model, windows)
    with pytest.raises(UsageError, match="predicted tokens"):
        window_nll_kl(model, windows[:, :-1], ref)
