"""Search quality: best feasible MicroNet score against trials for each sampler, side by side.

For each task (a space file) this measures the exhaustive reference first, every uniform policy
of the space's levels (one setting for all layers), then runs each method for `--trials` trials
with `--seeds` seeds, in-process, two at a time, into one SQLite store per task (the sensitivity
table is measured once per task, before the runs, and reused by every run that needs it; its
cost is reported apart). Per task and method it reports the best feasible score after 25, 50,
100 and 200 trials (mean, min, max over seeds), the feasible fraction, the hypervolume of
(score, perplexity) against trials, evaluation time saved by early stopping and wall time.

    python benchmarks/quality.py                      # both tasks, 6 methods, 3 seeds, 200 trials
    python benchmarks/quality.py --tasks shakespeare --methods auto,uniform --seeds 1
    python benchmarks/quality.py --finetune           # also: uniform vs auto with fine-tuning
    python benchmarks/quality.py --tasks ptb          # one task; the others in --out are kept

Writes benchmarks/results/quality.json and benchmarks/results/quality.png.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"shakespeare": "examples/shakespeare.py", "ptb": "examples/ptb.py"}
METHODS = ("uniform", "random", "tpe", "nsga2", "allocate", "auto")
CHECKPOINTS = (25, 50, 100, 200)

FINETUNE = """
from microsweep import Int, Float

space.hyper["finetune_steps"] = Int({steps}, {steps})
space.hyper["finetune_lr"] = Float({lr}, {lr})
"""


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _one_run(job: dict) -> dict:
    """One method and seed: a sweep in-process, summarized from the store."""
    import torch

    torch.set_num_threads(1)
    _quiet()
    from microsweep.search import run_sweep
    from microsweep.storage import Store

    store = Store(job["storage"])
    exists = job["name"] in store.sweep_names()
    done = exists and len(store.trials(job["name"])) >= job["trials"]
    store.dispose()
    if done:  # measured by an earlier invocation with the same --workdir: summarize it again
        return {**_summarize(job, None, None), "job": job}
    if exists:  # cut short earlier: finish it
        from microsweep.search import resume_sweep

        resume_sweep(
            job["name"],
            trials=job["trials"],
            storage=job["storage"],
            in_process=True,
            progress=False,
        )
        return {**_summarize(job, None, None), "job": job}
    started = time.perf_counter()
    result = run_sweep(
        job["space"],
        name=job["name"],
        trials=job["trials"],
        storage=job["storage"],
        sampler=job["method"],
        seed=job["seed"],
        in_process=True,
        progress=False,
    )
    wall = time.perf_counter() - started
    return {**_summarize(job, result, wall), "job": job}


def _hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by (score, perplexity) points below the reference, both minimized."""
    front: list[tuple[float, float]] = []
    for s, p in sorted((s, p) for s, p in points if s < ref[0] and p < ref[1]):
        if not front or p < front[-1][1]:
            front.append((s, p))
    if not front:
        return 0.0
    edges = [s for s, _ in front[1:]] + [ref[0]]
    return sum((nxt - s) * (ref[1] - p) for (s, p), nxt in zip(front, edges, strict=True))


def _hv_curve(rows: list, ref: tuple[float, float]) -> list[float]:
    """Hypervolume after each trial (feasible completed trials only)."""
    curve, points = [], []
    for r in rows:
        if r.state == "COMPLETE" and r.feasible:
            points.append((r.score, r.perplexity))
        curve.append(_hypervolume(points, ref))
    return curve


def _summarize(job: dict, result, wall: float) -> dict:  # noqa: ANN001
    from microsweep.storage import Store

    store = Store(job["storage"], must_exist=True)
    sweep = store.get_sweep(job["name"])
    rows = sorted(store.trials(job["name"]), key=lambda r: r.number)
    store.dispose()
    if wall is None:  # from the store: first row created to last trial finished
        wall = (max(r.finished_at for r in rows) - sweep.created_at).total_seconds()
    best_by, best = {}, math.inf
    trace = []
    for i, r in enumerate(rows, start=1):
        if r.state == "COMPLETE" and r.feasible and r.score < best:
            best = r.score
        trace.append(best if math.isfinite(best) else None)
        if i in CHECKPOINTS:
            best_by[str(i)] = best if math.isfinite(best) else None
    ref = (sweep.dense_score, sweep.ceiling)
    evaluate = sum(r.timings.get("evaluate", 0.0) for r in rows)
    saved = sum(r.timings.get("evaluate_saved", 0.0) for r in rows)
    origins: dict[str, int] = {}
    for r in rows:
        origins[r.origin or "?"] = origins.get(r.origin or "?", 0) + 1
    return {
        "best_by_trials": best_by,
        "best_trace": trace,
        "hv_trace": _hv_curve(rows, ref),
        "feasible_fraction": sum(1 for r in rows if r.state == "COMPLETE" and r.feasible)
        / max(len(rows), 1),
        "pruned": sum(1 for r in rows if r.state == "PRUNED"),
        "evaluate_s": evaluate,
        "evaluate_saved_s": saved,
        "wall_s": wall,
        "origins": origins,
        "dense_score": sweep.dense_score,
        "ceiling": sweep.ceiling,
        "dense_perplexity": sweep.dense_perplexity,
    }


