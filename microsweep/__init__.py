"""microsweep: search sparsity, bit-width and rank per layer of a language model, scored by the
MicroNet rules under a perplexity ceiling.

Public names load lazily, so ``import microsweep`` pulls in neither Ray, plotly, SQLAlchemy nor
torch until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from microsweep._version import __version__

if TYPE_CHECKING:
    from microsweep import data, models
    from microsweep.errors import (
        MicrosweepError,
        SpaceError,
        SpaceWarning,
        StorageError,
        UsageError,
    )
    from microsweep.export import load
    from microsweep.report import Sweep, open_sweep
    from microsweep.search import MicroNet, resume_sweep, run_sweep
    from microsweep.spaces import (
        Bands,
        Bits,
        Choice,
        Float,
        Int,
        LayerPolicy,
        Policy,
        Rank,
        Space,
        Sparsity,
    )

_LAZY = {
    "Space": "microsweep.spaces",
    "Sparsity": "microsweep.spaces",
    "Bits": "microsweep.spaces",
    "Bands": "microsweep.spaces",
    "Rank": "microsweep.spaces",
    "Choice": "microsweep.spaces",
    "Float": "microsweep.spaces",
    "Int": "microsweep.spaces",
    "Policy": "microsweep.spaces",
    "LayerPolicy": "microsweep.spaces",
    "MicroNet": "microsweep.prepare",
    "run_sweep": "microsweep.search",
    "resume_sweep": "microsweep.search",
    "MicrosweepError": "microsweep.errors",
    "SpaceError": "microsweep.errors",
    "SpaceWarning": "microsweep.errors",
    "StorageError": "microsweep.errors",
    "load": "microsweep.export",
    "open_sweep": "microsweep.report",
    "Sweep": "microsweep.report",
    "UsageError": "microsweep.errors",
}
_SUBMODULES = {
    "allocate",
    "export",
    "data",
    "models",
    "compress",
    "score",
    "spaces",
    "search",
    "storage",
    "report",
    "workers",
}

__all__ = [
    "__version__",
    "Bands",
    "Bits",
    "Choice",
    "Float",
    "Int",
    "LayerPolicy",
    "MicroNet",
    "MicrosweepError",
    "Policy",
    "Rank",
    "Space",
    "SpaceError",
    "SpaceWarning",
    "Sparsity",
    "StorageError",
    "UsageError",
    "Sweep",
    "open_sweep",
    "resume_sweep",
    "run_sweep",
    "data",
    "load",
    "models",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"microsweep.{name}")
    else:
        raise AttributeError(f"module 'microsweep' has no attribute {name!r}")
    globals()[name] = value
    return value
