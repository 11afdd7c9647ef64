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


# --- a small custom LM (no corpus, no pretraining) for the cases below ---------------------------

CUSTOM_LM = '''
import types

import torch
from torch import nn

from microsweep import Bits, MicroNet, Space


class TinyLM(nn.Module):
    """ids (B, T) -> logits (B, T, V)."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(block_size=16)
        self.emb = nn.Embedding(40, 16)
        self.head = nn.Linear(16, 40)

    def forward(self, ids):
        return self.head(self.emb(ids))
{extra}

torch.manual_seed(0)
model = {model}
space = Space(model, rules={{"head": dict(bits=Bits(4, 8, 32))}})
{objective}

def evaluate(model):
    return {returns}
'''

OBJECTIVE = 'objective = MicroNet(perplexity_ceiling=None, baseline="dense")'


def _custom(
    tmp_path: Path,
    name: str,
    *,
    extra: str = "",
    model: str = "TinyLM()",
    objective: str = OBJECTIVE,
    returns: str = "10.0",
) -> str:
    path = tmp_path / name
    path.write_text(
        CUSTOM_LM.format(extra=extra, model=model, objective=objective, returns=returns)
    )
    return str(path)


def _sweeps(url: str) -> list[str]:
    """The sweeps stored at a SQLite URL; none when the file was never created."""
    if not Path(url.split("///", 1)[1]).exists():
        return []
    store = Store(url, must_exist=True)
    try:
        return store.sweep_names()
    finally:
        store.dispose()


def _run(space: str, url: str, tmp_path: Path, *more: str) -> subprocess.CompletedProcess:
    return _cli(
        "run", space, "--name", "s", "--trials", "2", "--in-process", "--sampler", "random",
        "--storage", url, *more, cwd=tmp_path,
    )  # fmt: skip


# 1. policy files are read with a bound: a device, a FIFO or a huge file is refused at once


def test_count_refuses_a_policy_file_that_is_a_device_fifo_or_huge(tmp_path):
    import os

    fifo = tmp_path / "policy.fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as fh:  # sparse: 65 MiB of zeros that take no disk
        fh.truncate(65 * 2**20)
    for path, needle in (
        ("/dev/zero", "not a regular file"),
        (str(fifo), "not a regular file"),
        (str(huge), "larger than 64 MiB"),
        (str(tmp_path), "not a regular file"),
    ):
        started = time.perf_counter()
        proc = _cli("count", str(TINY), "--policy", path, cwd=tmp_path)
        _one_line_error(proc, f"policy file {path}", needle)
        assert time.perf_counter() - started < 60  # no read without limit (7 GB before)


def test_policy_read_bounds_and_one_line_errors(tmp_path):
    from microsweep import Policy
    from microsweep.errors import UsageError

    good = tmp_path / "p.json"
    good.write_text(Policy().dumps())
    assert Policy.read(good) == Policy()
    with pytest.raises(UsageError, match="larger than 10 bytes"):
        Policy.read(good, limit=10)
    for content, needle in (
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"type": "microsweep.Policy", "version": 1, "hyper": 3}', "policy file"),
    ):
        good.write_bytes(content)
        with pytest.raises(UsageError, match=needle) as err:
            Policy.read(good)
        assert "\n" not in str(err.value)


