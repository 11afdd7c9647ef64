"""What the sweep machinery costs around the trials themselves, side by side in one run.

    python benchmarks/orchestration.py                   # everything
    python benchmarks/orchestration.py --parts driver    # one part

Parts:
- ``driver``: microsweep's driver bookkeeping per trial (ask, suggest, dispatch, scoring, both
  stores' rows, tell; the sampler's own compute apart) on SQLite and PostgreSQL at 50 and 200
  per-layer parameters, an `evaluate` that costs nothing, random sampler, in-process; against
  Optuna driving the same RDB storage its usual way (`study.optimize` with the same suggest
  calls) and Optuna's in-memory storage as the floor. Measured twice: the per-trial `driver`
  and `sampler` seconds the driver stores (medians; any negative one is counted), and from
  outside, the wall-clock overhead per trial (the span of finish times less the workers' own
  time in it), which includes whatever the stored figures might miss.
- ``growth``: the same driver on SQLite at 51 parameters for a long sweep (10,000 trials by
  default): median bookkeeping over trials 50-150 against the last 100, and the sampler's.

- ``scaling``: sleep-bound 1 s trials (a 3-layer model, an `evaluate` that sleeps) on 1, 2, 4,
  8, 16 and 32 Ray workers of a local Ray instance given 32 CPUs (a simulated cluster: the
  workers sleep, so two cores carry them); efficiency = throughput / (N x one worker's).
- ``tune``: Ray Tune with OptunaSearch on the same free trial (51 parameters), one at a time,
  against microsweep on one Ray worker (`pip install "ray[tune]"`; part of the `bench` extra).
- ``trial``: a trial's wall time on its worker over the dense model's evaluation of the same
  windows on that worker, for `examples/shakespeare.py`, in-process and on a Ray worker
  (completed trials only: a trial stopped early reads fewer windows).

Writes benchmarks/results/orchestration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_DB = "microsweep_bench"

SPACE = '''
"""{n} small Linear layers with 3 knobs each and an evaluate that costs nothing."""
import torch
from torch import nn

from microsweep import Bits, MicroNet, Rank, Space, Sparsity


class Stack(nn.Module):
    def __init__(self, n, width=16, vocab=32):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


model = Stack({n})
space = Space(
    model,
    rules={{
        "layers.*": dict(
            sparsity=Sparsity(0.0, 0.9, step=0.1), bits=Bits(4, 8, 16, 32), rank=Rank(0.25, 0.75)
        ),
    }},
)
objective = MicroNet(window=8, perplexity_ceiling=None)


def evaluate(model):
    return 5.0
'''


def _floor(space_path: str, trials: int) -> list[float]:
    """Optuna's in-memory ask + the space's suggest calls + tell, per trial (the floor)."""
    import optuna

    from microsweep.prepare import load_space_file

    sf = load_space_file(space_path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(trials):
        t0 = time.perf_counter()
        trial = study.ask()
        sf.space.suggest(trial)
        study.tell(trial, 1.0)
        out.append(time.perf_counter() - t0)
    return out


def _optuna_rdb(space_path: str, url: str, trials: int) -> list[float]:
    """Optuna driving the RDB storage its usual way: `study.optimize` with the same suggests."""
    import optuna

    from microsweep.prepare import load_space_file

    sf = load_space_file(space_path)
    study = optuna.create_study(
        storage=url,
        study_name=f"optuna-{time.time_ns()}",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    stamps = []

    def objective(trial):
        sf.space.suggest(trial)
        return 1.0

    study.optimize(
        objective, n_trials=trials, callbacks=[lambda s, t: stamps.append(time.perf_counter())]
    )
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def _driver(space_path: str, url: str, trials: int, name: str) -> dict:
    from microsweep.search import run_sweep

    rows: list[dict] = []
    stamps: list[float] = []

    def finished(row: dict) -> None:
        stamps.append(time.perf_counter())
        rows.append(row)

    res = run_sweep(
        space_path,
        name=name,
        trials=trials,
        storage=url,
        seed=0,
        sampler="random",
        in_process=True,
        progress=False,
        on_trial=finished,
    )
    driver = [r["timings"]["driver"] for r in rows]
    sampler = [r["timings"].get("sampler", 0.0) for r in rows]
    worker = [r["timings"].get("total", 0.0) for r in rows]
    return {"driver": driver, "sampler": sampler, "worker": worker, "stamps": stamps,
            "wall": res.wall}  # fmt: skip


def _wall_overhead_ms(drv: dict, skip: int = 5) -> float:
    """The driver's wall-clock cost per trial, from outside: the span between finish times
    less the workers' own time in it, over the trials in the span (the first `skip` apart)."""
    stamps, worker = drv["stamps"][skip:], drv["worker"][skip:]
    span = stamps[-1] - stamps[0]
    return 1000 * (span - sum(worker[1:])) / (len(stamps) - 1)