def _uniform_grid(space_path: str, rank_levels: int) -> dict:
    """Every uniform policy of the space's levels, evaluated; the best feasible is the
    reference a per-layer search must beat."""
    import torch

    _quiet()
    torch.set_num_threads(2)
    from microsweep.allocate import Planner
    from microsweep.prepare import load_space_file, measure_dense, prepare, with_stop_rule
    from microsweep.score import Baseline, CountConfig, micronet_score
    from microsweep.workers import TrialRunner

    started = time.perf_counter()
    sf = load_space_file(space_path)
    prepared = prepare(sf, 0)
    dense = measure_dense(sf, prepared)
    ceiling = sf.objective.bound(dense.perplexity).value
    baseline = Baseline(dense.params, dense.ops)
    prepared = with_stop_rule(sf, prepared, dense, ceiling)
    planner = Planner(
        sf.space,
        sf.model,
        context=prepared.settings.context,
        config=CountConfig(**prepared.settings.count),
        baseline=baseline,
        calib=prepared.calib,
        rank_levels=rank_levels,
    )
    plans = sorted(planner.uniform(), key=lambda item: item[1].score)
    runner = TrialRunner(
        sf.model,
        prepared.windows,
        prepared.settings,
        calib=prepared.calib,
        train_tokens=prepared.train_tokens,
    )
    best = None
    evaluated = 0
    for _, plan in plans:
        if best is not None and plan.score >= best["score"]:
            break  # sorted by exact score: nothing later can beat the best feasible one
        res = runner.run(evaluated, planner.policy(plan.choice).to_json())
        evaluated += 1
        if not res.ok:
            continue
        score = micronet_score(res.params, res.ops, baseline)
        if res.perplexity <= ceiling:
            best = {
                "score": score,
                "perplexity": res.perplexity,
                "policy": planner.choices(plan.choice),
            }
    return {
        "rank_levels": rank_levels,
        "uniform_policies": len(plans),
        "evaluated": evaluated,
        "best": best,
        "seconds": time.perf_counter() - started,
        "dense_perplexity": dense.perplexity,
        "ceiling": ceiling,
    }


def _sensitivity(space_path: str, storage: str) -> dict:
    _quiet()
    from microsweep.search import run_sensitivity

    run = run_sensitivity(space_path, name="bench", storage=storage, workers=2, progress=False)
    return run.summary


def _stats(values: list[float | None]) -> dict:
    got = [v for v in values if v is not None]
    if not got:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(got), "min": min(got), "max": max(got), "n": len(got)}


def _to_90(curve: list[float]) -> int | None:
    final = curve[-1] if curve else 0.0
    if final <= 0:
        return None
    return next(i for i, v in enumerate(curve, start=1) if v >= 0.9 * final)


