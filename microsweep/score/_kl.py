"""KL divergence of a trial's next-token distributions from the dense model's, on the windows.

The dense model's distributions are computed once per sweep (`kl_reference`) and kept small:
for each predicted token, the whole distribution when the vocabulary has at most
`FULL_VOCAB_MAX` tokens, else its `DEFAULT_TOP_K` most likely tokens (log-probabilities and ids)
and the log of the mass outside them. A trial's KL(P_dense || Q_trial) per token is then

    sum over the kept ids of p (log p - log q)  +  p_tail (log p_tail - log q_tail)

with p_tail and q_tail the two models' mass outside the kept ids (1 - the sum over them): the
KL of the two distributions with the tail tokens merged into one outcome. It is exact when every
id is kept and never above the full KL otherwise (merging outcomes loses no mass and can only
lower a divergence). `window_nll_kl` reads the NLL and the KL from one forward pass.

Both read the windows as `window_nll` does (`plan_reading`): in batches chosen from a memory
limit unless the caller fixes one, a window too large for it in runs of positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from microsweep.errors import UsageError
from microsweep.score._perplexity import (
    _check_memory,
    check_windows,
    evaluating,
    plan_reading,
    read_logits,
)

__all__ = ["DEFAULT_TOP_K", "FULL_VOCAB_MAX", "KLReference", "kl_reference", "window_nll_kl"]

FULL_VOCAB_MAX = 256
"""Vocabularies up to this size keep the dense model's whole distribution (exact KL)."""

DEFAULT_TOP_K = 64
"""Tokens kept per position for a larger vocabulary: 64 x 8 bytes per token (about 4 MiB for
8192 evaluation tokens, beside 1.6 GiB for GPT-2's full distributions)."""

KL_BYTES_PER_LOGIT = 16
"""Working bytes per logit when the kept tokens are a top k: the float32 logits, their
log-softmax, and the log-sum-exp of the tail's temporaries."""

EXACT_KL_BYTES_PER_LOGIT = 48
"""Working bytes per logit of the exact KL (vocabulary <= `FULL_VOCAB_MAX`): the float32
log-softmax beside five float64 tensors of the per-token sum."""


