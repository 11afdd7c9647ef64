"""Frequency bands of a vocabulary: an adaptive embedding and an adaptive (exact) softmax head.

The vocabulary is ranked by how often calibration tokens use each word and cut into bands; each
band keeps its rows its own way (`Band`: dense rows, or a (V_b, r) table and an r -> d
projection, each pruned and quantized as a `CompressedEmbedding`). `BandSet` holds the bands
and the stored order of their words; `BandedHead` computes every band's logits and gathers them
back into vocabulary order, so the softmax is the full normalized distribution (perplexity is
exact); `BandedEmbedding` looks each token up in its band (a factorized band projects its row).
A tied table and head hold the same `BandSet`: every tensor is stored once.

Bands the policy leaves untouched are merged into one dense "rest" band whose rows keep
vocabulary order: its words are the complement of the stored bands' words, so they cost no
index and an untouched band costs exactly its dense rows. Each band counts its own operations
and stores its own words, so the counter's rows (``<layer>.bands.bands.head@1``) say what each
band of the space costs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._modules import fake_quantize_symmetric

__all__ = ["REST", "Band", "BandSet", "BandedEmbedding", "BandedHead", "band_key", "index_bits"]


def index_bits(vocab: int) -> int:
    """Bits per stored word index of a vocabulary of `vocab` words: ceil(log2 V), at least 1."""
    return max(1, math.ceil(math.log2(max(int(vocab), 2))))


def band_key(layer: str, index: int) -> str:
    """The key of band `index` of `layer` in its `BandSet` (module names take no dots):
    ``"head@1"``, ``"lm:head@1"`` for ``"lm.head"``; the counter's rows carry it."""
    return f"{layer.replace('.', ':')}@{index}"


REST = "rest"
"""The key of the dense band of the words no changed band takes."""


class Band(nn.Module):
    """One band's rows: `rows` (V_b, d), or `table` (V_b, r) and `proj` (r, d) with
    W_b = table @ proj; each an `nn.Embedding` or a `CompressedEmbedding` (per-row scales), read
    as matrices. `bias` (V_b,) is an output head's bias for these words, or None. `words`
    (stored: V_b integers) are its words in row order, None for the rest band (its words are
    the others, in vocabulary order); `share` is its words' share of the calibration tokens.
    `act_bits` (with `act_scale`) quantizes a head's input before this band's logits. `roles`
    says what uses it (``"head"``, ``"table"``), set by the banded modules holding it:
    a band counts its own operations (its logits for a head, its projection for a table)."""

    def __init__(
        self,
        rows: nn.Module | None = None,
        table: nn.Module | None = None,
        proj: nn.Module | None = None,
        bias: nn.Parameter | None = None,
        words: torch.Tensor | None = None,
        share: float = 0.0,
        act_bits: int = 32,
    ) -> None:
        super().__init__()
        if (rows is None) == (table is None) or (table is None) != (proj is None):
            raise ValueError("a band holds rows, or a table and a projection")
        self.rows = rows
        self.table = table
        self.proj = proj
        self.bias = bias
        self.act_bits = int(act_bits)
        self.register_buffer("act_scale", torch.ones(()) if self.act_bits < 32 else None)
        self.register_buffer("words", None if words is None else words.to(torch.int64))
        self.share = float(share)
        self.roles: set[str] = set()
        self.vocab = 0  # the whole vocabulary's size, set by the `BandSet` holding it

    @property
    def size(self) -> int:
        """Words in the band (V_b)."""
        matrix = self.rows if self.rows is not None else self.table
        return int(matrix.weight.shape[0])

    @property
    def rank(self) -> int | None:
        """The factorized band's rank r, or None for dense rows."""
        return None if self.proj is None else int(self.proj.weight.shape[0])

    def matrices(self) -> list[nn.Module]:
        """The modules holding its matrices: rows, or table then projection."""
        return [self.rows] if self.rows is not None else [self.table, self.proj]

    def weight_matrix(self) -> torch.Tensor:
        """The (V_b, d) rows the band stands for (table @ proj when factorized)."""
        if self.rows is not None:
            return self.rows.weight
        return self.table.weight @ self.proj.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h W_b^T (+ bias), a factorized band as (h proj^T) table^T; h quantized to
        `act_bits` first when below 32 (a head's input only: a table's lookup is exact)."""
        if self.act_scale is not None:
            h = fake_quantize_symmetric(h, self.act_scale, self.act_bits)
        if self.rows is not None:
            return F.linear(h, self.rows.weight, self.bias)
        return F.linear(F.linear(h, self.proj.weight), self.table.weight, self.bias)

    def embed(self, rows: torch.Tensor) -> torch.Tensor:
        """The embeddings of the band's rows `rows` (a factorized band projects its r values)."""
        if self.rows is not None:
            return self.rows.weight[rows]
        return self.table.weight[rows] @ self.proj.weight


