"""GPTQ, SparseGPT and Wanda against numbers: with an identity Hessian they are
round-to-nearest and magnitude pruning exactly; on correlated inputs they lose less of the
layer's output; counts and grids are exact."""

from __future__ import annotations

import pytest
import torch

from microsweep.compress._obs import (
    block_mask,
    gptq,
    output_error,
    quantize_groups,
    sparsegpt,
    wanda_mask,
)
from microsweep.compress._prune import magnitude_mask
from microsweep.compress._quantize import quantize_rows


def _weight(rows: int = 24, cols: int = 48, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen)


def _correlated_gram(cols: int, seed: int = 1, n: int = 4096) -> torch.Tensor:
    """X^T X / n of inputs that mix a few strong directions and differ in scale per feature,
    as a transformer layer's inputs do."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, cols, generator=gen, dtype=torch.float64)
    mix = torch.eye(cols, dtype=torch.float64) + 0.6 * torch.randn(
        cols, cols, generator=gen, dtype=torch.float64
    )
    scales = torch.logspace(-1, 1, cols, dtype=torch.float64)[torch.randperm(cols, generator=gen)]
    x = (z @ mix) * scales
    return x.T @ x / n


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_an_identity_hessian_is_round_to_nearest(bits: int, act_order: bool) -> None:
    w = _weight()
    rtn, rtn_scale = quantize_rows(w, bits)
    q, scale = gptq(w, torch.eye(w.shape[1]), bits, act_order=act_order, block=16)
    assert torch.equal(q, rtn) and torch.equal(scale, rtn_scale)


def test_gptq_keeps_a_given_mask_and_the_grid() -> None:
    w = _weight(seed=3)
    gram = _correlated_gram(w.shape[1])
    keep = magnitude_mask(w, 0.5)
    q, scale = gptq(w, gram, 4, mask=keep)
    assert torch.equal(q[~keep], torch.zeros_like(q[~keep]))
    steps = q / scale[:, None]
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.round().abs().max() <= 7


def test_sparsegpt_with_an_identity_hessian_is_magnitude_pruning() -> None:
    w = _weight(cols=96)
    for s in (0.3, 0.5, 0.8):
        out, keep, scales = sparsegpt(w, torch.eye(96), s)
        assert scales is None
        assert torch.equal(keep, magnitude_mask(w, s))
        assert torch.equal(out, w * keep)


@pytest.mark.parametrize("bits", [3, 4])
def test_on_correlated_inputs_gptq_loses_less_than_round_to_nearest(bits: int) -> None:
    w = _weight(32, 64, seed=5)
    gram = _correlated_gram(64)
    rtn = output_error(w, quantize_rows(w, bits)[0], gram)
    plain = output_error(w, gptq(w, gram, bits)[0], gram)
    ordered = output_error(w, gptq(w, gram, bits, act_order=True)[0], gram)
    assert plain < 0.7 * rtn and ordered < 0.7 * rtn, (rtn, plain, ordered)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_on_correlated_inputs_sparsegpt_and_wanda_lose_less_than_magnitude(sparsity) -> None:
    w = _weight(32, 64, seed=7)
    gram = _correlated_gram(64, seed=2)
    magnitude = output_error(w, w * magnitude_mask(w, sparsity), gram)
    obs = output_error(w, sparsegpt(w, gram, sparsity, block=16)[0], gram)
    wanda = output_error(w, w * wanda_mask(w, gram, sparsity), gram)
    assert obs < 0.7 * magnitude and wanda < magnitude, (magnitude, obs, wanda)
    assert obs < wanda  # compensation beats choosing the mask alone


@pytest.mark.parametrize("shape", [(24, 48), (7, 130), (5, 33)])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.83])
def test_counts_are_exact_and_a_joint_pass_stays_on_the_grid(shape, sparsity) -> None:
    """round(s * numel) zeros whatever the blocks and rows; with bits, every kept value on its
    row's 4-bit grid and every pruned one exactly zero."""
    w = _weight(*shape, seed=11)
    gram = _correlated_gram(shape[1], seed=4)
    want = round(sparsity * w.numel())
    out, keep, scales = sparsegpt(w, gram, sparsity, bits=4, block=32)
    assert int((~keep).sum()) == want and torch.equal(out[~keep], torch.zeros(want))
    steps = out / scales[:, None]
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.round().abs().max() <= 7
    assert int((~wanda_mask(w, gram, sparsity)).sum()) == want