def _aggregate(runs: list[dict], trials: int) -> dict:
    out = {}
    for method in sorted({r["job"]["method"] for r in runs}):
        mine = [r for r in runs if r["job"]["method"] == method]
        best_by = {
            str(c): _stats([r["best_by_trials"].get(str(c)) for r in mine])
            for c in CHECKPOINTS
            if c <= trials
        }
        evaluate = sum(r["evaluate_s"] for r in mine)
        saved = sum(r["evaluate_saved_s"] for r in mine)
        out[method] = {
            "best_by_trials": best_by,
            "feasible_fraction": statistics.fmean(r["feasible_fraction"] for r in mine),
            "wall_s": statistics.fmean(r["wall_s"] for r in mine),
            "pruned_per_run": statistics.fmean(r["pruned"] for r in mine),
            "early_stop_saved_fraction": saved / max(evaluate + saved, 1e-9),
            "trials_to_90pct_hv": [_to_90(r["hv_trace"]) for r in mine],
            "final_hv": [r["hv_trace"][-1] if r["hv_trace"] else 0.0 for r in mine],
            "seeds": [r["job"]["seed"] for r in mine],
            "origins": mine[0]["origins"],
        }
    return out


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 8.5), squeeze=False)
    colours = {
        "uniform": "#7f7f7f",
        "random": "#bcbd22",
        "tpe": "#1f77b4",
        "nsga2": "#9467bd",
        "allocate": "#ff7f0e",
        "auto": "#d62728",
        "uniform+ft": "#555555",
        "auto+ft": "#8b0000",
    }
    for col, task in enumerate(tasks):
        data = results["tasks"][task]
        ax, hv = axes[0][col], axes[1][col]
        for method, runs in data["runs"].items():
            traces = [r["best_trace"] for r in runs]
            n = max(len(t) for t in traces)
            step = runs[0].get("trace_step", 1)  # traces kept in the JSON are thinned
            xs = [1 + i * step for i in range(n)]
            mean = []
            lows, highs = [], []
            for i in range(n):
                vals = [t[i] for t in traces if i < len(t) and t[i] is not None]
                mean.append(statistics.fmean(vals) if vals else float("nan"))
                lows.append(min(vals) if vals else float("nan"))
                highs.append(max(vals) if vals else float("nan"))
            c = colours.get(method, None)
            ax.plot(xs, mean, label=method, color=c)
            ax.fill_between(xs, lows, highs, color=c, alpha=0.15)
            curves = [r["hv_trace"] for r in runs]
            hv.plot(
                xs,
                [statistics.fmean(cv[i] for cv in curves) for i in range(n)],
                label=method,
                color=c,
            )
        ref = data["uniform_grid"]["best"]
        if ref:
            ax.axhline(
                ref["score"],
                color="black",
                ls="--",
                lw=1,
                label=f"best uniform policy ({ref['score']:.3f})",
            )
            ax.axhline(0.8 * ref["score"], color="black", ls=":", lw=1, label="0.8x best uniform")
        ax.set_title(f"{task}: best feasible MicroNet score (mean, band = seeds)")
        ax.set_xlabel("trials")
        ax.set_ylabel("score (dense = 2.0)")
        finite = [v for r in data["runs"].values() for run in r for v in run["best_trace"] if v]
        if finite:
            ax.set_ylim(min(finite) * 0.95, min(max(finite), 1.2) * 1.05)
        ax.legend(fontsize=8)
        hv.set_title(f"{task}: hypervolume of (score, perplexity), feasible trials")
        hv.set_xlabel("trials")
        hv.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one core each)")
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="also uniform vs auto with recovery fine-tuning (shakespeare)",
    )
    parser.add_argument("--finetune-steps", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    parser.add_argument("--workdir", default=None, help="where the stores go (default: temp)")
    parser.add_argument("--tag", default="", help="suffix of the run names in the stores")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="drop the tasks an existing --out file holds (default: keep them)",
    )
    args = parser.parse_args()
    os.environ.setdefault("MICROSWEEP_DATA", str(ROOT.parent / "shared" / "data"))
    sys.path.insert(0, str(ROOT))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="microsweep-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    results: dict = {"trials": args.trials, "seeds": args.seeds, "methods": methods, "tasks": {}}
    out = Path(args.out)
    if out.is_file() and not args.fresh:  # tasks measured by an earlier invocation stay
        earlier = json.loads(out.read_text())
        if (earlier.get("trials"), earlier.get("seeds")) == (args.trials, args.seeds):
            results["tasks"] = earlier.get("tasks", {})
    ctx = mp.get_context("spawn")
    for task in [t for t in args.tasks.split(",") if t]:
        space = str(ROOT / TASKS[task])
        storage = f"sqlite:///{workdir / (task + '.db')}"
        grid_file = workdir / f"{task}-uniform-grid.json"
        if grid_file.is_file():
            grid = json.loads(grid_file.read_text())
        else:
            print(f"[{task}] exhaustive uniform grids ...", flush=True)
            grids = []
            for levels in (10, 20):  # two rank grids: the reference is the better one
                with ctx.Pool(1) as pool:  # a fresh process: the same settings the runs get
                    grids.append(pool.apply(_uniform_grid, (space, levels)))
            grid = min(grids, key=lambda g: (g["best"] or {}).get("score", math.inf))
            grid["grids"] = [
                {k: v for k, v in g.items() if k != "best"}
                | {"best_score": (g["best"] or {}).get("score")}
                for g in grids
            ]
            grid_file.write_text(json.dumps(grid))
        print(f"[{task}] best uniform {grid['best']} ({grid['evaluated']} evaluated)", flush=True)
        sens = None
        if {"auto", "allocate"} & set(methods):
            print(f"[{task}] sensitivity pass ...", flush=True)
            with ctx.Pool(1) as pool:
                sens = pool.apply(_sensitivity, (space, storage))
            print(f"[{task}] sensitivity {sens}", flush=True)
        from microsweep.storage import Store

        Store(storage).optuna_storage()  # Optuna's tables exist before runs start side by side
        jobs = [
            {
                "space": space,
                "storage": storage,
                "method": m,
                "seed": s,
                "trials": args.trials,
                "name": f"{m}{args.tag}-{s}",
            }
            for s in range(args.seeds)
            for m in methods
        ]
        if args.finetune and task == "shakespeare":
            ft_path = workdir / "shakespeare_ft.py"
            ft_path.write_text(
                Path(space).read_text() + FINETUNE.format(steps=args.finetune_steps, lr=5e-4)
            )
            jobs += [  # the same store: fine-tuning changes no measurement of the table
                {
                    "space": str(ft_path),
                    "storage": storage,
                    "method": m,
                    "seed": 0,
                    "trials": args.trials,
                    "name": f"{m}+ft-0",
                    "label": f"{m}+ft",
                }
                for m in ("uniform", "auto")
            ]
        runs = []
        with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
            for res in pool.imap_unordered(_one_run, jobs):
                job = res["job"]
                print(
                    f"[{task}] {job['name']}: best {res['best_by_trials']} "
                    f"wall {res['wall_s']:.0f}s",
                    flush=True,
                )
                runs.append(res)
        for r in runs:
            r["job"]["method"] = r["job"].get("label", r["job"]["method"])
        by_method: dict[str, list] = {}
        for r in sorted(runs, key=lambda r: (r["job"]["method"], r["job"]["seed"])):
            by_method.setdefault(r["job"]["method"], []).append(r)
        results["tasks"][task] = {
            "space": TASKS[task],
            "dense_perplexity": grid["dense_perplexity"],
            "ceiling": grid["ceiling"],
            "uniform_grid": grid,
            "sensitivity": sens,
            "methods": _aggregate(runs, args.trials),
            "runs": {
                m: [
                    {k: v for k, v in r.items() if k != "job"} | {"seed": r["job"]["seed"]}
                    for r in rs
                ]
                for m, rs in by_method.items()
            },
        }
    _ratios(results, args.trials)
    out.parent.mkdir(parents=True, exist_ok=True)
    _plot(results, out.with_suffix(".png"))
    for task in results["tasks"].values():  # traces are in the plot; keep the JSON readable
        for runs in task["runs"].values():
            for r in runs:
                if r.get("trace_step", 1) == 1:
                    step = max(1, len(r["best_trace"]) // 50)
                    r["best_trace"] = r["best_trace"][::step]
                    r["hv_trace"] = r["hv_trace"][::step]
                    r["trace_step"] = step
    out.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps({k: v for k, v in results.items() if k.startswith("ratio")}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _ratios(results: dict, trials: int) -> None:
    """Top-level ratios at the full trial count, averaged over tasks that have them."""
    key = str(trials)
    to_uniform, to_random, per_task = [], [], {}
    for name, task in results["tasks"].items():
        methods = task["methods"]
        auto = methods.get("auto", {}).get("best_by_trials", {}).get(key, {}).get("mean")
        uniform = (task["uniform_grid"]["best"] or {}).get("score")
        random = methods.get("random", {}).get("best_by_trials", {}).get(key, {}).get("mean")
        entry = {}
        if auto and uniform:
            entry["auto_to_uniform"] = auto / uniform
            to_uniform.append(auto / uniform)
        if auto and random:
            entry["auto_to_random"] = auto / random
            to_random.append(auto / random)
        ft_auto = methods.get("auto+ft", {}).get("best_by_trials", {}).get(key, {}).get("mean")
        ft_uni = methods.get("uniform+ft", {}).get("best_by_trials", {}).get(key, {}).get("mean")
        if ft_auto and uniform:
            entry["auto_finetuned_to_uniform"] = ft_auto / uniform
        if ft_auto and ft_uni:
            entry["auto_finetuned_to_uniform_finetuned"] = ft_auto / ft_uni
        per_task[name] = entry
    results["ratio_auto_to_uniform"] = statistics.fmean(to_uniform) if to_uniform else None
    results["ratio_auto_to_random"] = statistics.fmean(to_random) if to_random else None
    results["ratios_by_task"] = per_task


if __name__ == "__main__":
    main()
