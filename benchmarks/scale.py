"""What a sweep costs as the model grows: GPT-style models from 0.4M to GPT-2 small's 124M.

    python benchmarks/scale.py                        # every size on the CPU, 2 workers
    python benchmarks/scale.py --sizes 0.4M,3M --device cuda --out /tmp/scale_gpu.json

Random weights (time and memory do not depend on training), 4,096 evaluation tokens in windows of
128, the demo's knobs (`examples/shakespeare.py`). Each size runs in its own process, so its peak
RSS is its own; in that process, one thread:

- `dense_eval_s`: one evaluation of the dense model on the windows;
- `trial_cold` / `trial_warm`: a trial runner's first and second run of one policy, in dense
  evaluations (the second reuses the runner's cache), and the cache's hit rate on the second;
- `peak_rss_mib` over those trials (the peak restarts after the driver's statistics pass, which a
  worker does not run; the runner gets the statistics a Ray worker gets), and `model_rss_mib`, the
  peak less the process's RSS before the model was built (Python, torch and the imports), against
  3x the model's fp32 bytes plus one batch of logits;
- `export_s` and `bytes_ratio`: the policy saved as an artifact, payload over the count;
- `first_result_s`: a real `auto` sweep of `--trials` on `--workers` Ray workers, from
  `run_sweep` until its first trial's result (the opening trial, run while the planner works),
  also in dense evaluations (`first_trial_dense_evals`); `first_trial_s` until start-up ends and
  the planned trials begin (the sweep's own start-up line, `startup_dense_evals`), with the
  planner's and the sensitivity pass's seconds read from its lines.

Writes benchmarks/results/scale.json (machine-readable, with the targets checked) and prints a
table.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES: dict[str, dict[str, int]] = {
    "0.4M": {"n_layer": 2, "n_head": 4, "n_embd": 128, "vocab": 65},
    "3M": {"n_layer": 4, "n_head": 4, "n_embd": 256, "vocab": 65},
    "19M": {"n_layer": 6, "n_head": 8, "n_embd": 512, "vocab": 65},
    "85M": {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab": 65},
    "124M": {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab": 50257},
}
BLOCK = 128
EVAL_TOKENS = 4096
TARGETS = {"warm_over_dense": 1.1, "first_trial_dense_evals": 20.0, "rss_over_bound": 1.0}


class _Timestamped(io.TextIOBase):
    """stderr that also keeps each line with the seconds since `start` it was written at."""

    def __init__(self, stream: Any, start: float) -> None:
        self.stream, self.start, self.lines = stream, start, []
        self._partial = ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        self._partial += text
        *done, self._partial = self._partial.split("\n")
        now = time.perf_counter() - self.start
        self.lines.extend((now, line) for line in done)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _corpus(vocab: int) -> Any:
    """Tiny Shakespeare for a character vocabulary; random ids for GPT-2's 50,257."""
    import torch

    from microsweep import data
    from microsweep.data import Corpus

    if vocab == 65:
        return data.tiny_shakespeare()
    gen = torch.Generator().manual_seed(0)
    return Corpus(
        name=f"random-{vocab}",
        vocab=[f"w{i}" for i in range(vocab)],
        train=torch.randint(vocab, (200_000,), generator=gen),
        val=torch.randint(vocab, (40_000,), generator=gen),
        level="word",
        fingerprint=f"random-{vocab}-0",
    )


def _task(size: str) -> tuple[Any, Any, Any, Any]:
    """The model (random weights), the demo's space over it, its objective and corpus."""
    import torch

    from microsweep import Bits, MicroNet, Rank, Space, Sparsity
    from microsweep.models.gpt import GPT, GPTConfig

    shape = SIZES[size]
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=shape["vocab"],
        block_size=BLOCK,
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
    )
    model = GPT(config).eval()
    space = Space(
        model,
        rules={
            "blocks.*.attn.*": dict(
                sparsity=Sparsity(0.0, 0.5, step=0.05), bits=Bits(4, 6, 8), act_bits=Bits(8, 16)
            ),
            "blocks.*.mlp.*": dict(
                sparsity=Sparsity(0.0, 0.5, step=0.05),
                bits=Bits(3, 4, 6, 8),
                act_bits=Bits(8, 16),
                rank=Rank(0.25, 1.0),
            ),
            "head": dict(bits=Bits(4, 6, 8), act_bits=Bits(8, 16)),
        },
    )
    objective = MicroNet(
        perplexity_ceiling=1.05, relative_to="dense", baseline="dense", eval_tokens=EVAL_TOKENS
    )
    return model, space, objective, _corpus(shape["vocab"])