def test_run_refuses_a_warm_start_that_is_a_device(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    proc = _run(_custom(tmp_path, "ok.py"), url, tmp_path, "--warm-start", "/dev/zero")
    _one_line_error(proc, "/dev/zero", "not a regular file")
    assert _sweeps(url) == []


# 2. a perplexity that is not a positive finite number


def test_a_negative_dense_perplexity_is_refused_before_anything_is_stored(tmp_path):
    url = f"sqlite:///{tmp_path / 'n.db'}"
    for returns in ("-5.0", "0.0"):
        proc = _run(_custom(tmp_path, "neg.py", returns=returns), url, tmp_path)
        _one_line_error(proc, "evaluate(model) returned", "positive finite")
        assert _sweeps(url) == []
    # nothing was stored, so the same name runs once evaluate is fixed
    proc = _run(_custom(tmp_path, "neg.py"), url, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _sweeps(url) == ["s"]


def test_a_trial_whose_evaluate_returns_no_perplexity_fails(tmp_path):
    extra = '\n_calls = {"n": 0}\n\n\ndef _next():\n    _calls["n"] += 1\n' + (
        '    return {1: 5.0, 2: -5.0, 3: 0.0, 4: "abc"}.get(_calls["n"], 5.0)\n'
    )
    space = _custom(tmp_path, "scripted.py", extra=extra, returns="_next()")
    url = f"sqlite:///{tmp_path / 'f.db'}"
    result = run_sweep(
        space, name="f", trials=4, storage=url, seed=0, sampler="random", in_process=True,
        progress=False,
    )  # fmt: skip
    assert result.states == {"COMPLETE": 1, "FAIL": 3}
    reasons = sorted(r.reason for r in Store(url).trials("f") if r.state == "FAIL")
    assert all(r.startswith("evaluate(model) returned") for r in reasons), reasons
    assert any("returned -5" in r for r in reasons) and any("returned 0" in r for r in reasons)
    assert any("returned str 'abc'" in r for r in reasons)


# 3. an error in the user's forward: one line naming the module and the exception

FLOAT_LM = '''

class FloatLM(nn.Module):
    """Takes float features, not token ids."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(1, 16)
        self.head = nn.Linear(16, 40)

    def forward(self, x):
        return self.head(self.inp(x.unsqueeze(-1)))


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        if x.shape[1] > LONGEST:
            raise ValueError("the forward is broken")
        return self.lin(x)


class BrokenLM(TinyLM):
    def __init__(self):
        super().__init__()
        self.inner = Broken()

    def forward(self, ids):
        return self.head(self.inner(self.emb(ids)))
'''


@pytest.mark.parametrize(
    ("model", "longest", "needles"),
    [
        ("FloatLM()", 0, ("module 'inp' (Linear)", "RuntimeError: mat1 and mat2")),
        ("BrokenLM()", 0, ("shape (1, 2)", "module 'inner' (Broken)", "ValueError: the forward")),
        # passes the load-time check on 2 positions, fails in the counting trace
        ("BrokenLM()", 2, ("shape (1, 8)", "module 'inner' (Broken)", "ValueError: the forward")),
    ],
)
def test_an_error_in_the_users_forward_is_one_line(tmp_path, model, longest, needles):
    extra = FLOAT_LM.replace("LONGEST", str(longest))
    space = _custom(tmp_path, "fwd.py", extra=extra, model=model)
    url = f"sqlite:///{tmp_path / 'fwd.db'}"
    _one_line_error(_run(space, url, tmp_path), f"space file {space}", *needles)
    assert _sweeps(url) == []
    _one_line_error(_cli("count", space, cwd=tmp_path), f"space file {space}", *needles)


# 4. storage URLs SQLAlchemy cannot parse


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("postgresql://postgres@127.0.0.1:notaport/postgres", "port 'notaport' is not a number"),
        ("postgresql://postgres@[::1/postgres", "has no closing ']'"),
        ("postgresql://bob:s3cret-pw@[::1/postgres", "postgresql://bob:***@[::1/postgres"),
        ("postgresql://bob:s3cret-pw@host:x/db", "port 'x' is not a number"),
    ],
)
def test_a_malformed_postgresql_url_is_one_line(tmp_path, url, needle):
    proc = _cli("status", "--name", "x", "--storage", url, cwd=tmp_path)
    _one_line_error(proc, "cannot be parsed", needle)
    assert "s3cret-pw" not in proc.stderr + proc.stdout


# 5 and 6. a file without `objective` says so once; --in-process follows --cpus-per-worker


def test_run_without_objective_notes_it_and_in_process_threads_follow_cpus(tmp_path):
    space = _custom(tmp_path, "noobj.py", objective="")
    url = f"sqlite:///{tmp_path / 'o.db'}"
    proc = _run(space, url, tmp_path, "--cpus-per-worker", "1")
    assert proc.returncode == 0, proc.stderr
    note = f"microsweep: note: {space}:1: no `objective` in this file: using MicroNet()"
    assert proc.stderr.count(note) == 1, proc.stderr
    assert "no perplexity ceiling, every trial is feasible" in proc.stderr
    rows = Store(url).trials("s")
    assert rows and all(r.worker.endswith(", threads 1") for r in rows), [r.worker for r in rows]
    counted = _cli("count", space, cwd=tmp_path)
    assert counted.returncode == 0 and "objective" not in counted.stderr, counted.stderr
