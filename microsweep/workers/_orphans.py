"""Ray processes a killed driver leaves behind: recorded when a local Ray starts, stopped by the
next local start.

A driver that is SIGKILLed cannot shut its local Ray down. Ray's core processes notice and
exit, but its agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) linger for minutes.
Each local start therefore records the processes it started (its descendants, with their start
times so a reused pid is never mistaken for one), and the next start stops those of a driver
that no longer runs. Only processes a microsweep driver started are ever signalled. Linux only
(``/proc``); elsewhere nothing is recorded.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

__all__ = ["forget_ray_processes", "reap_ray_processes", "record_ray_processes"]


def _folder() -> Path:
    from microsweep.data import cache_dir

    return cache_dir() / "ray-drivers"


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks, command name) of a live process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    name = text[text.find("(") + 1 : text.rfind(")")]
    fields = text[text.rfind(")") + 2 :].split()
    if fields[0] == "Z":  # exited, not yet reaped: nothing to stop
        return None
    return int(fields[1]), int(fields[19]), name


def _descendants(root: int) -> list[tuple[int, int, str]]:
    """Every live process below `root`, as (pid, start time, name)."""
    children: dict[int, list[tuple[int, int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        info = _stat(int(entry.name))
        if info is not None:
            children.setdefault(info[0], []).append((int(entry.name), info[1], info[2]))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def record_ray_processes() -> None:
    """Note the processes this driver's local Ray start made (best effort)."""
    if not Path("/proc/self/stat").exists():
        return
    me = _stat(os.getpid())
    procs = _descendants(os.getpid())
    if me is None or not procs:
        return
    try:
        folder = _folder()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{os.getpid()}.json"
        tmp = path.with_suffix(".part")
        tmp.write_text(json.dumps({"driver": [os.getpid(), me[1]], "processes": procs}))
        tmp.replace(path)
    except OSError:
        pass


def forget_ray_processes(grace: float = 1.0) -> None:
    """This driver shut its Ray down: stop what of it outlives the shutdown (after an
    interrupt its agents were seen to stay), giving each `grace` seconds to end by itself,
    then drop the record."""
    import time

    path = _folder() / f"{os.getpid()}.json"
    try:
        procs = [tuple(p) for p in json.loads(path.read_text(encoding="utf-8"))["processes"]]
    except (OSError, ValueError, KeyError, TypeError):
        procs = []
    deadline = time.monotonic() + grace
    left = procs
    while left:
        left = [p for p in left if (_stat(int(p[0])) or (0, None))[1] == p[1]]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    for pid, _, _ in left:
        try:
            os.kill(int(pid), signal.SIGTERM)
        except OSError:
            pass
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def reap_ray_processes() -> list[str]:
    """Stop the recorded processes of drivers that no longer run; one line per such driver
    saying what was stopped."""
    folder = _folder()
    if not folder.is_dir() or not Path("/proc/self/stat").exists():
        return []
    lines = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            pid, started = data["driver"]
            procs = [(int(p), int(t), str(n)) for p, t, n in data["processes"]]
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        info = _stat(pid)
        if info is not None and info[1] == started:
            continue  # that driver still runs
        stopped = []
        for child, child_started, name in procs:
            now = _stat(child)
            if now is None or now[1] != child_started:
                continue  # gone, or the pid now names another process
            try:
                os.kill(child, signal.SIGTERM)
                stopped.append(name)
            except OSError:
                continue
        path.unlink(missing_ok=True)
        if stopped:
            lines.append(
                f"stopped {len(stopped)} Ray process(es) left by an earlier driver (pid {pid}) "
                f"that did not shut down: {', '.join(sorted(set(stopped)))}"
            )
    return lines
