"""The MicroNet counter against the scoring reference's worked examples and hand-written counts.

E1-E4 are §5 of ``micronet-scoring.md`` (E5 is in ``test_counter_e5.py``); the GPT, LSTM and
attention counts are derived here from the shapes alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from microsweep.compress._modules import CompressedLinear, LowRankLinear
from microsweep.errors import UsageError
from microsweep.models import build
from microsweep.models.gpt import GPT, GPTConfig
from microsweep.models.lstm import LSTMLM, LSTMConfig
from microsweep.report import count_report
from microsweep.score import (
    CHALLENGE_BASELINE,
    Baseline,
    Cost,
    CountConfig,
    count,
    linear_adds,
    mask_bits,
    micronet_score,
    mult_weight,
    op_weight,
    register_rule,
    tensor_bits,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _nonzero(*shape: int, seed: int = 0) -> torch.Tensor:
    """Values that are never zero, so that nnz is known exactly."""
    g = _gen(seed)
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return sign * (0.5 + torch.rand(shape, generator=g))


def _compressed(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    bits: int = 32,
    act_bits: int = 32,
    sparse: bool = False,
    block: tuple[int, int] | None = None,
) -> CompressedLinear:
    """A CompressedLinear holding `weight` (zeros are the pruned entries) and `bias`."""
    out_f, in_f = weight.shape
    layer = CompressedLinear(
        in_f, out_f, bias is not None, bits=bits, act_bits=act_bits, sparse=sparse, block=block
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        if sparse:
            layer.mask.copy_(weight != 0)
    return layer


def _e1_weight(block: tuple[int, int] | None = None) -> torch.Tensor:
    """128x512 with exactly 128 non-zeros per row (75% sparse), unstructured or in blocks."""
    g = _gen(1)
    if block is None:
        keep = torch.zeros(128, 512, dtype=torch.bool)
        for r in range(128):
            keep[r, torch.randperm(512, generator=g)[:128]] = True
    else:
        br, bc = block
        blocks = torch.zeros(128 // br, 512 // bc, dtype=torch.bool)
        for r in range(blocks.shape[0]):
            blocks[r, torch.randperm(blocks.shape[1], generator=g)[: blocks.shape[1] // 4]] = True
        keep = blocks.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return _nonzero(128, 512, seed=2) * keep


# --- E1: sparse 8-bit FC layer -----------------------------------------------------------------


def test_e1_storage_formula_matches_reference() -> None:
    # the reference stores the 128 biases at 8 bits: 16,384*8 + 65,536 + 1,024 bits
    weight = tensor_bits(512 * 128, 16_384, 8, mask_bits((128, 512)))
    bias = tensor_bits(128, 128, 8)
    assert weight + bias == 197_632
    assert (weight + bias) / 32 == 6_176.0
    block_weight = tensor_bits(512 * 128, 16_384, 8, mask_bits((128, 512), (4, 4)))
    assert mask_bits((128, 512), (4, 4)) == 4_096
    assert (block_weight + bias) / 32 == 4_256.0


def test_e1_ops_formula_matches_reference() -> None:
    rows = [128] * 128
    mults = 16_384 * mult_weight(8, 8)
    for mode in ("countingpy", "exact"):
        adds = linear_adds(rows, 512, bias=True, mode=mode)
        assert adds == 16_384
        assert mults + adds == 20_480
    assert micronet_score(6_176, 20_480) == pytest.approx(1.0324e-4, rel=1e-4)


def test_e1_module_count() -> None:
    """The counter stores biases at 32 bits and counts the fp32 quantizer scales."""
    layer = _compressed(_e1_weight(), _nonzero(128), bits=8, act_bits=8, sparse=True)
    for adds in ("exact", "countingpy"):
        c = count(layer, context=1, config=CountConfig(adds=adds))
        (row,) = c.layers
        assert row.kind == "compressed_linear"
        assert not c.freebie
        assert row.value_bits == 16_384 * 8 + 128 * 32
        assert row.mask_bits == 65_536
        assert row.const_bits == 128 * 32 + 32  # weight_scale per output row + act_scale
        assert c.params == (16_384 * 8 + 128 * 32 + 65_536 + 128 * 32 + 32) / 32 == 6_401.0
        assert (c.mults, c.adds) == (16_384, 16_384)
        assert row.mults_w == 4_096
        assert c.ops == 20_480
        assert row.sparsity == 0.75


def test_e1_block_sparse_module_count() -> None:
    weight = _e1_weight(block=(4, 4))
    assert int((weight != 0).sum()) == 16_384
    layer = _compressed(weight, _nonzero(128), bits=8, act_bits=8, sparse=True, block=(4, 4))
    c = count(layer, context=1)
    assert c.layers[0].mask_bits == 4_096
    assert c.params == (16_384 * 8 + 4_096 + 128 * 32 + 128 * 32 + 32) / 32
    assert c.ops == 20_480


# --- E2, E3, E4 ---------------------------------------------------------------------------------


def test_e2_dense_fp32_layer_with_freebie() -> None:
    model = nn.Sequential(nn.Linear(512, 128))
    with torch.no_grad():
        model[0].weight.copy_(_nonzero(128, 512))
        model[0].bias.copy_(_nonzero(128, seed=3))
    c = count(model, context=1)
    assert c.freebie
    assert c.params == 32_832
    assert c.ops == 98_304
    off = count(model, context=1, config=CountConfig(freebie=False))
    assert not off.freebie
    assert off.params == 65_664
    assert off.ops == 65_536 + 65_536


def test_e3_single_op_precision() -> None:
    assert mult_weight(3, 5) == 5 / 32
    assert mult_weight(32, 8) == 1
    assert mult_weight(8, 9) == 9 / 32
    assert mult_weight(1, 16, binary=True) == 1 / 32  # ±1 times an IEEE fp16 value
    assert mult_weight(1, 8, binary=True, sign_magnitude=False) == 8 / 32  # two's complement
    assert op_weight(32, 32) == 1  # fp32 addition
    assert op_weight(32) == 1  # exp on fp32
    with pytest.raises(UsageError):
        mult_weight(0, 8)


def test_e4_rule_example_and_jnlp_units() -> None:
    mobilenet = Baseline(6.9e6, 1170e6, "mobilenet-v2-1.4")
    assert micronet_score(3e6, 500e6, mobilenet) == pytest.approx(0.862, abs=1e-3)
    # §4.3: JNLP's 209.811 MB (bits / 8) become parameters as bytes / 4
    assert micronet_score(209.811e6 / 4, 156.857e6) == pytest.approx(0.82315, abs=1e-5)
    assert CHALLENGE_BASELINE == Baseline(159e6, 318e6, "challenge")
    with pytest.raises(UsageError):
        Baseline(0, 1)


# --- the built-in GPT ---------------------------------------------------------------------------


def _gpt(bias: bool = True, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=bias))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # zero at init; trained biases are non-zero
                p.copy_(_nonzero(*p.shape, seed=len(name)))
    return model


def _expected_gpt_ops(cfg: GPTConfig, c: float) -> tuple[float, float, float]:
    """Raw (mults, adds, others) per token of a dense GPT, from its shapes."""
    d, h, v = cfg.n_embd, cfg.n_head, cfg.vocab_size
    hs = d // h
    mults = adds = others = 0.0

    def linear(n_in: int, n_out: int, bias: bool) -> None:
        nonlocal mults, adds
        mults += n_in * n_out
        adds += (n_in - 1) * n_out + (n_out if bias else 0)

    def layernorm() -> None:
        nonlocal mults, adds, others
        others += 6 * d
        mults += d  # gamma
        adds += d if cfg.bias else 0  # beta

    adds += d  # token + position embedding
    for _ in range(cfg.n_layer):
        layernorm()
        linear(d, 3 * d, cfg.bias)
        mults += h * (hs * c + c + hs * c)  # q.k, 1/sqrt(hs), attn.v
        adds += h * ((hs - 1) * c + (c - 1) * hs)
        others += h * (3 * c - 1)  # softmax
        linear(d, d, cfg.bias)
        adds += d  # residual
        layernorm()
        linear(d, 4 * d, cfg.bias)
        mults += 3 * 4 * d  # GELU
        adds += 4 * d
        others += 4 * d
        linear(4 * d, d, cfg.bias)
        adds += d  # residual
    layernorm()
    linear(d, v, False)  # tied head
    others += 3 * v - 1  # output softmax
    return mults, adds, others


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("freebie", [True, False])
def test_dense_gpt_matches_hand_count(bias: bool, freebie: bool) -> None:
    model = _gpt(bias)
    cfg = model.config
    c = count(model, context=8.5, config=CountConfig(freebie=freebie))
    n = GPT.analytic_num_params(cfg)
    assert sum(p.numel() for p in model.parameters()) == n
    assert c.freebie is freebie
    assert c.params == n * (16 if freebie else 32) / 32
    mults, adds, others = _expected_gpt_ops(cfg, 8.5)
    assert c.mults == pytest.approx(mults, rel=1e-12)
    assert c.adds == pytest.approx(adds, rel=1e-12)
    assert c.others == pytest.approx(others, rel=1e-12)
    assert c.ops == pytest.approx(mults * (0.5 if freebie else 1) + adds + others, rel=1e-12)
    assert c.params == pytest.approx(sum(lc.params for lc in c.layers))
    assert c.ops == pytest.approx(sum(lc.ops for lc in c.layers))


def test_tied_head_counted_once() -> None:
    model = _gpt()
    assert model.head.weight is model.wte.weight
    c = count(model, context=1, config=CountConfig(freebie=False))
    rows = {lc.name: lc for lc in c.layers}
    assert rows["wte"].value_bits == 37 * 16 * 32
    assert rows["head"].value_bits == 0
    assert rows["head"].mults == 37 * 16  # the head still multiplies


def test_quantized_tied_head_spec_wins_over_embedding() -> None:
    model = _gpt()
    d, v = 16, 37
    head = _compressed(model.wte.weight.detach(), None, bits=8)
    model.head = head
    model.wte.weight = head.weight  # keep the tie: the embedding reads the 8-bit table
    c = count(model, context=1)
    rows = {lc.name: lc for lc in c.layers}
    assert not c.freebie
    assert rows["wte"].value_bits == 0
    assert rows["head"].value_bits == v * d * 8
    assert rows["head"].const_bits == v * 32
    n = GPT.analytic_num_params(model.config)
    assert c.params == n - v * d + v * d * 8 / 32 + v
    assert rows["head"].mults_w == v * d  # 8-bit weight x fp32 input -> weight 1


def test_model_train_flag_survives_activation_trace() -> None:
    model = _gpt()
    model.train()
    model.blocks[0].eval()
    count(model, context=4)
    assert model.training and not model.blocks[0].training and model.blocks[1].training


@pytest.mark.parametrize(
    ("bits", "act_bits", "freebie"),
    [(8, 32, False), (32, 8, False), (16, 16, True), (32, 32, True)],
)
def test_quantizing_one_layer_below_16_bits_voids_freebie(
    bits: int, act_bits: int, freebie: bool
) -> None:
    model = _gpt()
    fc = model.blocks[0].mlp.c_fc
    model.blocks[0].mlp.c_fc = _compressed(
        fc.weight.detach(), fc.bias.detach(), bits=bits, act_bits=act_bits
    )
    c = count(model, context=4)
    assert c.freebie is freebie
    plain = next(lc for lc in c.layers if lc.name == "blocks.0.attn.c_attn")
    assert plain.value_bits == (16 if freebie else 32) * (48 * 16 + 48)  # every layer is affected


def test_fold_layernorm_drops_affine_params_and_ops() -> None:
    model = _gpt()
    plain = count(model, context=4, config=CountConfig(freebie=False))
    folded = count(model, context=4, config=CountConfig(freebie=False, fold_layernorm=True))
    n_ln, d = 2 * 2 + 1, 16
    assert plain.params - folded.params == n_ln * 2 * d
    assert plain.mults - folded.mults == n_ln * d
    assert plain.adds - folded.adds == n_ln * d
    assert plain.others == folded.others


def test_gpt_compressed_every_way() -> None:
    """Rank, unstructured and block sparsity, weight and activation bits, quantized tied head."""
    model = _gpt()
    d, v = 16, 37
    blk = model.blocks[0]
    w = blk.attn.c_attn.weight.detach().clone()
    w[:, ::2] = 0  # 50% unstructured
    blk.attn.c_attn = _compressed(w, blk.attn.c_attn.bias.detach(), bits=4, act_bits=8, sparse=True)
    w = blk.attn.c_proj.weight.detach().clone()
    w[:8, :8] = 0  # one of four 8x8 blocks pruned
    blk.attn.c_proj = _compressed(w, None, bits=6, sparse=True, block=(8, 8))
    rank = 4
    first = _compressed(_nonzero(rank, d), None, bits=8, act_bits=8)
    second = nn.Linear(rank, 4 * d)
    with torch.no_grad():
        second.bias.copy_(_nonzero(4 * d))
    blk.mlp.c_fc = LowRankLinear(first, second)
    head = _compressed(
        model.wte.weight.detach() * (torch.arange(d) % 4 != 0), None, bits=2, sparse=True
    )
    model.head = head
    model.wte.weight = head.weight
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, v)

    c = count(model, context=2)
    rows = {lc.name: lc for lc in c.layers}
    assert not c.freebie
    attn = rows["blocks.0.attn.c_attn"]
    assert (attn.value_bits, attn.mask_bits) == (3 * d * d // 2 * 4 + 3 * d * 32, 3 * d * d)
    assert attn.mults == 3 * d * d // 2 and attn.mults_w == attn.mults * 8 / 32
    proj = rows["blocks.0.attn.c_proj"]
    assert (proj.value_bits, proj.mask_bits, proj.const_bits) == (192 * 6, 4, d * 32)
    assert proj.mults_w == 192  # 6-bit weight x fp32 input
    assert rows["blocks.0.mlp.c_fc"].kind == "low_rank" and rows["blocks.0.mlp.c_fc"].rank == rank
    assert rows["blocks.0.mlp.c_fc.first"].value_bits == rank * d * 8
    assert rows["blocks.0.mlp.c_fc.second"].value_bits == (rank * 4 * d + 4 * d) * 32
    assert rows["head"].value_bits == v * d * 3 // 4 * 2 and rows["head"].mask_bits == v * d
    assert rows["wte"].value_bits == 0
    assert c.params == sum(lc.value_bits + lc.mask_bits + lc.const_bits for lc in c.layers) / 32
    assert c.ops == pytest.approx(sum(lc.ops for lc in c.layers))
    json.dumps(c.to_json())
    table = c.table()
    assert "blocks.0.mlp.c_fc.first" in table and "total" in table and "not applied" in table


# --- masks and adds conventions -----------------------------------------------------------------


def test_mask_bits_per_element_per_block_and_always() -> None:
    w = _nonzero(8, 12)
    w[:, :4] = 0
    sparse = count(_compressed(w, None, sparse=True), context=1, config=CountConfig(freebie=False))
    assert sparse.layers[0].mask_bits == 96
    assert sparse.layers[0].value_bits == 64 * 32
    blocked = count(
        _compressed(w, None, sparse=True, block=(2, 4)),
        context=1,
        config=CountConfig(freebie=False),
    )
    assert blocked.layers[0].mask_bits == 96 // 8
    dense = count(_compressed(w, None), context=1, config=CountConfig(freebie=False))
    assert dense.layers[0].mask_bits == 0 and dense.layers[0].value_bits == 96 * 32

    linear = nn.Linear(12, 8)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(_nonzero(8))
    always = count(linear, context=1, config=CountConfig(mask="always", freebie=False))
    assert always.layers[0].mask_bits == 96 + 8  # weight and bias each get a bitmask
    assert always.layers[0].value_bits == (64 + 8) * 32  # stored as their non-zeros
    assert count(linear, context=1, config=CountConfig(freebie=False)).layers[0].mask_bits == 0


def test_adds_variants_differ_by_documented_amounts() -> None:
    row_nnz = [0, 1, 3, 10, 5, 0]
    w = torch.zeros(6, 10)
    for r, k in enumerate(row_nnz):
        w[r, :k] = _nonzero(k, seed=r)
    layer = _compressed(w, _nonzero(6), sparse=True)
    adds = {
        mode: count(layer, context=1, config=CountConfig(adds=mode)).adds
        for mode in ("exact", "countingpy", "mit")
    }
    nnz, out, density = 19, 6, 19 / 60
    assert adds["exact"] == 2 + 9 + 4 + out
    assert adds["countingpy"] == nnz
    assert adds["exact"] - adds["countingpy"] == 2  # the two empty rows
    assert adds["mit"] - adds["countingpy"] == pytest.approx((1 - density) * out)
    for mode, value in adds.items():
        assert linear_adds(row_nnz, 10, bias=True, mode=mode) == pytest.approx(value)
    # exact counts only the non-zero biases
    assert linear_adds(row_nnz, 10, bias=True, bias_nnz=2) == 15 + 2


# --- the rule registry and errors ---------------------------------------------------------------


class FooLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class BarLayer(FooLayer):
    pass


def test_module_without_rule_raises_naming_it() -> None:
    model = nn.Sequential(nn.Linear(5, 5), FooLayer())
    with pytest.raises(UsageError, match=r"'1' \(FooLayer\).*register_rule"):
        count(model, context=1)


def test_registered_rule_counts_subclasses() -> None:
    class Scaled(FooLayer):
        pass

    @register_rule(Scaled)
    def _scaled(module: Scaled, name: str, ctx: object) -> Cost:
        cost = Cost("scale")
        cost.store(module.scale)
        cost.mul(module.scale.numel())
        return cost

    class Scaled2(Scaled):
        pass

    c = count(nn.Sequential(Scaled(), Scaled2()), context=1, config=CountConfig(freebie=False))
    assert [lc.kind for lc in c.layers] == ["scale", "scale"]
    assert c.params == 10 and c.ops == 10
    with pytest.raises(UsageError, match="BarLayer"):
        count(BarLayer(), context=1)


def test_parameter_list_is_counted_by_its_parent_rule() -> None:
    class Tables(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tables = nn.ParameterList(
                [nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(4))]
            )

    @register_rule(Tables)
    def _tables(module: Tables, name: str, ctx: object) -> Cost:
        cost = Cost("tables")
        for t in module.tables:
            cost.store(t)
        return cost

    c = count(Tables(), context=1, config=CountConfig(freebie=False))
    assert [lc.name for lc in c.layers] == [""] and c.params == 10

    class Untracked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tables = nn.ParameterList([nn.Parameter(torch.ones(3))])

    with pytest.raises(UsageError, match=r"'tables.0'.*stored by no rule"):
        count(Untracked(), context=1)


def test_parameter_no_rule_stores_raises() -> None:
    linear = nn.Linear(4, 4)
    prune.l1_unstructured(linear, "weight", amount=0.5)
    with pytest.raises(UsageError, match="weight_orig"):
        count(linear, context=1)


def test_bad_arguments_raise_usage_error() -> None:
    with pytest.raises(UsageError):
        count(nn.Linear(2, 2), context=0.5)
    with pytest.raises(UsageError):
        count(nn.Linear(2, 2), context=float("nan"))
    with pytest.raises(UsageError):
        CountConfig(adds="fast")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        CountConfig(mask="never")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="attention"):
        CountConfig(attention="per-layer")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="relu"):
        CountConfig(relu="free")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        register_rule(int)  # type: ignore[arg-type]


def test_count_config_json_round_trip() -> None:
    config = CountConfig(
        freebie=False,
        mask="always",
        adds="mit",
        fold_layernorm=True,
        attention="mit",
        relu="other",
    )
    assert CountConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert CountConfig.from_json({"adds": "countingpy"}) == CountConfig(adds="countingpy")
    with pytest.raises(UsageError):
        CountConfig.from_json({"speed": 1})
    with pytest.raises(UsageError):
        CountConfig.from_json({**config.to_json(), "version": 99})


def test_dense_baseline_scores_two() -> None:
    model = _gpt()
    c = count(model, context=8.5)
    dense = Baseline.from_counts(c)
    assert dense.name == "dense"
    assert micronet_score(c.params, c.ops, dense) == pytest.approx(2.0)
    assert math.isfinite(micronet_score(c.params, c.ops))


# --- softmax, ReLU and attention conventions ----------------------------------------------------


def _dense(module: nn.Module) -> nn.Module:
    """`module` with every parameter non-zero (trained values), so that nnz is known."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(_nonzero(*p.shape, seed=len(name)))
    return module


