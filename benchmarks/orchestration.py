"""What the sweep machinery costs around the trials themselves, side by side in one run.

    python benchmarks/orchestration.py                   # everything
    python benchmarks/orchestration.py --parts driver    # one part

Parts:
- ``driver``: microsweep's driver bookkeeping per trial (ask, suggest, dispatch, scoring, both
  stores' rows, tell; the sampler's own compute apart) on SQLite and PostgreSQL at 50 and 200
  per-layer parameters, an `evaluate` that costs nothing, random sampler, in-process; against
  Optuna driving the same RDB storage its usual way (`study.optimize` with the same suggest
  calls) and Optuna's in-memory storage as the floor; and the growth from trial 100 to the
  last trial of a long in-memory-sampled run.

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

    from microsweep.search._spacefile import load_space_file

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

    from microsweep.search._spacefile import load_space_file

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
    res = run_sweep(
        space_path,
        name=name,
        trials=trials,
        storage=url,
        seed=0,
        sampler="random",
        in_process=True,
        progress=False,
        on_trial=rows.append,
    )
    driver = [r["timings"]["driver"] for r in rows]
    sampler = [r["timings"].get("sampler", 0.0) for r in rows]
    return {"driver": driver, "sampler": sampler, "wall": res.wall}


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
                print(
                    f"{backend} {key}: driver {d_ms:.1f} ms + sampler {s_ms:.1f} ms, "
                    f"floor {f_ms:.1f} ms, Optuna RDB {_median_ms(rdb):.1f} ms",
                    flush=True,
                )
    finally:
        if pg:
            _drop_pg()
    return out


PARTS = {"driver": part_driver}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--trials", type=int, default=120)
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "orchestration.json")
    )
    args = parser.parse_args()
    os.environ.setdefault("MICROSWEEP_DATA", str(ROOT.parent / "shared" / "data"))
    results: dict = {}
    out = Path(args.out)
    if out.exists():
        results = json.loads(out.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts.split(","):
            results.update(PARTS[part](args, Path(tmp)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
