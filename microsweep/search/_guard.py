"""Storage faults in the driver: retry with backoff, and a local spool for finished trials.

A database that is restarting or briefly unreachable costs a pause, not the sweep: every driver
write is retried with exponential backoff for up to a set limit. When the database stays away
longer, the sweep stops cleanly and the finished trials it could not write go to a spool file
on the driver's machine; `resume` writes them first, so nothing that finished is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from microsweep.errors import StorageError, StorageUnavailable

__all__ = ["Lease", "StorageGuard", "StorageOutage", "read_spool", "spool_path", "write_spool"]

T = TypeVar("T")


class StorageOutage(StorageError):
    """The database stayed unreachable longer than the driver waits."""


class StorageGuard:
    """Call storage functions, retrying `StorageUnavailable` with exponential backoff (0.25 s
    doubling to 5 s) until `limit` seconds pass without one succeeding."""

    def __init__(self, limit: float, say: Callable[[str], None] = lambda _line: None) -> None:
        self.limit = limit
        self.say = say
        self.outages = 0

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        since, delay = None, 0.25
        while True:
            try:
                out = fn(*args, **kwargs)
            except StorageUnavailable as exc:
                now = time.monotonic()
                if since is None:
                    since = now
                    self.outages += 1
                    self.say(f"storage unavailable ({exc}); retrying for up to {self.limit:.0f}s")
                waited = now - since
                if waited >= self.limit:
                    raise StorageOutage(
                        f"storage unreachable for {waited:.0f}s (limit {self.limit:.0f}s): {exc}"
                    ) from None
                time.sleep(min(delay, self.limit - waited))
                delay = min(2 * delay, 5.0)
                continue
            if since is not None:
                self.say(f"storage back after {time.monotonic() - since:.1f}s")
            return out


def spool_path(display_url: str, sweep: str) -> Path:
    """Where the driver keeps finished trials it could not write: one JSON-lines file per
    (storage, sweep) under the microsweep cache."""
    from microsweep.data import cache_dir

    key = hashlib.sha256(f"{display_url}\n{sweep}".encode()).hexdigest()[:20]
    return cache_dir() / "spool" / f"{key}.jsonl"


def write_spool(path: Path, entries: list[dict[str, Any]]) -> None:
    """Append entries and flush them to disk before the sweep says they are kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_spool(path: Path) -> list[dict[str, Any]]:
    """The spooled entries (a torn last line, from a crash while writing, is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def trial_to_json(trial: Any) -> dict[str, Any]:
    """A finished FrozenTrial as plain JSON (distributions in Optuna's own JSON form)."""
    from optuna.distributions import distribution_to_json

    return {
        "state": trial.state.name,
        "values": trial.values,
        "params": {
            name: [distribution_to_json(trial.distributions[name]), value]
            for name, value in trial.params.items()
        },
        "intermediate": {str(k): v for k, v in trial.intermediate_values.items()},
        "user_attrs": trial.user_attrs,
        "system_attrs": trial.system_attrs,
        "start": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "complete": trial.datetime_complete.isoformat() if trial.datetime_complete else None,
    }


def trial_from_json(data: dict[str, Any]) -> Any:
    """The FrozenTrial that `trial_to_json` wrote."""
    from datetime import datetime

    from optuna.distributions import json_to_distribution
    from optuna.trial import FrozenTrial, TrialState

    params = {name: value for name, (_, value) in data["params"].items()}
    dists = {name: json_to_distribution(d) for name, (d, _) in data["params"].items()}
    return FrozenTrial(
        number=0,
        state=TrialState[data["state"]],
        value=None,
        values=data["values"],
        datetime_start=datetime.fromisoformat(data["start"]) if data["start"] else None,
        datetime_complete=datetime.fromisoformat(data["complete"]) if data["complete"] else None,
        params=params,
        distributions=dists,
        user_attrs=data["user_attrs"],
        system_attrs=data["system_attrs"],
        intermediate_values={int(k): v for k, v in data["intermediate"].items()},
        trial_id=0,
    )


LEASE_TTL_ENV = "MICROSWEEP_LEASE_TTL"
"""Seconds a driver's lease on a sweep lasts without a heartbeat (default 30)."""


def _exited(owner: str) -> bool:
    """Whether lease holder `owner` ("host:pid:tag") is a driver on this machine whose process
    has ended (a driver stopped by an outage or killed cannot release its lease, and waiting
    out the TTL would then keep the sweep locked for nothing)."""
    import socket

    host, _, rest = owner.rpartition(":")[0].rpartition(":")
    if host != socket.gethostname() or not rest.isdigit():
        return False
    pid = int(rest)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process that has exited but not yet been reaped by its parent (Linux's /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class Lease:
    """This driver's ownership of a sweep: taken before anything is written, renewed by a
    heartbeat thread every `ttl`/4 seconds, released at the end. A second driver is refused
    while the lease is live; one whose holder died takes it over once `ttl` has passed, or at
    once when the holder was a driver on this machine whose process has ended."""

    def __init__(self, store: Any, name: str, ttl: float | None = None) -> None:
        import socket
        import threading
        import uuid

        self.store = store
        self.name = name
        self.ttl = ttl if ttl is not None else float(os.environ.get(LEASE_TTL_ENV, "30"))
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost = False
        self._stop = threading.Event()
        self._thread: Any = None

    def acquire(self) -> None:
        """Take the sweep or raise StorageError naming the driver that has it."""
        import threading

        holder = self.store.acquire_lease(self.name, self.owner, self.ttl)
        if holder is not None and _exited(holder[0]):  # its driver ended without releasing
            holder = self.store.acquire_lease(self.name, self.owner, self.ttl, dead=holder[0])
        if holder is not None:
            who, ago = holder
            raise StorageError(
                f"sweep {self.name!r} is being run by another driver ({who}, alive {ago:.0f}s "
                f"ago); wait for it to end, or stop it: a driver that died frees the sweep "
                f"{self.ttl:.0f}s after its last heartbeat"
            )
        self._thread = threading.Thread(target=self._beat, name="microsweep-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self.store.renew_lease(self.name, self.owner, self.ttl):
                    self.lost = True  # taken over while this driver could not renew
                    return
            except StorageError:
                continue  # the database is away: the driver's own writes wait for it

    def check(self) -> None:
        """Raise if another driver took the sweep over (this one must stop writing)."""
        if self.lost:
            raise StorageError(
                f"another driver took sweep {self.name!r} over while this one could not renew "
                "its lease; this driver stops"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.store.release_lease(self.name, self.owner)
        except StorageError:
            pass  # the lease expires by itself
