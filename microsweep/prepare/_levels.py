"""`with_levels`: a sweep's layer input statistics, computed once, and its level store.

The data-aware methods read each layer's input statistics on the calibration tokens. They
depend on nothing but the dense model and those tokens, so a sweep computes them once, before
its workers start, and keeps them in a `LevelStore` folder named by the model fingerprint and
the tokens' digest (beside a SQLite store's file, or under the cache folder for a server
database): a later sweep of the same model reads them back, and every worker receives them
with the model instead of running a calibration pass of its own. The same folder holds the
built levels the workers share.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from microsweep.policy import DATA_AWARE_METHODS
from microsweep.spaces import Bits, Rank, Sparsity

from ._prepared import Prepared, _digest

if TYPE_CHECKING:
    from microsweep.compress import LevelStore
    from microsweep.spaces import Space

    from ._spacefile import SpaceFile

__all__ = ["level_folder", "level_store", "reading_layers", "with_levels"]


def level_folder(storage_url: str, model_fp: str, calib_digest: str) -> Path:
    """Where the levels of a model on these calibration tokens live: beside a SQLite store's
    file (``<file>.levels/<key>``), else under the cache folder (``levels/<key>``)."""
    from microsweep.data import cache_dir
    from microsweep.storage import sqlite_path

    key = hashlib.sha256(f"{model_fp}|{calib_digest}".encode()).hexdigest()[:16]
    path = sqlite_path(storage_url)
    if path is not None:
        return path.with_name(path.name + ".levels") / key
    return cache_dir() / "levels" / key


def reading_layers(space: Space) -> list[str]:
    """The layers of `space` some policy may compress with a method that reads their inputs
    (data-aware pruning or rounding, or a data-aware rank), in model order (a table's
    statistics are its token frequencies); a rank on a tied layer reads its partner's too
    (the factorized tied pair reads the head's inputs and the table's frequencies)."""
    out: list[str] = []
    for info in space.layers:
        rule = space.assignment[info.name]
        knobs = rule.settings
        sparsity, bits, rank = knobs.get("sparsity"), knobs.get("bits"), knobs.get("rank")
        # as `LayerPolicy.data_aware` reads it: any method but magnitude and round-to-nearest
        reads = (
            (isinstance(sparsity, Sparsity) and sparsity.method not in (None, "magnitude"))
            or (isinstance(bits, Bits) and bits.method not in (None, "rtn"))
            or (isinstance(rank, Rank) and rank.method in DATA_AWARE_METHODS)
        )
        if reads:
            out.append(info.name)
            if isinstance(rank, Rank) and info.shared_with:
                out.append(info.shared_with[0])
    return list(dict.fromkeys(out))


def with_levels(sf: SpaceFile, prepared: Prepared, storage_url: str, model_fp: str) -> Prepared:
    """`prepared` with the sweep's input statistics (read from the level folder, the missing
    ones computed in one calibration pass and kept there) and its `LevelStore`; unchanged when
    no layer reads its inputs or there are no calibration tokens."""
    from microsweep.compress import input_stats

    names = reading_layers(sf.space)
    store = level_store(storage_url, model_fp, prepared)
    if not names or store is None:
        return prepared
    stats = store.load_stats(names)
    missing = {n: sf.model.get_submodule(n) for n in names if n not in stats}
    if missing:
        found = input_stats(sf.model, missing, prepared.calib)
        store.save_stats(found)
        stats.update(found)
    return replace(prepared, stats=stats, levels=store)


def level_store(storage_url: str, model_fp: str, prepared: Prepared) -> LevelStore | None:
    """The level store of a sweep's model and calibration tokens (None without tokens)."""
    from microsweep.compress import LevelStore

    if prepared.calib is None:
        return None
    return LevelStore(level_folder(storage_url, model_fp, _digest(prepared.calib) or ""))
