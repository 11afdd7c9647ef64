"""Worker pools: K long-lived Ray actors, or one in-process runner for debugging.

Both take `submit(number, policy_json)` and hand back each finished trial's `TrialResult` from
`wait()`. The Ray pool puts the model and the token tensors into the object store once; every
actor receives them by reference at start and keeps them for all its trials. An actor that dies
fails only the trial it was running (a result with ``status="error"``); the pool starts a
replacement.
"""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from microsweep.errors import MicrosweepError, UsageError
from microsweep.workers._orphans import forget_ray_processes, record_ray_processes
from microsweep.workers._ray import check_capacity, first_line, join_ray, worker_threads
from microsweep.workers._result import TrialResult
from microsweep.workers._runner import EvalSettings, TrialRunner, check_subset

if TYPE_CHECKING:
    from microsweep.score import KLReference

__all__ = ["InProcessPool", "RayPool", "WorkerPool", "check_resources", "make_pool"]

T = TypeVar("T")


class WorkerPool:
    """Interface: `free` slots, `submit`, `wait` for one finished trial's `TrialResult`, `close`.

    A trial that fails, or whose worker dies, is still a `TrialResult` (``status="error"`` with
    its reason), never an exception from `wait`."""

    size: int
    on_finished: Callable[[TrialResult], None] | None = None
    """Called with the result of each trial that finishes while `map_runners` runs (so it is
    recorded at once); None keeps such results for `wait`."""

    @property
    def free(self) -> int:
        """Workers ready for `submit` now."""
        raise NotImplementedError

    @property
    def busy(self) -> int:
        """Workers running a trial."""
        return self.size - self.free

    def submit(
        self,
        number: int,
        policy_json: Mapping[str, Any],
        *,
        windows: Sequence[int] | None = None,
        **options: Any,
    ) -> None:
        """Start one policy on a free worker; `windows` (indices of the evaluation windows, see
        `microsweep.score.subset_windows`) evaluates only those, without early stop, and is
        refused here in one line when the workers cannot read them; `options` go to
        `TrialRunner.run`."""
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> TrialResult | None:
        """The next finished trial's result; with `timeout`, None when none finishes in time
        (or nothing is running)."""
        raise NotImplementedError

    def map_runners(self, fn: Callable[..., T], items: Sequence[tuple[Any, ...]]) -> list[T]:
        """`fn(runner, *item)` for each item on the idle workers (`TrialRunner.call`: the
        runner's threads, no grad), one item per call in the order given as workers free up;
        results in the order of `items`. For work other than trials (the planner's per-unit
        options): `fn` must be importable by name on the workers, and what it returns small."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the workers (and a Ray this pool started)."""


class InProcessPool(WorkerPool):
    """Runs each trial at submit time in this process: no Ray, easy to debug. The runner's
    thread count (`worker_threads` of ``--cpus-per-worker``, as a Ray worker's) holds during
    each trial; the caller's is put back after it."""

    def __init__(self, runner: TrialRunner) -> None:
        self.size = 1
        self.runner = runner
        self._done: deque[TrialResult] = deque()

    @property
    def free(self) -> int:
        """1 until the finished trial's result is taken by `wait`."""
        return 0 if self._done else 1

    def submit(
        self,
        number: int,
        policy_json: Mapping[str, Any],
        *,
        windows: Sequence[int] | None = None,
        **options: Any,
    ) -> None:
        """Run the trial now, in this process; its result waits for `wait`."""
        runner = self.runner
        subset = check_subset(windows, runner.windows.shape[0], runner.evaluate_fn is not None)
        threads = torch.get_num_threads()  # the runner sets its own for the trial
        try:
            self._done.append(runner.run(number, policy_json, windows=subset, **options))
        finally:
            torch.set_num_threads(threads)

    def wait(self, timeout: float | None = None) -> TrialResult | None:
        """The result of the trial run at `submit`."""
        if timeout is not None and not self._done:
            return None
        return self._done.popleft()

    def map_runners(self, fn: Callable[..., T], items: Sequence[tuple[Any, ...]]) -> list[T]:
        """Each item in turn, in this process, on the one runner."""
        return [self.runner.call(fn, *item) for item in items]


