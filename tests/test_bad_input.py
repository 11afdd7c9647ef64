"""Bad input from the command line and the API: one clean line, exit 2, stored data intact."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import microsweep
from microsweep.search import run_sweep
from microsweep.storage import Store
from tests.conftest import ROOT
from tests.conftest import cli as _cli

TINY = ROOT / "examples" / "tiny.py"


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("microsweep: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_in_memory_sqlite_is_refused(tmp_path):
    _one_line_error(
        _cli("status", "--name", "x", "--storage", "sqlite://", cwd=tmp_path), "in-memory"
    )


def test_sys_exit_in_a_space_file_is_reported(tmp_path):
    space = tmp_path / "exits.py"
    space.write_text("import sys\nsys.exit(3)\n")
    _one_line_error(_cli("count", str(space), cwd=tmp_path), "sys.exit(3)")


def test_load_refuses_devices_and_foreign_files_at_once(tmp_path):
    started = time.perf_counter()
    with pytest.raises(microsweep.MicrosweepError, match="not a regular file"):
        microsweep.load("/dev/zero")
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:  # 200 MB of something else: refused from its first bytes
        fh.truncate(200 * 1024 * 1024)
    with pytest.raises(microsweep.MicrosweepError, match="bad magic"):
        microsweep.load(big)
    assert time.perf_counter() - started < 2.0


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory, tiny_gpt):
    url = f"sqlite:///{tmp_path_factory.mktemp('bad') / 'bad.db'}"
    run_sweep(
        str(TINY),
        name="b",
        trials=4,
        storage=url,
        seed=0,
        sampler="uniform",
        in_process=True,
        progress=False,
    )
    return url


def test_outputs_that_cannot_be_written_are_one_line(tmp_path, small_sweep):
    rows = Store(small_sweep).trials("b")
    before = [r.number for r in rows]
    complete = next(r.number for r in rows if r.state == "COMPLETE")
    outdir = tmp_path / "adir"
    outdir.mkdir()
    _one_line_error(
        _cli("plot", "--name", "b", "--storage", small_sweep, "-o", str(outdir), cwd=tmp_path),
        str(outdir),
    )
    _one_line_error(
        _cli(
            "export",
            "--name",
            "b",
            "--trial",
            str(complete),
            "--storage",
            small_sweep,
            "-o",
            str(outdir),
            cwd=tmp_path,
        ),
        str(outdir),
    )
    assert [r.number for r in Store(small_sweep).trials("b")] == before


def test_status_into_a_closed_pipe_is_quiet(tmp_path, small_sweep):
    proc = subprocess.run(
        f"{sys.executable} -m microsweep.cli status --name b --storage {small_sweep} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.stdout.strip() and "Traceback" not in proc.stderr and "Error" not in proc.stderr


def test_password_is_masked_in_messages(tmp_path):
    url = "postgresql://bob:s3cret-pw@127.0.0.1:1/nowhere"
    proc = _cli("status", "--name", "x", "--storage", url, cwd=tmp_path)
    assert proc.returncode == 2 and "s3cret-pw" not in proc.stderr + proc.stdout
    assert "***" in proc.stderr


def test_unreachable_cluster_is_refused_quickly_and_stores_nothing(tmp_path, tiny_gpt):
    url = f"sqlite:///{tmp_path / 'addr.db'}"
    started = time.perf_counter()
    proc = _cli(
        "run",
        str(TINY),
        "--name",
        "a",
        "--trials",
        "2",
        "--storage",
        url,
        "--address",
        "127.0.0.1:1",
        cwd=tmp_path,
    )
    _one_line_error(proc, "no Ray cluster answers at 127.0.0.1:1")
    assert time.perf_counter() - started < 120
    assert Store(url).sweep_names() == []
    proc = _cli(
        "run",
        str(TINY),
        "--name",
        "a",
        "--trials",
        "2",
        "--storage",
        url,
        "--workers",
        "1000",
        cwd=tmp_path,
    )
    _one_line_error(proc, "--workers 1000")
    assert Store(url).sweep_names() == []


def test_cli_storage_wait_must_be_positive(tmp_path):
    proc = _cli("run", str(TINY), "--name", "w", "--storage-wait", "0", cwd=tmp_path)
    assert proc.returncode == 2 and "must be at least 1" in proc.stderr
    assert not Path(tmp_path / "microsweep.db").exists()


def test_an_optuna_only_database_is_left_as_it_was_by_a_refused_run(tmp_path):
    """A run refused after opening the store (here: a space file that fails) adds no table to
    a database that holds only Optuna's, and leaves its journal mode alone."""
    import sqlite3

    import optuna

    db = tmp_path / "optuna.db"
    optuna.create_study(storage=f"sqlite:///{db}", study_name="theirs")

    def state() -> tuple[list[str], str]:
        with sqlite3.connect(db) as conn:
            tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master"))
            return tables, conn.execute("PRAGMA journal_mode").fetchone()[0]

    before = state()
    bad = tmp_path / "bad.py"
    bad.write_text("raise ValueError('boom')\n")
    _one_line_error(
        _cli("run", str(bad), "--name", "x", "--storage", f"sqlite:///{db}", cwd=tmp_path),
        "boom",
    )
    assert state() == before
    assert not any(t.startswith("microsweep") for t in before[0])


def _mount_tmpfs(where: Path, size: str) -> bool:
    """A private tmpfs at `where` (root on Linux only); False where the machine refuses."""
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


def test_status_reads_a_sweep_on_a_read_only_medium(tmp_path, small_sweep):
    import shutil

    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt, "20m"):
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        src = Path(small_sweep.split("///", 1)[1])
        shutil.copy(src, mnt / "s.db")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        url = f"sqlite:///{mnt / 's.db'}"
        proc = _cli("status", "--name", "b", "--storage", url, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "best feasible" in proc.stdout or "trials" in proc.stdout
        reader = Store(url, must_exist=True)
        assert reader.sweep_names() == ["b"]
        done = next(r.number for r in reader.trials("b") if r.state == "COMPLETE")
        reader.dispose()
        _one_line_error(  # an output on the read-only medium: one line, nothing half-written
            _cli("plot", "--name", "b", "--storage", url, "-o", str(mnt / "p.html"), cwd=tmp_path),
            "p.html",
        )
        _one_line_error(
            _cli(
                "export",
                "--name",
                "b",
                "--trial",
                str(done),
                "--storage",
                url,
                "-o",
                str(mnt / "m.msz"),
                cwd=tmp_path,
            ),
            "m.msz",
        )
        _one_line_error(  # writing is refused in one line, not a traceback
            _cli("resume", "--name", "b", "--storage", url, "--in-process", cwd=tmp_path),
            "s.db",
        )
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
