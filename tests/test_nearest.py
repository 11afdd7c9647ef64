"""A sweep with no feasible trial says why: the nearest trial against the ceiling and the knobs
that cost it the most (measured single-knob losses when a sensitivity table exists, how far the
policy pushes each knob's range without one), in `status`, in `run`'s closing lines and on
`SweepResult`; checked against the stored rows of real sweeps."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from microsweep._text import distinct
from microsweep.prepare import table_key
from microsweep.report import sweep_status
from microsweep.search import run_sensitivity, run_sweep
from microsweep.search._nearest import explain_infeasible
from microsweep.storage import Store
from tests.conftest import cli as _cli

SPACE = '''"""The tiny GPT with a perplexity ceiling far below its dense perplexity."""
from microsweep import Bits, MicroNet, Space, Sparsity, data, models

corpus = data.tiny_shakespeare()
model = models.gpt(corpus, n_layer=2, n_head=2, n_embd=32, block_size=32, pretrain_steps=300)
space = Space(
    model,
    rules={{
        "blocks.*.attn.*": dict(sparsity=Sparsity(0.0, 0.8, step=0.1), bits=Bits(4, 8, 32)),
        "blocks.*.mlp.*": dict(sparsity=Sparsity(0.0, 0.9, step=0.1), bits=Bits(4, 8, 32)),
    }},
)
objective = MicroNet(
    perplexity_ceiling=1.5, baseline="dense", eval_tokens=1024, early_stop={early_stop}
)
'''
HIGH = {"attn": 0.8, "mlp": 0.9}
"""Each rule's highest sparsity (its lowest is 0)."""
BITS = [32, 8, 4]
"""Each rule's widths, least compressed first."""
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
"""The layers of each block the rules name."""


def _space(folder: Path, early_stop: bool) -> str:
    path = folder / f"impossible_{early_stop}.py"
    path.write_text(SPACE.format(early_stop=early_stop), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_gpt):
    """Five random trials that all complete over the ceiling; the lines said before and after
    a sensitivity table of the same model and evaluation settings is stored."""
    folder = tmp_path_factory.mktemp("nearest")
    url = f"sqlite:///{folder / 'near.db'}"
    space = _space(folder, early_stop=False)
    result = run_sweep(
        space, name="far", trials=5, storage=url, seed=4, sampler="random", in_process=True,
        progress=False,
    )  # fmt: skip
    store = Store(url, must_exist=True)
    before = explain_infeasible(store, "far")
    assert result.infeasible_notes == before  # the sweep's own result says it at its end
    table = run_sensitivity(space, name="far-sens", storage=url, in_process=True, progress=False)
    return {"url": url, "folder": folder, "result": result, "before": before, "key": table.eval_key}


def _nearest_row(store: Store, name: str, state: str = "COMPLETE"):
    rows = [r for r in store.trials(name) if r.state == state]
    assert rows, f"sweep {name!r} has no {state} trial"
    return min(rows, key=lambda r: r.perplexity)


def _percents(text: str) -> dict[str, str]:
    return dict(re.findall(r"(sparsity|bits) \(?(\d+%)", text))


def test_without_a_sensitivity_table_it_names_the_nearest_trial_and_the_knobs_it_pushes(sweep):
    store = Store(sweep["url"], must_exist=True)
    result = sweep["result"]
    assert result.best_number is None and result.states == {"COMPLETE": 5}
    row = _nearest_row(store, "far")
    ceiling = store.get_sweep("far").ceiling
    assert ceiling == 1.5
    ppl, ceil = distinct(row.perplexity, ceiling)
    lines = sweep["before"]
    assert lines[0] == (
        "no feasible trial: every measured trial is over the perplexity ceiling 1.5 (5 complete)"
    )
    assert lines[1] == (
        f"nearest: trial {row.number} (random) perplexity {ppl} against the ceiling {ceil} "
        f"({row.perplexity / ceiling - 1:+.0%}), score {row.score:.4g}"
    )
    # how far its policy goes into each knob's range, from the stored policy
    layers = row.policy["layers"]
    names = [f"blocks.{i}.{m}" for i in (0, 1) for m in TARGETS]
    sparsity = [
        layers.get(n, {}).get("sparsity", 0.0) / HIGH["attn" if ".attn." in n else "mlp"]
        for n in names
    ]
    bits = [BITS.index(layers.get(n, {}).get("bits", 32)) / 2 for n in names]
    reach = {"sparsity": sparsity, "bits": bits}
    assert lines[2].startswith("no sensitivity table measured its settings; it compresses")
    want = {k: f"{sum(v) / len(v):.0%}" for k, v in reach.items() if sum(v) > 0}
    assert _percents(lines[2]) == want
    for knob, values in reach.items():
        at_end = sum(1 for v in values if v >= 1 - 1e-9)
        if sum(values) > 0:
            assert f"at its most compressed on {at_end} of 8 layers" in lines[2].split(knob, 1)[1]
    hardest = max(reach, key=lambda k: sum(reach[k]))
    assert lines[3].startswith("to reach it: raise the ceiling (perplexity_ceiling), or narrow")
    assert hardest in lines[3]


