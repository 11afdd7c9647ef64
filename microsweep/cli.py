"""The `microsweep` command line: run, resume, status and plot over one storage URL.

Bad input ends with a one-line ``microsweep: error: ...`` message and exit status 2, never a
traceback; stored data is left as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from microsweep._text import digits_apart, distinct
from microsweep.errors import MicrosweepError, UsageError

__all__ = ["main"]

SAMPLER_NAMES = (
    "auto", "allocate", "evo", "evopress", "tpe", "nsga2", "gp", "cmaes", "random", "uniform",
)  # fmt: skip
"""The same names as `microsweep.search.SAMPLERS` (kept here so `-h` imports nothing heavy)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like our own errors
        words = self.prog.split()
        where = "microsweep" if len(words) == 1 else f"microsweep {words[-1]}"
        self.exit(2, f"microsweep: error: {message} (see '{where} -h')\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    from microsweep._version import __version__

    p = _Parser(prog="microsweep", description="Compression-policy search for language models.")
    p.add_argument("--version", action="version", version=f"microsweep {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    formats = ("table", "csv", "json")
    storage_help = "database URL (default: $MICROSWEEP_STORAGE, else sqlite:///microsweep.db)"
    wait_help = "seconds to keep retrying while the database is unreachable (default 60)"

    run = sub.add_parser("run", help="start a sweep over a space file")
    run.add_argument("space", help="Python file defining `space` (and `objective`, `corpus`)")
    run.add_argument("--name", required=True, help="sweep name, unique in the storage")
    run.add_argument("--trials", type=_positive, default=30, help="trials to run (default 30)")
    run.add_argument("--workers", type=_positive, default=1, help="parallel Ray workers")
    run.add_argument("--storage", help=storage_help)
    run.add_argument(
        "--sampler",
        choices=SAMPLER_NAMES,
        default="auto",
        help="auto (default): sensitivity pass, warm starts, then TPE over a few global "
        "quantities mapped through budget allocation; allocate; evo (auto's start, then "
        "evolution of the best feasible policy with staged selection); evopress (EvoPress's "
        "search, a baseline); uniform; or Optuna's "
        "per-layer tpe, nsga2, gp, cmaes, random",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampler and trial seed; the same seed repeats a sweep with --in-process or one "
        "worker, not with several (their results arrive in a different order each run)",
    )
    run.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    run.add_argument(
        "--in-process", action="store_true", help="no Ray: run trials here, one by one"
    )
    _resource_flags(run)
    run.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        help="time budget in seconds: no new "
        "trial starts after it; running ones finish and 'resume' continues",
    )
    run.add_argument(
        "--warm-start",
        action="append",
        default=[],
        metavar="POLICY.json",
        help="run this policy first (a file 'microsweep show --json' writes); repeatable",
    )
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.add_argument("--storage-wait", type=_positive, default=60, help=wait_help)
    _cache_flag(run)

    resume = sub.add_parser("resume", help="continue a stopped sweep")
    resume.add_argument("--name", required=True)
    resume.add_argument(
        "--trials",
        type=_positive,
        default=None,
        help="finished trials wanted in total (default: the sweep's target)",
    )
    resume.add_argument("--workers", type=_positive, default=1)
    resume.add_argument("--storage", help=storage_help)
    resume.add_argument("--address", default=None)
    resume.add_argument("--in-process", action="store_true")
    _resource_flags(resume)
    resume.add_argument("--timeout", type=_positive_float, default=None, help="time budget (s)")
    resume.add_argument("--quiet", action="store_true")
    resume.add_argument("--storage-wait", type=_positive, default=60, help=wait_help)
    _cache_flag(resume)

    for command, default in (("report", "report.html"), ("plot", "pareto.html")):
        page = sub.add_parser(
            command,
            help="write the sweep report (Pareto front, per-layer view, history, importances) "
            "as one self-contained HTML page"
            + ("; an alias of 'report'" if command == "plot" else ""),
        )
        page.add_argument("--name", required=True)
        page.add_argument("--storage", help=storage_help)
        page.add_argument("-o", "--output", default=default, help=f"(default {default})")

    dash = sub.add_parser(
        "dashboard",
        help="serve optuna-dashboard over the store, with the best feasible trial shown as best",
    )
    dash.add_argument("--storage", help=storage_help)
    dash.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    dash.add_argument("--port", type=int, default=8080, help="port (default 8080)")

    status = sub.add_parser("status", help="trial counts, the dense baseline and the best trials")
    status.add_argument("--name", required=True)
    status.add_argument("--storage", help=storage_help)
    status.add_argument("--top", type=_positive, default=5)
    status.add_argument("--format", choices=("text", "json"), default="text")
    status.add_argument(
        "--legend", action="store_true", help="explain the policy notation of the table"
    )

    sens = sub.add_parser(
        "sensitivity",
        help="measure each layer alone at each level of each knob, store and plot it",
    )
    sens.add_argument("space", help="Python file defining `space` (and `objective`, `corpus`)")
    sens.add_argument("--name", required=True, help="label of the measurements")
    sens.add_argument("--storage", help=storage_help)
    sens.add_argument("--workers", type=_positive, default=1, help="parallel Ray workers")
    sens.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    sens.add_argument("--in-process", action="store_true", help="no Ray: measure here")
    _resource_flags(sens)
    sens.add_argument("-o", "--output", default=None, help="plot (default: NAME-sensitivity.html)")
    sens.add_argument("--quiet", action="store_true", help="no progress lines")

    upgrade = sub.add_parser("upgrade", help="bring a database's tables to this release's schema")
    upgrade.add_argument("--storage", help=storage_help)

    count = sub.add_parser("count", help="per-layer MicroNet table for the dense model or a policy")
    count.add_argument("space", help="the space file whose model is counted")
    count.add_argument("--policy", default=None, help="policy JSON file (default: dense model)")

    ls = sub.add_parser("ls", help="the sweeps in a storage: trials, state, best feasible")
    ls.add_argument("--storage", help=storage_help)
    ls.add_argument("--format", choices=formats, default="table")

    trials = sub.add_parser("trials", help="a sweep's finished trials as a table, CSV or JSON")
    trials.add_argument("--name", required=True)
    trials.add_argument("--storage", help=storage_help)
    trials.add_argument("--state", choices=("COMPLETE", "PRUNED", "FAIL"), default=None)
    pick = trials.add_mutually_exclusive_group()
    pick.add_argument("--feasible", action="store_true", help="only trials under the ceiling")
    pick.add_argument("--infeasible", action="store_true", help="only trials over it")
    trials.add_argument("--format", choices=formats, default="table")

    show = sub.add_parser("show", help="one trial: full policy and per-layer counts")
    show.add_argument("--name", required=True)
    show.add_argument("--trial", type=int, required=True)
    show.add_argument("--storage", help=storage_help)
    show.add_argument("--format", choices=formats, default="table")
    show.add_argument(
        "--json",
        dest="policy_out",
        default=None,
        help="also write the policy to this file (what 'count --policy' and 'run --warm-start' "
        "read)",
    )

    export = sub.add_parser("export", help="write a trial's compressed model as a .msz file")
    export.add_argument("--name", required=True)
    export.add_argument("--trial", type=int, required=True, help="trial number")
    export.add_argument("--storage", help=storage_help)
    export.add_argument("-o", "--output", default="model.msz")
    return p


def _next_steps(result: object, storage: str | None) -> None:
    """The commands that read what a run or resume just stored, with its real store and best
    trial, so they work as printed."""
    import shlex

    from microsweep.search import SweepResult

    assert isinstance(result, SweepResult)
    where = f" --name {shlex.quote(result.name)}"
    if storage:
        where += f" --storage {shlex.quote(storage)}"
    print("next:")
    print(f"  microsweep status{where}")
    print(f"  microsweep report{where} -o {shlex.quote(result.name + '-report.html')}")
    if result.best_number is not None:
        print(f"  microsweep show{where} --trial {result.best_number}")
        print(f"  microsweep export{where} --trial {result.best_number} -o best.msz")


def _print_result(result: object, storage: str | None) -> None:
    """The closing lines of `run` and `resume`: trials by state, the best feasible trial (or,
    without one, the nearest trial and what cost it the most), sensitivity and time."""
    from microsweep.search import SweepResult
    from microsweep.storage import Store

    assert isinstance(result, SweepResult)
    states = ", ".join(f"{k} {v}" for k, v in sorted(result.states.items()))
    if result.already_done:
        done = sum(result.states.values())
        print(
            f"sweep {result.name!r} already has its {done} finished trials ({states}); nothing "
            "to do (--trials N asks for more)"
        )
        return
    print(f"sweep {result.name!r}: {states}")
    if result.best_number is not None:
        print(
            f"best feasible: trial {result.best_number} score {result.best_score:.6g} "
            f"perplexity {result.best_perplexity:.4f}"
        )
    else:
        notes = result.infeasible_notes or result.explain_infeasible(
            Store(storage, must_exist=True)
        )
        for line in notes:
            print(line)
    if result.best_uniform_number is not None and result.best_score is not None:
        if result.by == "perplexity":  # the budget form: compared by perplexity
            print(
                f"best uniform policy (one setting for every layer) in this sweep: trial "
                f"{result.best_uniform_number} perplexity {result.best_uniform_perplexity:.6g}"
            )
        else:
            ratio = result.best_score / result.best_uniform_score
            print(
                f"best uniform policy (one setting for every layer) in this sweep: trial "
                f"{result.best_uniform_number} score {result.best_uniform_score:.6g}; best "
                f"feasible is {ratio:.3f}x of it"
            )
    if result.sensitivity:
        sens = result.sensitivity
        print(
            f"sensitivity: {sens['measured']} probes measured, {sens['reused']} reused "
            f"({sens['seconds']:.1f}s)"
        )
    if result.cache:
        from microsweep.search._result import cache_line

        print(cache_line(result.cache))
    if result.timed_out:
        done = sum(result.states.values())
        print(
            f"time budget reached after {result.wall:.0f}s with {done} trials run; "
            f"'microsweep resume --name {result.name}' continues"
        )
    pruned = result.states.get("PRUNED", 0)
    if pruned:
        share = result.eval_seconds_saved / max(
            result.eval_seconds + result.eval_seconds_saved, 1e-9
        )
        print(
            f"early stopping: {pruned} trials stopped, {result.eval_seconds_saved:.1f}s of "
            f"evaluation saved ({100 * share:.0f}% of this run's)"
        )


def _status(name: str, storage: str | None, top: int, fmt: str, legend: bool = False) -> None:
    from microsweep.report import sweep_status
    from microsweep.spaces import Policy
    from microsweep.storage import Store

    st = sweep_status(Store(storage, must_exist=True), name, top)
    if fmt == "json":
        import json

        print(json.dumps(st, indent=2))
        return
    states = ", ".join(f"{k} {v}" for k, v in sorted(st["states"].items())) or "none"
    print(f"sweep {st['name']!r} in {st['storage']}")
    print(f"  trials: {st['finished']}/{st['target']} finished ({states})")
    complete = st["states"].get("COMPLETE", 0)
    print(
        f"  feasible: {st['feasible']} of {complete} complete, {st['over_ceiling']} over the "
        "ceiling"
    )
    if st["wall_seconds"] is not None:
        rate, busy = st["trials_per_minute"], st["trial_seconds"]
        rate_s = f", {rate:.1f} trials/min over {busy:.1f}s of trials" if rate else ""
        print(
            f"  state: {st['state']}; wall time {st['wall_seconds']:.1f}s since it was created "
            f"(start-up included){rate_s}"
        )
    else:
        print(f"  state: {st['state']}; no trial finished yet")
    d, b = st["dense"], st["baseline"]
    print(
        f"  dense model: perplexity {d['perplexity']:.4f}, params {d['params']:,.0f}"
        f", ops/token {d['ops']:,.0f}, score {d['score']:.6g}"
    )
    print(f"  baseline: {b['name']} ({b['params']:,.0f} params, {b['ops']:,.0f} ops)")
    ceiling = st["ceiling"]
    digits = 4
    for r in st["best"]:  # enough digits to tell every perplexity shown from the ceiling
        if ceiling is not None:
            digits = max(digits, digits_apart(r["perplexity"], ceiling))
    ceiling_s = "none" if ceiling is None else f"{ceiling:.{digits}g}"
    print(f"  perplexity ceiling: {ceiling_s}; sampler {st['sampler']}")
    if not st["best"]:
        for line in st["infeasible"]:
            print(f"  {line}")
    else:
        head = f"{'trial':>5} {'score':>10} {'perplexity':>10}  {'origin':<14} policy"
        where = f"policy: {Policy.NOTATION}" if legend else "--legend explains the policy"
        print(f"  best feasible trials ({where}; 'show' gives every layer):")
        print(f"    {head}")
        for r in st["best"]:
            origin = r["origin"] or "-"
            print(
                f"    {r['trial']:>5} {r['score']:>10.5g} {r['perplexity']:>10.{digits}g}  "
                f"{origin:<14} {r['policy']}"
            )
        u = st["best_uniform"]
        if u is not None:
            print(
                f"  best uniform policy: trial {u['trial']} score {u['score']:.5g} "
                f"(best feasible is {st['best'][0]['score'] / u['score']:.3f}x of it)"
            )
    for f in st["failures"][:3]:
        print(f"  trial {f['trial']} FAIL: {f['reason']}")


def _read_command(args: argparse.Namespace) -> None:
    """`ls`, `trials` and `show`: rows from the store printed as a table, CSV or JSON."""
    from microsweep.report import format_rows, sweep_rows, trial_detail, trial_rows
    from microsweep.storage import Store

    store = Store(args.storage, must_exist=True)
    if args.command == "ls":
        rows = sweep_rows(store)
        cols = ["name", "state", "finished", "target", "feasible", "best_score", "best_trial"]
        print(format_rows(rows, args.format, cols) if rows else f"no sweeps in {store.display}")
        return
    if args.command == "trials":
        feasible = True if args.feasible else False if args.infeasible else None
        rows = trial_rows(
            store, args.name, state=args.state, feasible=feasible,
            full_policy=args.format != "table",
        )  # fmt: skip
        cols = ["trial", "state", "feasible", "score", "perplexity", "origin", "policy"]
        print(format_rows(rows, args.format, cols))
        return
    detail = trial_detail(store, args.name, args.trial)
    if args.policy_out:
        from microsweep.spaces import Policy

        text = Policy.from_json(detail["policy"]).dumps()
        try:
            with open(args.policy_out, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {args.policy_out}: {exc.strerror or exc}") from None
    if args.format == "json":
        import json

        print(json.dumps(detail, indent=2, default=str))
        return
    if args.format == "csv":
        cols = list(detail["layers"][0]) if detail["layers"] else []
        print(format_rows(detail["layers"], "csv", cols))
    else:
        print(_show_text(detail))
    hyper = detail["policy"].get("hyper") or {}
    if hyper:
        print("hyper: " + ", ".join(f"{k}={v}" for k, v in sorted(hyper.items())))
    if args.policy_out:
        print(f"wrote the policy to {args.policy_out}")


def _show_text(detail: dict) -> str:
    """`show` as text: the trial's figures rounded as `status` rounds them, then one row per
    layer with the pruned share apart from the zeros that quantization made."""
    from microsweep.report import format_rows

    ceiling = detail["ceiling"]
    lines = []
    for key, value in detail.items():
        if key in ("policy", "layers", "perplexity", "ceiling"):
            continue
        if key == "score" and value is not None:
            value = f"{value:.6g}"
        elif key in ("params", "ops") and value is not None:
            value = f"{value:,.1f}"
        lines.append(f"{key}: {'-' if value is None else value}")
    ppl = detail["perplexity"]
    if ppl is not None and ceiling is not None:
        ppl_s, ceiling_s = distinct(ppl, ceiling)
        lines.append(f"perplexity: {ppl_s} (ceiling {ceiling_s})")
    else:
        lines.append(f"perplexity: {'-' if ppl is None else f'{ppl:.4f}'} (ceiling none)")

    def share(x: float | None) -> str | None:
        return None if x is None else f"{x:.3f}"

    def count(x: float | None) -> str | None:
        return None if x is None else f"{x:,.1f}"

    rows = [
        {
            "layer": r["layer"],
            "kind": r["kind"],
            "pruned": share(r["pruned"]),
            "quant zeros": share(r["quantized_zeros"]),
            "bits": r["bits"],
            "act_bits": r["act_bits"],
            "rank": r["rank"],
            "params": count(r["params"]),
            "dense params": count(r["dense_params"]),
            "ops": count(r["ops"]),
            "dense ops": count(r["dense_ops"]),
        }
        for r in detail["layers"]
    ]
    lines.append(format_rows(rows, "table", list(rows[0]) if rows else ["layer"]))
    lines.append(
        "pruned: the policy's sparsity ('-': the policy leaves the layer alone); quant zeros: "
        "weights that quantization rounded to zero on top of it"
    )
    return "\n".join(lines)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a number above 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a number of at least 0")
    return value


def _resource_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpus-per-worker",
        type=_positive_float,
        default=1.0,
        help="CPUs each Ray worker reserves; its torch threads follow them (default 1)",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=_non_negative_float,
        default=0.0,
        help="GPUs each Ray worker reserves; a worker given one evaluates on it (default 0)",
    )


def _mib(least: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number of MiB of at least `least` (`why` said when under)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} must be at least {least}{why}")
        return value

    return parse


def _cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval-memory-mb",
        type=_mib(1),
        default=None,
        help="memory one evaluation batch of a worker may take, in MiB; the batch size follows "
        "from it (default: min(1024, a quarter of the worker's free memory))",
    )
    parser.add_argument(
        "--cache-mb",
        type=_mib(0, " (0 copies the model)"),
        default=None,
        help="each worker's cache of compressed layers, in MiB (default: half its free memory "
        "split among the workers, at most 2x the model's fp32 size, at least 64; 0 copies "
        "the model per trial)",
    )


