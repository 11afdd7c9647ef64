"""Counting rules for Hugging Face transformers modules (GPT-2 and Llama families).

Registered the first time the counter meets a module from the transformers package, in
whatever process that happens (a Ray worker too), so transformers stays optional and is
imported only for models that use it. Conventions are the built-in GPT's: attention over the
mean context per token, one residual add per element per branch, the output softmax over the
vocabulary once per token.
"""

from __future__ import annotations

from torch import nn

from microsweep.score._registry import Cost, Rule, RuleContext, register_rule
from microsweep.score._rules import (
    _attention_ops,
    _elementwise,
    _gelu_erf,
    _gelu_tanh,
    _silu,
    _softmax_others,
)

__all__ = ["register_hf_rules"]

_DONE = False


def _hidden(module: nn.Module) -> int:
    """The hidden size, from the module, its attention or the config either holds."""
    attention = next(
        (getattr(module, a) for a in ("self_attn", "attention", "attn") if hasattr(module, a)),
        None,
    )
    for owner in (module, attention):
        for key in ("hidden_size", "embed_dim"):
            if isinstance(getattr(owner, key, None), int):
                return int(getattr(owner, key))
    for config in (getattr(module, "config", None), getattr(attention, "config", None)):
        for key in ("n_embd", "hidden_size"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
    raise ValueError(f"cannot find the hidden size of {type(module).__name__}")


def _vocab(module: nn.Module) -> int:
    return int(module.config.vocab_size)


def register_hf_rules() -> bool:
    """Register the rules for the transformers classes that exist in this installation;
    False when transformers is missing."""
    global _DONE
    if _DONE:
        return True
    try:
        import transformers.activations as act
    except ImportError:
        return False
    _DONE = True
    for name, rule in (
        ("NewGELUActivation", _gelu_tanh),
        ("FastGELUActivation", _gelu_tanh),
        ("GELUTanh", _gelu_tanh),
        ("PytorchGELUTanh", _gelu_tanh),
        ("GELUActivation", _gelu_erf),
        ("AccurateGELUActivation", _gelu_erf),
        ("QuickGELUActivation", _elementwise("gelu", 4, 1, 0)),  # x·sigmoid(1.702x)
        ("SiLUActivation", _silu),
    ):
        if hasattr(act, name):
            register_rule(getattr(act, name))(rule)
    _families()
    return True


def _causal_lm_rule(module: nn.Module, name: str, ctx: RuleContext) -> Cost:
    """The output softmax over the vocabulary (3V-1 others); the body and head are children."""
    cost = Cost("model")
    cost.other(_softmax_others(_vocab(module)))
    return cost


def _position_add_rule(module: nn.Module, name: str, ctx: RuleContext) -> Cost:
    """Token plus learned position embedding: d adds."""
    cost = Cost("body")
    cost.add(_hidden(module))
    return cost


def _residual_rule(module: nn.Module, name: str, ctx: RuleContext) -> Cost:
    """Two residual additions of the hidden size."""
    cost = Cost("block")
    cost.add(2 * _hidden(module))
    return cost


def _plain_attention(module: nn.Module, name: str, ctx: RuleContext) -> Cost:
    """Attention over the context (`num_heads` heads of `head_dim`); the projections are
    children with their own rules."""
    cost = Cost("attention")
    heads, size = int(module.num_heads), int(module.head_dim)
    _attention_ops(cost, ctx, heads=heads, head_size=size, c=ctx.context)
    return cost


def _rotated(module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> int:
    """Elements of q and k that rotary position embedding turns (all of each head, or the
    first `rotary_ndims`)."""
    dims = int(getattr(module, "rotary_ndims", None) or head_dim)
    return (heads + kv_heads) * dims


def _rotary_attention(module: nn.Module, name: str, ctx: RuleContext) -> Cost:
    """Rotary position on q and k (2 mults and 1 add per turned element), then attention of
    every query head over the context (key/value heads shared in groups)."""
    cost = Cost("attention")
    config = module.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    size = int(getattr(module, "head_dim", None) or getattr(module, "head_size", None))
    rotated = _rotated(module, heads, kv_heads, size)
    cost.mul(2 * rotated)
    cost.add(rotated)
    _attention_ops(cost, ctx, heads=heads, head_size=size, c=ctx.context)
    return cost


def _rms_norm(module: nn.Module, name: str, ctx: RuleContext) -> Cost:
    """x·rsqrt(mean(x²)+ε)·γ over d: d mults (x²), d adds (sum, +ε), 1 other (rsqrt), d mults
    (normalize), d mults (γ); γ is stored."""
    d = int(module.weight.numel())
    cost = Cost("rmsnorm")
    cost.store(module.weight)
    cost.mul(3 * d)
    cost.add(d)
    cost.other(1)
    return cost


def _rotary(module: nn.Module, name: str, ctx: RuleContext) -> Cost:
    """cos and sin of this position's angles: one mult per frequency, then cos and sin of each
    angle written for both halves (4 others per frequency); the inverse frequencies are a
    constant recomputable from the config (not stored)."""
    cost = Cost("rotary")
    half = int(module.inv_freq.numel())
    cost.mul(half)
    cost.other(4 * half)
    return cost


def _gated_mlp(module: nn.Module, name: str, ctx: RuleContext) -> Cost:
    """act(gate(x)) · up(x): one mult per intermediate element; projections are children."""
    cost = Cost("mlp")
    cost.mul(int(module.intermediate_size))
    return cost


_FAMILIES: tuple[tuple[str, str, tuple[tuple[str, Rule], ...]], ...] = (
    ("gpt2", "GPT2", (
        ("Attention", _plain_attention), ("Block", _residual_rule),
        ("Model", _position_add_rule), ("LMHeadModel", _causal_lm_rule),
    )),
    ("opt", "OPT", (
        ("Attention", _plain_attention), ("DecoderLayer", _residual_rule),
        ("Decoder", _position_add_rule), ("ForCausalLM", _causal_lm_rule),
    )),
    ("gpt_neox", "GPTNeoX", (
        ("Attention", _rotary_attention), ("RotaryEmbedding", _rotary),
        ("Layer", _residual_rule),  # parallel residual or not: two adds of d
        ("ForCausalLM", _causal_lm_rule),
    )),
    *(
        (family, prefix, (  # Llama and the families built the same way: RMSNorm, rotary
            ("RMSNorm", _rms_norm),  # attention with grouped key/value heads, a gated MLP,
            ("Attention", _rotary_attention),  # two residual adds per layer
            ("RotaryEmbedding", _rotary), ("MLP", _gated_mlp),
            ("DecoderLayer", _residual_rule), ("ForCausalLM", _causal_lm_rule),
        ))
        for family, prefix in (
            ("llama", "Llama"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"), ("mistral", "Mistral"),
        )
    ),
)  # fmt: skip
"""(transformers module family, class prefix, (class suffix, rule) pairs) for each family."""


def _families() -> None:
    """Register each family's rules on the classes this transformers version has."""
    import importlib

    for family, prefix, rules in _FAMILIES:
        try:
            m = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue
        for suffix, rule in rules:
            cls = getattr(m, prefix + suffix, None)
            if cls is not None:
                register_rule(cls)(rule)
