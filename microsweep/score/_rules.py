"""Built-in counting rules: torch layers and the built-in models (the rules of microsweep's
compressed layers live with their techniques in `microsweep.compress`).

Each rule counts one module per token, online, batch size 1 (scoring reference §3), and leaves
its children to their own rules. Conventions, where the rules leave a choice:
- linear ``y = W x + b``: nnz(W) multiplies at max(weight bits, input bits)/32, adds per
  `CountConfig.adds`; biases are stored dense and unquantized;
- embedding lookup: indexing, 0 ops;
- LayerNorm over d: 6d others (mean, variance, subtract, divide), plus d mults (γ) and d adds (β)
  unless `CountConfig.fold_layernorm`;
- elementwise activations per output element (composites count a divide as a multiply, as
  counting.py does): ReLU 1 mult (1 other with ``CountConfig.relu="other"``); sigmoid 2 mults +
  1 add; tanh 3 mults + 2 adds; SiLU/swish 3 mults + 1 add; GELU (erf) 3 mults + 1 add + 1 other
  (x/√2, erf, +1, ·x, ·0.5); GELU (tanh approximation) 6 mults + 2 adds + 1 other;
- softmax over n values: 3n-1 others (n exps, n-1 adds, n divides), as the winning entry did;
- attention over C positions per head of size d_k: q·k (d_k·C mults, (d_k-1)·C adds), scaling
  (C mults), softmax, attn·v (d_k·C mults, (C-1)·d_k adds); ``CountConfig.attention="mit"``
  drops the scaling and counts one softmax per layer;
- LSTM step (per layer and direction) of hidden size h: the gate products ``W_ih x + b_ih`` and
  ``W_hh h + b_hh`` like linear layers, 4h adds to join them, 3h sigmoids (i, f, o), 2h tanhs
  (g and the cell), 3h mults and h adds for ``c' = f·c + i·g`` and ``h' = o·tanh(c')``;
- activation × activation multiplies (attention, gating) are fp32 inputs, weighted 1 (16/32
  with the freebie).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from microsweep.models._gates import LinearLSTM
from microsweep.models.gpt import GPT, Block, CausalSelfAttention
from microsweep.models.lstm import LSTMLM
from microsweep.score._formulas import block_pattern, linear_adds
from microsweep.score._registry import FLOAT_BITS, Cost, Rule, RuleContext, register_rule

__all__ = ["linear_ops", "matvec"]


def matvec(
    cost: Cost,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ctx: RuleContext,
    *,
    bits: int = FLOAT_BITS,
    act_bits: int = FLOAT_BITS,
    block: tuple[int, int] | None = None,
) -> int:
    """Count ``W x + b`` multiplies and adds from the stored non-zeros (whole kept blocks for a
    block-sparse weight); returns that count."""
    weight = weight.detach()
    pattern = block_pattern(weight, block) if block is not None else weight != 0
    row_nnz = pattern.sum(dim=1)
    nnz = int(row_nnz.sum())
    bias_nnz = int((bias.detach() != 0).sum()) if bias is not None else 0
    cost.mul(nnz, bits, act_bits)
    cost.add(
        linear_adds(
            row_nnz, weight.shape[1], bias=bias is not None, bias_nnz=bias_nnz, mode=ctx.config.adds
        )
    )
    return nnz


def linear_ops(
    cost: Cost, module: nn.Module, ctx: RuleContext, *, bits: int, act_bits: int
) -> tuple[int, int]:
    """Count a linear module's ``W x + b``; returns (nnz, numel) of its weight."""
    block = getattr(module, "block", None) if getattr(module, "sparse", False) else None
    nnz = matvec(cost, module.weight, module.bias, ctx, bits=bits, act_bits=act_bits, block=block)
    return nnz, module.weight.numel()


@register_rule(nn.Linear)
def _linear(module: nn.Linear, name: str, ctx: RuleContext) -> Cost:
    cost = Cost("linear", bits=FLOAT_BITS, act_bits=FLOAT_BITS)
    cost.store(module.weight)
    if module.bias is not None:
        cost.store(module.bias)
    nnz, numel = linear_ops(cost, module, ctx, bits=FLOAT_BITS, act_bits=FLOAT_BITS)
    cost.sparsity = 1 - nnz / numel if numel else 0.0
    return cost


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


_SIGMOID = (2, 1, 0)
"""(mults, adds, others) of one sigmoid: exp, +1, divide (counting.py)."""
_TANH = (3, 2, 0)
"""(mults, adds, others) of one tanh (the JNLP extension of counting.py)."""