@dataclass(frozen=True)
class KLReference:
    """The dense model's next-token distributions on the evaluation windows.

    - `logp`: float32 (n_windows, T, K), log-probabilities of the kept tokens (every token, in
      vocabulary order, when `ids` is None);
    - `ids`: int32 (n_windows, T, K), which tokens those are; None when K is the vocabulary;
    - `log_tail`: float32 (n_windows, T), log of the mass outside the kept tokens (None when
      every token is kept);
    - `vocab`: the vocabulary size V.
    """

    logp: torch.Tensor
    ids: torch.Tensor | None
    log_tail: torch.Tensor | None
    vocab: int

    @property
    def k(self) -> int:
        """Tokens kept per predicted position."""
        return int(self.logp.shape[-1])

    @property
    def exact(self) -> bool:
        """Whether the whole distribution is kept (the KL is then exact)."""
        return self.ids is None

    @property
    def n_windows(self) -> int:
        """Evaluation windows the reference covers."""
        return int(self.logp.shape[0])

    @property
    def tokens_per_window(self) -> int:
        """Predicted tokens per window."""
        return int(self.logp.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes the reference's tensors hold (what every worker receives)."""
        tensors = (self.logp, self.ids, self.log_tail)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def token_kl(self, logits: torch.Tensor, windows: torch.Tensor, start: int = 0) -> torch.Tensor:
        """KL(P_dense || Q) of every predicted token, float64 (B, t), for a trial's `logits`
        (B, t, V) on the reference's windows `windows` (B indices), positions `start` to
        `start + t` (t is every position unless the window is read in runs). Overwrites
        `logits` with the trial's log-probabilities (the caller's NLL reads them first)."""
        t = logits.shape[1]
        if logits.shape[-1] != self.vocab or not 0 <= start <= start + t <= self.tokens_per_window:
            raise UsageError(
                f"the KL reference holds {self.tokens_per_window} tokens of vocabulary "
                f"{self.vocab} per window; the model gave logits {tuple(logits.shape)}"
                + (f" at position {start}" if start else "")
            )
        logq = logits
        idx = windows.cpu()
        at = slice(start, start + t)
        logp = self.logp[idx, at].to(logq.device, torch.float64)
        if self.ids is None:
            kl = _terms(logp, logq.double()).sum(dim=-1)
        else:
            ids = self.ids[idx, at].to(logq.device, torch.long)
            head = _terms(logp, logq.gather(-1, ids).double()).sum(dim=-1)
            logq.scatter_(-1, ids, -torch.inf)  # the tail: every token but the kept ones
            log_q_tail = torch.logsumexp(logq, dim=-1).double()
            log_p_tail = self.log_tail[idx, at].to(logq.device, torch.float64)
            kl = head + _terms(log_p_tail, log_q_tail)
        return kl.clamp_(min=0.0)  # >= 0 exactly; only rounding goes below (NaN stays NaN)


def _terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p (log p - log q) elementwise, 0 where p is 0 (also against log q = -inf)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


def kl_reference(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int | None = None,
    top_k: int | None = None,
    memory_bytes: int | None = None,
) -> KLReference:
    """The dense `model`'s next-token distributions on `windows` (one forward pass over them),
    kept on the CPU: every token's log-probability when the vocabulary has at most
    `FULL_VOCAB_MAX` tokens (or `top_k` >= V), else the `top_k` (default `DEFAULT_TOP_K`) most
    likely tokens' with the log of the rest's mass. `batch_size` and `memory_bytes` as in
    `window_nll`."""
    check_windows(windows, batch_size)
    _check_memory(memory_bytes)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UsageError(f"kl_reference: top_k={top_k!r} must be an int >= 1 (or None)")
    n, tokens = windows.shape[0], windows.shape[1] - 1
    kept: dict[str, torch.Tensor] = {}  # filled once the vocabulary is known
    vocab = 0

    def read(start: int, pos: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        nonlocal vocab
        vocab = logits.shape[-1]
        k = top_k if top_k is not None else vocab if vocab <= FULL_VOCAB_MAX else DEFAULT_TOP_K
        k = min(k, vocab)
        if not kept:
            kept["logp"] = torch.empty(n, tokens, k, dtype=torch.float32)
            if k < vocab:
                kept["ids"] = torch.empty(n, tokens, k, dtype=torch.int32)
                kept["tail"] = torch.empty(n, tokens, dtype=torch.float32)
        at = (slice(start, start + logits.shape[0]), slice(pos, pos + logits.shape[1]))
        logp = F.log_softmax(logits, dim=-1)
        if k == vocab:
            kept["logp"][at] = logp.cpu()
            return
        top, ids = logp.topk(k, dim=-1)
        kept["logp"][at] = top.cpu()
        kept["ids"][at] = ids.to(torch.int32).cpu()
        kept["tail"][at] = torch.logsumexp(logp.scatter_(-1, ids, -torch.inf), dim=-1).cpu()

    with evaluating(model):
        plan = plan_reading(model, windows, batch_size, memory_bytes, KL_BYTES_PER_LOGIT)
        read_logits(model, windows, plan, read)
    return KLReference(
        logp=kept["logp"], ids=kept.get("ids"), log_tail=kept.get("tail"), vocab=vocab
    )


def window_nll_kl(
    model: nn.Module,
    windows: torch.Tensor,
    reference: KLReference,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int | None = None,
    memory_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window summed NLL (as `window_nll` gives it) and summed KL(P_dense || Q) of
    `windows`, both float64 (n,), from one forward pass. `indices` names the reference's
    windows these are (default: all of them, in order); `batch_size` and `memory_bytes` as in
    `window_nll`."""
    check_windows(windows, batch_size)
    _check_memory(memory_bytes)
    if windows.shape[1] - 1 != reference.tokens_per_window:
        raise UsageError(
            f"window_nll_kl: windows of {windows.shape[1] - 1} predicted tokens, but the KL "
            f"reference holds {reference.tokens_per_window} per window; build the reference on "
            "these windows"
        )
    if indices is None:
        indices = range(windows.shape[0])
    where = torch.as_tensor(list(indices), dtype=torch.long)
    if where.numel() != windows.shape[0]:
        raise UsageError(
            f"window_nll_kl: {where.numel()} indices for {windows.shape[0]} windows; give one "
            "reference window per window"
        )
    if where.numel() and not (0 <= int(where.min()) and int(where.max()) < reference.n_windows):
        raise UsageError(
            f"window_nll_kl: indices must lie in 0..{reference.n_windows - 1}, the reference's "
            "windows"
        )
    nll_sums = torch.zeros(windows.shape[0], dtype=torch.float64)
    kl_sums = torch.zeros(windows.shape[0], dtype=torch.float64)

    def read(start: int, pos: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logq = F.log_softmax(logits, dim=-1)
        # nll_loss on log_softmax is cross_entropy's own arithmetic: `window_nll`'s values
        nll = F.nll_loss(logq.reshape(-1, logq.shape[-1]), targets.reshape(-1), reduction="none")
        rows = slice(start, start + targets.shape[0])
        nll_sums[rows] += nll.to(torch.float64).view(targets.shape).sum(dim=1).cpu()
        kl_sums[rows] += reference.token_kl(logq, where[rows], pos).sum(dim=1).cpu()

    per_logit = EXACT_KL_BYTES_PER_LOGIT if reference.exact else KL_BYTES_PER_LOGIT
    with evaluating(model):
        plan = plan_reading(model, windows, batch_size, memory_bytes, per_logit)
        read_logits(model, windows, plan, read)
    return nll_sums, kl_sums