def _worker_options(args: argparse.Namespace) -> dict[str, Any]:
    """Where the workers of `run`, `resume` and `sensitivity` run, the storage, reporting."""
    return dict(
        workers=args.workers,
        storage=args.storage,
        address=args.address,
        in_process=args.in_process,
        progress=not args.quiet,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
    )


def _sweep_options(args: argparse.Namespace) -> dict[str, Any]:
    """What `run` and `resume` take alike: the worker options, storage patience, time budget."""
    return _worker_options(args) | dict(
        storage_wait=args.storage_wait, timeout=args.timeout, cache_mb=args.cache_mb,
        eval_memory_mb=args.eval_memory_mb,
    )  # fmt: skip


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "run":
        from microsweep.search import run_sweep

        result = run_sweep(
            args.space,
            name=args.name,
            trials=args.trials,
            sampler=args.sampler,
            seed=args.seed,
            warm_start=args.warm_start,
            **_sweep_options(args),
        )
        _print_result(result, args.storage)
        if not args.quiet:
            _next_steps(result, args.storage)
    elif args.command == "resume":
        from microsweep.search import resume_sweep

        result = resume_sweep(args.name, trials=args.trials, **_sweep_options(args))
        _print_result(result, args.storage)
        if not args.quiet and not result.already_done:
            _next_steps(result, args.storage)
    elif args.command in ("report", "plot"):
        from microsweep.report import write_report
        from microsweep.storage import Store

        data = write_report(Store(args.storage, must_exist=True), args.name, args.output)
        p = data.pareto
        print(
            f"wrote {args.output}: {len(p.points)} completed trials, {len(p.stopped)} stopped "
            f"early, {len(p.failures)} failed; {len(p.front)} on the Pareto front"
            + (" (the dense model among them)" if -1 in p.front else "")
        )
    elif args.command == "dashboard":
        from microsweep.report._dashboard import serve_dashboard

        serve_dashboard(args.storage, args.host, args.port)
    elif args.command == "status":
        _status(args.name, args.storage, args.top, args.format, args.legend)
    elif args.command == "sensitivity":
        from microsweep.prepare import table_key
        from microsweep.report import sensitivity_data, write_sensitivity_html
        from microsweep.search import run_sensitivity
        from microsweep.storage import Store

        out = args.output or f"{args.name}-sensitivity.html"
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            folder = os.path.dirname(out)
            raise UsageError(f"folder {folder} for the plot does not exist; create it first")
        run = run_sensitivity(args.space, name=args.name, **_worker_options(args))
        store = Store(args.storage, must_exist=True)
        data = sensitivity_data(store, table_key(store, run.eval_key), ceiling=run.ceiling)
        write_sensitivity_html(data, out)
        s = run.summary
        print(
            f"sensitivity {args.name!r}: {s['probes']} probes ({s['measured']} measured now, "
            f"{s['reused']} reused) in {s['seconds']:.1f}s; dense perplexity "
            f"{run.dense_perplexity:.4f}; wrote {out}"
        )
    elif args.command == "upgrade":
        from microsweep.storage import Store

        before, now = Store(args.storage, must_exist=True, upgrade=True).upgrade()
        if before == now:
            print(f"schema version {now}: already current")
        else:
            print(f"upgraded schema version {before} -> {now}")
    elif args.command == "count":
        from microsweep.report import count_report

        print(count_report(args.space, args.policy))
    elif args.command in ("ls", "trials", "show"):
        _read_command(args)
    elif args.command == "export":
        from microsweep.export import export_trial

        info = export_trial(args.name, args.trial, args.output, storage=args.storage)
        print(
            f"wrote {args.output}: payload {info.payload_bytes:,} bytes, header "
            f"{info.header_bytes:,} bytes; counted {info.counted_params:,.1f} params x 4 bytes "
            f"-> ratio {info.ratio:.4f}"
        )


