"""Search quality: best feasible MicroNet score against trials for each sampler, side by side.

For each task (a space file) this measures the exhaustive reference, every uniform policy of the
space's levels (one setting for all layers), then runs each method for `--trials` trials with
`--seeds` seeds, in-process, two at a time. The sensitivity table is measured once per task into
the task's SQLite store (its cost reported apart); each run then gets its own copy of that store,
so it shares the table but builds its own data-aware levels (`<db>.levels/`): a run's wall time
includes its input statistics and level builds, and it reports how many levels it built. Per
task and method it reports the best feasible score after 25, 50, 100 and 200 trials (mean, min,
max over seeds), the feasible fraction, the hypervolume of (score, perplexity) against trials,
evaluation time saved by early stopping and wall time.

Results are labelled with the pruning/quantization methods the space ran with, read from the
stored sweeps (e.g. "magnitude/rtn", "sparsegpt/gptq"), and a new invocation adds its results
beside those already in --out: same task, label and method replaced, everything else kept.

    python benchmarks/quality.py                      # both tasks, 6 methods, 3 seeds, 200 trials
    python benchmarks/quality.py --tasks shakespeare --methods auto,uniform --seeds 1
    python benchmarks/quality.py --finetune           # also: uniform vs auto with fine-tuning
    python benchmarks/quality.py --tasks ptb --grid last --workdir /tmp/q   # resumable

With --seconds S every run has a time budget instead (its trial loop stops starting trials after
S seconds; --trials caps it) and measures its own sensitivity pass (no shared table), so
methods compare at equal wall time including every pre-pass: each run records when each trial
finished, counted from the start of the run (dense measurement, statistics, level builds and
sensitivity included), and how many whole evaluations it spent (a screened or early-stopped
trial counts by its share of the windows). Per task the comparison horizons are the budget S
(best feasible at S seconds from each run's start) and the least evaluation count any compared
run spent; `ratios` then holds auto_to_evopress and auto_to_uniform at equal wall time and at
equal evaluations. --budget-form adds the task "<task>@budget": the same space in the budget
form (MicroNet(score_budget=B), B the best uniform policy's score from the task's grid, or
--score-budget), compared by perplexity.

    python benchmarks/quality.py --tasks shakespeare,ptb,llama --seconds 120 --trials 4000 \
        --methods uniform,random,tpe,allocate,auto,evo,evopress --grid skip --budget-form

Writes benchmarks/results/quality.json, quality.md and quality.png.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "shakespeare": "examples/shakespeare.py",
    "ptb": "examples/ptb.py",
    "llama": "examples/llama.py",
}
METHODS = ("uniform", "random", "tpe", "nsga2", "allocate", "auto", "evo", "evopress")
BUDGET_METHODS = ("uniform", "tpe", "auto", "evopress")
"""The methods compared in the budget form (`allocate` has none; `auto` runs `evo` there)."""
BUDGET_FORM = """
objective = MicroNet(
    **{{
        **objective.to_json(),
        "score_budget": {budget!r},
        "perplexity_ceiling": None,
        "relative_to": None,
    }}
)
"""
"""The budget form of a task: least perplexity at a score of at most the budget, with no
perplexity ceiling (EvoPress's problem)."""
CHECKPOINTS = (25, 50, 100, 200)
LEGACY_LABEL = "magnitude/rtn"
"""The methods of results written before they carried a label: every knob then was plain."""

FINETUNE = """
from microsweep import Int, Float

space.hyper["finetune_steps"] = Int({steps}, {steps})
space.hyper["finetune_lr"] = Float({lr}, {lr})
"""


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def methods_label(space_json: dict) -> str:
    """ "pruning/quantization" methods of a stored space description (`Space.to_json`), e.g.
    "sparsegpt/gptq"; several methods in one space are joined by "+", "-" where none applies.

    A knob's description names its method only when it is not the plain one (magnitude, rtn),
    and input quantization (`act_bits`) always rounds to nearest, so it is left out."""
    prune: set[str] = set()
    quant: set[str] = set()
    for rule in space_json.get("rules", []):
        settings = rule.get("settings", {})
        if settings.get("sparsity", {}).get("knob") == "Sparsity":
            prune.add(settings["sparsity"].get("method", "magnitude"))
        if settings.get("bits", {}).get("knob") == "Bits":
            quant.add(settings["bits"].get("method", "rtn"))
    return f"{'+'.join(sorted(prune)) or '-'}/{'+'.join(sorted(quant)) or '-'}"


def _levels_built(storage: str) -> int:
    """Levels built into a SQLite store's level folder: lines of `<db>.levels/*/builds.log`."""
    from microsweep.storage import sqlite_path

    path = sqlite_path(storage)
    if path is None:
        return 0
    total = 0
    for log in path.with_name(path.name + ".levels").glob("*/builds.log"):
        with open(log, encoding="utf-8") as f:
            total += sum(1 for line in f if line.strip())
    return total


def _copy_store(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite store (WAL included) without its level folder."""
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    src, dst = sqlite3.connect(source), sqlite3.connect(partial)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    partial.rename(target)


def _one_run(job: dict) -> dict:
    """One method and seed: a sweep in-process into its own store, summarized from it."""
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
        return {**_summarize(job, None), "job": job}
    if exists:  # cut short earlier: finish it
        from microsweep.search import resume_sweep

        resume_sweep(
            job["name"],
            trials=job["trials"],
            storage=job["storage"],
            in_process=True,
            progress=False,
        )
        return {**_summarize(job, None), "job": job}
    started = time.perf_counter()
    finished: dict[int, float] = {}

    def on_trial(row: dict) -> None:  # seconds from the run's start, pre-passes included
        finished[row["number"]] = time.perf_counter() - started

    run_sweep(
        job["space"],
        name=job["name"],
        trials=job["trials"],
        storage=job["storage"],
        sampler=job["method"],
        seed=job["seed"],
        in_process=True,
        progress=False,
        timeout=job.get("seconds"),
        on_trial=on_trial,
    )
    return {**_summarize(job, time.perf_counter() - started, finished), "job": job}


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


def _shares(store, name: str, rows: list, n_windows: int | None) -> list[float]:  # noqa: ANN001
    """Each trial's evaluation cost in whole evaluations: a staged trial its own share of the
    windows, a trial stopped early the share it read (from its saved evaluation time), a
    failed one nothing."""
    import optuna

    study = optuna.load_study(study_name=name, storage=store.optuna_storage())
    attrs = {t.number: t.user_attrs for t in study.get_trials(deepcopy=False)}
    out = []
    for r in rows:
        stage = attrs.get(r.number, {}).get("stage")
        if r.state == "FAIL":
            out.append(0.0)
        elif stage and n_windows:
            start = stage.get("start", 0) if stage.get("continues") is not None else 0
            out.append((min(stage["read"], n_windows) - start) / n_windows)
        elif r.state == "PRUNED":
            ev, saved = r.timings.get("evaluate", 0.0), r.timings.get("evaluate_saved", 0.0)
            out.append(ev / (ev + saved) if ev + saved > 0 else 1.0)
        else:
            out.append(1.0)
    return out


def _n_windows(space: str) -> int | None:
    """Evaluation windows of a task's space (None when it evaluates itself)."""
    from microsweep.prepare import load_space_file, prepare

    sf = load_space_file(space)
    return None if sf.evaluate is not None else int(prepare(sf, 0).windows.shape[0])


def _summarize(job: dict, wall: float | None, finished: dict[int, float] | None = None) -> dict:
    from microsweep.storage import Store
    from microsweep.storage._records import best_by as ranks_by

    store = Store(job["storage"], must_exist=True)
    sweep = store.get_sweep(job["name"])
    rows = sorted(store.trials(job["name"]), key=lambda r: r.number)
    by = ranks_by(sweep.objective_json)
    shares = _shares(store, job["name"], rows, job.get("n_windows"))
    store.dispose()

    def value(r) -> float:  # noqa: ANN001
        return r.perplexity if by == "perplexity" else r.score

    best, spent, time_trace, eval_trace = math.inf, 0.0, [], []
    for r, share in zip(rows, shares, strict=True):
        if r.state == "COMPLETE" and r.feasible and value(r) < best:
            best = value(r)
        spent += share
        mark = best if math.isfinite(best) else None
        eval_trace.append([spent, mark])
        if finished is not None and r.number in finished:
            time_trace.append([finished[r.number], mark])
    wall_from_store = wall is None
    if wall is None:  # from the store: first row created to last trial finished
        wall = (max(r.finished_at for r in rows) - sweep.created_at).total_seconds()
    best_by, best = {}, math.inf
    trace = []
    for i, r in enumerate(rows, start=1):
        if r.state == "COMPLETE" and r.feasible and value(r) < best:
            best = value(r)
        trace.append(best if math.isfinite(best) else None)
        if i in CHECKPOINTS:
            best_by[str(i)] = best if math.isfinite(best) else None
    # the hypervolume's reference: the ceiling, or without one (the budget form) 1.1x dense
    ref = (sweep.dense_score, sweep.ceiling or 1.1 * sweep.dense_perplexity)
    evaluate = sum(r.timings.get("evaluate", 0.0) for r in rows)
    saved = sum(r.timings.get("evaluate_saved", 0.0) for r in rows)
    origins: dict[str, int] = {}
    for r in rows:
        origins[r.origin or "?"] = origins.get(r.origin or "?", 0) + 1
    return {
        "methods_label": methods_label(sweep.space_json),
        "best_by_trials": best_by,
        "best_trace": trace,
        "hv_trace": _hv_curve(rows, ref),
        "feasible_fraction": sum(1 for r in rows if r.state == "COMPLETE" and r.feasible)
        / max(len(rows), 1),
        "pruned": sum(1 for r in rows if r.state == "PRUNED"),
        "evaluate_s": evaluate,
        "evaluate_saved_s": saved,
        "wall_s": wall,
        "wall_from_store": wall_from_store,
        "levels_built": _levels_built(job["storage"]),
        "origins": origins,
        "dense_score": sweep.dense_score,
        "ceiling": sweep.ceiling,
        "dense_perplexity": sweep.dense_perplexity,
        "ranked_by": by,
        "trials_run": len(rows),
        "evaluations": spent,
        "time_trace": time_trace,
        "eval_trace": eval_trace,
    }


def _uniform_grid(space_path: str, rank_levels: int, storage: str) -> dict:
    """Every uniform policy of the space's levels, evaluated; the best feasible is the
    reference a per-layer search must beat. Data-aware levels are kept beside `storage`."""
    import torch

    _quiet()
    torch.set_num_threads(1)
    from microsweep.allocate import Planner
    from microsweep.prepare import (
        load_space_file,
        measure_dense,
        model_fingerprint,
        prepare,
        with_levels,
        with_stop_rule,
    )
    from microsweep.score import Baseline, CountConfig, micronet_score
    from microsweep.workers import TrialRunner

    started = time.perf_counter()
    sf = load_space_file(space_path)
    prepared = prepare(sf, 0)
    dense = measure_dense(sf, prepared)
    ceiling = sf.objective.bound(dense.perplexity).value
    baseline = Baseline(dense.params, dense.ops)
    prepared = with_stop_rule(sf, prepared, dense, ceiling)
    prepared = with_levels(sf, prepared, storage, model_fingerprint(sf.model))
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
        stats=prepared.stats,
        levels=prepared.levels,
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
        "methods_label": methods_label(sf.space.to_json()),
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
            "methods_label": mine[0]["methods_label"],
            "trials": trials,
            "best_by_trials": best_by,
            "feasible_fraction": statistics.fmean(r["feasible_fraction"] for r in mine),
            "wall_s": statistics.fmean(r["wall_s"] for r in mine),
            "wall_s_per_run": [r["wall_s"] for r in mine],
            "levels_built_per_run": [r["levels_built"] for r in mine],
            "pruned_per_run": statistics.fmean(r["pruned"] for r in mine),
            "early_stop_saved_fraction": saved / max(evaluate + saved, 1e-9),
            "trials_to_90pct_hv": [_to_90(r["hv_trace"]) for r in mine],
            "final_hv": [r["hv_trace"][-1] if r["hv_trace"] else 0.0 for r in mine],
            "seeds": [r["job"]["seed"] for r in mine],
            "origins": mine[0]["origins"],
        }
    return out


def _labelled(entry: dict) -> dict:
    """A task entry of the results file by methods label; an entry written before labels
    existed (methods and runs at the task's top level) becomes the "magnitude/rtn" one."""
    if "by_methods" in entry:
        return entry
    old = {k: v for k, v in entry.items() if k != "space"}
    for agg in old.get("methods", {}).values():
        agg.setdefault("methods_label", LEGACY_LABEL)
    for runs in old.get("runs", {}).values():
        for r in runs:
            r.setdefault("methods_label", LEGACY_LABEL)
    if old.get("uniform_grid"):
        old["uniform_grid"].setdefault("methods_label", LEGACY_LABEL)
    return {"space": entry.get("space"), "by_methods": {LEGACY_LABEL: old}}


def _merge(results: dict, task: str, label: str, part: dict) -> None:
    """Add one invocation's results of a task and label: methods measured now replace those
    of the same name, a measured grid replaces the stored one, the rest stays."""
    entry = results["tasks"].setdefault(task, {"space": TASKS[task], "by_methods": {}})
    mine = entry["by_methods"].setdefault(label, {"methods": {}, "runs": {}})
    for key in (
        "dense_perplexity", "ceiling", "uniform_grid", "sensitivity", "equal_budgets",
        "ranked_by", "score_budget",
    ):  # fmt: skip
        if part.get(key) is not None or (key == "ceiling" and "methods" in part):
            mine[key] = part.get(key)  # a form without a ceiling says so
    mine["methods"].update(part.get("methods", {}))
    mine["runs"].update(part.get("runs", {}))


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the plot is optional: pip install -e ".[bench]"
        print(f"matplotlib is not installed: {path} not drawn", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(3, len(tasks), figsize=(6.5 * len(tasks), 12.5), squeeze=False)
    colours = {
        "uniform": "#7f7f7f",
        "random": "#bcbd22",
        "tpe": "#1f77b4",
        "nsga2": "#9467bd",
        "allocate": "#ff7f0e",
        "auto": "#d62728",
        "uniform+ft": "#555555",
        "auto+ft": "#8b0000",
        "evo": "#2ca02c",
        "evopress": "#8c564b",
    }
    dashes = {LEGACY_LABEL: "--"}  # the plain methods dashed, data-aware ones solid
    for col, task in enumerate(tasks):
        variants = results["tasks"][task]["by_methods"]
        ax, hv, wall = axes[0][col], axes[1][col], axes[2][col]
        finite = []
        for label, data in variants.items():
            ls = dashes.get(label, "-")
            for method, runs in data["runs"].items():
                traces = [r["best_trace"] for r in runs]
                n = max(len(t) for t in traces)
                step = runs[0].get("trace_step", 1)  # traces kept in the JSON are thinned
                xs = [1 + i * step for i in range(n)]
                mean, lows, highs = [], [], []
                for i in range(n):
                    vals = [t[i] for t in traces if i < len(t) and t[i] is not None]
                    mean.append(statistics.fmean(vals) if vals else float("nan"))
                    lows.append(min(vals) if vals else float("nan"))
                    highs.append(max(vals) if vals else float("nan"))
                c = colours.get(method, None)
                name = f"{method} ({label})"
                ax.plot(xs, mean, label=name, color=c, ls=ls)
                ax.fill_between(xs, lows, highs, color=c, alpha=0.1)
                curves = [r["hv_trace"] for r in runs]
                hv.plot(
                    xs,
                    [statistics.fmean(cv[i] for cv in curves if i < len(cv)) for i in range(n)],
                    label=name,
                    color=c,
                    ls=ls,
                )
                finite += [v for t in traces for v in t if v]
                for k, r in enumerate(runs):  # best against seconds from the run's start
                    pts = [(x, b) for x, b in r.get("time_trace") or [] if b is not None]
                    if pts:
                        wall.step(
                            [x for x, _ in pts], [b for _, b in pts], where="post", color=c,
                            ls=ls, alpha=0.8, label=name if k == 0 else None,
                        )  # fmt: skip
            ref = (data.get("uniform_grid") or {}).get("best")
            if ref:
                ax.axhline(
                    ref["score"],
                    color="black",
                    ls=ls,
                    lw=1,
                    label=f"best uniform policy, {label} ({ref['score']:.3f})",
                )
        ranked = next(iter(variants.values()), {}).get("ranked_by", "score")
        if ranked == "perplexity":  # the budget form
            ax.set_title(f"{task}: best perplexity within the score budget (mean, band = seeds)")
            ax.set_ylabel("perplexity")
        else:
            ax.set_title(f"{task}: best feasible MicroNet score (mean, band = seeds)")
            ax.set_ylabel("score (dense = 2.0)")
        ax.set_xlabel("trials")
        if finite:
            top = min(max(finite), 1.2 if ranked == "score" else 1.1 * min(finite))
            ax.set_ylim(min(finite) * 0.97, top * 1.03)
        ax.legend(fontsize=7)
        hv.set_title(f"{task}: hypervolume of (score, perplexity), feasible trials")
        hv.set_xlabel("trials")
        hv.legend(fontsize=7)
        wall.set_title(f"{task}: best feasible {ranked} against wall seconds (every seed)")
        wall.set_xlabel("seconds from the run's start, pre-passes included")
        if finite:
            wall.set_ylim(min(finite) * 0.97, min(max(finite), 1.2 * min(finite)) * 1.03)
        wall.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _markdown(results: dict) -> str:
    """The results as tables: the best uniform policy and each method per task and label,
    then every run with its wall time and the levels it built."""
    head = "| task | method | methods | " + " | ".join(f"best @{c}" for c in CHECKPOINTS)
    lines = [
        "# Search quality",
        "",
        "Best feasible MicroNet score (mean [min, max] over seeds) after n trials; wall seconds",
        "and data-aware levels built are the mean per run (each run has its own level store).",
        "",
        head + " | feasible | wall s | levels built | seeds |",
        "|---" * (3 + len(CHECKPOINTS) + 4) + "|",
    ]
    per_run = [
        "",
        "## Runs",
        "",
        "| task | method | methods | seed | best @200 | wall s | levels built |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, entry in results["tasks"].items():
        for label, data in entry["by_methods"].items():
            grid = data.get("uniform_grid") or {}
            if grid:
                best = (grid.get("best") or {}).get("score")
                cells = " | ".join([_fmt(best)] + [""] * (len(CHECKPOINTS) - 1))
                lines.append(
                    f"| {task} | best uniform policy (exhaustive, {grid.get('evaluated')} "
                    f"of {grid.get('uniform_policies')}) | {label} | {cells} | | "
                    f"{_fmt(grid.get('seconds'), 0)} | | |"
                )
            for method, agg in data["methods"].items():
                cells = []
                for c in CHECKPOINTS:
                    st = agg["best_by_trials"].get(str(c)) or {}
                    cells.append(
                        f"{_fmt(st.get('mean'))} [{_fmt(st.get('min'))}, {_fmt(st.get('max'))}]"
                        if st.get("n")
                        else "-"
                    )
                levels = agg.get("levels_built_per_run")
                lines.append(
                    f"| {task} | {method} | {label} | {' | '.join(cells)} | "
                    f"{agg['feasible_fraction']:.0%} | {agg['wall_s']:.0f} | "
                    f"{_fmt(statistics.fmean(levels), 0) if levels else '-'} | "
                    f"{len(agg['seeds'])} |"
                )
            for method, runs in data["runs"].items():
                for r in runs:
                    levels = r.get("levels_built")
                    per_run.append(
                        f"| {task} | {method} | {label} | {r['seed']} | "
                        f"{_fmt(r['best_by_trials'].get('200'))} | {r['wall_s']:.0f} | "
                        f"{'-' if levels is None else levels} |"
                    )
    equal = [
        "",
        "## At equal budgets",
        "",
        "Best feasible value (score; perplexity in the budget form) at equal wall time (seconds",
        "from each run's start, every pre-pass included) and at equal whole evaluations (a",
        "screened or early-stopped trial counts by its share of the windows): mean [min, max]",
        "over seeds; `-` where a seed had no feasible trial by then.",
        "",
        "| task | method | ranked by | at equal wall (s) | at equal evaluations (n) | trials "
        "| evaluations | first trial s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, entry in results["tasks"].items():
        for data in entry["by_methods"].values():
            eb = data.get("equal_budgets") or {}
            for method, m in (eb.get("methods") or {}).items():

                def cell(st: dict) -> str:
                    missing = any(v is None for v in st.get("per_seed", []))
                    text = f"{_fmt(st.get('mean'))} [{_fmt(st.get('min'))}, {_fmt(st.get('max'))}]"
                    return text + (" (a seed had none)" if missing else "")

                first = [v for v in m["first_trial_s"] if v is not None]
                equal.append(
                    f"| {task} | {method} | {data.get('ranked_by', 'score')} | "
                    f"{cell(m['at_equal_wall'])} ({_fmt(eb.get('horizon_seconds'), 0)}) | "
                    f"{cell(m['at_equal_evaluations'])} ({_fmt(eb.get('horizon_evaluations'), 1)})"
                    f" | {statistics.fmean(m['trials_run']):.0f} | "
                    f"{statistics.fmean(m['evaluations']):.1f} | "
                    f"{_fmt(statistics.fmean(first), 1) if first else '-'} |"
                )
    return "\n".join(lines + per_run + equal) + "\n"


def _grid(task: str, space: str, workdir: Path, ctx) -> dict:  # noqa: ANN001
    """The task's exhaustive uniform reference (kept in `workdir` for a later invocation)."""
    grid_file = workdir / f"{task}-uniform-grid.json"
    if grid_file.is_file():
        return json.loads(grid_file.read_text())
    print(f"[{task}] exhaustive uniform grids ...", flush=True)
    storage = f"sqlite:///{workdir / (task + '-grid.db')}"  # the grids share their levels
    with ctx.Pool(2) as pool:  # two rank grids side by side: the reference is the better one
        grids = pool.starmap(_uniform_grid, [(space, levels, storage) for levels in (10, 20)])
    grid = dict(min(grids, key=lambda g: (g["best"] or {}).get("score", math.inf)))
    grid["grids"] = [
        {k: v for k, v in g.items() if k != "best"} | {"best_score": (g["best"] or {}).get("score")}
        for g in grids
    ]
    grid["levels_built"] = _levels_built(storage)  # both grids together: they share a folder
    grid_file.write_text(json.dumps(grid))
    print(f"[{task}] best uniform {grid['best']} ({grid['evaluated']} evaluated)", flush=True)
    return grid


def _runs(task: str, space: str, workdir: Path, methods: list[str], args, ctx) -> list[dict]:  # noqa: ANN001
    """Every (method, seed) run of a task, each in its own copy of the task's store."""
    with ctx.Pool(1) as pool:
        n_windows = pool.apply(_n_windows, (space,))
    task_db = workdir / (task.replace("@", "-") + ".db")
    storage = f"sqlite:///{task_db}"
    sens = None
    if {"auto", "allocate", "evo"} & set(methods) and not args.seconds:
        print(f"[{task}] sensitivity pass ...", flush=True)
        with ctx.Pool(1) as pool:
            sens = pool.apply(_sensitivity, (space, storage))
        print(f"[{task}] sensitivity {sens}", flush=True)
    from microsweep.storage import Store

    store = Store(storage)
    store.optuna_storage()  # Optuna's tables exist in every copy
    store.dispose()
    jobs = [
        {
            "space": space,
            "method": m,
            "seed": s,
            "trials": args.trials,
            "name": f"{m}{args.tag}-{s}",
            "seconds": args.seconds,
            "n_windows": n_windows,
        }
        for m in methods  # all seeds of the first method first
        for s in range(args.seeds)
    ]
    if args.finetune and task == "shakespeare":
        ft_path = workdir / "shakespeare_ft.py"
        ft_path.write_text(
            Path(space).read_text() + FINETUNE.format(steps=args.finetune_steps, lr=5e-4)
        )
        jobs += [
            {
                "space": str(ft_path),
                "method": m,
                "seed": 0,
                "trials": args.trials,
                "name": f"{m}+ft-0",
                "label": f"{m}+ft",
            }
            for m in ("uniform", "auto")
        ]
    for job in jobs:  # its own store: the table is shared, the level folder is not
        run_db = workdir / f"{task.replace('@', '-')}-{job['name']}.db"
        if not run_db.is_file():
            _copy_store(task_db, run_db)
        job["storage"] = f"sqlite:///{run_db}"
    runs = []
    with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
        for res in pool.imap_unordered(_one_run, jobs):
            job = res["job"]
            print(
                f"[{task}] {job['name']} ({res['methods_label']}): best {res['best_by_trials']} "
                f"wall {res['wall_s']:.0f}s levels built {res['levels_built']}",
                flush=True,
            )
            runs.append(res)
    for r in runs:
        r["job"]["method"] = r["job"].get("label", r["job"]["method"])
        r["sensitivity"] = sens
    return runs


def _best_at(trace: list, horizon: float) -> float | None:
    """The best feasible value of a [x, best] trace at x <= horizon."""
    got = [b for x, b in trace if x <= horizon + 1e-9 and b is not None]
    return got[-1] if got else None


def _equal_budgets(runs: list[dict], seconds: float | None) -> dict:
    """Each method's best feasible value at equal wall time (the time budget, counted from each
    run's start with every pre-pass in it) and at equal evaluations (the fewest any run spent),
    mean [min, max] over seeds."""
    out: dict = {"horizon_seconds": seconds, "horizon_evaluations": None, "methods": {}}
    if not runs:
        return out
    evals = min(r["evaluations"] for r in runs)
    out["horizon_evaluations"] = evals
    for method in sorted({r["job"]["method"] for r in runs}):
        mine = [r for r in runs if r["job"]["method"] == method]
        at_wall = [_best_at(r["time_trace"], seconds) for r in mine] if seconds else []
        at_evals = [_best_at(r["eval_trace"], evals) for r in mine]
        out["methods"][method] = {
            "at_equal_wall": _stats(at_wall) | {"per_seed": at_wall},
            "at_equal_evaluations": _stats(at_evals) | {"per_seed": at_evals},
            "feasible_every_seed": all(v is not None for v in (at_wall or at_evals)),
            "trials_run": [r["trials_run"] for r in mine],
            "evaluations": [r["evaluations"] for r in mine],
            "wall_s": [r["wall_s"] for r in mine],
            "first_trial_s": [r["time_trace"][0][0] if r["time_trace"] else None for r in mine],
        }
    return out


def _task_parts(runs: list[dict], trials: int, seconds: float | None = None) -> dict[str, dict]:
    """Runs grouped by methods label, aggregated per method."""
    parts: dict[str, dict] = {}
    for label in sorted({r["methods_label"] for r in runs}):
        mine = sorted(
            (r for r in runs if r["methods_label"] == label),
            key=lambda r: (r["job"]["method"], r["job"]["seed"]),
        )
        by_method: dict[str, list] = {}
        for r in mine:
            by_method.setdefault(r["job"]["method"], []).append(r)
        parts[label] = {
            "dense_perplexity": mine[0]["dense_perplexity"],
            "ceiling": mine[0]["ceiling"],
            "sensitivity": mine[0]["sensitivity"],
            "methods": _aggregate(mine, trials),
            "equal_budgets": _equal_budgets(mine, seconds),
            "ranked_by": mine[0].get("ranked_by", "score"),
            "runs": {
                m: [
                    {k: v for k, v in r.items() if k not in ("job", "sensitivity")}
                    | {"seed": r["job"]["seed"]}
                    for r in rs
                ]
                for m, rs in by_method.items()
            },
        }
    return parts


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
    parser.add_argument(
        "--workdir", default=None, help="where the stores go (default: temp); reuse to resume"
    )
    parser.add_argument("--tag", default="", help="suffix of the run names in the stores")
    parser.add_argument(
        "--grid",
        choices=("first", "last", "skip"),
        default="first",
        help="the exhaustive uniform reference before the runs, after them, or not at all",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="each run's time budget (its loop starts no trial after it); --trials caps it",
    )
    parser.add_argument(
        "--budget-form",
        action="store_true",
        help="also each task in the budget form, at the best uniform policy's score",
    )
    parser.add_argument("--score-budget", type=float, default=None)
    parser.add_argument(
        "--budget-only", action="store_true", help="with --budget-form: only the budget form"
    )
    parser.add_argument(
        "--budget-tasks", default="shakespeare", help="the tasks --budget-form adds a form of"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="drop the results an existing --out file holds (default: add to them)",
    )
    args = parser.parse_args()
    os.environ.setdefault("MICROSWEEP_DATA", str(ROOT.parent / "shared" / "data"))
    sys.path.insert(0, str(ROOT))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="microsweep-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    results: dict = {"tasks": {}}
    out = Path(args.out)
    if out.is_file() and not args.fresh:  # results of earlier invocations stay
        earlier = json.loads(out.read_text())
        results["tasks"] = {t: _labelled(e) for t, e in earlier.get("tasks", {}).items()}
    ctx = mp.get_context("spawn")
    for task in [t for t in args.tasks.split(",") if t]:
        space = str(ROOT / TASKS[task])
        grid = _grid(task, space, workdir, ctx) if args.grid == "first" else None
        ceiling_form = methods and not args.budget_only
        runs = _runs(task, space, workdir, methods, args, ctx) if ceiling_form else []
        if args.grid == "last":
            grid = _grid(task, space, workdir, ctx)
        parts = _task_parts(runs, args.trials, args.seconds)
        if grid is not None:
            part = parts.setdefault(grid["methods_label"], {})
            part.update(
                uniform_grid=grid,
                dense_perplexity=grid["dense_perplexity"],
                ceiling=grid["ceiling"],
            )
        for label, part in parts.items():
            _merge(results, task, label, part)
        if args.budget_form and task in args.budget_tasks.split(","):
            budget = args.score_budget or _uniform_best(results, task, grid)
            if budget is None:
                sys.exit(f"{task}: no best uniform score for the budget form; pass --score-budget")
            btask = f"{task}@budget"
            bspace = workdir / f"{task}_budget.py"
            bspace.write_text(Path(space).read_text() + BUDGET_FORM.format(budget=budget))
            TASKS[btask] = str(bspace)
            bmethods = [m for m in methods if m in BUDGET_METHODS]
            bruns = _runs(btask, str(bspace), workdir, bmethods, args, ctx)
            for label, part in _task_parts(bruns, args.trials, args.seconds).items():
                _merge(results, btask, label, part | {"score_budget": budget})
    _ratios(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    _plot(results, out.with_suffix(".png"))
    for entry in results["tasks"].values():  # traces are in the plot; keep the JSON readable
        for data in entry["by_methods"].values():
            for runs in data["runs"].values():
                for r in runs:
                    if r.get("trace_step", 1) == 1:
                        step = max(1, len(r["best_trace"]) // 50)
                        r["best_trace"] = r["best_trace"][::step]
                        r["hv_trace"] = r["hv_trace"][::step]
                        r["trace_step"] = step
                    for key in ("time_trace", "eval_trace"):  # where the best changed, and the end
                        trace = r.get(key) or []
                        r[key] = [
                            pt
                            for i, pt in enumerate(trace)
                            if i in (0, len(trace) - 1) or pt[1] != trace[i - 1][1]
                        ]
    out.write_text(json.dumps(results, indent=1, default=str))
    out.with_suffix(".md").write_text(_markdown(results))
    print(json.dumps(results["ratios"], indent=1))
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")


def _uniform_best(results: dict, task: str, grid: dict | None) -> float | None:
    """The best uniform policy's score: the exhaustive grid's (this run's or a stored one),
    else the uniform sampler's best at equal wall time."""
    if grid and grid.get("best"):
        return grid["best"]["score"]
    for data in results["tasks"].get(task, {}).get("by_methods", {}).values():
        best = ((data.get("uniform_grid") or {}).get("best") or {}).get("score")
        if best is not None:
            return best
    for data in results["tasks"].get(task, {}).get("by_methods", {}).values():
        uni = (data.get("equal_budgets") or {}).get("methods", {}).get("uniform")
        if uni and uni["at_equal_wall"]["min"] is not None:
            return uni["at_equal_wall"]["min"]
    return None


def _ratios(results: dict) -> None:
    """Ratios at each label's full trial count, per task and label."""
    ratios: dict[str, dict] = {}
    for name, entry in results["tasks"].items():
        for label, data in entry["by_methods"].items():
            methods = data.get("methods", {})

            def final(method: str, methods: dict = methods) -> float | None:
                agg = methods.get(method, {})
                key = str(agg.get("trials", 200))
                return agg.get("best_by_trials", {}).get(key, {}).get("mean")

            auto, random = final("auto"), final("random")
            uniform = ((data.get("uniform_grid") or {}).get("best") or {}).get("score")
            ft_auto, ft_uni = final("auto+ft"), final("uniform+ft")
            entry_ratios = {}
            if auto and uniform:
                entry_ratios["auto_to_uniform"] = auto / uniform
            if auto and random:
                entry_ratios["auto_to_random"] = auto / random
            if ft_auto and uniform:
                entry_ratios["auto_finetuned_to_uniform"] = ft_auto / uniform
            if ft_auto and ft_uni:
                entry_ratios["auto_finetuned_to_uniform_finetuned"] = ft_auto / ft_uni
            equal = (data.get("equal_budgets") or {}).get("methods", {})
            for budget in ("at_equal_wall", "at_equal_evaluations"):

                def mean(method: str, budget: str = budget, equal: dict = equal) -> float | None:
                    return ((equal.get(method) or {}).get(budget) or {}).get("mean")

                a = mean("auto")
                for other in ("evopress", "uniform", "evo", "tpe", "random", "allocate"):
                    if a is not None and mean(other):
                        entry_ratios[f"auto_to_{other}_{budget}"] = a / mean(other)
                if a is not None and uniform and data.get("ranked_by", "score") == "score":
                    entry_ratios[f"auto_{budget}_to_best_uniform_policy"] = a / uniform
            if equal:
                entry_ratios["auto_feasible_every_seed"] = (equal.get("auto") or {}).get(
                    "feasible_every_seed"
                )
            ratios.setdefault(name, {})[label] = entry_ratios
    results["ratios"] = ratios


if __name__ == "__main__":
    main()
