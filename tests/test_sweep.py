"""Real sweeps of examples/tiny.py: on 2 Ray actors into a SQLite file, in-process, resumed,
and through the CLI; then the trials, per-layer rows and plot data are read back and checked."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from microsweep.errors import UsageError
from microsweep.report import Point, pareto_data, write_pareto_html
from microsweep.search import resume_sweep, run_sweep
from microsweep.storage import Store
from tests.conftest import ROOT
from tests.conftest import cli as _cli

TINY = str(ROOT / "examples" / "tiny.py")


def _check_sweep(url: str, name: str, n: int) -> None:
    store = Store(url, must_exist=True)
    sweep = store.get_sweep(name)
    trials = store.trials(name, with_layers=True)
    assert [t.number for t in trials] == list(range(n))
    assert sweep.dense_perplexity > 1.0 and sweep.ceiling == pytest.approx(
        1.10 * sweep.dense_perplexity
    )
    assert sweep.baseline_name == "dense" and sweep.baseline_params == sweep.dense_params
    study = optuna.load_study(study_name=name, storage=store.optuna_storage())
    by_number = {t.number: t for t in study.trials}
    for t in trials:
        assert t.state in ("COMPLETE", "PRUNED"), t.reason
        # the score is the MicroNet formula over the stored counts, against the dense baseline
        assert t.score == pytest.approx(t.params / sweep.dense_params + t.ops / sweep.dense_ops)
        frozen = by_number[t.number]
        if t.state == "PRUNED":  # stopped early: over the ceiling by its estimate
            assert not t.feasible and t.perplexity > sweep.ceiling and "stopped after" in t.reason
            # the last intermediate value is the projected perplexity; the stored value is the
            # score (Optuna would store that projection in the score's column)
            last = frozen.intermediate_values[max(frozen.intermediate_values)]
            assert last == pytest.approx(t.perplexity)
            assert frozen.value == pytest.approx(t.score)
            assert frozen.user_attrs["score"] == pytest.approx(t.score)
        else:
            assert t.feasible == (t.perplexity <= sweep.ceiling)
            assert frozen.value == pytest.approx(t.score)
        assert frozen.constraints["perplexity"] == pytest.approx(t.perplexity - sweep.ceiling)
        # per-layer rows add up to the trial's totals
        assert sum(lr.params for lr in t.layers) == pytest.approx(t.params, rel=1e-9)
        assert sum(lr.ops for lr in t.layers) == pytest.approx(t.ops, rel=1e-9)
        policy_layers = t.policy["layers"]
        rows = {lr.layer: lr for lr in t.layers}
        for layer, settings in policy_layers.items():
            if settings.get("rank") is None and layer in rows:
                assert rows[layer].bits == settings.get("bits", 32) or rows[layer].bits is None
        assert set(t.timings) >= {"compress", "evaluate", "count", "driver", "total"}
    data = pareto_data(store, name)
    assert len(data.points) == sum(t.state == "COMPLETE" for t in trials) and data.front
    dense = Point(-1, data.dense_score, data.dense_perplexity, True, 0.0, 0.0, "dense")
    feasible = [p for p in data.points if p.feasible] + [dense]

    def dominated(p):
        return any(
            q.score <= p.score
            and q.perplexity <= p.perplexity
            and (q.score, q.perplexity) != (p.score, p.perplexity)
            for q in feasible
        )

    # brute force: the front is exactly the non-dominated feasible points, the dense model too
    assert sorted(data.front) == sorted(p.number for p in feasible if not dominated(p))
    store.dispose()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_sweep_two_workers_into_sqlite(tmp_path, sqlite_url, tiny_gpt):
    seen = []
    result = run_sweep(
        TINY,
        name="ray",
        trials=6,
        workers=2,
        storage=sqlite_url,
        seed=3,
        sampler="tpe",
        progress=False,
        on_trial=seen.append,
    )
    assert sum(result.states.values()) == 6 and set(result.states) <= {"COMPLETE", "PRUNED"}
    assert sorted(s["number"] for s in seen) == list(range(6))
    _check_sweep(sqlite_url, "ray", 6)
    import ray

    assert not ray.is_initialized()  # the pool shut down the Ray it started

    # the same seed in-process gives the same trials: workers are deterministic and isolated
    local_url = f"sqlite:///{tmp_path / 'local.db'}"
    run_sweep(
        TINY,
        name="ray",
        trials=6,
        storage=local_url,
        seed=3,
        sampler="tpe",
        in_process=True,
        progress=False,
    )
    ray_rows = Store(sqlite_url).trials("ray")
    local_rows = Store(local_url).trials("ray")
    assert [r.policy for r in ray_rows] == [r.policy for r in local_rows]
    assert [r.perplexity for r in ray_rows] == pytest.approx(
        [r.perplexity for r in local_rows], rel=1e-6
    )

    html = tmp_path / "p.html"
    data = write_pareto_html(Store(sqlite_url), "ray", html)
    text = html.read_text()
    assert "plotly" in text and "Pareto front" in text and len(text) > 1_000_000  # inlined js
    assert f'data-trial="{data.front[0]}"' in text  # the front table row that selects it


def test_worker_threads_follow_the_cpus_ray_gives_it(sqlite_url, tiny_gpt):
    """--cpus-per-worker reserves CPUs per actor and the actor's torch threads follow them;
    asking for more CPUs or GPUs than there are is refused before anything is stored."""
    import os

    from microsweep.errors import UsageError

    cores = os.cpu_count() or 1
    with pytest.raises(UsageError, match="cpus-per-worker"):
        run_sweep(TINY, name="big", trials=2, storage=sqlite_url, cpus_per_worker=cores + 1)
    with pytest.raises(UsageError, match="needs 1 GPUs; the Ray cluster has 0"):
        run_sweep(TINY, name="gpu", trials=2, storage=sqlite_url, gpus_per_worker=1)
    assert Store(sqlite_url).sweep_names() == []
    seen: list[dict] = []
    run_sweep(
        TINY,
        name="wide",
        trials=2,
        storage=sqlite_url,
        sampler="random",
        cpus_per_worker=cores,
        progress=False,
        on_trial=seen.append,
    )
    assert [s["worker"].startswith("node ") for s in seen] == [True, True]  # on Ray
    assert [s["worker"].rsplit(", threads ", 1)[1] for s in seen] == [str(cores)] * 2


def test_in_process_sweep_resume_and_zombie_trials(sqlite_url, tiny_gpt):
    result = run_sweep(
        TINY,
        name="r",
        trials=3,
        storage=sqlite_url,
        seed=1,
        sampler="tpe",
        in_process=True,
        progress=False,
    )
    assert sum(result.states.values()) == 3
    # a driver that died mid-trial leaves a RUNNING trial behind
    store = Store(sqlite_url)
    study = optuna.load_study(study_name="r", storage=store.optuna_storage())
    zombie = study.ask()
    zombie.suggest_float("blocks.0.mlp.c_fc:sparsity", 0.0, 0.9)
    result = resume_sweep("r", trials=6, storage=sqlite_url, in_process=True, progress=False)
    rows = Store(sqlite_url).trials("r")
    assert len(rows) == 6  # 3 + the zombie (FAIL, it counts toward the total) + 2 new
    states = {r.number: r.state for r in rows}
    assert states[zombie.number] == "FAIL"
    assert "driver stopped" in next(r.reason for r in rows if r.number == zombie.number)
    assert sum(1 for s in states.values() if s in ("COMPLETE", "PRUNED")) == 5
    assert Store(sqlite_url).get_sweep("r").target_trials == 6
    # the resumed sampler draws fresh policies, not the first ones again
    by_number = {r.number: r.policy for r in rows}
    assert by_number[4] != by_number[0] and by_number[5] != by_number[1]
    with pytest.raises(UsageError, match="already has 6 finished trials"):
        resume_sweep("r", trials=4, storage=sqlite_url, in_process=True, progress=False)
    # resuming a finished sweep runs nothing more
    again = resume_sweep("r", storage=sqlite_url, in_process=True, progress=False)
    assert sum(again.states.values()) == 6


def test_two_objectives_store_score_and_perplexity(tmp_path, sqlite_url, tiny_gpt):
    space = _space_with(
        tmp_path, "eval_tokens=2048", 'eval_tokens=2048, objectives="score+perplexity"'
    )
    run_sweep(
        space,
        name="two",
        trials=3,
        storage=sqlite_url,
        sampler="nsga2",
        seed=0,
        in_process=True,
        progress=False,
    )
    study = optuna.load_study(study_name="two", storage=Store(sqlite_url).optuna_storage())
    rows = {r.number: r for r in Store(sqlite_url).trials("two")}
    for t in study.trials:
        if rows[t.number].state == "PRUNED":
            assert t.values is None and not rows[t.number].feasible
        else:
            assert t.values == pytest.approx([rows[t.number].score, rows[t.number].perplexity])


def _scripted_space(tmp_path: Path, script: dict[int, str]) -> str:
    """examples/tiny.py plus an `evaluate` whose n-th call (1 is the dense baseline) runs the
    statement script[n]; every other call returns perplexity 5.0."""
    cases = "".join(f'    if _calls["n"] == {n}:\n        {stmt}\n' for n, stmt in script.items())
    path = tmp_path / "scripted.py"
    path.write_text(
        Path(TINY).read_text()
        + '\nimport math\n\n_calls = {"n": 0}\n\n\ndef evaluate(model):\n'
        + '    _calls["n"] += 1\n'
        + cases
        + "    return 5.0\n"
    )
    return str(path)


def test_worker_exception_and_nan_perplexity_are_failed_trials(tmp_path, sqlite_url, tiny_gpt):
    space = _scripted_space(
        tmp_path, {2: 'raise RuntimeError("evaluation exploded")', 3: "return math.nan"}
    )
    result = run_sweep(
        space,
        name="bad",
        trials=4,
        storage=sqlite_url,
        seed=0,
        sampler="tpe",  # the script counts evaluate calls: no sensitivity pass in between
        in_process=True,
        progress=False,
    )
    rows = Store(sqlite_url).trials("bad")
    assert result.states == {"COMPLETE": 2, "FAIL": 2}
    reasons = [r.reason for r in rows if r.state == "FAIL"]
    assert any("evaluation exploded" in r for r in reasons)
    assert any("not finite" in r for r in reasons)


@pytest.mark.ray
@pytest.mark.slow
def test_cli_run_plot_status(tmp_path, tiny_gpt):
    url = "sqlite:///t.db"
    run = _cli(
        "run",
        TINY,
        "--name",
        "t",
        "--trials",
        "6",
        "--workers",
        "2",
        "--storage",
        url,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    states = run.stdout.splitlines()[0].split(": ", 1)[1]  # sweep 't': COMPLETE 5, PRUNED 1
    assert sum(int(part.split()[1]) for part in states.split(", ")) == 6
    assert "[6/6]" in run.stderr  # progress lines
    # what it does before the first trial, in order, while Ray starts
    steps = [
        "measuring the dense model",
        "dense model: perplexity",
        "starting 2 Ray worker(s) on a local Ray instance",
        "workers ready after",
        "[1/6]",
    ]
    at = [run.stderr.find(step) for step in steps]
    assert -1 not in at and at == sorted(at), run.stderr
    assert "meets the ceiling" in run.stderr or "OVER the ceiling" in run.stderr
    assert "elapsed, ETA 0:00" in run.stderr  # the last line: nothing left to wait for
    assert "sensitivity:" in run.stderr and "best uniform policy" in run.stdout  # auto, on Ray
    plot = _cli("plot", "--name", "t", "--storage", url, "-o", "p.html", cwd=tmp_path)
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "p.html").stat().st_size > 1_000_000
    status = _cli("status", "--name", "t", "--storage", url, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "6/6 finished (COMPLETE" in status.stdout
    assert "dense model: perplexity" in status.stdout and "best feasible trials" in status.stdout


def _space_with(tmp_path: Path, old: str, new: str) -> str:
    path = tmp_path / "space.py"
    text = Path(TINY).read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return str(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ('"head": dict(bits=Bits(6, 8, 32), tied=True)', '"hed": dict(bits=Bits(8))'),
            "rule 'hed' matches no Linear, Embedding or LSTM gate",
        ),
        (("bits=Bits(4, 8, 16, 32)", "bits=Bits(4, 8, 64)"), "Bits: 64 is not a width"),
        (("Sparsity(0.0, 0.9, step=0.1)", "Sparsity(0.0, 1.5)"), "Sparsity: 1.5 is outside [0, 1)"),
        (("rank=Rank(0.25, 1.0)", "rank=Rank(8, 200)"), "rank 200 is above layer"),
        (("space = Space(", "spaec = Space("), "must define `space"),
        (("corpus = data", "corpus = undefined_name + data"), "NameError"),
    ],
)
def test_cli_bad_space_is_one_line_error(tmp_path, edit, message, tiny_gpt):
    space = _space_with(tmp_path, *edit)
    proc = _cli(
        "run", space, "--name", "x", "--trials", "2", "--storage", "sqlite:///x.db", cwd=tmp_path
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("microsweep: error:"), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nope.py", "--name", "x"], "space file nope.py does not exist"),
        (["run", TINY, "--name", "x", "--trials", "0"], "must be at least 1"),
        (["run", TINY, "--name", "x", "--sampler", "grid"], "invalid choice"),
        (
            ["run", TINY, "--name", "x", "--seed", "-1", "--storage", "sqlite:///missing.db"],
            "--seed -1 must be in 0..",
        ),
        (["run", TINY, "--name", "x", "--storage", "nonsense"], "is not a database URL"),
        (["run", TINY, "--name", "x", "--cpus-per-worker", "0"], "must be a number above 0"),
        (["resume", "--name", "x", "--gpus-per-worker", "-1"], "must be a number of at least 0"),
        (["status", "--name", "x", "--storage", "sqlite:///missing.db"], "no sweep database"),
        (["plot", "--name", "x", "--storage", "sqlite:///missing.db"], "no sweep database"),
        (["resume", "--name", "x", "--storage", "sqlite:///missing.db"], "no sweep database"),
    ],
)
def test_cli_bad_arguments(tmp_path, args, message):
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "missing.db").exists()


def test_cli_unknown_sweep_and_duplicate_leave_data_intact(tmp_path, tiny_gpt):
    url = f"sqlite:///{tmp_path / 'keep.db'}"
    run_sweep(TINY, name="keep", trials=2, storage=url, in_process=True, progress=False)
    before = [(r.number, r.score) for r in Store(url).trials("keep")]
    proc = _cli("status", "--name", "other", "--storage", url, cwd=tmp_path)
    assert proc.returncode == 2 and "no sweep named 'other'" in proc.stderr
    assert "sweeps here: keep" in proc.stderr
    proc = _cli("run", TINY, "--name", "keep", "--trials", "2", "--storage", url, cwd=tmp_path)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert [(r.number, r.score) for r in Store(url).trials("keep")] == before
    out = tmp_path / "no" / "p.html"
    proc = _cli("plot", "--name", "keep", "--storage", url, "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_policy_json_in_store_revives(sqlite_url, tiny_gpt):
    from microsweep import Policy

    run_sweep(TINY, name="p", trials=2, storage=sqlite_url, in_process=True, progress=False)
    for row in Store(sqlite_url).trials("p"):
        policy = Policy.from_json(row.policy)
        assert json.loads(policy.dumps()) == row.policy


def test_cli_count_and_export_round_trip(tmp_path, tiny_gpt):
    """`microsweep count` prints the table; `microsweep export` writes a file whose reload
    reproduces the stored perplexity and whose payload matches the count."""
    import microsweep
    from microsweep.export import read_header
    from microsweep.score import eval_windows, perplexity

    url = f"sqlite:///{tmp_path / 'e.db'}"
    run_sweep(TINY, name="e", trials=3, storage=url, seed=2, in_process=True, progress=False)
    dense = _cli("count", TINY, cwd=tmp_path)
    assert dense.returncode == 0, dense.stderr
    assert "blocks.0.mlp.c_fc" in dense.stdout and "freebie" in dense.stdout.lower()

    row = next(r for r in Store(url).trials("e") if r.state == "COMPLETE")
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(row.policy))
    counted = _cli("count", TINY, "--policy", str(policy_file), cwd=tmp_path)
    assert counted.returncode == 0, counted.stderr
    assert counted.stdout != dense.stdout

    out = tmp_path / "m.msz"
    proc = _cli(
        "export",
        "--name",
        "e",
        "--trial",
        str(row.number),
        "--storage",
        url,
        "-o",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    header = read_header(out)
    assert header["counted_params"] == pytest.approx(row.params)
    assert abs(header["payload_bytes"] / (row.params * 4) - 1.0) <= 0.02
    model = microsweep.load(out)
    windows = eval_windows(microsweep.data.tiny_shakespeare().val, window=32, max_tokens=2048)
    assert perplexity(model, windows) == pytest.approx(row.perplexity, rel=1e-4)

    bad = _cli(
        "export", "--name", "e", "--trial", "99", "--storage", url, "-o", "x.msz", cwd=tmp_path
    )
    assert bad.returncode == 2 and "no finished trial 99" in bad.stderr
    assert not (tmp_path / "x.msz").exists()
    out.write_bytes(out.read_bytes()[:-10])
    with pytest.raises(microsweep.MicrosweepError):
        microsweep.load(out)


def test_interrupted_sweep_leaves_no_trial_unrecorded(tmp_path, sqlite_url, tiny_gpt):
    """Ctrl-C during a trial: every trial Optuna knows is FAIL or COMPLETE with a stored row."""
    space = _scripted_space(tmp_path, {3: "raise KeyboardInterrupt"})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(
            space,
            name="i",
            trials=4,
            storage=sqlite_url,
            sampler="tpe",
            in_process=True,
            progress=False,
        )
    rows = {r.number: r for r in Store(sqlite_url).trials("i")}
    study = optuna.load_study(study_name="i", storage=Store(sqlite_url).optuna_storage())
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert sorted(rows) == [0, 1]
    assert rows[1].state == "FAIL" and "stopped before the trial finished" in rows[1].reason
    assert rows[1].policy["type"] == "microsweep.Policy"  # the policy that was running is kept


def test_progress_lines_show_elapsed_and_an_estimate_from_this_runs_pace():
    import io

    from microsweep._text import clock as _clock
    from microsweep.search._progress import Progress as _Progress

    assert (_clock(5), _clock(75), _clock(3725)) == ("0:05", "1:15", "1:02:05")
    out = io.StringIO()
    bar = _Progress(10, stream=out, first=4)  # a resume: 4 trials were done before
    bar.started -= 30.0  # 30 s into this run
    bar.update(6, {"COMPLETE": 6}, 0.5, "trial 5")
    # 2 trials in 30 s, 4 left: 60 s
    assert out.getvalue().startswith("[6/10] 0:30 elapsed, ETA 1:00 | COMPLETE=6")
