"""Vectorized bit packing: signed integers at exactly b bits each, and 1-bit masks.

Bits are laid out least-significant first, value after value, and the stream is padded with
zero bits to a whole byte. Packing loops over the b bit positions, never over elements, so a
million values pack in well under a second.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pack_mask", "pack_signed", "packed_len", "unpack_mask", "unpack_signed"]

MAX_BITS = 32


def packed_len(n_values: int, bits: int) -> int:
    """Bytes that `n_values` values of `bits` bits take once padded to a whole byte."""
    return (n_values * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bit-width {bits!r} must be an int in 1..{MAX_BITS}")


def pack_signed(values: torch.Tensor, bits: int) -> bytes:
    """Two's-complement `values` (any integer tensor, any shape) packed at `bits` bits each.

    Every value must lie in [-2^(b-1), 2^(b-1) - 1]; a value outside raises ValueError.
    """
    _check_bits(bits)
    flat = values.detach().reshape(-1).to(torch.int64).cpu().numpy()
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if flat.size and (flat.min() < low or flat.max() > high):
        raise ValueError(
            f"values span [{flat.min()}, {flat.max()}], outside {bits}-bit [{low}, {high}]"
        )
    unsigned = (flat & ((1 << bits) - 1)).astype(np.uint64)
    planes = np.empty((flat.size, bits), dtype=np.uint8)
    for k in range(bits):  # one pass per bit position, vectorized over all values
        planes[:, k] = (unsigned >> np.uint64(k)) & np.uint64(1)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_signed(data: bytes, bits: int, n_values: int) -> torch.Tensor:
    """The int64 tensor (n_values,) that `pack_signed` wrote into `data` at `bits` bits each."""
    _check_bits(bits)
    if len(data) != packed_len(n_values, bits):
        raise ValueError(f"{len(data)} bytes cannot hold exactly {n_values} values of {bits} bits")
    planes = np.unpackbits(
        np.frombuffer(data, dtype=np.uint8), count=n_values * bits, bitorder="little"
    ).reshape(n_values, bits)
    unsigned = np.zeros(n_values, dtype=np.int64)
    for k in range(bits):
        unsigned |= planes[:, k].astype(np.int64) << k
    signed = np.where(unsigned >= (1 << (bits - 1)), unsigned - (1 << bits), unsigned)
    return torch.from_numpy(signed.astype(np.int64))


def pack_mask(mask: torch.Tensor) -> bytes:
    """A bool tensor as one bit per element (row-major, least-significant bit first)."""
    flat = mask.detach().reshape(-1).to(torch.bool).cpu().numpy()
    return np.packbits(flat, bitorder="little").tobytes()


def unpack_mask(data: bytes, n: int) -> torch.Tensor:
    """The flat bool tensor (n,) that `pack_mask` wrote into `data`."""
    if len(data) != packed_len(n, 1):
        raise ValueError(f"{len(data)} bytes cannot hold exactly a {n}-bit mask")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n, bitorder="little")
    return torch.from_numpy(bits.astype(np.bool_))