START_TIMEOUT_ENV = "MICROSWEEP_WORKER_START_TIMEOUT"
"""Seconds the workers have to start and load the model before the sweep stops (default 600:
generous, since a busy machine can take minutes; a cluster that cannot place them still ends
in one line instead of waiting for ever)."""


class RayPool(WorkerPool):
    """K Ray actors, each a `TrialRunner`; local Ray unless `address` names a cluster."""

    def __init__(
        self,
        workers: int,
        runner_args: dict[str, Any],
        *,
        address: str | None = None,
        register_by_value: tuple[Any, ...] = (),
        start_timeout: float | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
    ) -> None:
        import ray

        check_resources(
            workers, address=address, cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
        )  # fmt: skip
        self._ray = ray
        self._local = not address
        self._started_ray = join_ray(ray, address, workers * cpus_per_worker)
        check_capacity(ray, workers, cpus_per_worker, gpus_per_worker, started=self._started_ray)
        for module in register_by_value:  # classes from the user's space file travel by value
            ray.cloudpickle.register_pickle_by_value(module)
        self._refs = {k: ray.put(v) for k, v in runner_args.items()}
        # what `submit` checks a subset against, without asking an actor
        self._n_windows = runner_args["windows"].shape[0]
        self._user_evaluate = runner_args.get("evaluate") is not None
        # threads follow the CPUs Ray gives each actor (TrialRunner reads them on the node)
        self._actor_cls = ray.remote(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0
        )(TrialRunner)
        self.size = workers
        self._idle = [self._new_actor() for _ in range(workers)]
        self._running: dict[Any, tuple[Any, int]] = {}
        self._finished: deque[TrialResult] = deque()  # trials a map saw finish, for `wait`
        if start_timeout is None:
            start_timeout = float(os.environ.get(START_TIMEOUT_ENV) or 600.0)
        self._check_started(start_timeout)

    def _check_started(self, timeout: float) -> None:
        """Every actor answers a ping, or the sweep stops with why (no pending actor hangs)."""
        ray = self._ray
        pings = {actor.ping.remote(): actor for actor in self._idle}
        ready, pending = ray.wait(list(pings), num_returns=len(pings), timeout=timeout)
        try:
            for ref in ready:
                ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.close()
            raise UsageError(f"a worker failed to start: {first_line(exc)}") from None
        if pending:
            self.close()
            raise UsageError(
                f"Ray placed {len(ready)} of {len(pings)} workers within {timeout:.0f}s; "
                "lower --workers or add CPUs to the cluster"
            )
        if self._started_ray and self._local:  # so a later start can stop them if we are killed
            record_ray_processes()

    def _new_actor(self) -> Any:
        """A new actor holding the shared model and tensors by reference."""
        refs = self._refs
        return self._actor_cls.remote(
            refs["model"],
            refs["windows"],
            refs["settings"],
            calib=refs["calib"],
            train_tokens=refs["train_tokens"],
            evaluate=refs["evaluate"],
            rules=refs["rules"],
            stats=refs["stats"],
            levels=refs["levels"],
            reference=refs["reference"],
        )

    @property
    def free(self) -> int:
        """Idle actors."""
        return len(self._idle)

    def submit(
        self,
        number: int,
        policy_json: Mapping[str, Any],
        *,
        windows: Sequence[int] | None = None,
        **options: Any,
    ) -> None:
        """Start the trial on an idle actor."""
        subset = check_subset(windows, self._n_windows, self._user_evaluate)
        actor = self._idle.pop()
        ref = actor.run.remote(number, dict(policy_json), windows=subset, **options)
        self._running[ref] = (actor, number)

    def wait(self, timeout: float | None = None) -> TrialResult | None:
        """The next finished trial's result (first those a `map_runners` saw finish); a call
        that raised, or an actor, node or worker lost, is an error result for that trial (a lost
        actor is replaced)."""
        if self._finished:
            return self._finished.popleft()
        if timeout is not None and not self._running:
            return None
        done, _ = self._ray.wait(list(self._running), num_returns=1, timeout=timeout)
        if not done:
            return None
        result, actor = self._settle(done[0])
        self._idle.append(actor)
        return result

    def _settle(self, ref: Any) -> tuple[TrialResult, Any]:
        """A finished trial call's result, and the actor free for the next call (a new one in
        place of a lost actor)."""
        ray = self._ray
        actor, number = self._running.pop(ref)
        try:
            return ray.get(ref), actor
        except ray.exceptions.RayTaskError as exc:  # the call raised; the actor lives on
            return TrialResult(number, "error", error=f"worker error: {first_line(exc)}"), actor
        except ray.exceptions.RayError as exc:  # actor, node or worker lost: replace the actor
            why = f"worker died ({type(exc).__name__}): {first_line(exc)}"
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
            return TrialResult(number, "error", error=why), self._new_actor()

    def map_runners(self, fn: Callable[..., T], items: Sequence[tuple[Any, ...]]) -> list[T]:
        """The items on the idle actors, the next item to whichever actor finishes first; a
        trial running meanwhile is left to finish, its result given to `on_finished` (or kept
        for `wait`) and its actor joining the map. A call that raises stops the map once the
        calls in flight end, with its error (a `MicrosweepError` as raised, anything else as
        one line naming the worker error; of several, the first item's); a lost actor is
        replaced and its item sent again, once."""
        ray = self._ray
        if not self._idle and not self._running:
            raise UsageError("no worker to run on: the pool is closed")
        actors, self._idle = self._idle, []
        results: list[Any] = [None] * len(items)
        todo = deque(range(len(items)))
        lost = [0] * len(items)
        running: dict[Any, tuple[Any, int]] = {}
        failures: dict[int, BaseException] = {}
        try:
            while running or (todo and not failures):
                while todo and actors and not failures:
                    i = todo.popleft()
                    actor = actors.pop()
                    running[actor.call.remote(fn, *items[i])] = (actor, i)
                # every worker on a trial: wait for one; else for a call or a trial
                [ref], _ = ray.wait(list(running) + list(self._running), num_returns=1)
                if ref in self._running:  # a trial finished: its worker joins the map
                    result, actor = self._settle(ref)
                    actors.append(actor)
                    if self.on_finished is not None:
                        self.on_finished(result)
                    else:
                        self._finished.append(result)
                    continue
                actor, i = running.pop(ref)
                try:
                    results[i] = ray.get(ref)
                    actors.append(actor)
                except ray.exceptions.RayTaskError as exc:  # fn raised; the actor lives on
                    actors.append(actor)
                    failures[i] = exc
                except ray.exceptions.RayError as exc:  # actor, node or worker lost
                    try:
                        ray.kill(actor, no_restart=True)
                    except Exception:
                        pass
                    actors.append(self._new_actor())
                    lost[i] += 1
                    if lost[i] > 1:
                        failures[i] = exc
                    else:
                        todo.appendleft(i)
        finally:
            self._idle.extend(actors)
            self._idle.extend(actor for actor, _ in running.values())
        if failures:
            raise _map_error(ray, failures[min(failures)])
        return results

    def close(self) -> None:
        """Kill every actor, and shut down a Ray this pool started."""
        ray = self._ray
        for actor in self._idle + [a for a, _ in self._running.values()]:
            ray.kill(actor, no_restart=True)
        self._idle.clear()
        self._running.clear()
        if self._started_ray:
            ray.shutdown()
            if self._local:
                forget_ray_processes()