def test_with_a_sensitivity_table_it_sums_each_knobs_measured_losses(sweep):
    from microsweep.allocate._levels import level_key
    from microsweep.policy import LayerPolicy

    store = Store(sweep["url"], must_exist=True)
    row_sweep = store.get_sweep("far")
    assert sweep["key"] == row_sweep.eval_key  # the sensitivity run measured this sweep's key
    table = store.sensitivity(table_key(store, row_sweep.eval_key))
    dense = table[("", "dense", "")]
    row = _nearest_row(store, "far")
    cost: dict[str, float] = {}
    for layer, data in row.policy["layers"].items():
        setting = LayerPolicy.from_json(data)
        for knob in ("sparsity", "bits", "act_bits", "rank"):
            key = level_key(knob, setting)
            if key is not None:  # every level of this space is a probed one
                cost[knob] = cost.get(knob, 0.0) + max(0.0, table[(layer, knob, key)] - dense)
    total = sum(cost.values())
    assert total > 0
    lines = explain_infeasible(store, "far")
    assert lines[:2] == sweep["before"][:2]  # the same nearest trial
    assert lines[2].startswith("largest measured costs in it: ")
    shares = {k: f"{v / total:.0%}" for k, v in cost.items() if v / total >= 0.01}
    assert _percents(lines[2]) == shares
    top = max(cost, key=cost.get)
    assert lines[2].removeprefix("largest measured costs in it: ").startswith(top)
    alone = math.exp(dense + total)
    assert f"add up to perplexity {alone:.4g} " in lines[3]
    assert f"the trial {row.perplexity:.4g})" in lines[3]
    assert "unmeasured" not in lines[3]
    assert top in lines[4]
    # the same lines in status (its JSON and its text) and on the Python result
    assert sweep_status(store, "far")["infeasible"] == lines
    result = sweep["result"]
    assert result.explain_infeasible(store) == lines and result.infeasible_notes == lines
    proc = _cli("status", "--name", "far", "--storage", sweep["url"], cwd=sweep["folder"])
    assert proc.returncode == 0, proc.stderr
    assert "no feasible trial yet" not in proc.stdout
    assert [f"  {line}" for line in lines] == proc.stdout.splitlines()[-len(lines) :]


def test_a_sweep_of_stopped_trials_names_the_least_projection_in_runs_closing_lines(sweep):
    """Early stopping ends every trial PRUNED at its projection: the nearest is the least
    projection, and `run` prints it where it used to say only that nothing was feasible."""
    space = _space(sweep["folder"], early_stop=True)
    proc = _cli(
        "run", space, "--name", "stopped", "--trials", "3", "--sampler", "random", "--seed", "1",
        "--storage", sweep["url"], "--in-process", "--quiet", cwd=sweep["folder"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    store = Store(sweep["url"], must_exist=True)
    assert {r.state for r in store.trials("stopped")} == {"PRUNED"}
    row = _nearest_row(store, "stopped", "PRUNED")
    lines = explain_infeasible(store, "stopped")
    assert lines[0].endswith("(3 stopped early)")
    ppl, ceil = distinct(row.perplexity, 1.5)
    assert lines[1].startswith(
        f"nearest: trial {row.number} (random) projected perplexity {ppl} against the ceiling "
        f"{ceil}"
    )
    assert lines[1].endswith(", stopped early")
    assert "no feasible trial yet" not in proc.stdout
    out = proc.stdout.splitlines()
    assert out[out.index(lines[0]) : out.index(lines[0]) + len(lines)] == lines
