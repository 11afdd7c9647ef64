"""GPTQ, SparseGPT and Wanda against numbers: with an identity Hessian they are
round-to-nearest and magnitude pruning exactly; on correlated inputs they lose less of the
layer's output; counts and grids are exact; a diagonal Gram matrix given as a vector (an
embedding's token frequencies) weighs each input's saliency by it."""

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


@pytest.mark.parametrize("tile", [(4, 4), (1, 8), (8, 1), (32, 2)])
def test_sparsegpt_in_tiles_moves_the_removed_tiles_error_onto_kept_weights(tile) -> None:
    """Whole tiles go, exactly round(s * n_tiles) of them; the kept weights take their error,
    so the output error is below that of the same saliency without the update and below plain
    block magnitude; a joint pass keeps every kept value on its row's grid."""
    w = _weight(32, 256, seed=21)
    gram = _correlated_gram(256, seed=9)
    br, bc = tile
    n_tiles = (32 // br) * (256 // bc)
    for s in (0.3, 0.5, 0.7):
        out, keep, scales = sparsegpt(w, gram, s, tile=tile)
        assert scales is None
        assert int((~keep).sum()) == br * bc * round(s * n_tiles)
        grid = keep.reshape(32 // br, br, 256 // bc, bc)
        assert bool((grid.all(dim=(1, 3)) | ~grid.any(dim=(1, 3))).all())  # whole tiles
        assert bool((out[~keep] == 0).all())
        selected = output_error(w, w * block_mask(w, gram, s, tile), gram)
        plain = output_error(w, w * magnitude_mask(w, s, tile), gram)
        error = output_error(w, out, gram)
        assert error < 0.9 * selected and error < 0.6 * plain, (tile, s)
    out, keep, scales = sparsegpt(w, gram, 0.5, bits=4, tile=tile)
    steps = out / scales[:, None]
    assert torch.allclose(steps, steps.round(), atol=1e-4) and bool((out[~keep] == 0).all())
    assert float(steps.abs().max()) <= 7 + 1e-4
    with pytest.raises(ValueError, match="tile"):
        sparsegpt(w, gram, 0.5, tile=(5, 4))


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_with_static_groups(bits: int) -> None:
    """act_order with group: each group's scales come from the weight before any update, in
    contiguous runs of the original columns. With no off-diagonal Hessian (nothing moves) that
    is group-wise round-to-nearest exactly, whatever order a diagonal Hessian rounds in; on
    correlated inputs the output error is below group-only GPTQ's, every value on its group's
    grid and every pruned entry zero."""
    group = 16
    w = _weight(16, 64, seed=9)
    rtn, rtn_scales = quantize_groups(w, bits, group)
    energy = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5
    for hessian in (torch.eye(64), torch.diag(energy)):  # the second permutes the columns
        q, scales = gptq(w, hessian, bits, group=group, act_order=True, block=32)
        assert torch.equal(q, rtn) and torch.equal(scales, rtn_scales)
    qmax = 2 ** (bits - 1) - 1
    for seed in (5, 6):
        w = _weight(32, 64, seed=seed)
        gram = _correlated_gram(64, seed=seed + 10)
        keep = magnitude_mask(w, 0.25)
        grouped = output_error(w, gptq(w, gram, bits, group=group)[0], gram)
        q, scales = gptq(w, gram, bits, group=group, act_order=True, mask=keep)
        static = output_error(w, gptq(w, gram, bits, group=group, act_order=True)[0], gram)
        assert static < 0.8 * grouped, (static, grouped)
        assert torch.equal(scales, quantize_groups(w, bits, group, keep)[1])
        steps = q / scales.repeat_interleave(group, dim=1)
        assert torch.allclose(steps, steps.round(), atol=1e-4)
        assert int(steps.round().abs().max()) <= qmax
        assert torch.equal(q[~keep], torch.zeros(int((~keep).sum())))


def _frequencies(cols: int, seed: int = 0, unseen: int = 0) -> torch.Tensor:
    """Zipf-like input frequencies in a random order, the first `unseen` inputs never seen."""
    gen = torch.Generator().manual_seed(seed)
    freq = 1.0 / torch.arange(1, cols + 1, dtype=torch.float64)
    freq = freq[torch.randperm(cols, generator=gen)]
    freq[:unseen] = 0.0
    return freq / freq.sum()


def test_a_diagonal_gram_weighs_saliency_by_frequency() -> None:
    """A diagonal Gram matrix given as its vector: uniform frequencies give magnitude pruning,
    skewed ones less frequency-weighted error; inputs never seen go first (ties by |w|); Wanda
    and its blocks choose as with the same diagonal written as a matrix; exact counts."""
    w = _weight(24, 96, seed=21)
    uniform = torch.full((96,), 1 / 96, dtype=torch.float64)
    for s in (0.3, 0.7):
        out, keep, scales = sparsegpt(w, uniform, s)
        assert scales is None and torch.equal(keep, magnitude_mask(w, s))
        assert torch.equal(out, w * keep)
    freq = _frequencies(96, unseen=12)
    for s in (0.3, 0.7):
        out, keep, _ = sparsegpt(w, freq, s)
        assert int((~keep).sum()) == round(s * w.numel())
        magnitude = output_error(w, w * magnitude_mask(w, s), freq)
        assert output_error(w, out, freq) < 0.5 * magnitude
    _, keep, _ = sparsegpt(w, freq, 0.2)  # 460 pruned; the 12 unseen inputs hold 288 entries
    assert not keep[:, :12].any()
    _, keep, _ = sparsegpt(w, freq, 0.05)  # 115 pruned: the unseen entries of least |w|
    unseen = w[:, :12].abs().flatten()
    assert int((~keep).sum()) == 115 and not keep[:, 12:].logical_not().any()
    assert torch.equal(~keep[:, :12].flatten(), unseen <= unseen.sort().values[114])
    seen = _frequencies(96, seed=1)
    assert torch.equal(wanda_mask(w, seen, 0.5), wanda_mask(w, torch.diag(seen), 0.5))
    assert torch.equal(
        block_mask(w, seen, 0.5, (4, 8), method="wanda"),
        block_mask(w, torch.diag(seen), 0.5, (4, 8), method="wanda"),
    )
    assert torch.equal(block_mask(w, uniform, 0.5, (4, 8)), magnitude_mask(w, 0.5, (4, 8)))
    assert int((~block_mask(w, freq, 0.5, (4, 8))).sum()) == 32 * round(0.5 * 72)
    assert output_error(w, w * 0.9, seen) == pytest.approx(
        output_error(w, w * 0.9, torch.diag(seen))
    )
    q, keep, scales = sparsegpt(w, freq, 0.5, bits=4)
    assert torch.equal(q, quantize_rows(w * keep, 4, keep)[0]) and scales.shape == (24,)
