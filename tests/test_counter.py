"""The MicroNet counter against the scoring reference's worked examples and hand-written counts.

E1-E4 are §5 of ``micronet-scoring.md``; the GPT counts are derived here from the shapes alone.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from microsweep.compress._modules import CompressedLinear, LowRankLinear
from microsweep.errors import UsageError
from microsweep.models.gpt import GPT, GPTConfig
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
    with pytest.raises(UsageError):
        register_rule(int)  # type: ignore[arg-type]


def test_count_config_json_round_trip() -> None:
    config = CountConfig(freebie=False, mask="always", adds="mit", fold_layernorm=True)
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