def _map_error(ray: Any, exc: BaseException) -> BaseException:
    """What `map_runners` raises for a failed call: the worker's own `MicrosweepError` (its one
    line already says what to do), else a RuntimeError with the error's first line."""
    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
    if isinstance(cause, MicrosweepError):
        return cause
    if isinstance(cause, BaseException):
        text = str(cause).strip().splitlines()
        return RuntimeError(f"a worker failed: {type(cause).__name__}: {text[0] if text else ''}")
    return RuntimeError(f"a worker failed: {first_line(exc)}")


def check_resources(
    workers: int,
    *,
    address: str | None = None,
    in_process: bool = False,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
) -> None:
    """Refuse, in one line and before any model is measured, what no pool could place: CPUs
    or GPUs per worker out of range, more CPUs than this machine has for a local Ray start,
    or a cluster address where nothing answers (a cluster's own capacity is checked once
    joined)."""
    if in_process:
        return
    if not cpus_per_worker > 0 or not gpus_per_worker >= 0:
        raise UsageError(
            f"--cpus-per-worker {cpus_per_worker:g} / --gpus-per-worker {gpus_per_worker:g}: "
            "CPUs must be above 0 and GPUs at least 0"
        )
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # a Ray this process already joined
        return
    if address:
        _probe(address)
    elif workers * cpus_per_worker > (os.cpu_count() or 1):
        raise UsageError(
            f"--workers {workers} x --cpus-per-worker {cpus_per_worker:g} is more than "
            f"this machine's {os.cpu_count()} CPUs; use fewer, or a Ray cluster with --address"
        )


