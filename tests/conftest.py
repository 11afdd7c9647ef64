"""Shared fixtures: corpora from ../shared/data, a private cache, and a pretrained tiny GPT."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session", autouse=True)
def _environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point the product at the shared corpora and a cache private to this test session."""
    data = os.environ.get("MICROSWEEP_DATA") or str(SHARED_DATA)
    if not (Path(data) / "tinyshakespeare" / "input.txt").is_file():
        pytest.exit(f"test corpora not found under {data}; set MICROSWEEP_DATA", returncode=2)
    os.environ["MICROSWEEP_DATA"] = data
    os.environ.setdefault("MICROSWEEP_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.pop("MICROSWEEP_STORAGE", None)


@pytest.fixture(scope="session")
def corpus():
    from microsweep import data

    return data.tiny_shakespeare()


@pytest.fixture(scope="session")
def tiny_gpt(corpus):
    """The same tiny model examples/tiny.py builds (shared through the cache)."""
    from microsweep import models

    return models.gpt(corpus, n_layer=2, n_head=2, n_embd=32, block_size=32, pretrain_steps=300)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sweeps.db'}"


@pytest.fixture
def unique_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3
        ):
            return True
    except Exception:
        return False


def cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `microsweep` command line in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "microsweep.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=timeout,
    )
