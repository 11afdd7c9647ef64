"""What a new user meets first: honest progress figures, output a script can read, a quiet
run, a clean stop on SIGTERM, a resume with nothing to do, and a store that remembers where
its corpus lives."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microsweep.search import run_sweep
from microsweep.storage import Store
from tests.conftest import ROOT
from tests.conftest import cli as _cli

TINY = ROOT / "examples" / "tiny.py"


def _space(tmp_path: Path, body: str) -> str:
    """examples/tiny.py plus an `evaluate` with `body` (its argument is `model`)."""
    path = tmp_path / "space.py"
    path.write_text(TINY.read_text() + "\n\ndef evaluate(model):\n" + body)
    return str(path)


def _wait_for(check, what: str, timeout: float = 600.0) -> None:
    """Poll `check()` until true; the bound is a safety net for a very slow machine."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # the store is not there yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout:.0f}s")


# -- figures ---------------------------------------------------------------------------------
def test_progress_clock_starts_at_the_first_trial(monkeypatch):
    """The start-up is said once on its own line; elapsed and ETA count trial time only."""
    import microsweep.search._progress as driver

    now = [1000.0]
    monkeypatch.setattr(driver.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    bar = driver.Progress(10, stream=out)
    now[0] += 363.0  # sensitivity pass and planning
    bar.start(363.0)
    bar.start(999.0)  # only the first call counts
    now[0] += 12.0
    bar.update(1, {"COMPLETE": 1}, 0.9, "trial 0")
    now[0] += 12.0
    bar.update(4, {"COMPLETE": 4}, 0.8, "trial 3")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("start-up took 6:03 (") and "10 trials to run" in lines[0]
    assert len(lines) == 3
    # one trial in 12 s, 9 left: 1:48 (counting the start-up would say 3:07:03 left)
    assert lines[1].startswith("[1/10] 0:12 elapsed, ETA 1:48 |")
    assert lines[2].startswith("[4/10] 0:24 elapsed, ETA 0:36 |")


def test_clock_and_digits_are_never_misleading():
    from microsweep._text import clock as _clock
    from microsweep._text import digits_apart, distinct

    assert _clock(-3.0) == "0:00"
    ppl, ceiling = distinct(5.463199, 5.463181)
    assert ppl != ceiling and float(ppl) > float(ceiling)
    assert (ppl, ceiling) == ("5.46320", "5.46318")
    assert distinct(5.3, 5.5) == ("5.3", "5.5")
    assert distinct(5.5, 5.5) == ("5.5", "5.5")
    assert digits_apart(1.0, 1.0 + 1e-12) == 10  # at most 10 digits


def test_driver_and_sampler_seconds_are_never_negative_on_ray(tmp_path, tiny_gpt):
    """A Ray sweep asks the next policy ahead of each result: per-trial driver and sampler
    seconds are both >= 0 (the ask's sampler seconds were once subtracted from a window that
    did not contain them), and a plain run prints no third-party warnings."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    space = _space(tmp_path, "    return 5.0\n")
    proc = _cli(
        "run", space, "--name", "s", "--trials", "12", "--workers", "1", "--sampler", "tpe",
        "--seed", "0", "--storage", url, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = Store(url, must_exist=True).trials("s")
    assert len(rows) == 12
    for r in rows:
        assert r.timings["driver"] >= 0 and r.timings["sampler"] >= 0, r.timings
        assert 0 <= r.timings["total"] < 600
    noise = [
        line
        for line in proc.stderr.splitlines()
        if "Warning" in line or "WARNING" in line or "warn" in line.lower()
    ]
    assert not noise, noise
    assert "start-up took" in proc.stderr
    # the commands it suggests use the real store and best trial
    assert f"microsweep status --name s --storage {url}" in proc.stdout
    # resume of a finished sweep: one line, exit 0, no model loaded, no worker started
    again = _cli("resume", "--name", "s", "--storage", url, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines() == [
        "sweep 's' already has its 12 finished trials ("
        + ", ".join(f"{k} {v}" for k, v in sorted(_states(rows).items()))
        + "); nothing to do (--trials N asks for more)"
    ]
    assert again.stderr == ""


def _states(rows) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r.state] = out.get(r.state, 0) + 1
    return out


def test_sigterm_stops_a_sweep_like_ctrl_c(tmp_path, tiny_gpt):
    """SIGTERM to a running sweep on Ray: one line, exit 143, the lease released (a resume
    starts at once) and no native stack dump."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    gate = tmp_path / "go"
    space = _space(
        tmp_path,
        "    import pathlib, time\n"
        f"    while not pathlib.Path({str(gate)!r}).exists():\n"
        "        time.sleep(0.05)\n"
        "    return 5.0\n",
    )
    gate.touch()  # the dense measurement and the first trials pass, then trials wait
    proc = subprocess.Popen(
        [sys.executable, "-m", "microsweep.cli", "run", space, "--name", "t", "--trials", "20",
         "--workers", "1", "--sampler", "random", "--storage", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    record = Path(os.environ["MICROSWEEP_CACHE"]) / "ray-drivers" / f"{proc.pid}.json"
    try:
        _wait_for(lambda: len(Store(url, must_exist=True).trials("t")) >= 1, "a first trial")
        gate.unlink()  # the trials now block: the driver is waiting on a worker
        started = json.loads(record.read_text())["processes"]  # what its Ray start made
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    lines = [x for x in err.splitlines() if x.startswith("microsweep:") and " note: " not in x]
    assert lines == ["microsweep: terminated; 'microsweep resume' continues the sweep"], err
    assert "Traceback" not in err and "SIGTERM" not in err and "*** " not in err, err
    sweep = Store(url, must_exist=True).get_sweep("t")
    assert sweep.owner is None  # released on the way out
    rows = Store(url, must_exist=True).trials("t")
    assert rows and all(r.state in ("COMPLETE", "PRUNED", "FAIL") for r in rows)
    # nothing of its Ray outlives it (after an interrupt, Ray's agents were seen to stay)
    from microsweep.workers._orphans import _stat

    assert started and not record.exists()
    _wait_for(
        lambda: all((_stat(pid) or (0, None))[1] != t for pid, t, _ in started),
        "the stopped driver's Ray processes to end",
        timeout=120,
    )


def test_a_driver_that_exited_leaves_its_sweep_to_the_next_one(tmp_path, tiny_gpt):
    """A lease whose holder was a driver on this machine that has exited (an outage or a kill
    stopped it before it could release) is taken at once, not after the TTL."""
    from microsweep.search._guard import Lease

    url = f"sqlite:///{tmp_path / 'l.db'}"
    run_sweep(
        str(TINY), name="l", trials=1, storage=url, in_process=True, sampler="random",
        progress=False,
    )  # fmt: skip
    store = Store(url, must_exist=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    assert store.acquire_lease("l", f"{host}:{gone.pid}:dead", 3600) is None
    Lease(store, "l", ttl=3600).acquire()  # no wait for the hour-long lease
    assert store.get_sweep("l").owner.startswith(f"{host}:{os.getpid()}:")
    # a live holder (this test's own process, as another driver) is still refused
    store.release_lease("l", store.get_sweep("l").owner)
    assert store.acquire_lease("l", f"{host}:{os.getppid()}:alive", 3600) is None
    with pytest.raises(Exception, match="being run by another driver"):
        Lease(store, "l", ttl=3600).acquire()
    # and so is a holder on another machine, until its TTL runs out
    store.release_lease("l", f"{host}:{os.getppid()}:alive")
    assert store.acquire_lease("l", f"elsewhere:{gone.pid}:x", 3600) is None
    with pytest.raises(Exception, match="being run by another driver"):
        Lease(store, "l", ttl=3600).acquire()
    store.dispose()


# -- output a script can use -----------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_gpt) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('fc') / 'fc.db'}"
    run_sweep(
        str(TINY), name="r", trials=6, storage=url, seed=5, sampler="random", in_process=True,
        progress=False,
    )  # fmt: skip
    return url


def test_trials_csv_and_json_carry_every_layer_of_the_policy(tmp_path, sweep):
    rows = {r.number: r for r in Store(sweep, must_exist=True).trials("r")}
    proc = _cli("trials", "--name", "r", "--storage", sweep, "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert len(got) == len(rows)
    for g in got:
        assert g["policy"] == rows[g["trial"]].policy  # the whole stored policy, an object
        assert g["summary"] == rows[g["trial"]].summary  # the notation, beside the policy
    proc = _cli("trials", "--name", "r", "--storage", sweep, "--format", "csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for g in csv.DictReader(io.StringIO(proc.stdout)):
        assert json.loads(g["policy"]) == rows[int(g["trial"])].policy
    # the table keeps the short notation
    proc = _cli("trials", "--name", "r", "--storage", sweep, cwd=tmp_path)
    assert proc.returncode == 0 and '"layers"' not in proc.stdout


def test_show_rounds_and_tells_quantization_zeros_from_pruning(tmp_path, sweep):
    rows = Store(sweep, must_exist=True).trials("r")
    row = next(r for r in rows if r.state == "COMPLETE")
    detail = json.loads(
        _cli(
            "show", "--name", "r", "--trial", str(row.number), "--storage", sweep, "--format",
            "json", cwd=tmp_path,
        ).stdout
    )  # fmt: skip
    asked = row.policy["layers"]
    for layer in detail["layers"]:
        name = layer["layer"]
        if name not in asked:
            assert layer["pruned"] is None
            continue
        pruned = asked[name].get("sparsity", 0.0)
        assert layer["pruned"] == pruned
        assert layer["quantized_zeros"] == pytest.approx(max(0.0, layer["sparsity"] - pruned))
    text = _cli(
        "show", "--name", "r", "--trial", str(row.number), "--storage", sweep, cwd=tmp_path
    ).stdout
    assert "quant zeros" in text and "pruned" in text
    assert f"score: {row.score:.6g}" in text
    ceiling = Store(sweep, must_exist=True).get_sweep("r").ceiling
    from microsweep._text import distinct

    ppl_s, ceiling_s = distinct(row.perplexity, ceiling)
    assert f"perplexity: {ppl_s} (ceiling {ceiling_s})" in text
    # no raw float with more than 6 significant digits in the per-layer table
    table = text.split("quant zeros", 1)[1]
    for word in table.split():
        digits = word.replace(",", "").replace(".", "")
        if digits.isdigit() and "." in word:
            assert len(word.split(".")[1]) <= 3, word


def test_status_legend_only_when_asked(tmp_path, sweep):
    from microsweep.spaces import Policy

    plain = _cli("status", "--name", "r", "--storage", sweep, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert Policy.NOTATION not in plain.stdout and "--legend" in plain.stdout
    legend = _cli("status", "--name", "r", "--storage", sweep, "--legend", cwd=tmp_path)
    assert legend.returncode == 0 and Policy.NOTATION in legend.stdout


def test_space_notes_are_said_on_run_not_on_every_command(tmp_path, sweep):
    counted = _cli("count", str(TINY), cwd=tmp_path)
    assert counted.returncode == 0, counted.stderr
    assert "note:" not in counted.stderr
    ran = _cli(
        "run", str(TINY), "--name", "n", "--trials", "1", "--in-process", "--sampler",
        "random", "--storage", f"sqlite:///{tmp_path / 'n.db'}", cwd=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "microsweep: note:" in ran.stderr


def test_sweep_name_with_a_control_character_is_refused(tmp_path, tiny_gpt):
    url = f"sqlite:///{tmp_path / 'n.db'}"
    proc = _cli(
        "run", str(TINY), "--name", "two\nlines", "--trials", "1", "--in-process",
        "--storage", url, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("microsweep: error: sweep name") and "Traceback" not in (
        proc.stderr
    )
    assert not (tmp_path / "n.db").exists() or not Store(url).sweep_names()


def test_the_corpus_folder_is_remembered_for_later_commands(tmp_path, monkeypatch):
    """A corpus read through $MICROSWEEP_DATA is found again without the variable (as
    `count` and `export` run after `make demo`)."""
    from microsweep import data

    shared = os.environ["MICROSWEEP_DATA"]
    monkeypatch.setenv("MICROSWEEP_CACHE", str(tmp_path / "cache"))
    first = data.tiny_shakespeare()
    monkeypatch.delenv("MICROSWEEP_DATA")
    again = data.tiny_shakespeare()
    assert again.fingerprint == first.fingerprint
    assert Path(again.source).resolve().parent.parent == Path(shared).resolve()
    assert data.ptb(train="valid", val="test").vocab_size > 1000
    # a folder named by the variable that lacks the corpus is still an error
    monkeypatch.setenv("MICROSWEEP_DATA", str(tmp_path))
    with pytest.raises(Exception, match="has no tinyshakespeare"):
        data.tiny_shakespeare()


def test_workers_beyond_the_machine_are_refused_before_the_model_runs(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    proc = _cli(
        "run", str(TINY), "--name", "w", "--trials", "1", "--workers", "100000", "--storage",
        url, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"microsweep: error: --workers 100000 x --cpus-per-worker 1 is more than this "
        f"machine's {os.cpu_count()} CPUs; use fewer, or a Ray cluster with --address"
    ]
    assert not (tmp_path / "w.db").exists() or not Store(url).sweep_names()


def test_ray_processes_of_a_killed_driver_are_stopped_by_the_next_run(tmp_path, tiny_gpt):
    """SIGKILL leaves Ray's agents running for minutes: the next local start stops exactly
    the processes the killed driver recorded, and says so."""
    from microsweep.workers._orphans import _stat

    url = f"sqlite:///{tmp_path / 'k.db'}"
    space = _space(tmp_path, "    return 5.0\n")
    first = subprocess.Popen(
        [sys.executable, "-m", "microsweep.cli", "run", space, "--name", "k", "--trials",
         "100000", "--workers", "1", "--sampler", "random", "--storage", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    record = Path(os.environ["MICROSWEEP_CACHE"]) / "ray-drivers" / f"{first.pid}.json"
    try:
        _wait_for(lambda: len(Store(url, must_exist=True).trials("k")) >= 1, "a first trial")
        assert record.is_file()  # written once the workers were up
    finally:
        first.kill()
        first.communicate()
    recorded = json.loads(record.read_text())["processes"]
    assert recorded and all(name for _, _, name in recorded)
    alive = [(pid, t) for pid, t, _ in recorded if (_stat(pid) or (0, None))[1] == t]
    second = _cli(
        "run", space, "--name", "k2", "--trials", "1", "--workers", "1", "--sampler",
        "random", "--storage", url, cwd=tmp_path,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    if alive:  # what the kill left running was stopped, with one note
        assert f"left by an earlier driver (pid {first.pid})" in second.stderr, second.stderr
    assert not record.exists()

    def gone() -> bool:
        return all((_stat(pid) or (0, None))[1] != t for pid, t in alive)

    _wait_for(gone, "the killed driver's Ray processes to end", timeout=120)
