"""Where one trial's time goes: compress / fine-tune / evaluate / count on the worker, and the
driver's ask + suggest + record + tell, for a sweep on Ray workers and in-process, side by side.

    python benchmarks/trial_timing.py --space examples/shakespeare.py --trials 12 --workers 2

Writes benchmarks/results/trial_timing.json (medians and means per phase, wall time per trial).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("compress", "finetune", "evaluate", "count", "total", "driver")


def _summary(rows: list[dict], wall: float) -> dict:
    out: dict = {"trials": len(rows), "wall_s": wall, "wall_per_trial_s": wall / max(len(rows), 1)}
    for phase in PHASES:
        values = [r["timings"][phase] for r in rows if phase in r["timings"]]
        if values:
            out[phase] = {
                "median_ms": 1000 * statistics.median(values),
                "mean_ms": 1000 * statistics.fmean(values),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "examples" / "tiny.py"))
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trial_timing.json"))
    args = parser.parse_args()
    os.environ.setdefault("MICROSWEEP_DATA", str(ROOT.parent / "shared" / "data"))

    from microsweep.search import run_sweep

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ray", "in_process"):
            rows: list[dict] = []
            url = f"sqlite:///{tmp}/{mode}.db"
            start = time.perf_counter()
            res = run_sweep(
                args.space,
                name=mode,
                trials=args.trials,
                workers=args.workers,
                storage=url,
                seed=0,
                in_process=mode == "in_process",
                progress=False,
                on_trial=rows.append,
            )
            summary = _summary(rows, time.perf_counter() - start)
            summary["best_feasible_score"] = res.best_score
            summary["driver_ms_per_trial"] = res.driver_ms_per_trial
            results[mode] = summary
    results["space"] = args.space
    results["workers"] = args.workers
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{'mode':<11} {'phase':<9} {'median ms':>10} {'mean ms':>10}")
    for mode in ("ray", "in_process"):
        for phase in PHASES:
            if phase in results[mode]:
                r = results[mode][phase]
                print(f"{mode:<11} {phase:<9} {r['median_ms']:>10.1f} {r['mean_ms']:>10.1f}")
        print(
            f"{mode:<11} wall {results[mode]['wall_s']:.1f}s for {results[mode]['trials']} "
            f"trials; best feasible score {results[mode]['best_feasible_score']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
