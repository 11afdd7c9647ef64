"""Numerics of `microsweep.compress`: SVD error, exact sparsity, grid bounds, ties and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import microsweep.compress as mc
from microsweep.compress import (
    CompressedLinear,
    LowRankLinear,
    compress,
    compress_,
    project_,
    sparsity_of,
)
from microsweep.errors import SpaceError
from microsweep.models.gpt import GPT, GPTConfig
from microsweep.policy import LayerPolicy, Policy

BITS = [2, 3, 4, 6, 8, 12, 16]


class Net(nn.Module):
    """One Linear called `fc`, weights drawn from a fixed generator."""

    def __init__(self, out_f: int = 32, in_f: int = 48, seed: int = 0) -> None:
        super().__init__()
        self.fc = nn.Linear(in_f, out_f)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(out_f, in_f, generator=g))
            self.fc.bias.copy_(torch.randn(out_f, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class TokNet(nn.Module):
    """Token ids -> embedding -> `fc`, so calibration tokens reach `fc` as float inputs."""

    def __init__(self, vocab: int = 20, d: int = 16, out_f: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, out_f)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, d, generator=g))
            self.fc.weight.copy_(torch.randn(out_f, d, generator=g) / 4)
            self.fc.bias.copy_(torch.randn(out_f, generator=g))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(idx))


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32))


def _tokens(vocab: int = 65, shape: tuple[int, int] = (3, 16), seed: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _one(**settings: object) -> Policy:
    return Policy(layers={"fc": LayerPolicy(**settings)})


def _assert_on_grid(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> None:
    """weight / scale is an integer in [-qmax, qmax] per row, up to float32 rounding of q * s."""
    qmax = 2 ** (bits - 1) - 1
    q = weight.detach().double() / scale.double()[:, None]
    tol = max(1e-3, 4 * qmax * 2.0**-24)
    assert (q - q.round()).abs().max().item() < tol
    assert q.abs().max().item() < qmax + tol


# ---------------------------------------------------------------- low rank


def test_full_rank_svd_reproduces_layer_output() -> None:
    net = Net(24, 40)
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(3))
    ref = net(x)
    compress_(net, _one(rank=24))
    assert isinstance(net.fc, LowRankLinear) and net.fc.rank == 24
    assert type(net.fc.first) is nn.Linear and type(net.fc.second) is nn.Linear
    assert net.fc.first.bias is None and net.fc.second.bias is not None
    assert (net(x) - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("rank", [1, 4, 12, 23])
def test_rank_r_error_equals_tail_singular_values(rank: int) -> None:
    net = Net(24, 40)
    w = net.fc.weight.detach().clone()
    s = torch.linalg.svdvals(w.double())
    compress_(net, _one(rank=rank))
    approx = (net.fc.second.weight @ net.fc.first.weight).detach().double()
    err = torch.linalg.matrix_norm(w.double() - approx).item()
    expected = s[rank:].square().sum().sqrt().item()
    assert err == pytest.approx(expected, rel=1e-4)
    assert net.fc.first.weight.shape == (rank, 40) and net.fc.second.weight.shape == (24, rank)
    assert net.fc.first.weight.dtype == torch.float32


@pytest.mark.parametrize("rank", [25, 100])
def test_rank_above_min_dim_raises(rank: int) -> None:
    with pytest.raises(SpaceError, match=r"rank .* 'fc' .* 1\.\.24"):
        compress_(Net(24, 40), _one(rank=rank))


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("s", [0.1, 0.5, 0.9, 0.95])
def test_unstructured_sparsity_is_exact_and_keeps_largest(s: float) -> None:
    net = Net(33, 47)
    w = net.fc.weight.detach().clone()
    n = w.numel()
    compress_(net, _one(sparsity=s))
    layer = net.fc
    assert isinstance(layer, CompressedLinear) and layer.sparse and layer.block is None
    assert layer.bits == 32 and layer.weight_scale is None
    assert sparsity_of(layer.weight) == round(s * n) / n
    assert torch.equal(layer.mask, layer.weight != 0)
    kept, dropped = w[layer.mask].abs(), w[~layer.mask].abs()
    assert kept.min() >= dropped.max()
    assert torch.equal(layer.weight[layer.mask], w[layer.mask])  # kept entries untouched


def test_unstructured_ties_are_broken_by_index() -> None:
    net = Net(4, 10)
    with torch.no_grad():
        net.fc.weight.fill_(1.0)
    compress_(net, _one(sparsity=0.25))
    flat = net.fc.mask.flatten()
    assert int((~flat).sum()) == 10
    assert not flat[:10].any() and flat[10:].all()


@pytest.mark.parametrize("s", [0.25, 0.5, 0.8])
def test_block_sparsity_zeroes_whole_lowest_norm_blocks(s: float) -> None:
    net = Net(32, 48)
    w = net.fc.weight.detach().clone()
    compress_(net, _one(sparsity=s, block=(4, 8)))
    layer = net.fc
    assert layer.block == (4, 8)
    tiles = layer.mask.reshape(8, 4, 6, 8)
    per_block = tiles.sum(dim=(1, 3))
    assert set(per_block.unique().tolist()) <= {0, 32}  # each block all kept or all dropped
    n_blocks = 8 * 6
    assert int((per_block == 0).sum()) == round(s * n_blocks)
    assert sparsity_of(layer.weight) == round(s * n_blocks) / n_blocks
    norms = torch.linalg.vector_norm(w.reshape(8, 4, 6, 8), dim=(1, 3))
    assert norms[per_block > 0].min() >= norms[per_block == 0].max()


def test_bad_block_shape_raises_with_layer_and_shape() -> None:
    net = Net(32, 48)
    before = net.fc.weight.detach().clone()
    with pytest.raises(SpaceError, match=r"'fc'.*32x48.*5x8"):
        compress_(net, _one(sparsity=0.5, block=(5, 8)))
    with pytest.raises(SpaceError, match=r"'fc' first factor.*6x48"):
        compress_(net, _one(sparsity=0.5, block=(4, 4), rank=6))
    assert type(net.fc) is nn.Linear and torch.equal(net.fc.weight, before)


# ---------------------------------------------------------------- weight quantization


@pytest.mark.parametrize("bits", BITS)
def test_weight_quantization_error_bound_and_levels(bits: int) -> None:
    net = Net(16, 64)
    w = net.fc.weight.detach().clone()
    compress_(net, _one(bits=bits))
    layer = net.fc
    qmax = 2 ** (bits - 1) - 1
    assert layer.bits == bits and not layer.sparse and layer.mask is None
    scale = layer.weight_scale
    assert torch.allclose(scale, w.abs().amax(dim=1) / qmax, rtol=0, atol=0)
    err = (layer.weight.detach() - w).abs().amax(dim=1)
    assert (err <= scale / 2 + 1e-7).all()
    for row in layer.weight.detach():
        assert row.unique().numel() <= 2**bits - 1
    _assert_on_grid(layer.weight, scale, bits)


def test_mean_quantization_error_strictly_decreases_with_bits() -> None:
    errors = []
    for bits in BITS:
        net = Net(16, 64)
        w = net.fc.weight.detach().clone()
        compress_(net, _one(bits=bits))
        errors.append((net.fc.weight.detach() - w).abs().mean().item())
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_all_zero_row_gets_unit_scale() -> None:
    net = Net(4, 8)
    with torch.no_grad():
        net.fc.weight[2].zero_()
    compress_(net, _one(bits=4))
    assert net.fc.weight_scale[2].item() == 1.0
    assert torch.isfinite(net.fc.weight).all() and not net.fc.weight[2].any()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pruned_zeros_stay_zero_after_quantization(bits: int) -> None:
    net = Net(32, 48)
    w = net.fc.weight.detach().clone()
    compress_(net, _one(sparsity=0.6, bits=bits))
    layer = net.fc
    n = w.numel()
    assert int((~layer.mask).sum()) == round(0.6 * n)
    assert not layer.weight[~layer.mask].any()
    assert w[layer.mask].abs().min() >= w[~layer.mask].abs().max()  # pruned before quantizing
    _assert_on_grid(layer.weight, layer.weight_scale, bits)


# ---------------------------------------------------------------- activation quantization


def test_activation_quantization_scale_and_bounded_change() -> None:
    net = TokNet()
    calib = _tokens(vocab=20, shape=(4, 12))
    ref = net(calib)
    x = net.emb(calib).detach()
    w = net.fc.weight.detach().clone()
    compress_(net, _one(act_bits=8), calib=calib)
    layer = net.fc
    assert isinstance(layer, CompressedLinear) and layer.act_bits == 8 and layer.bits == 32
    expected_scale = x.abs().max() / 127
    assert layer.act_scale.shape == () and layer.act_scale.item() == expected_scale.item()
    assert torch.equal(layer.weight, w)  # weights untouched by act-only quantization
    diff = (net(calib) - ref).abs().detach()
    bound = w.abs().sum(dim=1) * expected_scale / 2 + 1e-5  # |W dx| <= |W|_1 * scale / 2
    assert diff.max() > 0
    assert (diff <= bound).all()


def test_activation_quantization_needs_calib_tokens() -> None:
    with pytest.raises(SpaceError, match="calib"):
        compress_(TokNet(), _one(act_bits=8))


def test_activation_quantizer_sits_on_first_factor() -> None:
    net = TokNet()
    calib = _tokens(vocab=20, shape=(4, 12))
    x = net.emb(calib).detach()
    compress_(net, _one(rank=4, act_bits=6), calib=calib)
    assert isinstance(net.fc, LowRankLinear)
    first, second = net.fc.first, net.fc.second
    assert isinstance(first, CompressedLinear) and first.act_bits == 6
    assert first.act_scale.item() == (x.abs().max() / 31).item()
    assert type(second) is nn.Linear  # nothing but rank applies to the second factor


# ---------------------------------------------------------------- order of operations


def test_rank_then_prune_then_bits_on_one_layer() -> None:
    net = Net(32, 48)
    bias = net.fc.bias
    compress_(net, _one(rank=8, sparsity=0.5, bits=4))
    pair = net.fc
    assert isinstance(pair, LowRankLinear) and pair.rank == 8
    for factor, shape in ((pair.first, (8, 48)), (pair.second, (32, 8))):
        assert isinstance(factor, CompressedLinear)
        assert factor.weight.shape == shape and factor.bits == 4 and factor.sparse
        n = factor.weight.numel()
        assert int((~factor.mask).sum()) == round(0.5 * n)
        assert not factor.weight[~factor.mask].any()
        _assert_on_grid(factor.weight, factor.weight_scale, 4)
    assert pair.first.act_bits == 32 and pair.second.act_bits == 32
    assert pair.first.bias is None and pair.second.bias is bias


# ---------------------------------------------------------------- GPT, ties and errors


def test_tied_head_quantized_keeps_tie_and_embedding_on_grid() -> None:
    model = _gpt()
    compress_(model, Policy(layers={"head": LayerPolicy(bits=4, sparsity=0.3)}))
    head = model.head
    assert isinstance(head, CompressedLinear)
    assert head.weight is model.wte.weight
    _assert_on_grid(model.wte.weight, head.weight_scale, 4)
    assert not model.wte.weight[~head.mask].any()
    idx = _tokens()
    rows = model.wte(idx).reshape(-1, 32)
    assert torch.equal(rows, head.weight.detach()[idx.flatten()])
    assert len(list(model.parameters())) == len(list(_gpt().parameters()))  # still one matrix


def test_rank_on_tied_head_by_a_method_that_cannot_tie_raises() -> None:
    with pytest.raises(SpaceError, match=r"'head' shares its weight with 'wte'.*cannot factorize"):
        compress_(_gpt(), Policy(layers={"head": LayerPolicy(rank=8, rank_method="autoencoder")}))


@pytest.mark.parametrize("name", ["blocks.7.mlp.c_fc", "nope", "ln_f", "blocks.0.mlp"])
def test_unknown_or_non_linear_layer_raises_with_name(name: str) -> None:
    with pytest.raises(SpaceError, match=rf"layer '{name}' is not a Linear"):
        compress_(_gpt(), Policy(layers={name: LayerPolicy(bits=8)}))


def test_identity_settings_are_skipped_and_bad_policy_type_raises() -> None:
    model = _gpt()
    compress_(model, Policy(layers={"not.a.layer": LayerPolicy()}))
    assert type(model.blocks[0].mlp.c_fc) is nn.Linear
    with pytest.raises(SpaceError, match="not a microsweep Policy"):
        compress_(model, {"head": LayerPolicy(bits=8)})  # type: ignore[arg-type]


def test_failed_validation_leaves_model_unchanged() -> None:
    model = _gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy = Policy(
        layers={
            "blocks.0.mlp.c_fc": LayerPolicy(bits=4),
            "blocks.0.attn.c_attn": LayerPolicy(sparsity=0.5, block=(7, 7)),
        }
    )
    with pytest.raises(SpaceError, match="c_attn"):
        compress_(model, policy)
    assert type(model.blocks[0].mlp.c_fc) is nn.Linear
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compress_copies_and_leaves_original_unchanged() -> None:
    model = _gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy = Policy(layers={"head": LayerPolicy(bits=4), "blocks.1.mlp.c_fc": LayerPolicy(rank=8)})
    out = compress(model, policy)
    assert out is not model
    assert type(model.head) is nn.Linear and type(model.blocks[1].mlp.c_fc) is nn.Linear
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert out.head.weight is out.wte.weight and model.head.weight is model.wte.weight
    assert out.head.weight is not model.wte.weight


def test_mixed_policy_gpt_stays_finite_and_deterministic() -> None:
    model = _gpt()
    calib = _tokens()
    policy = Policy(
        layers={
            "blocks.0.attn.c_attn": LayerPolicy(sparsity=0.5, block=(4, 4), bits=6, act_bits=8),
            "blocks.0.mlp.c_fc": LayerPolicy(rank=16, sparsity=0.3, bits=4),
            "blocks.1.mlp.c_proj": LayerPolicy(sparsity=0.9),
            "blocks.1.attn.c_proj": LayerPolicy(act_bits=4),
            "head": LayerPolicy(bits=8),
        }
    )
    a = compress(model, policy, calib=calib)
    b = compress(model, policy, calib=calib)
    logits = a(calib)
    assert logits.shape == (3, 16, 65) and torch.isfinite(logits).all()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.blocks[0].attn.c_attn.act_scale is not None
    assert isinstance(a.blocks[0].mlp.c_fc, LowRankLinear)


def test_eight_bit_weights_change_logits_by_under_five_percent() -> None:
    model = _gpt()
    idx = _tokens()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "head" in names and len(names) == 9
    out = compress(model, Policy(layers={n: LayerPolicy(bits=8) for n in names}))
    assert all(isinstance(out.get_submodule(n), CompressedLinear) for n in names)
    with torch.no_grad():
        ref, got = model(idx), out(idx)
    rel = (torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)).item()
    assert 0 < rel < 0.05


def test_no_global_torch_state_changes() -> None:
    model = _gpt().train()
    model.blocks[1].eval()
    rng = torch.get_rng_state()
    policy = Policy(
        layers={
            "blocks.0.mlp.c_fc": LayerPolicy(rank=8, act_bits=8),
            "blocks.0.attn.c_proj": LayerPolicy(sparsity=0.5, bits=4),
        }
    )
    compress_(model, policy, calib=_tokens())
    assert torch.is_grad_enabled()
    assert torch.equal(rng, torch.get_rng_state())
    assert model.blocks[0].mlp.c_fc.training and model.blocks[0].mlp.c_fc.first.training
    assert not model.blocks[1].mlp.c_fc.training
    assert model.training and not model.blocks[1].training


# ---------------------------------------------------------------- recovery fine-tuning


def test_project_restores_mask_and_grid_after_perturbation() -> None:
    model = _gpt()
    policy = Policy(
        layers={
            "head": LayerPolicy(sparsity=0.4, bits=4),
            "blocks.0.mlp.c_fc": LayerPolicy(sparsity=0.5, block=(4, 4), bits=3),
            "blocks.1.attn.c_attn": LayerPolicy(rank=8, sparsity=0.25, bits=5),
            "blocks.1.mlp.c_proj": LayerPolicy(sparsity=0.7),
        }
    )
    compress_(model, policy)
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == 5
    masks = [layer.mask.clone() for layer in layers]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    assert any(layer.weight[~layer.mask].any() for layer in layers)  # perturbation broke mask
    out = project_(model)
    assert out is model and model.head.weight is model.wte.weight
    for layer, mask in zip(layers, masks, strict=True):
        assert torch.equal(layer.mask, mask)
        assert not layer.weight[~mask].any()
        if layer.bits < 32:
            expected = layer.weight.detach().abs().amax(dim=1) / (2 ** (layer.bits - 1) - 1)
            assert torch.allclose(layer.weight_scale, expected, rtol=1e-6, atol=0)
            _assert_on_grid(layer.weight, layer.weight_scale, layer.bits)
    assert torch.is_grad_enabled()


def test_project_is_a_fixed_point_on_a_fresh_compression() -> None:
    net = Net(16, 32)
    compress_(net, _one(sparsity=0.5, bits=4))
    w = net.fc.weight.detach().clone()
    project_(net)
    assert torch.allclose(net.fc.weight, w, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- small pieces


def test_sparsity_of_counts_exact_zeros() -> None:
    assert sparsity_of(torch.tensor([0.0, 1e-30, -0.0, 2.0])) == 0.5
    assert sparsity_of(torch.zeros(0)) == 0.0
    assert sparsity_of(torch.zeros(3, 3)) == 1.0


def test_shared_weight_or_module_in_two_layers_raises() -> None:
    net = nn.Module()
    net.a = nn.Linear(8, 8)
    net.b = nn.Linear(8, 8)
    net.b.weight = net.a.weight
    with pytest.raises(SpaceError, match="share one weight"):
        compress_(net, Policy(layers={"a": LayerPolicy(bits=8), "b": LayerPolicy(bits=4)}))
    net.c = net.a
    with pytest.raises(SpaceError, match="same module as"):
        compress_(net, Policy(layers={"c": LayerPolicy(bits=8)}))


def test_public_api() -> None:
    assert set(mc.__all__) == {
        "compress_",
        "compress",
        "compress_layer",
        "project_",
        "CompressedLinear",
        "LowRankLinear",
        "VariantCache",
        "LevelStore",
        "InputStats",
        "input_stats",
        "rank_transform",
        "factorize",
        "weight_svd",
        "fake_quantize_symmetric",
        "layer_inputs",
        "magnitude_mask",
        "magnitude_masks",
        "sparsity_of",
        "tensor_scale",
        # embeddings, tensor-train, grouped ranks (shared basis, autoencoder), group lasso
        "CompressedEmbedding",
        "LowRankEmbedding",
        "TTEmbedding",
        "TTLinear",
        "tensor_train",
        "tt_shape",
        "tt_svd",
        "AutoDecoder",
        "DecodedLinear",
        "compress_linears",
        "train_decoder",
        "build_group",
        "group_modules",
        "shared_basis",
        "block_norms",
        "group_lasso_penalty",
        "group_lasso_train_",
        "reweight",
        # the technique registry, its forms, and the checks a Space asks of it
        "Technique",
        "MatrixTechnique",
        "RankTechnique",
        "Form",
        "SpecContext",
        "RebuildContext",
        "register_technique",
        "technique",
        "techniques",
        "form_for",
        "form_of_spec",
        "check_rule",
        "check_shared_weight",
        "embedding_misfit",
        # the factorized tied pair (a rank on a tied table or head) and its checks
        "TiedLowRankEmbedding",
        "compress_tied",
        "tied_factors",
        "frequency_rows",
        "check_tied_rank",
        "ties",
        # frequency bands of a table or head
        "Band",
        "BandSet",
        "BandedEmbedding",
        "BandedHead",
        "BandSlot",
        "band_reads",
        "parse_band",
        "token_order",
    }
    assert all(hasattr(mc, name) for name in mc.__all__)
    assert math.isclose(mc.fake_quantize_symmetric(torch.tensor(0.74), torch.tensor(0.5), 4), 0.5)
