"""`with_reference`: the dense model's next-token distributions, once per sweep that asks.

An objective with ``select_by="kl"`` measures each trial's KL divergence from the dense model.
The dense side depends only on the model and the evaluation windows, so the driver computes it
once (`microsweep.score.kl_reference`, a few MiB) before its workers start and ships it to every
worker with the model, like the input statistics of `with_levels`. Any other objective builds
nothing and costs nothing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from microsweep.errors import UsageError

from ._prepared import Prepared

if TYPE_CHECKING:
    from ._spacefile import SpaceFile

__all__ = ["with_reference"]


def with_reference(sf: SpaceFile, prepared: Prepared, *, wanted: bool = False) -> Prepared:
    """`prepared` with the dense model's KL reference on its windows when the objective selects
    by KL, or the sampler ranks by it (`wanted`, where the windows allow; else unchanged);
    refused in one line when the objective asks for KL but the space measures with its own
    `evaluate`, which gives no next-token distributions."""
    if wanted and not sf.objective.wants_kl and sf.evaluate is None and prepared.windows.numel():
        return replace(prepared, reference=_reference(sf, prepared))
    if not sf.objective.wants_kl:
        return prepared
    if sf.evaluate is not None or not prepared.windows.numel():
        raise UsageError(
            "MicroNet(select_by='kl') measures the KL from the dense model on the built-in "
            "evaluation windows, but this space measures with its own evaluate(); give a corpus "
            "instead, or use select_by='perplexity'"
        )
    return replace(prepared, reference=_reference(sf, prepared))


def _reference(sf: SpaceFile, prepared: Prepared) -> Any:
    """The dense model's KL reference on the windows, read in batches that fit the settings'
    memory limit."""
    from microsweep.score import kl_reference

    settings = prepared.settings
    return kl_reference(
        sf.model, prepared.windows, batch_size=settings.batch_size,
        memory_bytes=getattr(settings, "memory_bytes", None),
    )  # fmt: skip
