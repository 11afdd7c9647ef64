"""Pure MicroNet formulas: storage bits of one tensor, op weights, and the adds of a linear layer.

These are the arithmetic of the scoring reference (``micronet-scoring.md`` §2.4, §3.3, §3.5)
without any torch module around them, so that the reference's worked examples can be checked
number for number and the counter can reuse exactly the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from microsweep.errors import UsageError

__all__ = [
    "AddsMode",
    "block_grid",
    "block_pattern",
    "linear_adds",
    "mask_bits",
    "mult_weight",
    "op_weight",
    "tensor_bits",
]

AddsMode = Literal["exact", "countingpy", "mit"]
ADDS_MODES: tuple[str, ...] = ("exact", "countingpy", "mit")


def _check_bits(*bits: int) -> None:
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise UsageError(f"bit-width {b!r} must be a positive int such as 8 or 32")


def op_weight(*input_bits: int) -> float:
    """32-bit-equivalent weight of one op: the widest input's bits / 32 (the output width is
    irrelevant). An fp32 add or exp is ``op_weight(32, 32) == 1``."""
    if not input_bits:
        raise UsageError("op_weight needs the bit-width of at least one input")
    _check_bits(*input_bits)
    return max(input_bits) / 32


def mult_weight(
    bits_a: int, bits_b: int, *, binary: bool = False, sign_magnitude: bool = True
) -> float:
    """Weight of one multiply of a `bits_a` by a `bits_b` value: max(a, b) / 32.

    With ``binary=True`` one input is a ±1 weight; multiplying it by a value whose format has a
    standalone sign bit (IEEE float, ``sign_magnitude=True``) is a sign flip and counts 1/32.
    The exception does not apply to two's-complement integers (``sign_magnitude=False``).
    """
    _check_bits(bits_a, bits_b)
    if binary and sign_magnitude:
        return 1 / 32
    return max(bits_a, bits_b) / 32


def mask_bits(shape: Sequence[int], block: tuple[int, int] | None = None) -> int:
    """Bitmask size of a sparse tensor: one bit per element, or one per `block` (rows, cols)
    of a 2-D tensor (partial blocks at the edges count as whole blocks)."""
    dims = [int(s) for s in shape]
    if any(s < 0 for s in dims):
        raise UsageError(f"shape {tuple(dims)} has a negative size")
    if block is None:
        return math.prod(dims)
    if len(dims) != 2:
        raise UsageError(f"block sparsity needs a 2-D tensor, got shape {tuple(dims)}")
    br, bc = block
    if br < 1 or bc < 1:
        raise UsageError(f"block {block!r} must be two positive ints such as (4, 4)")
    return math.ceil(dims[0] / br) * math.ceil(dims[1] / bc)


def block_grid(tensor: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(ceil(rows/br), ceil(cols/bc)) bool: the (rows, cols) blocks that hold a non-zero."""
    if tensor.dim() != 2:
        raise UsageError(f"block sparsity needs a 2-D tensor, got shape {tuple(tensor.shape)}")
    br, bc = block
    rows, cols = tensor.shape
    padded = torch.zeros(math.ceil(rows / br) * br, math.ceil(cols / bc) * bc, dtype=torch.bool)
    padded[:rows, :cols] = tensor.detach() != 0
    return padded.view(padded.shape[0] // br, br, padded.shape[1] // bc, bc).any(dim=(1, 3))


def block_pattern(tensor: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The elements a block mask stores: every element of each block that holds a non-zero.
    Zeros inside kept blocks are stored (a block mask cannot locate them) and multiplied by a
    block-sparse kernel, so values and multiplies are counted from this."""
    br, bc = block
    grid = block_grid(tensor, block)
    return grid.repeat_interleave(br, 0).repeat_interleave(bc, 1)[
        : tensor.shape[0], : tensor.shape[1]
    ]


def tensor_bits(numel: int, nnz: int, bits: int, mask_bits: int = 0) -> int:
    """Storage of one tensor in bits: ``nnz * bits + mask_bits``.

    Pass ``nnz = numel`` and ``mask_bits = 0`` for a tensor stored dense (explicit zeros are then
    stored like any value); for a sparse tensor pass its non-zero count and `mask_bits()`.
    """
    _check_bits(bits)
    if not 0 <= nnz <= numel:
        raise UsageError(f"nnz={nnz} must lie between 0 and numel={numel}")
    if mask_bits < 0:
        raise UsageError(f"mask_bits={mask_bits} must not be negative")
    return nnz * bits + mask_bits


def linear_adds(
    row_nnz: Sequence[int] | torch.Tensor,
    in_features: int,
    *,
    bias: bool,
    bias_nnz: int | None = None,
    mode: AddsMode = "exact",
) -> float:
    """Additions per token of ``y = W x + b`` for W (out, in) with `row_nnz[r]` non-zeros in row r.

    - ``exact``: Σ_r max(k_r - 1, 0) + nnz(b), what a sparse kernel really adds.
    - ``countingpy``: (in·d - 1)·out + out·[bias], the organizers' counting.py with density
      d = nnz/(in·out); the first term is clamped at 0 for matrices with fewer non-zeros than rows.
    - ``mit``: d·(in - 1)·out + d_b·out, the winning entry's form with d_b = nnz(b)/out.

    With every row non-empty and a fully non-zero bias, exact = countingpy and
    mit = countingpy + (1 - d)·out; each empty row adds 1 to exact - countingpy.
    """
    rows = torch.as_tensor(row_nnz, dtype=torch.float64).reshape(-1)
    out = rows.numel()
    if in_features < 1:
        raise UsageError(f"in_features={in_features} must be positive")
    if out and (bool((rows < 0).any()) or bool((rows > in_features).any())):
        raise UsageError(f"row non-zero counts must lie between 0 and in_features={in_features}")
    nnz = float(rows.sum())
    nnz_b = (out if bias else 0) if bias_nnz is None else int(bias_nnz)
    if not bias and nnz_b:
        raise UsageError("bias_nnz is non-zero but bias=False")
    if not 0 <= nnz_b <= out:
        raise UsageError(f"bias_nnz={nnz_b} must lie between 0 and the {out} output rows")
    if mode == "exact":
        return float(torch.clamp(rows - 1, min=0).sum()) + nnz_b
    if mode == "countingpy":
        return max(nnz - out, 0.0) + (out if bias else 0)
    if mode == "mit":
        return nnz * (in_features - 1) / in_features + nnz_b
    raise UsageError(f"adds mode {mode!r} is not one of {', '.join(ADDS_MODES)}")