class BandSet(nn.Module):
    """The bands of one vocabulary of `vocab` words, by key (`band_key`; the rest band, when
    there is one, last under `REST`). `order` (every stored band's words, band after band),
    `inverse`, `band_of` and `row_of` are derived from the bands' words (never stored): each
    word's place in the bands' concatenation, its band and its row there."""

    def __init__(self, vocab: int, bands: dict[str, Band]) -> None:
        super().__init__()
        self.vocab = int(vocab)
        self.bands = nn.ModuleDict(bands)
        for key, band in self.bands.items():
            if (band.words is None) != (key == REST) or (key == REST and key != list(bands)[-1]):
                raise ValueError("every band but a last rest band lists its words")
        for band in self.bands.values():
            band.vocab = self.vocab
        for name in ("order", "inverse", "band_of", "row_of"):  # derived: not in state_dict
            self.register_buffer(name, torch.empty(0, dtype=torch.int64), persistent=False)
        if all(b.words is None or b.words.device.type != "meta" for b in self.bands.values()):
            self.restore_index()

    @property
    def has_rest(self) -> bool:
        return REST in self.bands

    @property
    def sizes(self) -> list[int]:
        """Rows per band, in band order."""
        return [band.size for band in self.bands.values()]

    def words(self) -> torch.Tensor:
        """Every word in the bands' row order: the stored bands' words, then the rest band's."""
        if not self.has_rest:
            return self.order
        taken = torch.zeros(self.vocab, dtype=torch.bool, device=self.order.device)
        taken[self.order] = True
        return torch.cat([self.order, (~taken).nonzero().reshape(-1)])

    def restore_index(self) -> None:
        """Rebuild `order`, `inverse`, `band_of` and `row_of` from the bands' words."""
        stored = [b.words for b in self.bands.values() if b.words is not None]
        self.order = torch.cat(stored) if stored else torch.empty(0, dtype=torch.int64)
        sizes = self.sizes
        if sum(sizes) != self.vocab or any(
            len(b.words) != b.size for b in self.bands.values() if b.words is not None
        ):
            raise ValueError("the bands' rows do not cover the vocabulary")
        words = self.words()
        device = words.device
        inverse = torch.full((self.vocab,), -1, dtype=torch.int64, device=device)
        inverse[words] = torch.arange(self.vocab, device=device)
        if bool((inverse < 0).any()):
            raise ValueError("a word is in no band, or in two")
        counts = torch.tensor(sizes, device=device)
        band_at = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
        starts = torch.cumsum(counts, 0) - counts
        self.inverse = inverse
        self.band_of = band_at[inverse]
        self.row_of = inverse - starts[self.band_of]


class BandedHead(nn.Module):
    """An output head over bands: every band's logits, gathered into vocabulary order (the
    full distribution; no word is left out). A drop-in for the ``nn.Linear`` head."""

    def __init__(self, bands: BandSet, in_features: int) -> None:
        super().__init__()
        self.bands = bands
        self.in_features = int(in_features)
        for band in bands.bands.values():
            band.roles.add("head")

    @property
    def out_features(self) -> int:
        return self.bands.vocab

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pieces = [band.logits(h) for band in self.bands.bands.values()]
        return torch.cat(pieces, dim=-1).index_select(-1, self.bands.inverse)


class BandedEmbedding(nn.Module):
    """An embedding table over bands: each token is looked up in its band (a factorized band
    projects its row to the embedding size). A drop-in for ``nn.Embedding``."""

    def __init__(self, bands: BandSet, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.bands = bands
        self.embedding_dim = int(embedding_dim)
        self.padding_idx = padding_idx
        for band in bands.bands.values():
            band.roles.add("table")

    @property
    def num_embeddings(self) -> int:
        return self.bands.vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        which = self.bands.band_of[flat]
        rows = self.bands.row_of[flat]
        first = next(iter(self.bands.bands.values()))
        dtype = first.matrices()[-1].weight.dtype
        out = torch.empty(flat.numel(), self.embedding_dim, dtype=dtype, device=flat.device)
        for b, band in enumerate(self.bands.bands.values()):
            picked = (which == b).nonzero().reshape(-1)
            if picked.numel():
                out[picked] = band.embed(rows[picked])
        return out.view(*idx.shape, self.embedding_dim)
