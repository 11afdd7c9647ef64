"""`LevelStore`: data-aware layer variants and input statistics on disk, built once per sweep.

A data-aware level (GPTQ, SparseGPT or Wanda at one setting of one layer) costs a pass over
the layer's columns; a sweep asks for the same (layer, settings) again and again, on every
worker. The store keeps each one built, one file per (layer, settings) in a folder named by
the model and the calibration tokens, so any process that opens the folder (another worker,
a later sweep of the same model, `export`) loads the very tensors the first build produced
instead of building again. Files are written to a temporary name and renamed, so a reader
sees a whole file or none, and two workers building the same level at once write the same
bytes. Every build appends one line to ``builds.log``: the count of builds across processes.
The per-layer input statistics the methods read are kept in the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from microsweep._version import __version__
from microsweep.policy import LayerPolicy

from ._lowrank import InputStats

__all__ = ["LevelStore"]

FORMAT = 1
"""Bumped when what a stored level holds changes: an old folder is then not read."""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _remove(path: Path) -> None:
    """Delete a file if it is there (a folder that cannot hold it has none)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _abandoned(claim: Path) -> bool:
    """Whether a claim file names a process of this host that no longer runs."""
    try:
        host, pid = claim.read_text().split()
    except (OSError, ValueError):
        return False  # gone already, or being written
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


class LevelStore:
    """Built layer variants and input statistics in folder `root` (created on first write).

    Picklable: a worker process gets the folder, not the counters. `builds` and `loads` count
    this process's writes and reads; `build_count()` reads every process's builds."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.builds = 0
        self.loads = 0
        # False once a write failed (a read-only medium, a full disk): levels are then built
        # in memory as without a store, and what is on disk is still read
        self.writable = True

    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.root)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])

    def __repr__(self) -> str:
        return f"LevelStore({str(self.root)!r})"

    # -- layer variants ---------------------------------------------------------------------
    @staticmethod
    def key(name: str, settings: LayerPolicy) -> str:
        """The text a level is filed under: the format, the package version (an upgrade may
        change an algorithm), the layer and every setting that shapes it."""
        settings_text = json.dumps(settings.to_json(), sort_keys=True)
        return f"{FORMAT} {__version__}\n{name}\n{settings_text}"

    def _level_path(self, key: str) -> Path:
        return self.root / "levels" / f"{_digest(key)}.pt"

    def has(self, name: str, settings: LayerPolicy) -> bool:
        """Whether the level is on disk (a cheap check: the file exists)."""
        return self._level_path(self.key(name, settings)).is_file()

    def get(
        self, name: str, settings: LayerPolicy, device: torch.device | str = "cpu"
    ) -> nn.Module | None:
        """The stored module of `name` under `settings` (on `device`), or None when none is
        stored (or the file cannot be read: the caller builds it again and overwrites it)."""
        key = self.key(name, settings)
        found = self._read(self._level_path(key), device)
        if not isinstance(found, dict) or found.get("key") != key:
            return None
        module = found.get("module")
        if not isinstance(module, nn.Module):
            return None
        self.loads += 1
        return module

    def get_or_build(
        self,
        name: str,
        settings: LayerPolicy,
        build: Callable[[], nn.Module],
        device: torch.device | str = "cpu",
        *,
        wait: float = 600.0,
    ) -> nn.Module:
        """The stored level, or the one `build` makes (then stored). One process builds a
        level while the others asking for it wait for its file: the builder holds a claim
        file; a claim whose process on this host is gone, or older than `wait` seconds,
        is taken over."""
        found = self.get(name, settings, device)
        if found is not None:
            return found
        key = self.key(name, settings)
        claim = self._level_path(key).with_suffix(".claim")
        deadline = time.monotonic() + wait
        while True:
            if self._claim(claim):
                try:
                    found = self.get(name, settings, device)  # finished while we asked
                    if found is None:
                        found = build()
                        self.put(name, settings, found)
                    return found
                finally:
                    _remove(claim)
            time.sleep(0.02)
            found = self.get(name, settings, device)
            if found is not None:
                return found
            if _abandoned(claim) or time.monotonic() > deadline:
                _remove(claim)

    def _claim(self, path: Path) -> bool:
        """Create the claim file; False when another process holds it (True without one
        when the folder cannot be written: this process builds, as without a store)."""
        if not self.writable:
            return True
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if path.parent.is_dir():
                return False
            self.writable = False
            return True
        except OSError:
            self.writable = False
            return True
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}")
        return True

    def put(self, name: str, settings: LayerPolicy, module: nn.Module) -> None:
        """Keep a freshly built level and log the build."""
        key = self.key(name, settings)
        self.builds += 1
        if not self._write(self._level_path(key), {"key": key, "module": module}):
            return
        line = json.dumps({"layer": name, "settings": settings.to_json(), "pid": os.getpid()})
        try:
            with open(self.root / "builds.log", "a", encoding="utf-8") as log:
                log.write(line + "\n")  # one short append per build: whole lines across processes
        except OSError:
            self.writable = False

    def build_count(self) -> int:
        """Levels built into this folder so far, by every process."""
        try:
            with open(self.root / "builds.log", encoding="utf-8") as log:
                return sum(1 for line in log if line.strip())
        except OSError:  # no log yet, or no folder to hold one
            return 0

    def stored_levels(self) -> int:
        """How many levels the folder holds."""
        folder = self.root / "levels"
        return sum(1 for _ in folder.glob("*.pt")) if folder.is_dir() else 0

    # -- input statistics -------------------------------------------------------------------
    def _stats_path(self, name: str) -> Path:
        return self.root / "stats" / f"{_digest(name)}.pt"

    def has_stats(self, name: str) -> bool:
        """Whether the folder holds layer `name`'s statistics."""
        return self._stats_path(name).is_file()

    def load_stats(self, names: list[str]) -> dict[str, InputStats]:
        """The stored statistics of those of `names` that have them (on the CPU)."""
        out: dict[str, InputStats] = {}
        for name in names:
            found = self._read(self._stats_path(name), "cpu")
            if isinstance(found, dict) and found.get("name") == name:
                out[name] = InputStats(found["gram"], found["abs_mean"], int(found["rows"]))
        return out

    def save_stats(self, stats: Mapping[str, InputStats]) -> None:
        """Keep each layer's statistics (a later sweep of the same model and tokens reads them)."""
        for name, s in stats.items():
            record = {"name": name, "gram": s.gram, "abs_mean": s.abs_mean, "rows": s.rows}
            self._write(self._stats_path(name), record)

    # -- files ------------------------------------------------------------------------------
    def _write(self, path: Path, value: Any) -> bool:
        """Write `value` to `path` whole (temporary file, then rename); False when the folder
        cannot be written (the store then stops trying)."""
        if not self.writable:
            return False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
        except OSError:
            self.writable = False
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(value, f)
            os.replace(tmp, path)  # readers see the whole file or none
        except OSError:
            _remove(Path(tmp))
            self.writable = False
            return False
        except BaseException:
            _remove(Path(tmp))
            raise
        return True

    @staticmethod
    def _read(path: Path, device: torch.device | str) -> Any:
        if not path.is_file():
            return None
        try:
            # our own files: modules of microsweep's classes, written by `_write`
            return torch.load(path, map_location=device, weights_only=False)
        except Exception:  # a damaged file is rebuilt, never trusted
            return None
