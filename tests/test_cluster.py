"""A two-node Ray cluster started with the Ray CLI on this machine (token auth, as Ray 2.60
needs), a sweep joined to it by `--address`, and trials on both nodes. Only the processes this
test started are stopped: those whose command line names its own temp folder."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from microsweep.storage import Store
from tests.conftest import ROOT
from tests.conftest import cli as _cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(marker: str) -> list[int]:
    """Processes whose command line contains `marker` (this test's unique temp folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop(procs: list[subprocess.Popen], marker: str) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _ours(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while _ours(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


def _wait_for(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{path.name} never said {text!r}:\n{path.read_text()[-2000:]}")


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_runs_on_both_nodes_of_a_cli_cluster(tmp_path, tiny_gpt):
    ray_cli = str(Path(sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="msray-", dir="/tmp")  # short: Ray's socket paths are capped
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    started = "block forever"
    procs: list[subprocess.Popen] = []
    try:
        head_log, node_log = tmp_path / "head.log", tmp_path / "node.log"
        procs.append(_start_head(temp, port, env, head_log))
        with open(node_log, "w") as log:
            procs.append(
                subprocess.Popen(
                    [
                        ray_cli,
                        "start",
                        "--address",
                        f"127.0.0.1:{port}",
                        "--num-cpus",
                        "1",
                        "--block",
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        _wait_for(node_log, started)
        url = f"sqlite:///{tmp_path / 'cluster.db'}"
        before = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "token"  # the CLI below inherits it
        try:
            proc = _cli(
                "run",
                str(ROOT / "examples" / "tiny.py"),
                "--name",
                "c",
                "--trials",
                "6",
                "--workers",
                "2",
                "--address",
                f"127.0.0.1:{port}",
                "--sampler",
                "random",
                "--storage",
                url,
                cwd=tmp_path,
            )
        finally:
            if before is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = before
        assert proc.returncode == 0, proc.stderr
        rows = Store(url).trials("c")
        assert [r.number for r in rows] == list(range(6))
        nodes = {r.worker.split(" pid")[0] for r in rows}
        assert len(nodes) == 2 and all(n.startswith("node ") for n in nodes), nodes
    finally:
        _stop(procs, temp)
        assert not _ours(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _start_head(temp: str, port: int, env: dict[str, str], log_path: Path, *extra: str):
    """`ray start --head` on `port` with this test's temp folder (what `_stop` finds it by)."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    if not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run(
            [ray_cli, "get-auth-token", "--generate"],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
    cmd = [ray_cli, "start", "--head", "--port", str(port), "--num-cpus", "1"]
    cmd += ["--include-dashboard", "false", "--temp-dir", temp, "--block", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    _wait_for(log_path, "block forever")
    return proc


@pytest.mark.ray
@pytest.mark.slow
def test_gpus_per_worker_places_workers_on_a_gpu_node(tmp_path, tiny_gpt):
    """`--gpus-per-worker 1` on a cluster whose node offers one GPU: Ray places the worker
    there and gives it the GPU. With a CUDA torch the sweep runs on it; with a CPU-only torch
    (a GPU resource but no CUDA) the sweep stops in one line saying so, instead of running the
    trials on the CPU unsaid. Stored data: nothing half-made."""
    import torch

    temp = tempfile.mkdtemp(prefix="msray-", dir="/tmp")
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start_head(temp, port, env, tmp_path / "head.log", "--num-gpus", "1"))
        url = f"sqlite:///{tmp_path / 'gpu.db'}"
        before = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "token"  # the CLI below inherits it
        try:
            proc = _cli(
                "run", str(ROOT / "examples" / "tiny.py"), "--name", "g", "--trials", "2",
                "--workers", "1", "--gpus-per-worker", "1", "--address", f"127.0.0.1:{port}",
                "--sampler", "random", "--storage", url, cwd=tmp_path,
            )  # fmt: skip
        finally:
            if before is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = before
        if torch.cuda.is_available():
            assert proc.returncode == 0, proc.stderr
            rows = Store(url).trials("g")
            assert len(rows) == 2 and all(r.state in ("COMPLETE", "PRUNED") for r in rows)
        else:
            assert proc.returncode != 0
            last = proc.stderr.strip().splitlines()[-1]
            assert "sees no CUDA device" in last and "--gpus-per-worker" in last, proc.stderr
            assert "Traceback" not in proc.stderr, proc.stderr
    finally:
        _stop(procs, temp)
        assert not _ours(temp)
        shutil.rmtree(temp, ignore_errors=True)
