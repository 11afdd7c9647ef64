"""Imports between microsweep's packages run one way: each package imports only packages in lower
layers (function-level imports included), so no two packages import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import microsweep

ROOT = Path(microsweep.__file__).parent

LAYERS: list[set[str]] = [
    {"_version", "errors", "_text"},
    {"data", "storage"},
    {"models"},
    {"spaces"},
    {"compress"},
    {"score"},
    {"allocate", "workers"},
    {"prepare"},
    {"search"},
    {"report", "export"},
    {"cli", "__init__", "__main__"},
]
"""Bottom to top. Storage knows nothing of models or search; reports and export read the store
and rebuild models through `prepare`; the CLI and the lazy top-level names sit above all."""


def _layer(package: str) -> int:
    for i, names in enumerate(LAYERS):
        if package in names:
            return i
    raise AssertionError(f"package {package!r} has no layer in LAYERS; add it")


def _imports(path: Path) -> set[str]:
    """The microsweep packages a file imports, at any depth of the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "microsweep":
                continue
            if len(parts) > 1:
                out.add(parts[1])
            else:  # from microsweep import data, models
                out.update(alias.name for alias in node.names if (ROOT / alias.name).exists())
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "microsweep" and len(parts) > 1:
                    out.add(parts[1])
    return out


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    return rel[0]


def test_every_import_goes_down_the_layers() -> None:
    upward = []
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 40  # the walk sees the package, not an empty directory
    for path in files:
        package = _package_of(path)
        for target in _imports(path) - {package}:
            if _layer(target) >= _layer(package) and package not in ("__init__", "__main__"):
                upward.append(f"{path.relative_to(ROOT)} imports microsweep.{target}")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_the_check_sees_a_cycle(tmp_path: Path) -> None:
    """The parser finds function-level imports, so a lazy upward import cannot hide."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from microsweep.search._driver import run_sweep\n")
    assert _imports(src) == {"search"}
    assert _layer("search") > _layer("workers")
