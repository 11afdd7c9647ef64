"""Shared basis: the layers of a tied rule keep their own coefficients over one rank-r basis
(`LowRankLinear` pairs whose first factors hold one Parameter, stored and counted once)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from microsweep.errors import SpaceError

from .._groups import shared_basis
from ._base import GroupTechnique, RuleCheck
from ._svd import LOW_RANK

__all__ = ["SharedBasis"]


class SharedBasis(GroupTechnique):
    """W_l ~= C_l B for every layer l of the group, B the top right singular vectors of the
    layers' stacked rows; stored dense at fp32."""

    name = "shared"
    forms = (LOW_RANK,)

    def check_rule(self, rule: RuleCheck) -> None:
        """Dense-only; one basis is shared by a tied rule's layers of one input size."""
        super().check_rule(rule)
        if not rule.tied:
            raise SpaceError(
                f"rule {rule.rule_key!r}: Rank(..., method='shared') shares one basis across "
                "the rule's layers; add tied=True"
            )
        if len({i.in_features for i in rule.members}) > 1:
            raise SpaceError(
                f"rule {rule.rule_key!r}: a shared basis needs layers with one input size; "
                f"{rule.members[0].name!r} and others differ"
            )

    def build_group(
        self, rank: int, layers: Mapping[str, nn.Module], *, seed: int = 0
    ) -> dict[str, nn.Module]:
        """One basis from the layers' stacked rows, each layer its own coefficients."""
        with torch.enable_grad():
            return dict(shared_basis(layers, rank))
