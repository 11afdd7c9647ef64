"""Sweeps from Python objects (a Space built in a notebook), resumed and exported with the same
objects; warm starts from policies and from the files 'microsweep show --json' writes."""

from __future__ import annotations

import json

import optuna
import pytest
import torch

from microsweep import MicroNet, Policy, Space, open_sweep, resume_sweep, run_sweep
from microsweep.errors import SpaceError, SpaceWarning, UsageError
from microsweep.spaces import Bits, LayerPolicy, Rank, Sparsity
from microsweep.storage import Store
from tests.conftest import ROOT
from tests.conftest import cli as _cli

TINY = str(ROOT / "examples" / "tiny.py")
MLP = ["blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj", "blocks.1.mlp.c_fc", "blocks.1.mlp.c_proj"]


def _space(model) -> Space:
    return Space(
        model,
        rules={
            "blocks.*.mlp.*": dict(
                sparsity=Sparsity(0.0, 0.8, step=0.1), bits=Bits(4, 8, 32), rank=Rank(0.25, 1.0)
            )
        },
    )


OBJECTIVE = MicroNet(
    perplexity_ceiling=1.10, relative_to="dense", baseline="dense", eval_tokens=2048
)


def test_a_space_object_runs_resumes_and_exports_with_its_objects(tmp_path, tiny_gpt, corpus):
    url = f"sqlite:///{tmp_path / 'py.db'}"
    space = _space(tiny_gpt)
    warm = Policy(layers={n: LayerPolicy(sparsity=0.3, bits=8, rank=8) for n in MLP})
    with pytest.warns(SpaceWarning, match="values run with the space's methods"):
        result = run_sweep(
            space, objective=OBJECTIVE, corpus=corpus, name="py", trials=3, storage=url,
            sampler="tpe", seed=0, in_process=True, progress=False, warm_start=[warm],
        )  # fmt: skip
    assert sum(result.states.values()) == 3
    store = Store(url, must_exist=True)
    sweep = store.get_sweep("py")
    assert sweep.space_path == "<python objects>" and sweep.ceiling == pytest.approx(
        1.10 * sweep.dense_perplexity
    )
    rows = store.trials("py")
    # the policy's values, with the methods the space gives (calibrated: SparseGPT and GPTQ)
    ran = Policy.from_json(rows[0].policy)
    assert rows[0].origin == "warm start" and set(ran.layers) == set(warm.layers)
    for lp in ran.layers.values():
        assert (lp.sparsity, lp.bits, lp.rank) == (0.3, 8, 8)
        assert (lp.prune_method, lp.quant_method, lp.act_order) == ("sparsegpt", "gptq", True)
    assert all(r.origin == "tpe" for r in rows[1:])
    # no file to re-run: resume and export say what to pass
    with pytest.raises(UsageError, match="defined from Python objects"):
        resume_sweep("py", trials=4, storage=url, in_process=True, progress=False)
    with pytest.raises(UsageError, match="need space="):
        resume_sweep("py", trials=4, storage=url, corpus=corpus, progress=False)
    result = resume_sweep(
        "py", trials=4, storage=url, in_process=True, progress=False, space=space, corpus=corpus
    )
    assert len(store.trials("py")) == 4
    from microsweep.export import export_trial

    done = next(r for r in store.trials("py") if r.state == "COMPLETE")
    info = export_trial("py", done.number, tmp_path / "py.msz", storage=url, space=space,
                        corpus=corpus)  # fmt: skip
    assert info.ratio == pytest.approx(1.0, abs=0.02)
    with pytest.raises(UsageError, match="defined from Python objects"):
        export_trial("py", done.number, tmp_path / "x.msz", storage=url)


def test_objects_beside_a_space_file_or_a_wrong_space_are_refused(tmp_path, corpus):
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    with pytest.raises(UsageError, match="beside a space file"):
        run_sweep(TINY, name="x", trials=1, storage=url, corpus=corpus, in_process=True)
    with pytest.raises(UsageError, match="must be a Space"):
        run_sweep(object(), name="x", trials=1, storage=url, in_process=True)  # type: ignore[arg-type]


def test_params_from_policy_round_trips_and_refuses_what_the_space_cannot_make(tiny_gpt):
    space = _space(tiny_gpt)
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    for _ in range(20):
        policy = space.suggest(study.ask())
        params = space.params_from_policy(policy)
        assert space.suggest(optuna.trial.FixedTrial(params)) == policy
    off_grid = Policy(layers={MLP[0]: LayerPolicy(sparsity=0.35)})
    with pytest.raises(SpaceError, match="out of the range"):
        space.params_from_policy(off_grid)
    with pytest.raises(SpaceError, match="does not search: blocks.0.attn.c_attn"):
        space.params_from_policy(Policy(layers={"blocks.0.attn.c_attn": LayerPolicy(bits=8)}))
    with pytest.raises(SpaceError, match="cannot produce"):
        space.params_from_policy(Policy(layers={MLP[0]: LayerPolicy(act_bits=8)}))
    with pytest.raises(SpaceError):
        space.params_from_policy(Policy(layers={MLP[0]: LayerPolicy(bits=6)}))


