"""Reweighted group lasso over weight blocks (Li et al. 2020, arXiv:2009.08065), before pruning.

Training adds ``penalty * sum_g alpha_g * ||W_g||_2`` over the block-shaped tiles W_g of the
chosen Linear weights, with alpha_g = 1 / (||W_g||_2 + eps) re-estimated every few steps: small
blocks get a large coefficient and are pushed to zero harder than large ones, so that the blocks
magnitude pruning removes afterwards carry little of the trained function. A block of (1, C)
(or (1, 0)) groups whole rows, (br, bc) square or row-segment tiles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from microsweep.errors import UsageError

__all__ = [
    "DEFAULT_EPS",
    "block_norms",
    "group_lasso_penalty",
    "group_lasso_train_",
    "reweight",
]

DEFAULT_EPS = 1e-3
"""eps in alpha_g = 1 / (||W_g|| + eps): bounds alpha for blocks already at zero (trained GPT
blocks have norms around 1e-2 to 1, so it matters only for blocks the penalty has emptied)."""


def _check(weight: torch.Tensor, block: tuple[int, int], what: str = "weight") -> tuple[int, int]:
    """The (br, bc) of `block` after checking it tiles the 2-D `weight` exactly; a 0 side spans
    the whole side of the matrix, as in `LayerPolicy.block` ((0, 4): full-height columns)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise UsageError(f"{what} must be a 2-D tensor (rows, cols), got {shape}")
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in block)
        or not any(block)
    ):
        raise UsageError(
            f"block {block!r} for {what} must be two ints >= 0, not both 0, such as (4, 4)"
        )
    rows, cols = weight.shape
    br, bc = int(block[0]) or rows, int(block[1]) or cols
    if rows % br or cols % bc:
        raise UsageError(
            f"{what} of shape {rows}x{cols} does not split into {br}x{bc} blocks; "
            f"pick a block whose sides divide {rows} and {cols}"
        )
    return br, bc