class _Ids(nn.Module):
    """ids (B, T) -> embeddings (B, T, d) -> `body`: a host for modules that take vectors."""

    def __init__(self, body: nn.Module, vocab: int = 11, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body = body

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(self.emb(ids))


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
def test_softmax_module_counts_3n_minus_1_over_its_dim() -> None:
    c = count(_Ids(nn.Softmax(dim=-1)), context=5)
    assert (c.mults, c.adds, c.others) == (0, 0, 3 * 6 - 1)
    # dim=None: torch's legacy choice, dim 0 of a 3-D output: 6 softmaxes over 1 value each
    c = count(_Ids(nn.Softmax()), context=5)
    assert c.others == 6 * (3 * 1 - 1)
    two = count(_Ids(nn.Sequential(nn.Softmax(-1), nn.Linear(6, 4), nn.Softmax(-1))), context=5)
    assert two.others == (3 * 6 - 1) + (3 * 4 - 1)


def test_relu_is_a_mult_or_an_other() -> None:
    model = _Ids(nn.ReLU())
    assert count(model, context=1).mults == 6
    other = count(model, context=1, config=CountConfig(relu="other"))
    assert (other.mults, other.others) == (0, 6)


def test_gpt_mit_attention_drops_scaling_and_per_head_softmax() -> None:
    model = _gpt()
    h, c, layers = 2, 8.5, 2
    faithful = count(model, context=c, config=CountConfig(freebie=False))
    mit = count(model, context=c, config=CountConfig(freebie=False, attention="mit"))
    assert faithful.mults - mit.mults == pytest.approx(layers * h * c)
    assert faithful.others - mit.others == pytest.approx(layers * (h - 1) * (3 * c - 1))
    assert faithful.adds == mit.adds and faithful.params == mit.params


class _MHA(nn.Module):
    """Self-attention on embeddings; keys and values read the first `kdim` features."""

    def __init__(self, e: int, h: int, kdim: int, add_bias_kv: bool) -> None:
        super().__init__()
        self.kdim = kdim
        self.emb = nn.Embedding(11, e)
        self.mha = nn.MultiheadAttention(e, h, add_bias_kv=add_bias_kv, kdim=kdim, vdim=kdim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        kv = x[..., : self.kdim]
        return self.mha(x, kv, kv, need_weights=False)[0]


@pytest.mark.parametrize("kv", [False, True])
@pytest.mark.parametrize("kdim", [12, 8])
def test_multihead_attention_matches_hand_count(kv: bool, kdim: int) -> None:
    e, h, c = 12, 3, 6.5
    model = _dense(_MHA(e, h, kdim, kv))
    assert model.mha._qkv_same_embed_dim is (kdim == e)
    got = count(model, context=c, config=CountConfig(freebie=False))
    hs, pos = e // h, c + (1 if kv else 0)
    proj_in = e + 2 * kdim  # inputs of the q, k and v projections
    mults = e * proj_in + e * e + h * (2 * hs * pos + pos)
    adds = e * (proj_in - 3) + 3 * e + (e - 1) * e + e + h * ((hs - 1) * pos + (pos - 1) * hs)
    assert got.mults == pytest.approx(mults)
    assert got.adds == pytest.approx(adds)
    assert got.others == pytest.approx(h * (3 * pos - 1))
    assert got.params == 11 * e + e * proj_in + 3 * e + e * e + e + (2 * e if kv else 0)
    mit = count(model, context=c, config=CountConfig(freebie=False, attention="mit"))
    assert got.ops - mit.ops == pytest.approx(h * pos + (h - 1) * (3 * pos - 1))


# --- LSTM layers and the built-in LSTM LM -------------------------------------------------------


def _lstm_step(n_in: int, h: int, bias: bool = True, proj: int = 0) -> tuple[int, int]:
    """Raw (mults, adds) of one LSTM step, written out term by term; others are 0."""
    r = proj or h
    mults = 4 * h * n_in + 4 * h * r  # W_ih x, W_hh h
    adds = 4 * h * (n_in - 1) + 4 * h * (r - 1) + 4 * h  # the two dot products, their sum
    adds += 2 * 4 * h if bias else 0  # b_ih, b_hh
    mults += 3 * h * 2 + 2 * h * 3  # sigmoid i, f, o (2 mults + 1 add); tanh g, c' (3 + 2)
    adds += 3 * h * 1 + 2 * h * 2
    mults += 3 * h  # f*c, i*g, o*tanh(c')
    adds += h  # f*c + i*g
    if proj:
        mults += proj * h
        adds += proj * (h - 1)
    return mults, adds


@pytest.mark.parametrize(
    ("layers", "bidirectional", "bias", "proj"),
    [(1, False, True, 0), (2, False, False, 0), (2, True, True, 0), (2, True, True, 3)],
)
def test_lstm_matches_hand_count(layers: int, bidirectional: bool, bias: bool, proj: int) -> None:
    n_in, h = 5, 4
    dirs = 2 if bidirectional else 1
    lstm = nn.LSTM(
        n_in, h, num_layers=layers, bias=bias, bidirectional=bidirectional, proj_size=proj
    )
    c = count(_dense(lstm), context=1, config=CountConfig(freebie=False))
    (row,) = c.layers
    mults = adds = 0
    for layer in range(layers):
        step = _lstm_step(n_in if layer == 0 else dirs * (proj or h), h, bias, proj)
        mults += dirs * step[0]
        adds += dirs * step[1]
    assert (row.kind, row.mults, row.adds, row.others) == ("lstm", mults, adds, 0)
    assert row.value_bits == 32 * sum(p.numel() for p in lstm.parameters())
    assert row.sparsity == 0.0


def test_lstm_cell_and_pruned_lstm() -> None:
    cell = _dense(nn.LSTMCell(5, 4))
    c = count(cell, context=1, config=CountConfig(freebie=False))
    assert (c.mults, c.adds) == _lstm_step(5, 4)
    assert c.params == sum(p.numel() for p in cell.parameters())
    lstm = _dense(nn.LSTM(5, 4))
    with torch.no_grad():
        lstm.weight_ih_l0[:, :2] = 0  # 2 of 5 inputs gone from every gate row
    c = count(lstm, context=1, config=CountConfig(freebie=False))
    mults, adds = _lstm_step(5, 4)
    assert (c.mults, c.adds) == (mults - 16 * 2, adds - 16 * 2)
    assert c.layers[0].sparsity == pytest.approx(32 / (16 * 9))
    always = count(lstm, context=1, config=CountConfig(freebie=False, mask="always"))
    assert always.layers[0].mask_bits == sum(p.numel() for p in lstm.parameters())


def _lstm_lm(tie: bool, n_embd: int, n_hidden: int, n_layer: int) -> LSTMLM:
    cfg = LSTMConfig(
        vocab_size=23, n_embd=n_embd, n_hidden=n_hidden, n_layer=n_layer, tie_weights=tie
    )
    torch.manual_seed(0)
    return _dense(LSTMLM(cfg))


def _expected_lstm_lm(cfg: LSTMConfig) -> tuple[int, int, int]:
    v, e, h = cfg.vocab_size, cfg.n_embd, cfg.n_hidden
    mults = adds = 0
    for layer in range(cfg.n_layer):
        m, a = _lstm_step(e if layer == 0 else h, h)
        mults, adds = mults + m, adds + a
    out = h
    if cfg.tie_weights and h != e:  # projection h -> e, no bias
        mults, adds, out = mults + h * e, adds + (h - 1) * e, e
    mults, adds = mults + out * v, adds + (out - 1) * v + v  # head with bias
    return mults, adds, 3 * v - 1  # output softmax


@pytest.mark.parametrize(
    ("tie", "n_embd", "n_hidden", "n_layer"),
    [(True, 8, 8, 1), (True, 6, 10, 2), (False, 6, 10, 2)],
)
@pytest.mark.parametrize("freebie", [True, False])
def test_lstm_lm_matches_hand_count(
    tie: bool, n_embd: int, n_hidden: int, n_layer: int, freebie: bool
) -> None:
    model = _lstm_lm(tie, n_embd, n_hidden, n_layer)
    cfg = model.config
    assert model(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 23)
    assert (model.head.weight is model.wte.weight) is tie
    assert (model.proj is not None) is (tie and n_hidden != n_embd)
    n = LSTMLM.analytic_num_params(cfg)
    assert sum(p.numel() for p in model.parameters()) == n
    c = count(model, context=4, config=CountConfig(freebie=freebie))
    assert c.freebie is freebie
    assert c.params == n * (16 if freebie else 32) / 32
    mults, adds, others = _expected_lstm_lm(cfg)
    assert (c.mults, c.adds, c.others) == (mults, adds, others)
    assert c.ops == mults * (0.5 if freebie else 1) + adds + others
    assert count(model, context=40, config=CountConfig(freebie=freebie)).ops == c.ops


def test_lstm_lm_recipe_builds_the_same_shape() -> None:
    model = _lstm_lm(True, 6, 10, 2)
    recipe = json.loads(json.dumps(model.recipe()))
    assert recipe["builder"] == "lstm"
    rebuilt = build(recipe)
    assert isinstance(rebuilt, LSTMLM) and rebuilt.config == model.config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    with pytest.raises(UsageError, match="n_hidden"):
        LSTMConfig(vocab_size=10, n_hidden=0)


def test_compressed_lstm_lm_head() -> None:
    """A quantized tied head on an LSTM LM: the table is stored once, at the head's width."""
    from microsweep.compress import compress
    from microsweep.spaces import LayerPolicy, Policy

    model = _lstm_lm(True, 6, 10, 1)
    small = compress(
        model, Policy(layers={"head": LayerPolicy(bits=8), "proj": LayerPolicy(sparsity=0.5)})
    )
    c = count(small, context=4)
    rows = {lc.name: lc for lc in c.layers}
    assert not c.freebie
    assert rows["wte"].value_bits == 0 and rows["head"].value_bits == 23 * 6 * 8 + 23 * 32
    assert rows["proj"].sparsity == pytest.approx(0.5)
    assert rows["lstm"].value_bits == 32 * sum(p.numel() for p in model.lstm.parameters())


# --- count_report: the text of `microsweep count` ----------------------------------------------

_SPACE = """
from microsweep import Bits, MicroNet, Space, Sparsity, data
from microsweep.models import GPT, GPTConfig

corpus = data.tiny_shakespeare()
model = GPT(GPTConfig(vocab_size=corpus.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
space = Space(model, rules={"blocks.*.mlp.*": dict(sparsity=Sparsity(0.0, 0.5), bits=Bits(8, 32))})
objective = MicroNet(baseline="dense", count={"mask": "always"})
"""


def test_count_report_dense_and_policy(tmp_path: Path) -> None:
    space = tmp_path / "space.py"
    space.write_text(_SPACE)
    dense = count_report(str(space))
    assert "dense model" in dense and "total" in dense and "freebie applied" in dense
    assert "mask=always" in dense and "against the challenge baseline" in dense
    assert "context 8.5 " in dense  # (16 + 1) / 2
    assert "against the dense model" not in dense

    policy = {
        "type": "microsweep.Policy",
        "version": 1,
        "layers": {"blocks.0.mlp.c_fc": {"sparsity": 0.5, "bits": 8, "act_bits": 8}},
        "hyper": {},
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    text = count_report(str(space), str(path))
    assert "freebie not applied" in text and "compressed_linear" in text
    assert "w8/a8" in text and "against the dense model" in text
    row = next(line for line in text.splitlines() if line.startswith("blocks.0.mlp.c_fc "))
    assert "0.500" in row


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read policy file"),
        ("{not json", "not valid JSON"),
        ('{"type": "microsweep.Policy", "version": 7}', "version"),
        ('{"type": "microsweep.Policy", "version": 1, "layers": [1]}', "policy file"),
        (
            '{"type": "microsweep.Policy", "version": 1, "layers": {"nope": {"bits": 8}}}',
            "nope",
        ),
    ],
)
def test_count_report_bad_policy(tmp_path: Path, content: str | None, message: str) -> None:
    space = tmp_path / "space.py"
    space.write_text(_SPACE)
    path = tmp_path / "policy.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message) as err:
        count_report(str(space), str(path))
    assert "\n" not in str(err.value)


class _HandAttention(nn.Module):
    """Attention by hand: no parameters and no counting rule, so its math would count as 0."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
        return att @ v


class _HandLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.qkv = nn.Linear(16, 48)
        self.attn = _HandAttention()
        self.head = nn.Linear(16, 30)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.emb(ids)).split(16, dim=-1)
        return self.head(self.attn(q, k, v))


def test_count_refuses_math_no_rule_counts_as_the_cli_does() -> None:
    """With example ids (or a tolerance) `count` runs the forward once and refuses uncounted
    work past the tolerance, naming the module; within it, and when not asked, it warns."""
    from microsweep.score import UncountedWarning

    torch.manual_seed(0)
    model = _HandLM()
    ids = torch.zeros(1, 16, dtype=torch.long)
    with pytest.warns(UncountedWarning, match=r"'attn'.*pass example="):
        plain = count(model, context=8.0)
    with pytest.raises(UsageError, match=r"module 'attn' \(_HandAttention\) executes .*matmul"):
        count(model, context=8.0, example=ids)
    with pytest.raises(UsageError, match="uncounted_tolerance"):
        count(model, context=8.0, uncounted_tolerance=0.0)
    with pytest.warns(UncountedWarning, match="within uncounted_tolerance"):
        within = count(model, context=8.0, example=ids, uncounted_tolerance=0.9)
    assert within.ops == plain.ops and within.params == plain.params
    with pytest.raises(UsageError, match="fraction"):
        count(model, context=8.0, example=ids, uncounted_tolerance=1.5)


def test_count_runs_no_forward_when_every_module_has_a_rule() -> None:
    """A model whose every module is counted by a rule (or passes through) is not run, and a
    model that does not take token ids is not checked unless asked."""
    import warnings

    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        count(net, context=1.0)

        class Floats(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.a = nn.Linear(4, 3)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.a(x) * 2.0

        count(Floats(), context=1.0)  # takes floats: the automatic check cannot run it
    with pytest.raises(UsageError, match="forward fails"):
        count(Floats(), context=1.0, example=torch.zeros(1, 4, dtype=torch.long))