def test_dead_inputs_and_bad_arguments() -> None:
    """An input never seen on calibration (zero Gram row) neither breaks the factorization nor
    keeps its weights; shapes and ranges are checked."""
    w = _weight(8, 16)
    gram = _correlated_gram(16)
    gram[3, :] = 0.0
    gram[:, 3] = 0.0
    q, _ = gptq(w, gram, 4)
    out, _, _ = sparsegpt(w, gram, 0.5)
    assert torch.isfinite(q).all() and torch.isfinite(out).all()
    assert torch.equal(q[:, 3], torch.zeros(8)) and torch.equal(out[:, 3], torch.zeros(8))
    with pytest.raises(ValueError, match="does not match"):
        gptq(w, torch.eye(5), 4)
    with pytest.raises(ValueError, match="bits"):
        gptq(w, torch.eye(16), 32)
    with pytest.raises(ValueError, match="sparsity"):
        sparsegpt(w, torch.eye(16), 1.0)


@pytest.mark.parametrize("bits", [3, 4])
def test_group_wise_scales_hand_counted_and_gptq_with_an_identity_hessian(bits: int) -> None:
    """One scale per row and run of `group` inputs, max|w| / (2^(b-1) - 1) of that run; GPTQ
    with an identity Hessian gives exactly that rounding, and on correlated inputs less error."""
    w = torch.tensor([[1.0, -3.0, 0.5, 0.25], [0.0, 0.0, -2.0, 1.0]])
    q, scales = quantize_groups(w, 3, 2)
    assert scales.shape == (2, 2)
    assert torch.equal(scales, torch.tensor([[1.0, 0.1666666716], [1.0, 2.0 / 3.0]]).float())
    assert torch.equal(q[0, :2], torch.tensor([1.0, -3.0])) and q[1, 0] == 0.0
    w = _weight(16, 64, seed=9)
    rtn, rtn_scales = quantize_groups(w, bits, 16)
    q, scales = gptq(w, torch.eye(64), bits, group=16, block=32)
    assert torch.equal(q, rtn) and torch.equal(scales, rtn_scales) and scales.shape == (16, 4)
    gram = _correlated_gram(64, seed=6)
    grouped = output_error(w, gptq(w, gram, bits, group=16)[0], gram)
    assert grouped < 0.9 * output_error(w, rtn, gram)
    assert output_error(w, rtn, gram) < output_error(w, quantize_rows(w, bits)[0], gram)
    with pytest.raises(ValueError, match="group"):
        gptq(w, gram, bits, group=24)
    with pytest.raises(ValueError, match="act_order"):
        gptq(w, gram, bits, group=16, act_order=True)


def test_block_selection_by_saliency() -> None:
    """With an identity Hessian the OBS block saliency (sum of w^2) removes the blocks magnitude
    block pruning removes; on correlated inputs both saliencies lose less output than norms
    alone; exactly round(s * n_blocks) blocks go."""
    w = _weight(32, 64, seed=13)
    for s in (0.25, 0.5, 0.75):
        want = magnitude_mask(w, s, (4, 4))
        assert torch.equal(block_mask(w, torch.eye(64), s, (4, 4)), want)
        assert int((~want).sum()) == 16 * round(s * 128)
    gram = _correlated_gram(64, seed=8)
    norms = output_error(w, w * magnitude_mask(w, 0.5, (4, 4)), gram)
    for method in ("obs", "wanda"):
        keep = block_mask(w, gram, 0.5, (4, 4), method=method)
        assert int((~keep).sum()) == 16 * 64
        assert output_error(w, w * keep, gram) < norms, method
    with pytest.raises(ValueError, match="tile"):
        block_mask(w, gram, 0.5, (5, 4))