def block_norms(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """L2 norm of each `block`-shaped tile of `weight` (R, C), shape (R / br, C / bc), row-major
    as `magnitude_order` ranks them; differentiable (the gradient at an all-zero tile is 0)."""
    br, bc = _check(weight, block)
    rows, cols = weight.shape
    tiles = weight.reshape(rows // br, br, cols // bc, bc)
    return torch.linalg.vector_norm(tiles, dim=(1, 3))


def reweight(
    weight: torch.Tensor, block: tuple[int, int], eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """The reweighting coefficients alpha_g = 1 / (||W_g||_2 + eps) of each tile, detached (they
    are constants between re-estimations, not trained)."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise UsageError(f"eps {eps!r} must be a positive number (it bounds 1 / norm at zero)")
    with torch.no_grad():
        return 1.0 / (block_norms(weight.detach(), block) + eps)


def group_lasso_penalty(
    weights_and_blocks: Sequence[tuple[torch.Tensor, tuple[int, int]]],
    alphas: Sequence[torch.Tensor],
) -> torch.Tensor:
    """sum over layers and tiles of alpha_g * ||W_g||_2, differentiable in the weights; `alphas`
    holds one coefficient grid per (weight, block), shaped like its `block_norms`."""
    if len(weights_and_blocks) != len(alphas):
        raise UsageError(
            f"{len(weights_and_blocks)} weights but {len(alphas)} alpha grids; give one each"
        )
    if not weights_and_blocks:
        raise UsageError("group_lasso_penalty needs at least one (weight, block) pair")
    terms = []
    for i, ((weight, block), alpha) in enumerate(zip(weights_and_blocks, alphas, strict=True)):
        norms = block_norms(weight, block)
        if not isinstance(alpha, torch.Tensor) or alpha.shape != norms.shape:
            got = tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
            raise UsageError(
                f"alphas[{i}] has shape {got}; weight {i} has a {tuple(norms.shape)} block grid"
            )
        terms.append((alpha.to(norms) * norms).sum())
    return torch.stack(terms).sum()


def group_lasso_train_(
    model: nn.Module,
    targets: Mapping[str, tuple[int, int]],
    train_tokens: torch.Tensor,
    *,
    steps: int,
    lr: float,
    penalty: float,
    reweight_every: int,
    block_size: int,
    batch_size: int = 8,
    seed: int = 0,
    eps: float = DEFAULT_EPS,
) -> nn.Module:
    """Train the dense `model` in place for `steps` AdamW steps on cross-entropy plus `penalty`
    x the reweighted group lasso of the `targets` (layer name -> block shape: Linears, embedding
    tables, LSTM gate matrices) weights, with the
    alphas re-estimated every `reweight_every` steps; returns `model`.

    Every parameter trains (the penalty falls on the targets only). Batches come from a generator
    seeded with `seed` and the global RNG is forked and seeded too, so the same call gives the
    same weights whatever ran before; training flags and requires_grad are restored afterwards.
    """
    _check_settings(steps, lr, penalty, reweight_every, block_size, batch_size)
    if not isinstance(train_tokens, torch.Tensor) or train_tokens.dim() != 1:
        raise UsageError("group lasso train_tokens must be a 1-D tensor of token ids")
    if len(train_tokens) <= block_size + 1:
        raise UsageError(
            f"{len(train_tokens)} training tokens are too few for block_size {block_size}"
        )
    pairs = _target_weights(model, targets)
    params = list(model.parameters())
    grads = [p.requires_grad for p in params]
    flags = [(m, m.training) for m in model.modules()]
    on_gpu = any(p.device.type == "cuda" for p in params)
    devices = list(range(torch.cuda.device_count())) if on_gpu else []  # manual_seed sets all
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(seed)  # dropout, if the model has any, repeats too
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            model.train()
            for step in range(steps):
                if step % reweight_every == 0:
                    alphas = [reweight(w, b, eps) for w, b in pairs]
                loss = _loss(model, train_tokens, block_size, batch_size, gen)
                if penalty > 0:
                    loss = loss + penalty * group_lasso_penalty(pairs, alphas)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p, g in zip(params, grads, strict=True):
            p.requires_grad_(g)
            p.grad = None
        for module, training in flags:
            module.training = training
    return model


def _loss(
    model: nn.Module,
    tokens: torch.Tensor,
    block_size: int,
    batch_size: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """The language-model loss of one batch drawn with `gen`."""
    from microsweep.models import lm_batch_loss

    return lm_batch_loss(model, tokens, block_size=block_size, batch_size=batch_size, gen=gen)


def _check_settings(
    steps: int, lr: float, penalty: float, reweight_every: int, block_size: int, batch_size: int
) -> None:
    """One-line `UsageError`s for the training settings `group_lasso_train_` takes."""
    for name, value in (("steps", steps), ("reweight_every", reweight_every),
                        ("block_size", block_size), ("batch_size", batch_size)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"group lasso {name} {value!r} must be a positive int")
    for name, value in (("lr", lr), ("penalty", penalty)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise UsageError(f"group lasso {name} {value!r} must be a finite number >= 0")


def _target_weights(
    model: nn.Module, targets: Mapping[str, tuple[int, int]]
) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """(weight, checked block) of each target layer; an `nn.LSTM` named by a gate matrix runs
    as a `LinearLSTM` first, so its gates are Linears to penalise."""
    if not targets:
        raise UsageError("group lasso needs at least one target layer (name -> block shape)")
    from microsweep.compress._apply import _gate_lstms_

    _gate_lstms_(model, list(targets))  # an nn.LSTM's gate matrices become Linears to penalise
    pairs: list[tuple[torch.Tensor, tuple[int, int]]] = []
    for name, block in targets.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise UsageError(
                f"group lasso target {name!r} is not a Linear, Embedding or LSTM gate matrix "
                "of the model"
            )
        pairs.append((module.weight, _check(module.weight, block, f"layer {name!r}")))
    return pairs
