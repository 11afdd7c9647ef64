"""What a worker learns from Ray, and how the pool joins it: the CPUs and GPU an actor was given,
where a trial ran, and starting or joining a Ray instance that can place the workers.

Ray is never imported here for the worker-side helpers: a Ray worker has it in `sys.modules`
already, and in-process nothing should load it just to ask.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch

from microsweep.errors import UsageError
from microsweep.workers._orphans import reap_ray_processes

__all__ = [
    "assigned_cpus",
    "assigned_device",
    "check_capacity",
    "first_line",
    "join_ray",
    "worker_name",
    "worker_threads",
]


def worker_threads(cpus: float) -> int:
    """Torch threads for a worker given `cpus` CPUs, one rule for Ray actors and the in-process
    runner: the whole CPUs, at least 1 (a fraction still runs), at most this machine's cores
    (more threads than cores only contend)."""
    return max(1, min(int(cpus), os.cpu_count() or 1))


def assigned_device() -> torch.device | None:
    """The GPU Ray gave this actor (Ray limits CUDA_VISIBLE_DEVICES to it), or None: CPU.
    Refused in one line when Ray gave GPUs that this process's torch cannot use, rather than
    running the worker's trials on the CPU unsaid."""
    ray = sys.modules.get("ray")
    try:
        gpus = ray.get_gpu_ids() if ray is not None and ray.is_initialized() else []
    except Exception:  # no runtime context: not a Ray worker
        gpus = []
    if not gpus:
        return None
    if not torch.cuda.is_available():
        raise UsageError(
            f"Ray gave this worker GPU {', '.join(map(str, gpus))} but torch {torch.__version__} "
            "here sees no CUDA device (a CPU-only build, or no driver); install a CUDA build of "
            "torch on the GPU nodes, or leave out --gpus-per-worker"
        )
    return torch.device("cuda")


def assigned_cpus() -> int | None:
    """Threads for the CPUs Ray gave this actor (`worker_threads`: they follow the reservation,
    not the machine's core count); None outside Ray."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return worker_threads(cpus)
    except Exception:  # no runtime context: not a Ray worker
        pass
    return None


def worker_name() -> str:
    """Where a trial ran: the Ray node (first 12 hex digits of its id) and process, or the
    host and process outside Ray."""
    import socket

    ray = sys.modules.get("ray")  # a Ray worker has it; in-process it is not imported for this
    try:
        if ray is not None and ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
            return f"node {node[:12]} pid {os.getpid()}"
    except Exception:  # Ray missing or no runtime context: the host will do
        pass
    return f"{socket.gethostname()} pid {os.getpid()}"


def join_ray(ray: Any, address: str | None, cpus_needed: float) -> bool:
    """Join the Ray cluster at `address`, or start a local instance with `cpus_needed` CPUs
    (stopping a killed driver's leftovers first); nothing when this process joined one
    already. True when this call started or joined it (the pool shuts it down at close)."""
    if ray.is_initialized():
        return False
    if not address:
        for line in reap_ray_processes():  # a killed driver's leftovers
            sys.stderr.write(f"microsweep: note: {line}\n")
    try:
        if address:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        else:  # a local instance reachable from this machine only
            ray.init(
                num_cpus=max(math.ceil(cpus_needed), 1),
                include_dashboard=False,
                logging_level="WARNING",
                log_to_driver=False,
                _node_ip_address="127.0.0.1",
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise UsageError(f"cannot start or join {where}: {first_line(exc)}") from None
    return True


def check_capacity(
    ray: Any, workers: int, cpus_per_worker: float, gpus_per_worker: float, *, started: bool
) -> None:
    """Refuse, in one line, workers the joined cluster has too few CPUs or GPUs for (shutting
    down a Ray this pool `started`)."""
    have = ray.cluster_resources()
    for what, need, flag in (
        ("CPU", workers * cpus_per_worker, "cpus"),
        ("GPU", workers * gpus_per_worker, "gpus"),
    ):
        if need > have.get(what, 0):
            if started:
                ray.shutdown()
            raise UsageError(
                f"--workers {workers} x --{flag}-per-worker needs {need:g} {what}s; the Ray "
                f"cluster has {have.get(what, 0):g}: lower them or add nodes"
            )


def first_line(exc: BaseException) -> str:
    """One line for a Ray error: its first, plus the underlying error's own last line when the
    first only says that an actor or task died; our own refusal raised in a worker alone."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first, last = lines[0], lines[-1]
    ours = "microsweep.errors.UsageError: "
    if ours in last:  # our own one-line refusal, raised in the worker: it says it all
        before, message = last.split(ours, 1)
        return message.removesuffix(")") if before.endswith("(") else message
    return f"{first} ({last})" if last != first and "died" in first else first