def _probe(address: str, timeout: float = 10.0) -> None:
    """Refuse quickly when nothing answers at a Ray cluster address (`ray.init` would wait for
    minutes): the GCS port must accept a TCP connection."""
    import socket

    if address in ("auto", "local") or address.startswith(("ray://", "anyscale://")):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except ValueError:
        raise UsageError(f"--address {address!r} is not HOST:PORT") from None
    except OSError as exc:
        raise UsageError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
            "'ray start --head' or check the address"
        ) from None


def make_pool(
    workers: int,
    *,
    model: nn.Module,
    windows: torch.Tensor,
    settings: EvalSettings,
    calib: torch.Tensor | None = None,
    train_tokens: torch.Tensor | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    address: str | None = None,
    in_process: bool = False,
    register_by_value: tuple[Any, ...] = (),
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    rules: Mapping[type, Any] | None = None,
    stats: Mapping[str, Any] | None = None,
    levels: Any = None,
    reference: KLReference | None = None,
) -> WorkerPool:
    """`workers` Ray actors, each reserving `cpus_per_worker` CPUs and `gpus_per_worker` GPUs
    (or one in-process runner when `in_process`, whose torch threads follow `cpus_per_worker`
    by the Ray workers' rule, `worker_threads`). `stats`, `levels` and the KL `reference` go
    to every runner (put in Ray's object store once, like the model)."""
    if in_process:
        if isinstance(cpus_per_worker, bool) or not (
            isinstance(cpus_per_worker, (int, float)) and 0 < cpus_per_worker < math.inf
        ):
            raise UsageError(
                f"--cpus-per-worker {cpus_per_worker!r} must be a number above 0 (the in-process "
                "runner's torch threads follow it)"
            )
        runner = TrialRunner(
            model,
            windows,
            settings,
            calib=calib,
            train_tokens=train_tokens,
            evaluate=evaluate,
            threads=worker_threads(cpus_per_worker),
            stats=stats,
            levels=levels,
            reference=reference,
        )
        return InProcessPool(runner)
    args = {
        "model": model,
        "windows": windows,
        "settings": settings,
        "calib": calib,
        "train_tokens": train_tokens,
        "evaluate": evaluate,
        "rules": dict(rules or {}),
        "stats": stats,
        "levels": levels,
        "reference": reference,
    }
    return RayPool(
        workers,
        args,
        address=address,
        register_by_value=register_by_value,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
    )
