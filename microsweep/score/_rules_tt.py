"""Counting rules for the tensor-train layers (`TTLinear`, `TTEmbedding`).

Both store their cores (and a TTLinear its bias) dense at fp32, claimed as compressed so their
spec wins over any other claim on the same tensors. Ops per token are what each `forward` runs
(counted step by step in `microsweep.compress._tt`): a TTLinear's chain of core contractions
plus the bias adds, fp32 inputs; a TTEmbedding's product of the looked-up core slices (unlike a
dense table, whose lookup is plain indexing and costs nothing).
"""

from __future__ import annotations

from microsweep.compress._tt import TTEmbedding, TTLinear
from microsweep.score._registry import FLOAT_BITS, Cost, RuleContext, register_rule

__all__: list[str] = []


def _tt_cost(kind: str, module: TTLinear | TTEmbedding, ops: tuple[int, int]) -> Cost:
    cost = Cost(kind, bits=FLOAT_BITS, act_bits=FLOAT_BITS, sparsity=0.0)
    cost.rank = max(module.ranks) if module.ranks else None
    for core in module.cores:
        cost.store(core, compressed=True)
    mults, adds = ops
    cost.mul(mults, FLOAT_BITS, FLOAT_BITS)
    cost.add(adds)
    return cost


@register_rule(TTLinear)
def _tt_linear(module: TTLinear, name: str, ctx: RuleContext) -> Cost:
    """Cores and bias stored fp32; `TTLinear.matvec_ops()` multiplies and adds at fp32."""
    cost = _tt_cost("tt_linear", module, module.matvec_ops())
    if module.bias is not None:
        cost.store(module.bias, compressed=True)
    return cost


@register_rule(TTEmbedding)
def _tt_embedding(module: TTEmbedding, name: str, ctx: RuleContext) -> Cost:
    """Cores stored fp32; `TTEmbedding.lookup_ops()` per token to rebuild the looked-up row."""
    return _tt_cost("tt_embedding", module, module.lookup_ops())