def test_cli_warm_start_takes_the_policy_show_writes(tmp_path, tiny_gpt):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    args = ["--storage", url, "--in-process", "--quiet", "--sampler", "random", "--seed", "4"]
    proc = _cli("run", TINY, "--name", "one", "--trials", "2", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = _cli("show", "--name", "one", "--trial", "1", "--storage", url, "--json", "p.json",
                cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = _cli("run", TINY, "--name", "two", "--trials", "2", "--warm-start", "p.json", *args,
                cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    store = Store(url, must_exist=True)
    first = store.trials("two")[0]
    assert first.origin == "warm start"
    assert first.policy == store.trial("one", 1).policy
    with open_sweep("two", url) as s:
        assert s.policy(0) == Policy.loads((tmp_path / "p.json").read_text())
    # a policy for another space, or a file that is not one: one line, exit 2, nothing stored
    other = {"type": "microsweep.Policy", "version": 1, "layers": {"nope": {"sparsity": 0.5}}}
    (tmp_path / "bad.json").write_text(json.dumps(other))
    (tmp_path / "junk.json").write_text("{not json")
    for name, why in (("bad.json", "does not search"), ("junk.json", "not valid JSON"),
                      ("missing.json", "cannot read")):  # fmt: skip
        proc = _cli("run", TINY, "--name", "three", "--trials", "2", "--warm-start", name, *args,
                    cwd=tmp_path)  # fmt: skip
        errors = [x for x in proc.stderr.splitlines() if x.startswith("microsweep: error")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr
        assert f"warm start {name}" in errors[0] and why in errors[0]
    assert "three" not in Store(url, must_exist=True).sweep_names()


def test_resuming_with_another_space_or_objective_is_refused(tmp_path, tiny_gpt, corpus):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    space = _space(tiny_gpt)
    run_sweep(space, objective=OBJECTIVE, corpus=corpus, name="o", trials=1, storage=url,
              sampler="random", seed=1, in_process=True, progress=False)  # fmt: skip
    narrower = Space(tiny_gpt, rules={"blocks.*.mlp.*": dict(sparsity=Sparsity(0.0, 0.5))})
    with pytest.raises(UsageError, match="space given differs"):
        resume_sweep("o", trials=2, storage=url, in_process=True, progress=False,
                     space=narrower, corpus=corpus)  # fmt: skip
    looser = MicroNet(perplexity_ceiling=1.5, relative_to="dense", baseline="dense",
                      eval_tokens=2048)  # fmt: skip
    with pytest.raises(UsageError, match="objective given differs"):
        resume_sweep("o", trials=2, storage=url, in_process=True, progress=False,
                     space=space, objective=looser, corpus=corpus)  # fmt: skip
    assert len(Store(url, must_exist=True).trials("o")) == 1  # nothing ran


def test_warm_starts_of_a_tied_rank_over_layers_of_different_shapes():
    """One fraction must give every tied layer its rank; each layer's own r/full may not."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(64, 64)
            self.b = torch.nn.Linear(64, 256)
            self.c = torch.nn.Linear(256, 256)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.a(x)))

    space = Space(Net(), rules={"re:[abc]": dict(rank=Rank(0.1, 0.45), tied=True)})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(200):
        policy = space.suggest(study.ask())
        assert space.suggest(optuna.trial.FixedTrial(space.params_from_policy(policy))) == policy


def test_sweep_options_are_one_typed_set_and_a_misspelt_one_is_refused(tmp_path):
    """`run_sweep` and `resume_sweep` take the same `SweepOptions`; a name that is none of them
    fails at once, as Python refuses an unexpected keyword, and stores nothing."""
    from typing import get_type_hints

    from microsweep.search import SweepOptions

    url = f"sqlite:///{tmp_path / 'opts.db'}"
    with pytest.raises(TypeError, match="run_sweep.*'workerz'.*workers"):
        run_sweep(str(ROOT / "examples" / "tiny.py"), name="o", trials=2, storage=url, workerz=2)
    with pytest.raises(TypeError, match="resume_sweep.*'trails'"):
        resume_sweep("o", storage=url, trails=4)
    assert not (tmp_path / "opts.db").exists()
    assert set(get_type_hints(SweepOptions)) == {
        "workers", "storage", "address", "in_process", "progress", "storage_wait",
        "cpus_per_worker", "gpus_per_worker", "timeout", "cache_mb",
        "eval_memory_mb",
    }  # fmt: skip
