"""Shared fixtures: corpora from ../shared/data, a private cache, and a pretrained tiny GPT.

The tiny GPT is pretrained once per session into the session's cache, in this process and on
one torch thread, before any test starts a process that builds it: a test that waits on a
subprocess then waits on its trials, never on a pretraining run (minutes beside busy processes).
"""

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
    """Point the product at the shared corpora and a cache private to this test session, and
    run torch on one thread in this process.

    The models built here are tiny: with two threads beside a busy process the threads mostly
    wait on each other (pretraining the tiny GPT took 2.8 s on one thread and 109 s on two with
    both cores busy). No test's result depends on the count, which differs from machine to
    machine anyway; subprocesses and Ray workers choose their own."""
    data = os.environ.get("MICROSWEEP_DATA") or str(SHARED_DATA)
    if not (Path(data) / "tinyshakespeare" / "input.txt").is_file():
        pytest.exit(f"test corpora not found under {data}; set MICROSWEEP_DATA", returncode=2)
    os.environ["MICROSWEEP_DATA"] = data
    os.environ.setdefault("MICROSWEEP_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.pop("MICROSWEEP_STORAGE", None)
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus():
    from microsweep import data

    return data.tiny_shakespeare()


@pytest.fixture(scope="session")
def tiny_gpt(corpus):
    """The same tiny model examples/tiny.py builds (shared through the cache)."""
    from microsweep import models

    return models.gpt(corpus, n_layer=2, n_head=2, n_embd=32, block_size=32, pretrain_steps=300)


@pytest.fixture(scope="session")
def tiny_cache(tiny_gpt) -> Path:
    """The session's cache folder, once the tiny GPT's weights are in it: a process that builds
    examples/tiny.py with this cache loads them instead of pretraining again."""
    from microsweep.data import cache_dir

    cache = cache_dir()
    assert any((cache / "models").glob("gpt-*.pt")), f"no pretrained GPT in {cache}"
    return cache


@pytest.fixture
def private_cache(tmp_path: Path, tiny_cache: Path) -> Path:
    """A cache folder of the test's own (for a spool it looks into) whose `models/` is a link
    to the session cache's, so a subprocess given it as MICROSWEEP_CACHE finds the tiny GPT
    pretrained (the same weights, so the same model fingerprint) instead of training it."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(tiny_cache / "models", target_is_directory=True)
    return cache


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
