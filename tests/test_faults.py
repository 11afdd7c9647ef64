"""Faults against real processes: a second driver, a killed driver, PostgreSQL restarted and
away for longer than the driver waits. Every check ends with exactly N finished trials, no
duplicate numbers, and both stores agreeing trial by trial.

Nothing here waits a fixed time for a process: a test holds a driver at a chosen `evaluate`
call and waits on events (a call held, a trial recorded, a line printed, a stored lease run
out, a process exited), each bounded by BOUND only as a safety net. The tiny GPT comes
pretrained from the session's cache (conftest), so no subprocess pretrains it."""

from __future__ import annotations

import functools
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from microsweep.storage import Store
from tests.conftest import ROOT

TINY = ROOT / "examples" / "tiny.py"

BOUND = 600.0
"""Seconds any wait here gives up after: a safety net against a hung process, never a guess at
how long start-up, a trial or pretraining takes (a busy machine is many times slower)."""

_WARM = f"""\
import sys
import time
from pathlib import Path

import microsweep.cli
import microsweep.search
import microsweep.storage

go = Path(sys.argv[1])
Path(sys.argv[1] + ".ready").touch()
deadline = time.monotonic() + {BOUND}
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.02)
sys.exit(microsweep.cli.main(sys.argv[2:]))
"""
"""A `microsweep` command line that imports everything first, says so (`<go>.ready`), and runs
only once the file `go` exists: what it does then happens at a moment the test chooses, not
an interpreter start-up later."""


class _Gate:
    """Files through which a test holds a driver's `evaluate` at chosen calls (see
    `_slow_space`): the held call creates held-<n>-<pid> here and waits for release-<n>."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()

    def held(self, n: int) -> list[int]:
        """The pids of the processes that have been held at call `n`."""
        return [int(p.name.rsplit("-", 1)[1]) for p in self.folder.glob(f"held-{n}-*")]

    def wait_held(self, n: int, driver: _Driver) -> None:
        """Wait until a process of `driver`'s is held at call `n`."""
        _wait_for(f"evaluate call {n} to be held", lambda: self.held(n), driver)

    def release(self, *calls: int) -> None:
        for n in calls:
            (self.folder / f"release-{n}").touch()


def _slow_space(tmp_path: Path, seconds: float, holds: tuple[int, ...] = ()) -> str:
    """examples/tiny.py with an `evaluate` that takes `seconds` (so a sweep lasts a while) and
    is held at each call number in `holds` until the test releases it (`_Gate` on
    tmp_path/"gate"). Calls are counted per process; in a driver that runs its trials
    in-process call 1 is the dense baseline, so call n is trial n-2 with trials 0..n-3
    recorded. A held driver is mid-sweep, its lease live, for as long as the test needs."""
    path = tmp_path / "slow.py"
    path.write_text(
        TINY.read_text()
        + f"""
import os
import time
from pathlib import Path

_GATE = Path({str(tmp_path / "gate")!r})
_HOLDS = {tuple(holds)!r}
_calls = {{}}  # by pid: a copy sent to a Ray worker counts its own calls


def evaluate(model):
    pid = os.getpid()
    _calls[pid] = n = _calls.get(pid, 0) + 1
    time.sleep({seconds})
    if n in _HOLDS:
        (_GATE / f"held-{{n}}-{{pid}}").touch()
        deadline = time.monotonic() + {BOUND}
        while not (_GATE / f"release-{{n}}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return 5.0
"""
    )
    return str(path)