def _note(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Space warnings print as one note naming the user's line; others as Python prints them."""
    from microsweep.errors import SpaceWarning

    if issubclass(category, SpaceWarning):
        print(f"microsweep: note: {filename}:{lineno}: {message}", file=sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning

DEFINES_SPACE = ("run", "sensitivity")
"""Commands that define a search over a space file: its notes (wasteful levels, tables left
alone) are said there, once, and not again by every command that reopens the space."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, stopped like Ctrl-C: the driver's clean-up runs and one line is printed."""


_signals: list[int] = []  # what stopped the command (Ray may re-raise a plain KeyboardInterrupt)


def _terminate(signum: int, frame: object) -> None:
    _signals.append(signum)
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    warnings.showwarning = _note
    if args.command not in DEFINES_SPACE:
        from microsweep.errors import SpaceWarning

        warnings.filterwarnings("ignore", category=SpaceWarning)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        _dispatch(args)
    except MicrosweepError as exc:
        print(f"microsweep: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `microsweep status | head -1`: the reader left, nothing to say
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - flushed at exit, never closed
        return 0
    except OSError as exc:  # e.g. -o on a directory or a read-only filesystem
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"microsweep: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        resumable = args.command in ("run", "resume")
        hint = "; 'microsweep resume' continues the sweep" if resumable else ""
        terminated = isinstance(exc, _Terminated) or signal.SIGTERM in _signals
        print(f"microsweep: {'terminated' if terminated else 'interrupted'}{hint}", file=sys.stderr)
        return 143 if terminated else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
