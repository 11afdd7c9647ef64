"""Counting rules for auto-decoder compression (`microsweep.compress._autoencoder`), reference
``compression-techniques.md`` §3: the stored artifact is the latent codes plus the decoder, and
the decoder runs once at load time.

- `AutoDecoder` ("ae_decoder"): stores its four parameters, 0 ops per token. Shared by several
  layers, it is one module object and is counted once (the counter visits each module once and
  each stored tensor once).
- `DecodedLinear` ("decoded_linear"): stores its codes and bias; per token it is the linear
  layer of its decoded weight, counted as ``nn.Linear`` is (nnz multiplies, adds per
  `CountConfig.adds`, fp32): a decoded weight has no exact zeros, so that is the dense count.

Importing this module registers both rules.
"""

from __future__ import annotations

import torch

from microsweep.compress._autoencoder import AutoDecoder, DecodedLinear
from microsweep.score._registry import FLOAT_BITS, Cost, RuleContext, register_rule
from microsweep.score._rules import _matvec

__all__: list[str] = []


@register_rule(AutoDecoder)
def _ae_decoder(module: AutoDecoder, name: str, ctx: RuleContext) -> Cost:
    """Stores every decoder parameter (fp32); runs at load time, so no per-token ops."""
    cost = Cost("ae_decoder", bits=FLOAT_BITS)
    for param in module.parameters(recurse=False):
        cost.store(param, compressed=True)
    return cost


@register_rule(DecodedLinear)
def _decoded_linear(module: DecodedLinear, name: str, ctx: RuleContext) -> Cost:
    """Codes and bias stored (fp32); ops those of ``W_hat x + b`` with W_hat = decoder(codes)."""
    cost = Cost("decoded_linear", bits=FLOAT_BITS, act_bits=FLOAT_BITS, rank=module.code_dim)
    cost.store(module.codes, compressed=True)
    if module.bias is not None:
        cost.store(module.bias, compressed=True)
    with torch.no_grad():
        weight = module.weight_matrix()
    nnz = _matvec(cost, weight, module.bias, ctx)
    cost.sparsity = 1 - nnz / weight.numel()
    return cost
