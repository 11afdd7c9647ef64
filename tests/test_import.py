"""`import microsweep` stays light: no Ray, plotly, SQLAlchemy, Optuna or torch at import."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, microsweep; "
        "mods = ('ray', 'plotly', 'sqlalchemy', 'optuna', 'torch'); "
        "heavy = [m for m in mods if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_lazy_names_resolve():
    import microsweep

    assert microsweep.Space.__name__ == "Space"
    assert microsweep.MicroNet.__name__ == "MicroNet"
    assert hasattr(microsweep.data, "tiny_shakespeare")


def test_search_package_loads_no_optuna_ray_or_plotly():
    """A space file imports `microsweep.search` (for MicroNet): the samplers, Ray and the
    report load only when a sweep needs them."""
    code = (
        "import sys, microsweep.search; "
        "mods = ('ray', 'plotly', 'optuna'); "
        "print(','.join(m for m in mods if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