def _policy(space: Any) -> Any:
    """One policy of the space, drawn with a fixed seed (every knob at some level)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    return space.suggest(study.ask())


def _peak_rss_mib() -> float:
    """The process's peak RSS in MiB since start or the last `_reset_peak_rss` (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    """Start the peak over from the current RSS (Linux), so the trials' peak is theirs and not
    the driver's statistics pass run before them in this process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _runner_phase(size: str, workdir: Path, workers: int) -> dict[str, Any]:
    """Dense evaluation, a cold and a warm trial of one policy, peak RSS, and its export."""
    import optuna  # noqa: F401  (imported before the baseline RSS, as every import above)
    import torch

    from microsweep.compress import compress
    from microsweep.export import save
    from microsweep.prepare import model_fingerprint, prepare, space_from_objects, with_levels
    from microsweep.score import batch_for_memory, count, perplexity
    from microsweep.search._workers import WorkerOptions, cache_settings, shipped_stats
    from microsweep.workers import TrialRunner

    torch.set_num_threads(1)
    base_rss = _peak_rss_mib()  # Python, torch, imports
    model, space, objective, corpus = _task(size)
    sf = space_from_objects(space, objective=objective, corpus=corpus)
    prepared = prepare(sf, 0)
    windows, settings = prepared.windows, prepared.settings
    params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"size": size, "params": params, "windows": list(windows.shape)}
    perplexity(model, windows[:1], batch_size=1)  # first-call allocations, not the model's time
    start = time.perf_counter()
    perplexity(model, windows, batch_size=settings.batch_size)
    out["dense_eval_s"] = dense = time.perf_counter() - start
    start = time.perf_counter()
    prepared = with_levels(sf, prepared, f"sqlite:///{workdir}/levels.db", model_fingerprint(model))
    out["statistics_s"] = time.perf_counter() - start
    # one of the sweep's `workers` runners, with the settings and statistics a sweep gives it
    options = WorkerOptions(workers=workers)
    worker_settings = cache_settings(settings, options, sf)
    shipped = shipped_stats(prepared, options)
    prepared = replace(prepared, stats=None)  # the driver's copy: not the worker's memory
    gc.collect()
    _reset_peak_rss()
    runner = TrialRunner(
        sf.model,
        prepared.windows,
        worker_settings,
        calib=prepared.calib,
        threads=1,
        stats=shipped,
        levels=prepared.levels,
    )
    policy = _policy(space)
    payload = policy.to_json()
    cache = runner._cache
    runs = []
    for number in (1, 2):
        hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
        start = time.perf_counter()
        result = runner.run(number, payload, early_stop=False)
        wall = time.perf_counter() - start
        if result.status != "ok":
            raise SystemExit(f"{size}: the trial failed: {result.error}")
        looked = (cache.hits - hits) + (cache.misses - misses) if cache is not None else 0
        runs.append(
            {
                "wall_s": wall,
                "timings": result.timings,
                "perplexity": result.perplexity,
                "cache_hit_rate": (cache.hits - hits) / looked if looked else None,
            }
        )
    out["trial_cold"] = runs[0]["wall_s"] / dense
    out["trial_warm"] = runs[1]["wall_s"] / dense
    out["cache_hit_rate_warm"] = runs[1]["cache_hit_rate"]
    out["cache_mb"] = cache.max_bytes / 2**20 if cache is not None else 0
    out["cache_bytes"] = cache.nbytes if cache is not None else 0
    out["runs"] = runs
    out["peak_rss_mib"] = _peak_rss_mib()
    out["runtime_rss_mib"] = base_rss
    out["model_rss_mib"] = out["peak_rss_mib"] - base_rss  # what the model's work added
    out["eval_batch"] = batch = settings.batch_size or batch_for_memory(model, windows)
    logits = min(batch, windows.shape[0]) * (windows.shape[1] - 1) * SIZES[size]["vocab"] * 4
    out["rss_bound_mib"] = (3 * params * 4 + logits) / 2**20
    del runner
    start = time.perf_counter()
    compressed = compress(model, policy, calib=prepared.calib)
    out["compress_s"] = time.perf_counter() - start
    start = time.perf_counter()
    info = save(compressed, workdir / "model.msz", policy=policy, recipe=model.recipe())
    out["export_s"] = time.perf_counter() - start
    out["bytes_ratio"] = info.ratio
    out["counted_params"] = count(compressed, context=settings.context).params
    return out


def _sweep_phase(size: str, workdir: Path, trials: int, workers: int) -> dict[str, Any]:
    """A real `auto` sweep until its first trial is dispatched: the start-up, from its lines."""
    from microsweep.search import run_sweep

    _, space, objective, corpus = _task(size)
    start = time.perf_counter()
    tee = _Timestamped(sys.stderr, start)
    first: list[float] = []

    class _Enough(Exception):
        pass

    def on_trial(record: dict[str, Any]) -> None:
        first.append(time.perf_counter() - start)
        if any(line.startswith("start-up took") for _, line in tee.lines):
            raise _Enough  # the first planned trial: start-up is over

    real, sys.stderr = sys.stderr, tee
    try:
        run_sweep(
            space,
            name=f"scale-{size}",
            trials=trials,
            sampler="auto",
            seed=0,
            objective=objective,
            corpus=corpus,
            workers=workers,
            storage=f"sqlite:///{workdir}/sweep.db",
            progress=True,
            on_trial=on_trial,
        )
    except _Enough:
        pass
    finally:
        sys.stderr = real
    # the first result is the opening trial's (run while the planner works); the planned
    # trials begin after "start-up took"
    out: dict[str, Any] = {
        "first_result_s": first[0] if first else None,
        "first_planned_result_s": first[-1] if len(first) > 1 else None,
    }
    for when, line in tee.lines:
        if line.startswith("start-up took"):
            out["first_trial_s"] = when
        elif line.startswith("workers ready after"):
            found = re.search(r"after ([0-9.]+)s", line)
            out["workers_start_s"] = float(found.group(1)) if found else None
        elif line.startswith("planning:"):
            found = re.search(r"in ([0-9.]+)\s*s", line)
            out["planner_s"] = float(found.group(1)) if found else None
            out["planner_line"] = line
        elif line.startswith("sensitivity"):
            out["sensitivity_line"] = line
            out["sensitivity_done_s"] = when
    out["lines"] = [[round(w, 2), line] for w, line in tee.lines[:40]]
    return out