def _median_ms(values: list[float], skip: int = 5) -> float:
    return 1000 * statistics.median(values[skip:] or values)


def _pg_url() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {PG_DB}")
            conn.execute(f"CREATE DATABASE {PG_DB}")
        return f"postgresql://postgres@127.0.0.1:5432/{PG_DB}"
    except Exception as exc:
        print(f"PostgreSQL not available ({exc}); skipping it", file=sys.stderr)
        return None


def _drop_pg() -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")


def part_driver(args: argparse.Namespace, tmp: Path) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backends = {"sqlite": None}
    pg = _pg_url()
    if pg:
        backends["postgresql"] = pg
    out: dict = {
        "driver_ms_per_trial": {},
        "sampler_ms_per_trial": {},
        "optuna_rdb_ms_per_trial": {},
        "optuna_memory_floor_ms_per_trial": {},
        "driver_over_floor": {},
        "wall_overhead_ms_per_trial": {},
        "wall_overhead_over_floor": {},
        "negative_driver_or_sampler_seconds": {},
        "trials": args.trials,
    }
    try:
        for n_params in (50, 200):
            layers = -(-n_params // 3)
            space = tmp / f"stack{layers}.py"
            space.write_text(SPACE.format(n=layers))
            key = f"{layers * 3}_params"
            for backend, url in backends.items():
                url = url or f"sqlite:///{tmp / f'{key}.db'}"
                # the three, back to back, so the machine's load is the same for all
                floor = _floor(str(space), args.trials)
                drv = _driver(str(space), url, args.trials, f"d-{key}")
                rdb = _optuna_rdb(str(space), url, min(args.trials, 60))
                f_ms, d_ms = _median_ms(floor), _median_ms(drv["driver"])
                s_ms = _median_ms(drv["sampler"])
                out["driver_ms_per_trial"].setdefault(backend, {})[key] = d_ms
                out["sampler_ms_per_trial"].setdefault(backend, {})[key] = s_ms
                out["optuna_rdb_ms_per_trial"].setdefault(backend, {})[key] = _median_ms(rdb)
                out["optuna_memory_floor_ms_per_trial"].setdefault(backend, {})[key] = f_ms
                out["driver_over_floor"].setdefault(backend, {})[key] = (d_ms + s_ms) / f_ms
                w_ms = _wall_overhead_ms(drv)
                if not w_ms >= 0:  # sequential trials: the span holds every worker's time
                    raise RuntimeError(f"wall-clock overhead {w_ms} ms is negative: mismeasured")
                out["wall_overhead_ms_per_trial"].setdefault(backend, {})[key] = w_ms
                out["wall_overhead_over_floor"].setdefault(backend, {})[key] = w_ms / f_ms
                negative = sum(v < 0 for v in drv["driver"] + drv["sampler"])
                out["negative_driver_or_sampler_seconds"].setdefault(backend, {})[key] = negative
                print(
                    f"{backend} {key}: driver {d_ms:.1f} ms + sampler {s_ms:.1f} ms, wall-clock "
                    f"overhead {w_ms:.1f} ms, floor {f_ms:.1f} ms, Optuna RDB "
                    f"{_median_ms(rdb):.1f} ms, {negative} negative figures",
                    flush=True,
                )
    finally:
        if pg:
            _drop_pg()
    return out


def part_growth(args: argparse.Namespace, tmp: Path) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = tmp / "stack17.py"
    space.write_text(SPACE.format(n=17))
    drv = _driver(str(space), f"sqlite:///{tmp / 'growth.db'}", args.growth_trials, "growth")
    n = len(drv["driver"])
    early = 1000 * statistics.median(drv["driver"][50:150])
    late = 1000 * statistics.median(drv["driver"][n - 100 :])
    early_s = 1000 * statistics.median(drv["sampler"][50:150])
    late_s = 1000 * statistics.median(drv["sampler"][n - 100 :])
    print(
        f"growth over {n} trials: driver {early:.1f} -> {late:.1f} ms ({late / early:.2f}x), "
        f"sampler {early_s:.2f} -> {late_s:.2f} ms",
        flush=True,
    )
    return {
        "growth": {
            "trials": n,
            "params": 51,
            "driver_ms_at_100": early,
            "driver_ms_at_end": late,
            "driver_growth": late / early,
            "sampler_ms_at_100": early_s,
            "sampler_ms_at_end": late_s,
            "wall_s": drv["wall"],
        }
    }


SLEEPY = SPACE.replace("return 5.0", "time.sleep({sleep})\n    return 5.0").replace(
    "import torch\n", "import time\n\nimport torch\n"
)


def part_scaling(args: argparse.Namespace, tmp: Path) -> dict:
    import ray

    from microsweep.search import run_sweep

    space = tmp / "sleepy.py"
    space.write_text(SLEEPY.format(n=3, sleep=args.sleep))
    ray.init(num_cpus=32, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    throughput = {}
    try:
        for n in (1, 2, 4, 8, 16, 32):
            trials = args.per_worker * n
            url = f"sqlite:///{tmp / f'scale{n}.db'}"
            stamps: list[float] = []
            run_sweep(
                str(space),
                name=f"w{n}",
                trials=trials + n,
                workers=n,
                storage=url,
                seed=0,
                sampler="random",
                progress=False,
                on_trial=lambda _row, stamps=stamps: stamps.append(time.perf_counter()),
            )
            steady = stamps[n:]  # after every worker finished its first trial
            throughput[n] = (len(steady) - 1) / (steady[-1] - steady[0])
            print(f"{n} workers: {throughput[n]:.2f} trials/s", flush=True)
    finally:
        ray.shutdown()
    one = throughput[1]
    return {
        "trial_sleep_s": args.sleep,
        "throughput_by_workers": {str(n): t for n, t in throughput.items()},
        "efficiency_by_workers": {str(n): t / (n * one) for n, t in throughput.items()},
    }


def part_trial(args: argparse.Namespace, tmp: Path) -> dict:
    import torch

    from microsweep.prepare import load_space_file, prepare
    from microsweep.search import run_sweep
    from microsweep.spaces import Policy
    from microsweep.workers import TrialRunner

    space = str(ROOT / "examples" / "shakespeare.py")
    sf = load_space_file(space)
    prepared = prepare(sf, 0)
    torch.set_num_threads(1)
    runner = TrialRunner(
        sf.model,
        prepared.windows,
        prepared.settings,
        calib=prepared.calib,
        train_tokens=prepared.train_tokens,
    )
    dense = [runner.run(-1, Policy({}).to_json()).timings["evaluate"] for _ in range(5)]
    dense_s = statistics.median(dense)
    out = {"dense_evaluate_s": dense_s, "trial_over_dense_eval": {}}
    for mode in ("in_process", "ray"):
        rows: list[dict] = []
        run_sweep(
            space,
            name=mode,
            trials=args.trials_timing,
            workers=1,
            storage=f"sqlite:///{tmp / f'trial-{mode}.db'}",
            seed=0,
            sampler="random",
            in_process=mode == "in_process",
            progress=False,
            on_trial=rows.append,
        )
        walls = [r["timings"]["total"] for r in rows if r["state"] == "COMPLETE"]
        out["trial_over_dense_eval"][mode] = statistics.median(walls) / dense_s
        print(
            f"{mode}: trial {1000 * statistics.median(walls):.0f} ms, dense evaluation "
            f"{1000 * dense_s:.0f} ms",
            flush=True,
        )
    return out


_TUNE: dict = {}  # the space Ray Tune's define-by-run function suggests from


def _define_by_run(trial):  # noqa: ANN001, ANN202 - module level: OptunaSearch pickles it
    _TUNE["space"].suggest(trial)


def _trainable(config):  # noqa: ANN001, ANN202
    return {"score": 1.0}


def part_tune(args: argparse.Namespace, tmp: Path) -> dict:
    """Ray Tune with OptunaSearch (define-by-run over the same suggest calls) on the same free
    trial, against microsweep on one Ray worker: wall time per trial once started."""
    import logging

    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from microsweep.prepare import load_space_file
    from microsweep.search import run_sweep

    space = tmp / "tune-stack.py"
    space.write_text(SPACE.format(n=17))
    _TUNE["space"] = load_space_file(str(space)).space
    n = args.tune_trials

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        logging.getLogger("ray.tune").setLevel(logging.ERROR)
        tuner = tune.Tuner(
            _trainable,
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(space=_define_by_run, metric="score", mode="min"),
                num_samples=n,
                max_concurrent_trials=1,
            ),
            run_config=tune.RunConfig(storage_path=str(tmp / "tune"), verbose=0),
        )
        t0 = time.perf_counter()
        tuner.fit()
        tune_s = (time.perf_counter() - t0) / n
        stamps: list[float] = []
        run_sweep(
            str(space),
            name="tune-cmp",
            trials=n,
            workers=1,
            storage=f"sqlite:///{tmp / 'tune-cmp.db'}",
            seed=0,
            sampler="random",
            progress=False,
            on_trial=lambda _row: stamps.append(time.perf_counter()),
        )
        ours_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    finally:
        ray.shutdown()
    print(
        f"Ray Tune + OptunaSearch {1000 * tune_s:.0f} ms per trial, microsweep on one Ray "
        f"worker {1000 * ours_s:.0f} ms",
        flush=True,
    )
    return {
        "ray_tune_ms_per_trial": 1000 * tune_s,
        "microsweep_ray_ms_per_trial": 1000 * ours_s,
        "tune_trials": n,
        "tune_params": 51,
    }


PARTS = {
    "driver": part_driver,
    "growth": part_growth,
    "scaling": part_scaling,
    "trial": part_trial,
    "tune": part_tune,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--trials", type=int, default=120)
    parser.add_argument("--growth-trials", type=int, default=10_000, help="growth: trials")
    parser.add_argument("--sleep", type=float, default=1.0, help="scaling: seconds per trial")
    parser.add_argument("--per-worker", type=int, default=4, help="scaling: trials per worker")
    parser.add_argument("--trials-timing", type=int, default=12, help="trial: trials per mode")
    parser.add_argument("--tune-trials", type=int, default=40, help="tune: trials each")
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "orchestration.json")
    )
    args = parser.parse_args()
    os.environ.setdefault("MICROSWEEP_DATA", str(ROOT.parent / "shared" / "data"))
    results: dict = {}
    out = Path(args.out)
    if out.exists():
        results = json.loads(out.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts.split(","):
            results.update(PARTS[part](args, Path(tmp)))
            out.write_text(json.dumps(results, indent=2))  # each part kept as it finishes
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
