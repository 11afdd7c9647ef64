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