def one(size: str, trials: int, workers: int, sweep: bool) -> dict[str, Any]:
    """Every measurement of one size (run in its own process by `main`)."""
    os.environ.setdefault("MICROSWEEP_DATA", str(ROOT.parent / "shared" / "data"))
    import warnings

    from microsweep.errors import SpaceWarning

    warnings.filterwarnings("ignore", category=SpaceWarning)  # the demo's ranges, said once
    with tempfile.TemporaryDirectory() as tmp:
        out = _runner_phase(size, Path(tmp), workers)
        if sweep:
            out.update(_sweep_phase(size, Path(tmp), trials, workers))
    dense = out["dense_eval_s"]
    if out.get("first_result_s") is not None:  # from `run` to the first trial's result
        out["first_trial_dense_evals"] = out["first_result_s"] / dense
        if out.get("workers_start_s") is not None:  # Ray's start is a constant, not the model's
            out["first_trial_dense_evals_past_workers"] = (
                out["first_result_s"] - out["workers_start_s"]
            ) / dense
    if out.get("first_trial_s") is not None:  # start-up over: the planned trials begin
        out["startup_dense_evals"] = out["first_trial_s"] / dense
    if out.get("planner_s") is not None:
        out["planner_dense_evals"] = out["planner_s"] / dense
    out["checks"] = {
        "warm_over_dense": out["trial_warm"] <= TARGETS["warm_over_dense"],
        "rss_within_bound": out["model_rss_mib"] <= out["rss_bound_mib"],
        "bytes_ratio_1": abs(out["bytes_ratio"] - 1.0) <= 0.02,
    }
    if "first_trial_dense_evals" in out:
        out["checks"]["first_trial_within_20"] = (
            out["first_trial_dense_evals"] <= TARGETS["first_trial_dense_evals"]
        )
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "size     params   dense s  cold  warm  hit   first trial  start-up  planner  "
        "RSS MiB: added (bound)  export s  bytes"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['size']:<8} failed: {r['error']}")
            continue
        first = r.get("first_trial_dense_evals")
        startup = r.get("startup_dense_evals")
        planner = r.get("planner_dense_evals")
        hit = r.get("cache_hit_rate_warm")
        lines.append(
            f"{r['size']:<8} {r['params'] / 1e6:>6.1f}M {r['dense_eval_s']:>8.2f} "
            f"{r['trial_cold']:>5.2f} {r['trial_warm']:>5.2f} "
            f"{(f'{hit:.0%}' if hit is not None else '-'):>4} "
            f"{(f'{first:.1f}' if first is not None else '-'):>12} "
            f"{(f'{startup:.1f}' if startup is not None else '-'):>9} "
            f"{(f'{planner:.1f}' if planner is not None else '-'):>8} "
            f"{r['peak_rss_mib']:>7.0f}: {r['model_rss_mib']:>5.0f} ({r['rss_bound_mib']:>6.0f}) "
            f"{r['export_s']:>9.2f} {r['bytes_ratio']:>6.4f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default=",".join(SIZES), help="comma-separated: " + ", ".join(SIZES)
    )
    parser.add_argument("--trials", type=int, default=200, help="the sweep's trial budget")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--no-sweep", action="store_true", help="skip the time-to-first-trial sweep"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one size, JSON out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.trials, args.workers, not args.no_sweep)))
        return
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"--sizes: {', '.join(unknown)} not among {', '.join(SIZES)}")
    rows = []
    for size in sizes:
        cmd = [sys.executable, __file__, "--one", size, "--trials", str(args.trials)]
        cmd += ["--workers", str(args.workers)] + (["--no-sweep"] if args.no_sweep else [])
        started = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            rows.append({"size": size, "error": f"exit {proc.returncode}"})
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["process_s"] = time.perf_counter() - started
            rows.append(row)
        print(_table(rows[-1:]), file=sys.stderr)
    result = {
        "eval_tokens": EVAL_TOKENS,
        "window": BLOCK,
        "threads_per_process": 1,
        "workers": args.workers,
        "trials": args.trials,
        "targets": TARGETS,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(_table(rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
