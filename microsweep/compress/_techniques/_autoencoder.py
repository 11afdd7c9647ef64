"""Auto-decoder compression: latent codes per weight row plus one learned decoder per group
(`DecodedLinear`, `AutoDecoder`), trained on the weights alone.

Counting (reference ``compression-techniques.md`` §3: the stored artifact is the latent codes
plus the decoder, and the decoder runs once at load time):
- `AutoDecoder` ("ae_decoder"): stores its four parameters, 0 ops per token. Shared by several
  layers, it is one module object and is counted once (the counter visits each module once and
  each stored tensor once).
- `DecodedLinear` ("decoded_linear"): stores its codes and bias; per token it is the linear
  layer of its decoded weight, counted as ``nn.Linear`` is (nnz multiplies, adds per
  `CountConfig.adds`, fp32): a decoded weight has no exact zeros, so that is the dense count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from microsweep.errors import SpaceError
from microsweep.score import FLOAT_BITS, Cost, RuleContext, matvec, register_rule

from .._autoencoder import AutoDecoder, DecodedLinear, compress_linears
from ._base import Form, GroupTechnique, RebuildContext, RuleCheck, SpecContext

__all__ = ["DECODED", "Autoencoder"]


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
    nnz = matvec(cost, weight, module.bias, ctx)
    cost.sparsity = 1 - nnz / weight.numel()
    return cost


class DecodedForm(Form):
    """`DecodedLinear` ("decoded"): its shapes plus its decoder's spec; a layer whose decoder
    another layer wrote first names that layer (``"decoder_at"``) and shares its decoder."""

    types = (DecodedLinear,)
    spec_types = ("decoded",)

    def spec(self, module: nn.Module, ctx: SpecContext) -> dict[str, Any]:
        """Shapes, the decoder's spec, and where the decoder was first written."""
        spec = {**module.spec(), "decoder": module.decoder.spec()}
        first = ctx.first.setdefault(id(module.decoder), ctx.path)
        if first != ctx.path:  # one decoder for the group: rebuilt once, then shared
            spec["decoder_at"] = first
        return spec

    def rebuild(self, spec: Mapping[str, Any], ctx: RebuildContext) -> nn.Module:
        """An empty layer around its own decoder, or the one placed at ``decoder_at``."""
        if spec.get("decoder_at") is not None:
            decoder = ctx.find(str(spec["decoder_at"])).decoder
        else:
            decoder = AutoDecoder.from_spec(spec["decoder"])
        return DecodedLinear.from_spec(spec, decoder)

    def sides(self, spec: Mapping[str, Any]) -> tuple[int, int]:
        """(in, out) as written."""
        return int(spec["in"]), int(spec["out"])


DECODED = DecodedForm()


def _one_input_size(rule: RuleCheck) -> bool:
    return len({i.in_features for i in rule.members}) <= 1


class Autoencoder(GroupTechnique):
    """Codes of length ``rank`` per weight row and one decoder per group (the tied rule's
    layers, or a layer alone); stored dense at fp32."""

    name = "autoencoder"
    forms = (DECODED,)

    def check_rule(self, rule: RuleCheck) -> None:
        """Dense-only, and a joint decoder (tied) decodes rows of one size."""
        super().check_rule(rule)
        if rule.tied and not _one_input_size(rule):
            raise SpaceError(
                f"rule {rule.rule_key!r}: a joint decoder (tied=True) needs layers with one "
                "input size; split the rule or drop tied"
            )

    def build_group(
        self, rank: int, layers: Mapping[str, nn.Module], *, seed: int = 0
    ) -> dict[str, nn.Module]:
        """Codes and one decoder trained on the layers' weights (copies), gradients on. Small
        decoders train on one thread: their matrices are too small to split, and a second
        thread contending for a busy core made them many times slower."""
        small = sum(m.weight.numel() for m in layers.values()) < 2**20
        threads = torch.get_num_threads()
        if small:
            torch.set_num_threads(1)
        try:
            with torch.enable_grad():
                return dict(compress_linears(dict(layers), code_dim=rank, joint=True, seed=seed))
        finally:
            torch.set_num_threads(threads)