_relu_mult = _elementwise("relu", 1, 0, 0)
_relu_other = _elementwise("relu", 0, 0, 1)
register_rule(nn.Sigmoid)(_elementwise("sigmoid", *_SIGMOID))
register_rule(nn.Tanh)(_elementwise("tanh", *_TANH))
_silu = _elementwise("silu", 3, 1, 0)
register_rule(nn.SiLU)(_silu)
_gelu_erf = _elementwise("gelu", 3, 1, 1)
_gelu_tanh = _elementwise("gelu", 6, 2, 1)


@register_rule(nn.ReLU)
def _relu(module: nn.ReLU, name: str, ctx: RuleContext) -> Cost:
    """max(x, 0): 1 mult per element (counting.py) or, with ``relu="other"``, 1 other (MIT)."""
    return (_relu_other if ctx.config.relu == "other" else _relu_mult)(module, name, ctx)


@register_rule(nn.GELU)
def _gelu(module: nn.GELU, name: str, ctx: RuleContext) -> Cost:
    """erf form: x/√2, erf, +1, ·x, ·0.5; tanh form: x³ (2), ·0.044715, +x, ·√(2/π), tanh, +1,
    ·x, ·0.5."""
    return (_gelu_tanh if module.approximate == "tanh" else _gelu_erf)(module, name, ctx)


def _softmax_others(n: float) -> float:
    """Ops of one softmax over `n` values: n exps, n-1 adds, n divides, all counted as others."""
    return 3 * n - 1