class _Driver:
    """`microsweep <args>` in a fresh process, its output read as it comes so a test can wait
    for a line it prints. With `go`, the process starts warm and runs at `go()` (`_WARM`);
    `prefix` (`_another_host()`) runs it through a command that then execs it (same pid)."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        go: Path | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self._go = go
        head = ["-c", _WARM, str(go)] if go is not None else ["-m", "microsweep.cli"]
        self.proc = subprocess.Popen(
            [*(prefix or ()), sys.executable, *head, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def err(self) -> str:
        return "".join(self._err)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self) -> None:
        """Wait until a warm process has imported everything and waits for `go()`."""
        ready = Path(f"{self._go}.ready")
        _wait_for("the warm command line to be ready", ready.exists, self)

    def go(self) -> None:
        assert self._go is not None
        self._go.touch()

    def wait_for_line(self, text: str, count: int = 1) -> None:
        """Wait until the process has printed `text` to stderr `count` times."""
        _wait_for(f"{count} x {text!r} on stderr", lambda: self.err.count(text) >= count, self)

    def finish(self, timeout: float = BOUND) -> tuple[int, str, str]:
        """Wait for the process to exit; its return code, stdout and stderr."""
        rc = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=timeout)
        return rc, "".join(self._out), self.err

    def kill(self) -> None:
        """SIGKILL this process (only it) and reap it."""
        if self.running():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=BOUND)


def _stop(*drivers: _Driver | None) -> None:
    """After a failed check: kill the drivers this test started that still run."""
    for driver in drivers:
        if driver is not None and driver.running():
            driver.kill()


def _wait_for(what: str, ready: Any, driver: _Driver | None = None) -> None:
    """Poll `ready()` until it is true; fail at once if `driver` exits first (with what it
    said), and after BOUND seconds at most."""
    deadline = time.monotonic() + BOUND
    while not ready():
        if driver is not None and not driver.running() and not ready():
            rc, _, err = driver.finish()
            raise AssertionError(f"the driver exited ({rc}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {BOUND:.0f}s")
        time.sleep(0.2)


def _from_store(url: str, read: Any) -> Any:
    """`read(store)` on a store opened for it and disposed of after (None while the database
    or the sweep is not there yet)."""
    try:
        store = Store(url, must_exist=True)
    except Exception:
        return None
    try:
        return read(store)
    except Exception:
        return None
    finally:
        store.dispose()


def _wait_for_trials(url: str, name: str, n: int, driver: _Driver | None = None) -> None:
    """Wait until sweep `name` has `n` recorded trials."""
    _wait_for(
        f"{n} trials of sweep {name!r}",
        lambda: len(_from_store(url, lambda s: s.trials(name)) or ()) >= n,
        driver,
    )


def _wait_for_lease_to_end(url: str, name: str) -> None:
    """Wait until no driver holds sweep `name`: given up, or its stored lease (renewed by the
    holder's heartbeat) run out by this machine's clock, as the next driver judges it."""

    def free() -> bool:
        sweep = _from_store(url, lambda s: s.get_sweep(name))
        return sweep is not None and (
            sweep.owner is None or (sweep.lease_until or 0.0) < time.time()
        )

    _wait_for(f"end of the lease on sweep {name!r}", free)


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


def test_second_driver_is_refused_while_the_first_runs(tmp_path, tiny_cache):
    """The first driver is held in its second trial (one recorded) while a second driver and
    a second `run` of the same name are tried; then it is released and finishes."""
    url = f"sqlite:///{tmp_path / 'lease.db'}"
    gate = _Gate(tmp_path / "gate")
    space = _slow_space(tmp_path, 0.4, holds=(3,))
    first = _Driver(
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
        gate.wait_held(3, first)
        _wait_for_trials(url, "l", 1, first)
        second = _Driver("resume", "--name", "l", "--storage", url, "--in-process")
        rc, out, err = second.finish()
        assert rc == 2, err
        assert "being run by another driver" in err and "Traceback" not in err
        again = _Driver("run", space, "--name", "l", "--trials", "10", "--storage", url)
        rc, _, err = again.finish()
        assert rc == 2 and "already exists" in err
        assert first.running()  # all of this while the first driver was mid-sweep
    finally:
        gate.release(3)
        try:
            rc, out, err = first.finish()
        finally:
            _stop(first)
    assert rc == 0, err
    _stores_agree(url, "l", 10)
    assert Store(url).get_sweep("l").owner is None  # released at the end


@functools.cache
def _another_host() -> list[str] | None:
    """A command prefix that runs a process under a hostname of its own (a UTS namespace:
    `unshare`, with a user namespace where this is not root), so a driver it starts is, to
    the others, a driver on another machine; None where namespaces are not allowed."""
    if shutil.which("unshare") is None or shutil.which("hostname") is None:
        return None
    for flags in (["--uts"], ["--user", "--map-root-user", "--uts"]):
        prefix = ["unshare", *flags, "sh", "-c", 'hostname "$0" && exec "$@"', "elsewhere"]
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=BOUND)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return None


def test_killed_driver_is_taken_over_after_its_lease_ends(tmp_path, tiny_cache):
    """A driver on another machine is killed while held in its fourth trial (three recorded).
    A second driver, already started and waiting, tries the sweep at once and is refused while
    the dead driver's lease lasts; once the stored lease has run out a third one takes it over.

    The killed driver runs under another hostname: a driver on this machine whose process has
    ended is taken over at once (test_first_contact), so only one elsewhere waits out the TTL."""
    elsewhere = _another_host()
    if elsewhere is None:
        pytest.skip("needs `unshare --uts` to run a driver under another hostname")
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    gate = _Gate(tmp_path / "gate")
    space = _slow_space(tmp_path, 0.3, holds=(5,))
    env = {"MICROSWEEP_LEASE_TTL": "10"}
    first = _Driver(
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
        prefix=elsewhere,
    )
    early = late = None
    try:
        gate.wait_held(5, first)
        early = _Driver(
            "resume", "--name", "k", "--storage", url, "--in-process", env=env,
            go=tmp_path / "go",
        )  # fmt: skip
        early.wait_ready()
        first.kill()
        gate.release(5)  # whoever drives the sweep next evaluates the same space file
        kept = len(Store(url).trials("k"))
        assert kept >= 3
        owner = Store(url).get_sweep("k").owner
        assert owner is not None  # the dead driver still holds it
        assert owner.startswith("elsewhere:"), owner
        early.go()
        rc, _, err = early.finish()
        assert rc == 2 and "being run by another driver" in err
        _wait_for_lease_to_end(url, "k")  # the lease runs out
        late = _Driver("resume", "--name", "k", "--storage", url, "--in-process", env=env)
        rc, _, err = late.finish()
    finally:
        gate.release(5)
        _stop(first, early, late)
    assert rc == 0, err
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
def test_postgres_restart_and_outage_lose_no_trial(tmp_path, tiny_cache, private_postgres):
    """A restart and a 6 s outage, both shorter than the driver waits: the sweep goes on. The
    driver is held in trial 2 and in trial 6 while the server goes down, then released, so its
    next write meets each outage whatever the machine's pace."""
    pg = private_postgres
    gate = _Gate(tmp_path / "gate")
    space = _slow_space(tmp_path, 0.3, holds=(4, 8))
    run = _Driver(
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
    try:
        gate.wait_held(4, run)
        _wait_for_trials(pg.url, "p", 2, run)
        pg.stop()
        gate.release(4)
        run.wait_for_line("storage unavailable")  # the restart, seen by the driver
        pg.start()
        gate.wait_held(8, run)
        _wait_for_trials(pg.url, "p", 6, run)
        pg.stop()
        stopped = time.monotonic()
        gate.release(8)
        run.wait_for_line("storage unavailable", count=2)
        time.sleep(max(0.0, stopped + 6 - time.monotonic()))  # the outage lasts 6 s
        pg.start()
        rc, out, err = run.finish()
    finally:
        gate.release(4, 8)
        _stop(run)
    assert rc == 0, err
    assert "storage unavailable" in err and "storage back after" in err
    assert err.count("storage back after") >= 2, err  # both outages were met
    _stores_agree(pg.url, "p", 16)


@pytest.mark.slow
def test_postgres_away_too_long_spools_and_resume_writes(tmp_path, private_cache, private_postgres):
    """The server stops while the driver is held in trial 3 (three recorded) and stays away
    longer than the driver waits: the driver stops, spooling what finished into its cache;
    resume writes the spool once the server is back and the stopped driver's lease is over."""
    pg = private_postgres
    gate = _Gate(tmp_path / "gate")
    space = _slow_space(tmp_path, 0.3, holds=(5,))
    env = {"MICROSWEEP_CACHE": str(private_cache), "MICROSWEEP_LEASE_TTL": "2"}
    run = _Driver(
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
    resume = None
    try:
        gate.wait_held(5, run)
        _wait_for_trials(pg.url, "s", 3, run)
        pg.stop()
        gate.release(5)
        rc, out, err = run.finish()
        assert rc == 2 and "Traceback" not in err, err
        assert "microsweep resume --name s" in err and "kept in" in err
        spooled = list((private_cache / "spool").glob("*.jsonl"))
        assert len(spooled) == 1 and spooled[0].read_text().strip()
        pg.start()
        _wait_for_lease_to_end(pg.url, "s")  # the stopped driver's lease runs out
        resume = _Driver("resume", "--name", "s", "--storage", pg.url, "--in-process", env=env)
        rc, out, err = resume.finish()
    finally:
        gate.release(5)
        _stop(run, resume)
    assert rc == 0, err
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
def test_full_disk_spools_and_resume_writes_after_space_is_freed(tmp_path, private_cache):
    """The database's disk fills mid-sweep (a small tmpfs of the test's own, shrunk while the
    driver is held in trial 3 with three recorded): the driver stops in one line, finished
    trials go to the spool on another disk, and once there is room again resume writes them
    and completes exactly N trials with both stores agreeing."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "16m"):
        pytest.skip("this machine does not allow mounting a tmpfs")
    gate = _Gate(tmp_path / "gate")
    run = resume = None
    try:
        url = f"sqlite:///{disk / 'full.db'}"
        env = {"MICROSWEEP_CACHE": str(private_cache), "MICROSWEEP_LEASE_TTL": "2"}
        run = _Driver(
            "run",
            _slow_space(tmp_path, 0.2, holds=(5,)),
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
        gate.wait_held(5, run)
        _wait_for_trials(url, "f", 3, run)
        # no more room than a few trials' rows need
        subprocess.run(
            ["mount", "-o", f"remount,size={_used_kb(disk) + 48}k", str(disk)], check=True
        )
        gate.release(5)
        rc, out, err = run.finish()
        assert rc == 2 and "Traceback" not in err, err
        assert "microsweep resume --name f" in err and "kept in" in err, err
        written = len(Store(url, must_exist=True).trials("f"))
        assert 3 <= written < 60
        spooled = list((private_cache / "spool").glob("*.jsonl"))
        assert len(spooled) == 1 and spooled[0].read_text().strip()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        _wait_for_lease_to_end(url, "f")  # the stopped driver's lease runs out
        resume = _Driver("resume", "--name", "f", "--storage", url, "--in-process", env=env)
        rc, out, err = resume.finish()
        assert rc == 0, err
        assert "during an outage" in err and not spooled[0].exists()
        _stores_agree(url, "f", 60)
    finally:
        gate.release(5)
        _stop(run, resume)
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_killed_worker_fails_only_its_trial_and_the_sweep_goes_on(tmp_path, tiny_cache):
    """SIGKILL to a Ray worker process of a running sweep: the trial it held (or the next one
    sent to it) is FAIL with the reason, a new worker takes its place, and the sweep ends with
    exactly N finished trials in both stores. Each worker is held in its second trial, so the
    one killed is mid-trial and the sweep far from done."""
    import re

    url = f"sqlite:///{tmp_path / 'worker.db'}"
    gate = _Gate(tmp_path / "gate")
    run = _Driver(
        "run",
        _slow_space(tmp_path, 0.5, holds=(2,)),
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
        _wait_for_trials(url, "w", 2, run)
        rows = Store(url, must_exist=True).trials("w")
        pid = int(re.search(r"pid (\d+)", rows[-1].worker or "").group(1))
        assert pid != run.pid
        _wait_for(f"worker {pid} to be held", lambda: pid in gate.held(2), run)
        os.kill(pid, signal.SIGKILL)  # a process of this sweep's own Ray, found by its trial
        gate.release(2)
        rc, out, err = run.finish()
    finally:
        gate.release(2)
        _stop(run)
    assert rc == 0, err
    _stores_agree(url, "w", 10)
    rows = Store(url, must_exist=True).trials("w")
    failed = [r for r in rows if r.state == "FAIL"]
    assert failed and all("worker died" in (r.reason or "") for r in failed), failed
    assert len(failed) <= 2 and sum(r.state == "COMPLETE" for r in rows) >= 8


def test_time_budget_stops_starting_trials_and_resume_continues(tmp_path, tiny_cache):
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
        capture_output=True, text=True, timeout=BOUND,
    )  # fmt: skip
    assert proc.returncode == 2 and "must be a number above 0" in proc.stderr
