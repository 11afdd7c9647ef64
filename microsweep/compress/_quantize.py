"""Symmetric fake quantization: per-output-channel weight scales and a static input scale."""

from __future__ import annotations

import torch

from ._modules import fake_quantize_symmetric

__all__ = ["quantize_rows", "row_scales", "tensor_scale"]


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def row_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row scale max|w_row| / (2^(b-1) - 1); an all-zero row gets 1.0 to avoid 0/0."""
    amax = weight.detach().abs().amax(dim=1)
    return torch.where(amax > 0, amax / _qmax(bits), torch.ones_like(amax))


def quantize_rows(
    weight: torch.Tensor, bits: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight rounded to its per-row `bits` grid (mask re-applied), and the (out,) scales."""
    scale = row_scales(weight, bits)
    q = fake_quantize_symmetric(weight.detach(), scale[:, None], bits)
    if mask is not None:
        q = q * mask
    return q, scale


def tensor_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor scale max|x| / (2^(b-1) - 1) as a 0-d float32 tensor (1.0 if max|x| is 0)."""
    amax = amax.detach().to(torch.float32).reshape(())
    return torch.where(amax > 0, amax / _qmax(bits), torch.ones_like(amax))