@register_rule(nn.Softmax)
def _softmax(module: nn.Softmax, name: str, ctx: RuleContext) -> Cost:
    """3n-1 others per softmax over n values (`_softmax_others`), for every softmax of the output.

    Sized from a one-token forward: right for a softmax over features or a vocabulary. A softmax
    over attended positions belongs in the attention module's rule, which knows the context.
    """
    cost = Cost("softmax")
    for shape in ctx.shapes(name):
        if module.dim is not None:
            dim = module.dim
        else:  # torch's legacy implicit dim
            dim = 0 if len(shape) in (0, 1, 3) else 1
        n = shape[dim] if shape else 1
        if n:
            cost.other(math.prod(shape) // n * _softmax_others(n))
    return cost


def _attention_ops(cost: Cost, ctx: RuleContext, *, heads: int, head_size: int, c: float) -> None:
    """Per token over `c` attended positions: q·k, the 1/√d_k scaling, the softmax and attn·v.

    Faithful: all per head. ``CountConfig.attention="mit"``: no scaling (folded into the q
    weights) and one softmax per layer, as the winning entry counted (reference §3.4).
    """
    h, hs = heads, head_size
    mit = ctx.config.attention == "mit"
    cost.mul(h * hs * c)  # q·k
    cost.add(h * (hs - 1) * c)
    if not mit:
        cost.mul(h * c)  # scaling by 1/sqrt(d_k)
    cost.other((1 if mit else h) * _softmax_others(c))
    cost.mul(h * hs * c)  # attn·v
    cost.add(h * (c - 1) * hs)


@register_rule(CausalSelfAttention)
def _attention(module: CausalSelfAttention, name: str, ctx: RuleContext) -> Cost:
    """Attention over the context (`_attention_ops`); the projections c_attn and c_proj are
    children with their own rules."""
    h, d = int(module.n_head), int(module.n_embd)
    cost = Cost("attention")
    _attention_ops(cost, ctx, heads=h, head_size=d // h, c=ctx.context)
    return cost


@register_rule(nn.MultiheadAttention)
def _multihead_attention(module: nn.MultiheadAttention, name: str, ctx: RuleContext) -> Cost:
    """Self-attention online: the q, k and v projections of the new token, then attention
    (`_attention_ops`) over the context plus one position for ``add_bias_kv`` and one for
    ``add_zero_attn``. The output projection is a child Linear."""
    cost = Cost("attention")
    e = int(module.embed_dim)
    bias = module.in_proj_bias
    if module.in_proj_weight is not None:
        weights = [module.in_proj_weight]
        biases = [bias]
    else:
        weights = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
        biases = [None if bias is None else bias[i * e : (i + 1) * e] for i in range(3)]
    for weight, b in zip(weights, biases, strict=True):
        cost.store(weight)
        matvec(cost, weight, b, ctx)
    for extra in (bias, module.bias_k, module.bias_v):
        if extra is not None:
            cost.store(extra)
    c = ctx.context + (module.bias_k is not None) + bool(module.add_zero_attn)
    _attention_ops(cost, ctx, heads=int(module.num_heads), head_size=int(module.head_dim), c=c)
    nnz = sum(int((w.detach() != 0).sum()) for w in weights)
    cost.sparsity = 1 - nnz / sum(w.numel() for w in weights)
    return cost


def _lstm_cell(
    cost: Cost,
    ctx: RuleContext,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    w_hr: torch.Tensor | None = None,
) -> None:
    """One LSTM step of hidden size h, per token (every tensor is also stored, fp32).

    - gates ``W_ih x + b_ih + W_hh h + b_hh`` (4h rows): each product like a linear layer
      (nnz mults, adds per `CountConfig.adds`, one add per bias), plus 4h adds to sum the two;
    - i, f, o = sigmoid: 3h sigmoids; g = tanh: h tanhs (`_SIGMOID`, `_TANH` per element);
    - ``c' = f·c + i·g``: 2h mults, h adds; ``h' = o·tanh(c')``: h tanhs, h mults;
    - with a projection (``proj_size``), ``h' = W_hr h'`` like a bias-free linear layer.
    """
    h = w_ih.shape[0] // 4
    for tensor in (w_ih, w_hh, b_ih, b_hh, w_hr):
        if tensor is not None:
            cost.store(tensor)
    matvec(cost, w_ih, b_ih, ctx)
    matvec(cost, w_hh, b_hh, ctx)
    _lstm_gate_math(cost, h)
    if w_hr is not None:
        matvec(cost, w_hr, None, ctx)


def _lstm_gate_math(cost: Cost, h: int) -> None:
    """An LSTM step's work besides its matrix products: 4h adds joining the two gate products,
    3h sigmoids and 2h tanhs, then 3h mults and h adds for the cell and hidden state."""
    cost.add(4 * h)
    for n, (mults, adds, others) in ((3 * h, _SIGMOID), (2 * h, _TANH)):
        cost.mul(n * mults)
        cost.add(n * adds)
        cost.other(n * others)
    cost.mul(3 * h)
    cost.add(h)


def _weight_sparsity(tensors: list[torch.Tensor]) -> float:
    numel = sum(t.numel() for t in tensors)
    nnz = sum(int((t.detach() != 0).sum()) for t in tensors)
    return 1 - nnz / numel if numel else 0.0


@register_rule(nn.LSTM)
def _lstm(module: nn.LSTM, name: str, ctx: RuleContext) -> Cost:
    """Every layer and direction steps once per token (`_lstm_cell`); dropout costs nothing."""
    cost = Cost("lstm", bits=FLOAT_BITS, act_bits=FLOAT_BITS)
    weights = []
    for layer in range(int(module.num_layers)):
        for suffix in ("", "_reverse") if module.bidirectional else ("",):
            key = f"_l{layer}{suffix}"
            w_ih, w_hh = getattr(module, "weight_ih" + key), getattr(module, "weight_hh" + key)
            b_ih = getattr(module, "bias_ih" + key) if module.bias else None
            b_hh = getattr(module, "bias_hh" + key) if module.bias else None
            w_hr = getattr(module, "weight_hr" + key) if module.proj_size else None
            _lstm_cell(cost, ctx, w_ih, w_hh, b_ih, b_hh, w_hr)
            weights += [w for w in (w_ih, w_hh, w_hr) if w is not None]
    cost.sparsity = _weight_sparsity(weights)
    return cost


@register_rule(LinearLSTM)
def _linear_lstm(module: LinearLSTM, name: str, ctx: RuleContext) -> Cost:
    """Each layer and direction's gate math (`_lstm_gate_math`) once per token; the gate
    matrices are child Linears counted by their own rules, so a dense `LinearLSTM` counts
    exactly as the `nn.LSTM` it came from."""
    cost = Cost("lstm")
    directions = 2 if module.bidirectional else 1
    for _ in range(int(module.num_layers) * directions):
        _lstm_gate_math(cost, int(module.hidden_size))
    return cost


@register_rule(nn.LSTMCell)
def _lstm_cell_rule(module: nn.LSTMCell, name: str, ctx: RuleContext) -> Cost:
    """One step per token (`_lstm_cell`)."""
    cost = Cost("lstm_cell", bits=FLOAT_BITS, act_bits=FLOAT_BITS)
    _lstm_cell(cost, ctx, module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh)
    cost.sparsity = _weight_sparsity([module.weight_ih, module.weight_hh])
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
    cost.other(_softmax_others(module.config.vocab_size))
    return cost


@register_rule(LSTMLM)
def _lstm_lm(module: LSTMLM, name: str, ctx: RuleContext) -> Cost:
    """The output softmax over V (3V-1 others); the layers are children."""
    cost = Cost("model")
    cost.other(_softmax_others(module.config.vocab_size))
    return cost
