"""First contact: `make demo` on a fresh clone with an empty cache, quiet and beside busy processes.

Clones this repository's committed HEAD into a temporary folder (with ../shared beside it when
this checkout has one), points MICROSWEEP_CACHE at an empty folder, optionally starts N
`yes > /dev/null` processes (and stops exactly those), and times `make demo`. Phases are read
from the demo's own lines: pretraining, the sensitivity pass, planning, the trials. Results go
to benchmarks/results/demo_time.json.

    python benchmarks/demo_time.py                # quiet and with 2 busy processes
    python benchmarks/demo_time.py --busy 0       # one setting
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "demo_time.json"


def _clock(text: str) -> float:
    """'1:02:03' or '2:06' in seconds."""
    parts = [int(p) for p in text.split(":")]
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + p
    return float(seconds)


def phases(log: str) -> dict[str, float | None]:
    """The demo's own figures: pretraining time (its last progress line), sensitivity and
    planning seconds, start-up, trial time, dense perplexity and best feasible score."""

    def last(pattern: str) -> re.Match[str] | None:
        found = list(re.finditer(pattern, log, re.MULTILINE))
        return found[-1] if found else None

    pre = last(r"^pretrain \S+ \S+: step (\d+)/\1 .*?, ([\d:]+) elapsed")
    sens = last(r"^sensitivity: \d+ probes measured, \d+ reused \(([\d.]+)s\)")
    plan = last(r"^planning: .* in ([\d.]+)s")
    start = last(r"^start-up took ([\d:]+)")
    trials = last(r"^\[(\d+)/\1\] ([\d:]+) elapsed")
    dense = last(r"^dense model: perplexity ([\d.]+)")
    best = last(r"^best feasible: trial \d+ score ([\d.]+)")
    return {
        "pretrain_s": _clock(pre.group(2)) if pre else None,
        "sensitivity_s": float(sens.group(1)) if sens else None,
        "planning_s": float(plan.group(1)) if plan else None,
        "startup_s": _clock(start.group(1)) if start else None,
        "trials_s": _clock(trials.group(2)) if trials else None,
        "dense_perplexity": float(dense.group(1)) if dense else None,
        "best_feasible_score": float(best.group(1)) if best else None,
    }


def run(busy: int) -> dict[str, object]:
    """One `make demo` on a fresh clone and an empty cache beside `busy` busy processes."""
    work = Path(tempfile.mkdtemp(prefix="microsweep-demo-"))
    clone = work / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (work / "shared").symlink_to(shared, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MICROSWEEP_", "VIRTUAL_"))}
    env["MICROSWEEP_CACHE"] = str(work / "cache")
    hogs = [
        subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(busy)
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            ["make", "demo"], cwd=clone, env=env, capture_output=True, text=True, check=False
        )
        wall = time.perf_counter() - started
        # `make`'s tree alone: the busy processes are not reaped yet, so not counted here
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        for hog in hogs:  # exactly the processes started here
            hog.kill()
            hog.wait()
    log = proc.stdout + proc.stderr
    (work / "demo.log").write_text(log)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "busy_processes": busy,
        "exit": proc.returncode,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "log": str(work / "demo.log"),
        **phases(log),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, action="append", help="busy processes (repeatable)")
    args = parser.parse_args()
    results = [run(n) for n in (args.busy or [0, 2])]
    payload = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "runs": results,
    }
    OUT.write_text(json.dumps(payload, indent=2) + "\n")
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "log"}), file=sys.stdout)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
