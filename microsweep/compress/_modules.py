"""Modules that compressed layers become: what the counter counts and the exporter writes.

`CompressedLinear` holds a weight already on its quantization grid with pruned entries at zero,
plus the constants inference needs (per-output-channel weight scales, an input scale).
`LowRankLinear` is the factorized pair ``second(first(x))`` that replaces a full-rank Linear;
`TiedLowRankEmbedding` is the table side of a factorized tied pair (its head is a
`LowRankLinear` holding the same two tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CompressedEmbedding",
    "CompressedLinear",
    "LowRankEmbedding",
    "LowRankLinear",
    "TiedLowRankEmbedding",
    "fake_quantize_symmetric",
]


def fake_quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round `x / scale` to the signed grid [-(2^(b-1) - 1), 2^(b-1) - 1] and scale back.

    Without autograd the steps after the division run in place on its result (one new tensor
    instead of four: the same values, a fraction of the memory traffic at evaluation)."""
    qmax = 2 ** (bits - 1) - 1
    if not torch.is_grad_enabled():
        return (x / scale).round_().clamp_(-qmax, qmax).mul_(scale)
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


class CompressedLinear(nn.Module):
    """A Linear whose weight is pruned and/or quantized; a drop-in for ``nn.Linear``.

    Attributes the counter and the exporter rely on:
    - ``weight`` (out, in) float32 holding the dequantized values, exact zeros where pruned;
    - ``bias`` float32 or None (stored unquantized);
    - ``bits``: weight width (32 = fp32, no scales); ``weight_scale`` (out,) fp32 when bits < 32,
      or (out, in / group) with ``group``: one scale per row and run of `group` input columns;
    - ``act_bits``: input width (32 = not quantized); ``act_scale`` () fp32 when act_bits < 32;
    - ``sparse``: stored as non-zeros plus a bitmask; ``block``: mask granularity (rows, cols) or
      None for one bit per element; ``mask`` (out, in) bool of the kept entries when sparse.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 32,
        act_bits: int = 32,
        sparse: bool = False,
        block: tuple[int, int] | None = None,
        group: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.act_bits = act_bits
        self.sparse = sparse
        self.block = tuple(block) if block is not None else None
        self.group = group if bits < 32 else None
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        scale_shape = (out_features,) if self.group is None else (
            out_features, in_features // self.group)  # fmt: skip
        self.register_buffer(
            "weight_scale", torch.ones(scale_shape) if bits < 32 else None, persistent=True
        )
        self.register_buffer("act_scale", torch.ones(()) if act_bits < 32 else None)
        self.register_buffer(
            "mask", torch.ones(out_features, in_features, dtype=torch.bool) if sparse else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_scale is not None:
            x = fake_quantize_symmetric(x, self.act_scale, self.act_bits)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, act_bits={self.act_bits}, sparse={self.sparse}, block={self.block}"
            + ("" if self.group is None else f", group={self.group}")
        )


class LowRankLinear(nn.Module):
    """``W ~= second.weight @ first.weight``: ``first`` is in->rank without bias, ``second``
    is rank->out with the original bias. Either factor may itself be a `CompressedLinear`."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features

    @property
    def rank(self) -> int:
        return self.first.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class CompressedEmbedding(CompressedLinear):
    """An embedding table pruned and/or quantized like a `CompressedLinear` weight; a drop-in
    for ``nn.Embedding`` whose ``weight`` is (num_embeddings, embedding_dim).

    Seen as a matrix it is ``out_features = num_embeddings`` rows of ``in_features =
    embedding_dim`` (the orientation of a tied output head), so rows get one scale each. A
    lookup is indexing: no input to quantize (``act_bits`` is 32) and no bias.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        bits: int = 32,
        sparse: bool = False,
        block: tuple[int, int] | None = None,
        padding_idx: int | None = None,
        group: int | None = None,
    ) -> None:
        super().__init__(
            embedding_dim, num_embeddings, bias=False, bits=bits, sparse=sparse, block=block,
            group=group,
        )  # fmt: skip
        self.padding_idx = padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
            f"sparse={self.sparse}, block={self.block}"
        )


class LowRankEmbedding(LowRankLinear):
    """``E ~= table.weight @ proj.weight.T``: a (num_embeddings, rank) table looked up, then
    mapped to the embedding size by a bias-free rank -> dim Linear (rank x dim multiplies a
    token). ``first`` is the table and ``second`` the projection, as `LowRankLinear` runs them."""

    @property
    def in_features(self) -> int:
        return self.second.out_features  # the embedding dim, as CompressedEmbedding sees it

    @property
    def out_features(self) -> int:
        return self.first.weight.shape[0]

    @property
    def num_embeddings(self) -> int:
        return self.first.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.second.out_features

    @property
    def rank(self) -> int:
        return self.second.in_features


class TiedLowRankEmbedding(nn.Module):
    """The table side of a factorized tied pair: row i of ``E ~= A B`` is ``A[i] @ B``, a
    (num_embeddings, rank) lookup then a rank -> dim projection (rank x dim multiplies a token).

    ``table`` (A, (V, r)) and ``proj`` (B, (r, d)) are the very Parameters the tied head's
    `LowRankLinear` holds as ``second.weight`` and ``first.weight`` (its logits are
    ``(h B^T) A^T``): the head's factors store, prune and quantize them (and count them), and
    this module reads the same values. ``proj_bits``, ``proj_sparse`` and ``proj_block`` repeat
    how B is stored, for counting the projection's multiplies.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        *,
        padding_idx: int | None = None,
        proj_bits: int = 32,
        proj_sparse: bool = False,
        proj_block: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.empty(num_embeddings, rank))
        self.proj = nn.Parameter(torch.empty(rank, embedding_dim))
        self.padding_idx = padding_idx
        self.proj_bits = int(proj_bits)
        self.proj_sparse = bool(proj_sparse)
        self.proj_block = tuple(proj_block) if proj_block is not None else None

    @classmethod
    def tied_to(cls, head: LowRankLinear, padding_idx: int | None = None) -> TiedLowRankEmbedding:
        """The table side of `head` (first factor B, second factor A): the same Parameters."""
        first, second = head.first, head.second
        rows, rank = second.weight.shape
        module = cls(
            rows,
            first.weight.shape[1],
            rank,
            padding_idx=padding_idx,
            proj_bits=getattr(first, "bits", 32),
            proj_sparse=getattr(first, "sparse", False),
            proj_block=getattr(first, "block", None) if getattr(first, "sparse", False) else None,
        )
        module.table = second.weight
        module.proj = first.weight
        return module.train(head.training)

    @property
    def num_embeddings(self) -> int:
        return self.table.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.proj.shape[1]

    @property
    def rank(self) -> int:
        return self.proj.shape[0]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.table, self.padding_idx) @ self.proj

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, "
            f"proj_bits={self.proj_bits}, proj_sparse={self.proj_sparse}"
        )
