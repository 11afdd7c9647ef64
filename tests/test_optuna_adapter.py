"""Optuna's private names are used in one module only, each one still present in the installed
Optuna: an upgrade that moves one fails here, not deep inside a sweep."""

from __future__ import annotations

import ast
from pathlib import Path

import microsweep
from microsweep import _optuna

ROOT = Path(microsweep.__file__).parent


def test_every_private_use_exists_in_the_installed_optuna() -> None:
    assert _optuna.missing_private_uses() == {}
    assert set(_optuna.PRIVATE_USES) == set(_optuna._checks())
    assert all(len(why) > 40 for why in _optuna.PRIVATE_USES.values())  # each says why


def test_the_check_notices_a_missing_name(monkeypatch) -> None:
    import optuna

    monkeypatch.delattr(optuna.samplers.CmaEsSampler, _optuna.CMAES_TRIALS_HOOK)
    missing = _optuna.missing_private_uses()
    assert list(missing) == ["CmaEsSampler._get_trials"]
    assert "AttributeError" in missing["CmaEsSampler._get_trials"]


def _private_optuna_uses(path: Path) -> list[str]:
    """Attribute reads of Optuna internals: `._storage`, `._trial_id`, `._study_id`,
    `._get_trials(` on anything, and imports from `optuna.*._private` modules."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in (
            "_storage", "_trial_id", "_study_id", "_get_trials", "_cached_frozen_trial",
        ):  # fmt: skip
            if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optuna"):
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append(f"{path.name}:{node.lineno} from {node.module}")
    return found


def test_no_other_module_reaches_into_optuna() -> None:
    outside = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "_optuna.py" and path.parent == ROOT:
            continue
        outside += _private_optuna_uses(path)
    assert not outside, "Optuna private names outside microsweep/_optuna.py:\n" + "\n".join(outside)
    # the scan itself sees what it looks for
    assert _private_optuna_uses(ROOT / "_optuna.py")
