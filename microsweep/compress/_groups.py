"""Rank methods that compress a group of layers together: a shared low-rank basis, or latent
codes with one learned decoder (`LayerPolicy.group` names the group; a layer alone is a group
of one).

Shared basis: W_l ~= C_l B for every layer l of the group, B (rank, in) the top right singular
vectors of the layers' rows stacked, C_l = W_l B^T (the least-squares coefficients for that
basis). Each layer becomes a `LowRankLinear` whose first factor holds the one shared B
Parameter (stored and counted once; each layer still runs its own B x) and whose second holds
its own C_l and bias. Autoencoder: the offline compression of `train_decoder` (codes per row,
one decoder per group, trained on the weights alone; nothing is fine-tuned afterwards).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import skip_init

from microsweep.errors import SpaceError
from microsweep.policy import GROUP_METHODS

from ._modules import LowRankLinear

__all__ = ["group_key", "grouped", "shared_basis"]


def shared_basis(linears: Mapping[str, nn.Linear], rank: int) -> dict[str, LowRankLinear]:
    """Each of `linears` (one input size) as ``second(first(x))`` with one shared rank-`rank`
    basis as every first factor's weight; biases are reused, nothing is modified."""
    weights = [lin.weight.detach() for lin in linears.values()]
    in_sizes = {w.shape[1] for w in weights}
    if len(in_sizes) != 1:
        raise SpaceError(f"a shared basis needs layers with one input size, got {sorted(in_sizes)}")
    in_f = in_sizes.pop()
    if not 1 <= rank <= in_f:
        raise SpaceError(f"shared-basis rank {rank} must be in 1..{in_f} (the input size)")
    stacked = torch.cat([w.to(torch.float64) for w in weights])
    _, _, vh = torch.linalg.svd(stacked, full_matrices=False)
    basis = vh[:rank]  # (rank, in), orthonormal rows
    ref = weights[0]
    shared = nn.Parameter(basis.to(ref.dtype).to(ref.device), requires_grad=False)
    out: dict[str, LowRankLinear] = {}
    kw = {"device": ref.device, "dtype": ref.dtype}
    for name, lin in linears.items():
        first = skip_init(nn.Linear, in_f, rank, bias=False, **kw)
        first.weight = shared
        second = skip_init(nn.Linear, rank, lin.out_features, bias=lin.bias is not None, **kw)
        with torch.no_grad():
            second.weight.copy_(lin.weight.detach().to(torch.float64) @ basis.T)
        if lin.bias is not None:
            second.bias = lin.bias
        out[name] = LowRankLinear(first, second).train(lin.training)
    return out


def group_key(name: str, settings: Any) -> tuple[str, str, int]:
    """(method, group, rank): the layers that one `group_modules` call compresses together."""
    return (settings.rank_method, settings.group or name, int(settings.rank))


def grouped(steps: Sequence[Any]) -> dict[tuple[str, str, int], list[Any]]:
    """The steps (name, linear, settings) of grouped rank methods, by `group_key`."""
    groups: dict[tuple[str, str, int], list[Any]] = {}
    for step in sorted(steps, key=lambda s: s.name):  # the policy's order must not matter
        if step.settings.rank is not None and step.settings.rank_method in GROUP_METHODS:
            groups.setdefault(group_key(step.name, step.settings), []).append(step)
    return groups
