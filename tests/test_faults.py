"""Faults against real processes: a second driver, a killed driver, PostgreSQL restarted and
away for longer than the driver waits. Every check ends with exactly N finished trials, no
duplicate numbers, and both stores agreeing trial by trial."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from microsweep.storage import Store
from tests.conftest import ROOT

TINY = ROOT / "examples" / "tiny.py"


def _slow_space(tmp_path: Path, seconds: float) -> str:
    """examples/tiny.py with an `evaluate` that takes `seconds` (so a sweep lasts a while)."""
    path = tmp_path / "slow.py"
    path.write_text(
        TINY.read_text()
        + f"\nimport time\n\n\ndef evaluate(model):\n    time.sleep({seconds})\n    return 5.0\n"
    )
    return str(path)


def _start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "microsweep.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _wait_for_trials(url: str, name: str, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(Store(url, must_exist=True).trials(name)) >= n:
                return
        except Exception:  # not created yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"sweep {name} did not reach {n} trials in {timeout}s")


def _stores_agree(url: str, name: str, n: int) -> None:
    """Exactly `n` finished trials numbered 0..n-1 in both stores, the same state each, and
    nothing left RUNNING."""
    store = Store(url, must_exist=True)
    rows = store.trials(name)
    assert [r.number for r in rows] == list(range(n))
    study = optuna.load_study(study_name=name, storage=store.optuna_storage())
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert [t.number for t in trials] == list(range(n))
    for row, trial in zip(rows, trials, strict=True):
        assert row.state == trial.state.name, (row.number, row.state, trial.state)
        if row.state == "COMPLETE":
            assert trial.value == pytest.approx(row.score)
            assert trial.params and row.policy["layers"]
    store.dispose()


def test_second_driver_is_refused_while_the_first_runs(tmp_path, tiny_gpt):
    url = f"sqlite:///{tmp_path / 'lease.db'}"
    space = _slow_space(tmp_path, 0.4)
    first = _start(
        "run",
        space,
        "--name",
        "l",
        "--trials",
        "10",
        "--in-process",
        "--sampler",
        "random",
        "--storage",
        url,
        "--seed",
        "1",
    )
    try:
        _wait_for_trials(url, "l", 1)
        second = _start("resume", "--name", "l", "--storage", url, "--in-process")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert "being run by another driver" in err and "Traceback" not in err
        again = _start("run", space, "--name", "l", "--trials", "10", "--storage", url)
        _, err = again.communicate(timeout=120)
        assert again.returncode == 2 and "already exists" in err
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    _stores_agree(url, "l", 10)
    assert Store(url).get_sweep("l").owner is None  # released at the end


def test_killed_driver_is_taken_over_after_its_lease_ends(tmp_path, tiny_gpt):
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    space = _slow_space(tmp_path, 0.3)
    env = {"MICROSWEEP_LEASE_TTL": "10"}
    first = _start(
        "run",
        space,
        "--name",
        "k",
        "--trials",
        "12",
        "--in-process",
        "--sampler",
        "random",
        "--storage",
        url,
        env=env,
    )
    _wait_for_trials(url, "k", 3)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    killed = time.monotonic()
    kept = len(Store(url).trials("k"))
    assert Store(url).get_sweep("k").owner is not None  # the dead driver still holds it
    early = _start("resume", "--name", "k", "--storage", url, "--in-process", env=env)
    _, err = early.communicate(timeout=120)
    assert early.returncode == 2 and "being run by another driver" in err
    time.sleep(max(0.0, killed + 10.5 - time.monotonic()))  # the lease runs out
    late = _start("resume", "--name", "k", "--storage", url, "--in-process", env=env)
    _, err = late.communicate(timeout=300)
    assert late.returncode == 0, err
    _stores_agree(url, "k", 12)
    assert len(Store(url).trials("k")) == 12 >= kept


# -- a PostgreSQL server of the test's own, so it can be stopped and restarted -------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Postgres:
    """initdb in a temp folder and pg_ctl on a free port, run as the postgres user; only this
    server is ever stopped."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins or shutil.which("runuser") is None or os.geteuid() != 0:
            pytest.skip("needs PostgreSQL's server binaries and root (to run them as postgres)")
        self.bin = Path(bins[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="microsweep-pg-"))
        shutil.chown(self.dir, "postgres")
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres(
            self.bin / "initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres"
        )
        self.start()

    def _as_postgres(self, *cmd: object) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *map(str, cmd)],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            self.bin / "pg_ctl",
            "-D",
            self.dir / "data",
            "-o",
            opts,
            "-l",
            self.dir / "log",
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._as_postgres(self.bin / "pg_ctl", "-D", self.dir / "data", "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres():
    pg = _Postgres()
    yield pg
    pg.remove()


@pytest.mark.slow
def test_postgres_restart_and_outage_lose_no_trial(tmp_path, tiny_gpt, private_postgres):
    pg = private_postgres
    space = _slow_space(tmp_path, 0.3)
    # a restart and a 6 s outage, both shorter than the driver waits: the sweep goes on
    run = _start(
        "run",
        space,
        "--name",
        "p",
        "--trials",
        "16",
        "--in-process",
        "--sampler",
        "random",
        "--storage",
        pg.url,
        "--storage-wait",
        "60",
    )
    _wait_for_trials(pg.url, "p", 2)
    pg.stop()
    pg.start()
    _wait_for_trials(pg.url, "p", 6)
    pg.stop()
    time.sleep(6)
    pg.start()
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert "storage unavailable" in err and "storage back after" in err
    _stores_agree(pg.url, "p", 16)


@pytest.mark.slow
def test_postgres_away_too_long_spools_and_resume_writes(tmp_path, tiny_gpt, private_postgres):
    pg = private_postgres
    space = _slow_space(tmp_path, 0.3)
    cache = tmp_path / "cache"
    env = {"MICROSWEEP_CACHE": str(cache), "MICROSWEEP_LEASE_TTL": "2"}
    run = _start(
        "run",
        space,
        "--name",
        "s",
        "--trials",
        "12",
        "--in-process",
        "--sampler",
        "random",
        "--storage",
        pg.url,
        "--storage-wait",
        "2",
        env=env,
    )
    _wait_for_trials(pg.url, "s", 3)
    pg.stop()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 2 and "Traceback" not in err, err
    assert "microsweep resume --name s" in err and "kept in" in err
    spooled = list((cache / "spool").glob("*.jsonl"))
    assert len(spooled) == 1 and spooled[0].read_text().strip()
    pg.start()
    time.sleep(2.5)  # the stopped driver's lease runs out
    resume = _start("resume", "--name", "s", "--storage", pg.url, "--in-process", env=env)
    out, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err
    assert "during an outage" in err and not spooled[0].exists()
    _stores_agree(pg.url, "s", 12)


# -- a full disk, and a worker killed under a running sweep --------------------------------
def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    return proc.returncode == 0


def _used_kb(where: Path) -> int:
    out = subprocess.run(
        ["df", "-k", "--output=used", str(where)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.slow
def test_full_disk_spools_and_resume_writes_after_space_is_freed(tmp_path, tiny_gpt):
    """The database's disk fills mid-sweep (a small tmpfs of the test's own): the driver stops
    in one line, finished trials go to the spool on another disk, and once there is room again
    resume writes them and completes exactly N trials with both stores agreeing."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "16m"):
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        url = f"sqlite:///{disk / 'full.db'}"
        cache = tmp_path / "cache"
        env = {"MICROSWEEP_CACHE": str(cache), "MICROSWEEP_LEASE_TTL": "2"}
        run = _start(
            "run",
            _slow_space(tmp_path, 0.2),
            "--name",
            "f",
            "--trials",
            "60",
            "--in-process",
            "--sampler",
            "random",
            "--storage",
            url,
            "--storage-wait",
            "2",
            env=env,
        )
        _wait_for_trials(url, "f", 3)
        # no more room than a few trials' rows need
        subprocess.run(
            ["mount", "-o", f"remount,size={_used_kb(disk) + 48}k", str(disk)], check=True
        )
        out, err = run.communicate(timeout=300)
        assert run.returncode == 2 and "Traceback" not in err, err
        assert "microsweep resume --name f" in err and "kept in" in err, err
        written = len(Store(url, must_exist=True).trials("f"))
        assert 3 <= written < 60
        spooled = list((cache / "spool").glob("*.jsonl"))
        assert len(spooled) == 1 and spooled[0].read_text().strip()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        time.sleep(2.5)  # the stopped driver's lease runs out
        resume = _start("resume", "--name", "f", "--storage", url, "--in-process", env=env)
        out, err = resume.communicate(timeout=600)
        assert resume.returncode == 0, err
        assert "during an outage" in err and not spooled[0].exists()
        _stores_agree(url, "f", 60)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_killed_worker_fails_only_its_trial_and_the_sweep_goes_on(tmp_path, tiny_gpt):
    """SIGKILL to a Ray worker process of a running sweep: the trial it held (or the next one
    sent to it) is FAIL with the reason, a new worker takes its place, and the sweep ends with
    exactly N finished trials in both stores."""
    import re

    url = f"sqlite:///{tmp_path / 'worker.db'}"
    run = _start(
        "run",
        _slow_space(tmp_path, 0.5),
        "--name",
        "w",
        "--trials",
        "10",
        "--workers",
        "2",
        "--sampler",
        "random",
        "--storage",
        url,
    )
    try:
        _wait_for_trials(url, "w", 2)
        rows = Store(url, must_exist=True).trials("w")
        pid = int(re.search(r"pid (\d+)", rows[-1].worker or "").group(1))
        assert pid != run.pid
        os.kill(pid, signal.SIGKILL)  # a process of this sweep's own Ray, found by its trial
    finally:
        out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    _stores_agree(url, "w", 10)
    rows = Store(url, must_exist=True).trials("w")
    failed = [r for r in rows if r.state == "FAIL"]
    assert failed and all("worker died" in (r.reason or "") for r in failed), failed
    assert len(failed) <= 2 and sum(r.state == "COMPLETE" for r in rows) >= 8


def test_time_budget_stops_starting_trials_and_resume_continues(tmp_path, tiny_gpt):
    """--timeout: no trial starts after the budget, the running ones are kept (no FAIL), and
    resume goes on to the target."""
    from microsweep.search import resume_sweep, run_sweep

    url = f"sqlite:///{tmp_path / 'budget.db'}"
    space = _slow_space(tmp_path, 0.3)
    result = run_sweep(
        space, name="t", trials=200, storage=url, sampler="random", in_process=True,
        progress=False, timeout=2.0,
    )  # fmt: skip
    done = sum(result.states.values())
    assert result.timed_out and 1 <= done < 200 and "FAIL" not in result.states
    _stores_agree(url, "t", done)
    more = resume_sweep("t", trials=done + 2, storage=url, in_process=True, progress=False)
    assert not more.timed_out
    _stores_agree(url, "t", done + 2)
    proc = subprocess.run(
        [sys.executable, "-m", "microsweep.cli", "resume", "--name", "t", "--storage", url,
         "--timeout", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "must be a number above 0" in proc.stderr
