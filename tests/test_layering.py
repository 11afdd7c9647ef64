"""Imports between microsweep's packages run one way: each package imports only packages in lower
layers (function-level imports included), so no two packages import each other; and inside a
package no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import microsweep

ROOT = Path(microsweep.__file__).parent

LAYERS: list[set[str]] = [
    {"_version", "errors", "_text", "_optuna"},
    {"data", "storage"},
    {"models"},
    {"policy"},
    {"score"},
    {"compress"},
    {"spaces"},
    {"allocate", "workers"},
    {"prepare"},
    {"search"},
    {"report", "export"},
    {"cli", "__init__", "__main__"},
]
"""Bottom to top. Storage knows nothing of models or search; policies are plain data below
everything that reads them; compression techniques register their counting rules, so `compress`
sits above `score`, and `spaces` checks its rules with the techniques; reports and export read
the store and rebuild models through `prepare`; the CLI and the lazy top-level names sit above
all."""


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


def _module_of(path: Path, root: Path = ROOT) -> str:
    """The dotted module a file is, below microsweep (``compress._techniques._svd``; a package's
    ``__init__.py`` is the package itself)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_imports(path: Path, root: Path = ROOT) -> set[str]:
    """The microsweep modules (dotted, below microsweep) a file imports at any depth: absolute
    (``from microsweep.pkg._x import y``, ``import microsweep.pkg._x``) and relative
    (``from ._x import y``, ``from . import _x``); a name that is a module file counts as that
    module."""
    here = _module_of(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()

    def exists(dotted: list[str]) -> bool:
        base = root.joinpath(*dotted) if dotted else root
        return base.with_suffix(".py").exists() or (base / "__init__.py").exists()

    def add(dotted: list[str], names: list[str]) -> None:
        subs = [n for n in names if exists([*dotted, n])]
        out.update(".".join([*dotted, n]) for n in subs)
        if len(subs) < len(names) and dotted:
            out.add(".".join(dotted))

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 0 and node.module:
                parts = node.module.split(".")
                if parts[0] == "microsweep":
                    add(parts[1:], names)
            elif node.level > 0:
                base = package[: len(package) - (node.level - 1)]
                add([*base, *(node.module.split(".") if node.module else [])], names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "microsweep" and len(parts) > 1:
                    out.add(".".join(parts[1:]))
    return out


def _cycles(root: Path = ROOT) -> list[list[str]]:
    """Every circle of imports between modules of one package (each circle once, from its
    smallest module name)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = _module_of(path, root)
        top = module.split(".")[0]
        targets = {t for t in _module_imports(path, root) if t.split(".")[0] == top}
        graph[module] = targets - {module}
    found: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()

    def walk(start: str, node: str, trail: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                if tuple(trail) not in seen:
                    seen.add(tuple(trail))
                    found.append([*trail, start])
            elif nxt > start and nxt not in trail:
                walk(start, nxt, [*trail, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_no_import_circle_inside_a_package() -> None:
    cycles = _cycles()
    assert not cycles, "import circles inside a package:\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_the_check_sees_an_import_circle(tmp_path: Path) -> None:
    """Module-level and function-level imports, absolute and relative, all close a circle."""
    pkg = tmp_path / "search"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from ._driver import run_sweep\n")
    (pkg / "_driver.py").write_text("from ._sensitivity import run_sensitivity\n")
    (pkg / "_sensitivity.py").write_text(
        "def probe():\n    from microsweep.search._driver import _make_pool\n"
    )
    (pkg / "_alone.py").write_text("from . import _driver\n")
    assert _module_imports(pkg / "_sensitivity.py", tmp_path) == {"search._driver"}
    assert _module_imports(pkg / "_alone.py", tmp_path) == {"search._driver"}
    assert _cycles(tmp_path) == [["search._driver", "search._sensitivity", "search._driver"]]
    (pkg / "_sensitivity.py").write_text("def probe():\n    return 1\n")
    assert _cycles(tmp_path) == []
