"""Built-in counting rules: torch layers, microsweep's compressed layers and the built-in GPT.

Each rule counts one module per token, online, batch size 1 (scoring reference §3), and leaves
its children to their own rules. Conventions, where the rules leave a choice:
- linear ``y = W x + b``: nnz(W) multiplies at max(weight bits, input bits)/32, adds per
  `CountConfig.adds`; biases are stored dense and unquantized;
- embedding lookup: indexing, 0 ops;
- LayerNorm over d: 6d others (mean, variance, subtract, divide), plus d mults (γ) and d adds (β)
  unless `CountConfig.fold_layernorm`;
- elementwise activations per output element (composites count a divide as a multiply, as
  counting.py does): ReLU 1 mult; sigmoid 2 mults + 1 add; tanh 3 mults + 2 adds; SiLU/swish
  3 mults + 1 add; GELU (erf) 3 mults + 1 add + 1 other (x/√2, erf, +1, ·x, ·0.5);
  GELU (tanh approximation) 6 mults + 2 adds + 1 other;
- activation × activation multiplies (attention) are fp32 inputs, weighted 1 (16/32 with the
  freebie).
"""

from __future__ import annotations

from torch import nn

from microsweep.compress._modules import CompressedLinear, LowRankLinear
from microsweep.models.gpt import GPT, Block, CausalSelfAttention
from microsweep.score._formulas import linear_adds
from microsweep.score._registry import FLOAT_BITS, Cost, Rule, RuleContext, register_rule

__all__: list[str] = []


def _linear_ops(
    cost: Cost, module: nn.Module, ctx: RuleContext, *, bits: int, act_bits: int
) -> tuple[int, int]:
    """Count ``W x + b`` multiplies and adds from the actual non-zeros; returns (nnz, numel)."""
    weight = module.weight.detach()
    row_nnz = (weight != 0).sum(dim=1)
    nnz = int(row_nnz.sum())
    bias = module.bias
    bias_nnz = int((bias.detach() != 0).sum()) if bias is not None else 0
    cost.mul(nnz, bits, act_bits)
    cost.add(
        linear_adds(
            row_nnz, weight.shape[1], bias=bias is not None, bias_nnz=bias_nnz, mode=ctx.config.adds
        )
    )
    return nnz, weight.numel()


@register_rule(nn.Linear)
def _linear(module: nn.Linear, name: str, ctx: RuleContext) -> Cost:
    cost = Cost("linear", bits=FLOAT_BITS, act_bits=FLOAT_BITS)
    cost.store(module.weight)
    if module.bias is not None:
        cost.store(module.bias)
    nnz, numel = _linear_ops(cost, module, ctx, bits=FLOAT_BITS, act_bits=FLOAT_BITS)
    cost.sparsity = 1 - nnz / numel if numel else 0.0
    return cost


@register_rule(CompressedLinear)
def _compressed_linear(module: CompressedLinear, name: str, ctx: RuleContext) -> Cost:
    """Weight at `bits` (sparse or block-sparse when `sparse`), fp32 bias, fp32 scales."""
    bits, act_bits = int(module.bits), int(module.act_bits)
    cost = Cost("compressed_linear", bits=bits, act_bits=act_bits)
    block = module.block if module.sparse else None
    cost.store(module.weight, bits=bits, sparse=module.sparse, block=block, compressed=True)
    if module.bias is not None:
        cost.store(module.bias, compressed=True)
    if bits < FLOAT_BITS and module.weight_scale is not None:
        cost.const(module.weight_scale.numel())
    if act_bits < FLOAT_BITS and module.act_scale is not None:
        cost.const(module.act_scale.numel())
    nnz, numel = _linear_ops(cost, module, ctx, bits=bits, act_bits=act_bits)
    cost.sparsity = 1 - nnz / numel if numel else 0.0
    return cost


@register_rule(LowRankLinear)
def _low_rank(module: LowRankLinear, name: str, ctx: RuleContext) -> Cost:
    """Nothing of its own: `first` and `second` are counted as linears; the row shows the rank."""
    return Cost("low_rank", rank=int(module.rank))


@register_rule(nn.Embedding)
def _embedding(module: nn.Embedding, name: str, ctx: RuleContext) -> Cost:
    """The table is stored; a lookup is indexing, not arithmetic (0 ops)."""
    cost = Cost("embedding", bits=FLOAT_BITS)
    cost.store(module.weight)
    return cost


@register_rule(nn.LayerNorm)
def _layernorm(module: nn.LayerNorm, name: str, ctx: RuleContext) -> Cost:
    cost = Cost("layernorm")
    d = 1
    for size in module.normalized_shape:
        d *= int(size)
    cost.other(6 * d)
    for param, op in ((module.weight, cost.mul), (module.bias, cost.add)):
        if param is None:
            continue
        if ctx.config.fold_layernorm:
            cost.fold(param)
        else:
            cost.store(param)
            op(d)
    return cost


def _elementwise(kind: str, mults: int, adds: int, others: int) -> Rule:
    def rule(module: nn.Module, name: str, ctx: RuleContext) -> Cost:
        n = ctx.elements(name)
        cost = Cost(kind)
        cost.mul(mults * n)
        cost.add(adds * n)
        cost.other(others * n)
        return cost

    rule.__doc__ = f"{kind}: {mults} mults + {adds} adds + {others} others per output element."
    return rule


register_rule(nn.ReLU)(_elementwise("relu", 1, 0, 0))
register_rule(nn.Sigmoid)(_elementwise("sigmoid", 2, 1, 0))
register_rule(nn.Tanh)(_elementwise("tanh", 3, 2, 0))
register_rule(nn.SiLU)(_elementwise("silu", 3, 1, 0))
_gelu_erf = _elementwise("gelu", 3, 1, 1)
_gelu_tanh = _elementwise("gelu", 6, 2, 1)


@register_rule(nn.GELU)
def _gelu(module: nn.GELU, name: str, ctx: RuleContext) -> Cost:
    """erf form: x/√2, erf, +1, ·x, ·0.5; tanh form: x³ (2), ·0.044715, +x, ·√(2/π), tanh, +1,
    ·x, ·0.5."""
    return (_gelu_tanh if module.approximate == "tanh" else _gelu_erf)(module, name, ctx)


@register_rule(CausalSelfAttention)
def _attention(module: CausalSelfAttention, name: str, ctx: RuleContext) -> Cost:
    """Per token and head over C attended positions: q·k (hs·C mults, (hs-1)·C adds), scaling by
    1/√hs (C mults), softmax (3C-1 others), attn·v (hs·C mults, (C-1)·hs adds). The projections
    c_attn and c_proj are children with their own rules."""
    h, d = int(module.n_head), int(module.n_embd)
    hs, c = d // h, ctx.context
    cost = Cost("attention")
    cost.mul(h * (2 * hs * c + c))
    cost.add(h * ((hs - 1) * c + (c - 1) * hs))
    cost.other(h * (3 * c - 1))
    return cost


@register_rule(Block)
def _block(module: Block, name: str, ctx: RuleContext) -> Cost:
    """The two residual additions, d each."""
    cost = Cost("block")
    cost.add(2 * int(module.attn.n_embd))
    return cost


@register_rule(GPT)
def _gpt(module: GPT, name: str, ctx: RuleContext) -> Cost:
    """Token plus position embedding (d adds) and the output softmax over V (3V-1 others)."""
    cost = Cost("model")
    cost.add(module.config.n_embd)
    cost.other(3 * module.config.vocab_size - 1)
    return cost
