"""`round_to_storage`: make a model hold exactly the values its count says are stored."""

from __future__ import annotations

import torch
from torch import nn

from microsweep.score._counter import Counts

__all__ = ["round_to_storage"]


def round_to_storage(model: nn.Module, counts: Counts) -> bool:
    """Round every float parameter and buffer of `model` to fp16 precision in place when
    `counts` applied the 16-bit allowance, so the model holds exactly what a 16-bit artifact
    stores. Returns whether it rounded anything (False: values are stored as they are)."""
    if not counts.freebie:
        return False
    with torch.no_grad():
        seen: set[int] = set()
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point() and id(t) not in seen:
                seen.add(id(t))
                t.copy_(t.to(torch.float16).to(t.dtype))
    return True
