"""The multiple-choice knapsack behind budget allocation, solved exactly by dynamic programming.

Pick one option per group to minimise the summed cost while the summed loss stays within a
budget. Losses are measured in units of budget / resolution and rounded up, so a solution never
exceeds the budget; for losses on that grid the optimum is exact (tests compare with brute
force). Cost O(groups x options x resolution) after each group is cut to its Pareto options.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["pareto_options", "solve"]


def pareto_options(cost: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the options no other option beats on both cost and loss (NaN cost: excluded),
    sorted by loss."""
    ok = np.flatnonzero(np.isfinite(cost) & np.isfinite(loss))
    order = ok[np.lexsort((cost[ok], loss[ok]))]
    keep = []
    best = math.inf
    for i in order:
        if cost[i] < best - 1e-15:
            keep.append(i)
            best = cost[i]
    return np.array(keep, dtype=np.int64)


def solve(
    costs: Sequence[np.ndarray],
    losses: Sequence[np.ndarray],
    budget: float,
    *,
    resolution: int = 2000,
) -> list[int] | None:
    """One option index per group minimising Σ cost with Σ loss <= budget, or None when even
    the lowest-loss options exceed it. Options with a NaN cost are never chosen; losses below
    zero count as zero."""
    if len(costs) != len(losses):
        raise ValueError("costs and losses need one array per group")
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution {resolution!r} must be a positive int")
    if budget < 0:
        return None
    unit = budget / resolution if budget > 0 else 1.0
    cap = resolution if budget > 0 else 0
    dp = np.zeros(cap + 1)
    choices: list[tuple[np.ndarray, np.ndarray]] = []
    for cost, loss in zip(costs, losses, strict=True):
        cost = np.asarray(cost, dtype=np.float64)
        loss = np.maximum(np.asarray(loss, dtype=np.float64), 0.0)
        keep = pareto_options(cost, loss)
        if budget > 0:
            weight = np.ceil(loss[keep] / unit - 1e-9).astype(np.int64)
        else:
            weight = np.where(loss[keep] > 0, cap + 1, 0)
        fits = weight <= cap
        keep, weight = keep[fits], weight[fits]
        if keep.size == 0:
            return None
        best = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1, dtype=np.int64)
        for option, w in zip(keep, weight, strict=True):
            cand = np.full(cap + 1, np.inf)
            cand[w:] = dp[: cap + 1 - w] + cost[option]
            better = cand < best
            best[better] = cand[better]
            arg[better] = option
        choices.append((arg, _weights(keep, weight, cost.shape[0])))
        dp = best
    # dp[u] is the least cost of the groups so far within u loss units (dp starts at 0 for
    # every u, so each step keeps the "at most u" meaning); walk back from the full budget
    if not np.isfinite(dp[cap]):
        return None
    u = cap
    picked: list[int] = []
    for arg, weights in reversed(choices):
        option = int(arg[u])
        picked.append(option)
        u -= int(weights[option])
    picked.reverse()
    return picked


def _weights(keep: np.ndarray, weight: np.ndarray, n: int) -> np.ndarray:
    """The integer loss of each kept option by option index (-1 for the others)."""
    out = np.full(n, -1, dtype=np.int64)
    out[keep] = weight
    return out
