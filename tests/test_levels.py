"""The level store and the sweep's statistics: data-aware layers built once per (layer,
settings) and shared by trials, workers, later sweeps and export; the default methods."""

from __future__ import annotations

import os
import pickle
import random
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from microsweep.compress import LevelStore, VariantCache, compress
from microsweep.policy import LayerPolicy, Policy
from microsweep.score import eval_windows, perplexity
from microsweep.spaces import Bits, Space, Sparsity

from ._tiny import one_thread
from .test_data_aware import MLP, _policy

ROOT = Path(__file__).resolve().parents[1]
AWARE = dict(prune_method="sparsegpt", quant_method="gptq")


@pytest.fixture(scope="module")
def setup(tiny_gpt, corpus):
    """The tiny GPT, 2,048 evaluation tokens and 1,024 calibration tokens."""
    return tiny_gpt, eval_windows(corpus.val, window=32, max_tokens=2048), _calib(corpus)


def _calib(corpus) -> torch.Tensor:  # noqa: ANN001
    return corpus.train[: 32 * 32].view(32, 32)


def test_a_built_level_is_loaded_by_a_second_trial_and_worker_not_rebuilt(setup, tmp_path):
    model, windows, calib = setup
    store = LevelStore(tmp_path / "levels")
    policy = _policy(sparsity=0.5, bits=4, **AWARE)
    first = VariantCache(model, calib=calib, store=store)
    a = first.model(policy)
    assert first.builds == 4 and store.builds == 4 and store.build_count() == 4
    assert store.stored_levels() == 4
    first.model(policy)  # the next trial on the same worker: from memory
    assert first.builds == 4 and store.build_count() == 4
    # another worker: the store as a process receives it (pickled), its own empty cache
    received = pickle.loads(pickle.dumps(store))
    assert received.builds == 0 and received.root == store.root
    second = VariantCache(model, calib=calib, store=received)
    b = second.model(policy)
    assert second.builds == 0 and received.loads == 4 and store.build_count() == 4
    x = windows[:8, :-1]
    assert torch.equal(a(x), b(x))  # the very tensors the first build made
    # and the layers are those `compress` builds
    assert torch.allclose(compress(model, policy, calib=calib)(x), a(x), atol=1e-5)
    # a plain level is cheap to build and is not filed
    second.model(_policy(sparsity=0.5, bits=4))
    assert store.stored_levels() == 4 and second.builds == 4


def test_one_process_builds_a_level_the_others_wait_for_it(tmp_path) -> None:
    store = LevelStore(tmp_path)
    settings = LayerPolicy(sparsity=0.5, prune_method="sparsegpt")
    calls: list[int] = []
    started = threading.Event()

    def build() -> torch.nn.Module:
        started.set()
        calls.append(1)
        threading.Event().wait(0.3)  # a slow build: the other asker must wait, not build
        return torch.nn.Linear(4, 4)

    out: list[torch.nn.Module] = []
    t = threading.Thread(target=lambda: out.append(store.get_or_build("l", settings, build)))
    t.start()
    assert started.wait(60)
    out.append(LevelStore(tmp_path).get_or_build("l", settings, build))
    t.join(60)
    assert len(calls) == 1 and store.build_count() == 1
    assert torch.equal(out[0].weight, out[1].weight)
    # a claim left by a process that died is taken over at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    other = LayerPolicy(sparsity=0.7, prune_method="sparsegpt")
    claim = store._level_path(store.key("l", other)).with_suffix(".claim")
    claim.write_text(f"{socket.gethostname()} {int(dead.stdout)}")
    got = store.get_or_build("l", other, build, wait=600)
    assert isinstance(got, torch.nn.Linear) and len(calls) == 2 and not claim.exists()
    # a damaged file is rebuilt, never trusted
    path = store._level_path(store.key("l", other))
    path.write_bytes(b"not a torch file")
    assert store.get("l", other) is None
    store.get_or_build("l", other, build)
    assert len(calls) == 3 and store.get("l", other) is not None


def test_memory_stays_within_the_bound_over_a_100_trial_run(setup, tmp_path) -> None:
    """100 trials of random data-aware policies on one runner with a 1 MiB variant cache: the
    cache never holds more than its bound, evicted levels come back from the store, and every
    (layer, settings) is built exactly once."""
    from microsweep.score import mean_context
    from microsweep.workers import EvalSettings, TrialRunner

    model, windows, calib = setup
    store = LevelStore(tmp_path / "levels")
    settings = EvalSettings(context=mean_context(32), cache_mb=1)
    runner = TrialRunner(model, windows, settings, calib=calib, threads=1, levels=store)
    rng = random.Random(0)
    seen: set[tuple[str, LayerPolicy]] = set()
    peak = 0
    with one_thread():
        for number in range(100):
            layers = {
                name: LayerPolicy(
                    sparsity=rng.choice([0.0, 0.2, 0.4, 0.6, 0.8]),
                    bits=rng.choice([3, 4, 8, 32]),
                    **AWARE,
                )
                for name in MLP
            }
            seen.update((n, lp) for n, lp in layers.items() if lp.data_aware)
            result = runner.run(number, Policy(layers=layers).to_json(), early_stop=False)
            assert result.status == "ok", result.error
            peak = max(peak, runner._cache.nbytes)
            assert runner._cache.nbytes <= 2**20
    assert store.build_count() == len(seen) == store.stored_levels()
    assert store.loads > 0  # evicted from memory, read back from disk: the bound was reached
    assert peak > 2**19


def test_statistics_are_computed_once_per_model_and_tokens(tmp_path, tiny_cache) -> None:
    from microsweep.prepare import load_space_file, model_fingerprint, prepare, with_levels

    sf = load_space_file(str(ROOT / "examples" / "tiny.py"))
    prepared = prepare(sf, 0)
    url = f"sqlite:///{tmp_path / 's.db'}"
    fp = model_fingerprint(sf.model)
    first = with_levels(sf, prepared, url, fp)
    assert first.levels.root.parent == tmp_path / "s.db.levels"
    names = sorted(first.stats)
    # the tiny space's data-aware layers: every block Linear and the tied head
    assert names == sorted(i.name for i in sf.space.layers)
    files = sorted((first.levels.root / "stats").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    later = with_levels(sf, prepared, url, fp)  # a later sweep of the same model and tokens
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read back, not computed again
    for name in names:
        assert torch.equal(later.stats[name].gram, first.stats[name].gram)
    c_fc = sf.model.get_submodule("blocks.0.mlp.c_fc")
    gram = first.stats["blocks.0.mlp.c_fc"].gram
    assert gram.shape == (c_fc.in_features, c_fc.in_features) and gram.dtype == torch.float64
    assert torch.allclose(gram, gram.T) and bool((gram.diagonal() > 0).all())


def test_ray_workers_read_statistics_from_the_level_folder_when_it_holds_them(
    tmp_path, tiny_cache
) -> None:
    from dataclasses import replace

    from microsweep.prepare import load_space_file, model_fingerprint, prepare, with_levels
    from microsweep.search._workers import WorkerOptions, shipped_stats

    sf = load_space_file(str(ROOT / "examples" / "tiny.py"))
    url = f"sqlite:///{tmp_path / 's.db'}"
    prepared = with_levels(sf, prepare(sf, 0), url, model_fingerprint(sf.model))
    store = prepared.levels
    # the folder holds every layer's: Ray workers get none by reference, in-process ones share
    assert shipped_stats(prepared, WorkerOptions(workers=2)) is None
    assert shipped_stats(prepared, WorkerOptions(in_process=True)) is prepared.stats
    first = sorted(prepared.stats)[0]
    store._stats_path(first).unlink()
    assert shipped_stats(prepared, WorkerOptions(workers=2)) is prepared.stats
    store.save_stats({first: prepared.stats[first]})
    # a worker without them reads the files (not a calibration pass of its own: a file changed
    # on purpose changes the build), and keeps none of them once its layers are built
    policy = _policy(sparsity=0.5, bits=4, **AWARE)
    s = prepared.stats[MLP[0]]
    eye = torch.eye(s.gram.shape[0], dtype=s.gram.dtype)
    store.save_stats({MLP[0]: replace(s, gram=s.gram + s.gram.diagonal().mean() * eye)})
    changed = {**prepared.stats, MLP[0]: store.load_stats([MLP[0]])[MLP[0]]}

    def cache(**kw) -> VariantCache:  # noqa: ANN003
        return VariantCache(sf.model, calib=prepared.calib, **kw)

    x = prepared.windows[:4, :-1]
    lazy = cache(store=pickle.loads(pickle.dumps(store)))
    got = lazy.model(policy)(x)
    assert torch.equal(got, cache(stats=changed, store=LevelStore(tmp_path / "a")).model(policy)(x))
    assert not torch.equal(
        got, cache(stats=prepared.stats, store=LevelStore(tmp_path / "b")).model(policy)(x)
    )
    assert not [key for key in lazy._common if key[1] == ("stats",)]


def test_knobs_without_a_method_take_data_aware_defaults_where_tokens_exist(tiny_gpt) -> None:
    def space() -> Space:
        return Space(
            tiny_gpt,
            rules={
                "blocks.*.mlp.*": dict(sparsity=Sparsity(0, 0.5), bits=Bits(4, 8)),
                "blocks.*.attn.*": dict(
                    sparsity=Sparsity(0, 0.5, method="magnitude"), bits=Bits(4, method="rtn")
                ),
                "wte": dict(bits=Bits(8)),
            },
        )

    def methods(s: Space) -> dict[str, tuple[str, str, bool]]:
        choices = {
            u.key: {
                k: knob.grid()[-1] if isinstance(knob, Sparsity) else knob.choices[0]
                for k, knob in u.knobs.items()
            }
            for u in s.units()
        }
        layers = s.policy_for(choices).layers
        return {n: (lp.prune_method, lp.quant_method, lp.act_order) for n, lp in layers.items()}

    calibrated = space()
    assert methods(calibrated)["blocks.0.mlp.c_fc"] == ("magnitude", "rtn", False)  # as given
    calibrated.use_default_methods(calibrated=True)
    got = methods(calibrated)
    assert got["blocks.0.mlp.c_fc"] == ("sparsegpt", "gptq", True)
    assert got["blocks.0.attn.c_attn"] == ("magnitude", "rtn", False)  # named: kept
    assert got["wte"] == ("magnitude", "gptq", True)  # a table: token frequencies (no pruning)
    knob = calibrated.to_json()["rules"][0]["settings"]
    assert knob["sparsity"]["method"] == "sparsegpt" and knob["bits"]["act_order"] is True
    uncalibrated = space()
    uncalibrated.use_default_methods(calibrated=False)
    assert methods(uncalibrated)["blocks.0.mlp.c_fc"] == ("magnitude", "rtn", False)
    # a sweep stored before the defaults existed names no method: it keeps the plain ones
    old = uncalibrated.to_json()
    calibrated.pin_methods(old)
    assert methods(calibrated)["blocks.0.mlp.c_fc"] == ("magnitude", "rtn", False)
    calibrated.pin_methods(space_json_of(calibrated, "sparsegpt"))
    assert methods(calibrated)["blocks.0.mlp.c_fc"][0] == "sparsegpt"


def space_json_of(space: Space, method: str) -> dict:
    """`space.to_json()` with the first rule's sparsity method set to `method`."""
    data = space.to_json()
    data["rules"][0]["settings"]["sparsity"]["method"] = method
    return data


def test_a_sweep_from_before_the_defaults_resumes_and_exports_unchanged(tmp_path, tiny_cache):
    """A sweep whose stored space file names no method ran magnitude and round-to-nearest:
    resumed, its new trials still do, and its trials export with bytes equal to the count and
    the stored perplexity."""
    from microsweep import resume_sweep, run_sweep
    from microsweep.export import export_trial, load
    from microsweep.storage import Store

    source = (ROOT / "examples" / "tiny.py").read_text()
    plain = source.replace("step=0.1)", 'step=0.1, method="magnitude")')
    plain = re.sub(r"Bits\(([\d, ]+)\)", r'Bits(\1, method="rtn")', plain)
    assert plain.count('method="magnitude"') == 2 and plain.count('method="rtn"') == 4
    path = tmp_path / "space.py"
    path.write_text(plain)
    url = f"sqlite:///{tmp_path / 'old.db'}"
    run_sweep(str(path), name="old", trials=3, storage=url, sampler="tpe", seed=0,
              in_process=True, progress=False)  # fmt: skip
    store = Store(url, must_exist=True)
    # what an earlier version stored: the source as written, with no method named
    store.update_sweep("old", space_source=source)
    store.dispose()
    resume_sweep("old", trials=6, storage=url, in_process=True, progress=False)
    store = Store(url, must_exist=True)
    rows = store.trials("old")
    store.dispose()
    assert len(rows) == 6
    for row in rows:
        for lp in row.policy["layers"].values():
            assert "prune_method" not in lp and "quant_method" not in lp
    assert not (tmp_path / "old.db.levels").exists()  # nothing data-aware was built
    done = [r for r in rows if r.state == "COMPLETE"]
    windows = eval_windows(_corpus().val, window=32, max_tokens=2048)
    out = tmp_path / "t.msz"
    info = export_trial("old", done[-1].number, out, storage=url)
    assert abs(info.ratio - 1.0) <= 0.02
    assert perplexity(load(out), windows) == pytest.approx(done[-1].perplexity, rel=1e-4)


def _corpus():
    from microsweep import data

    return data.tiny_shakespeare()


def test_an_exported_trial_is_the_model_the_store_built(tmp_path, tiny_cache) -> None:
    """A sweep with the data-aware defaults files its levels; export rebuilds its trials from
    them: equal logits to the worker's model and bytes equal to the count."""
    from microsweep import run_sweep
    from microsweep.export import export_trial, load
    from microsweep.prepare import load_space_file, model_fingerprint, prepare, with_levels
    from microsweep.storage import Store

    url = f"sqlite:///{tmp_path / 'new.db'}"
    tiny = str(ROOT / "examples" / "tiny.py")
    run_sweep(tiny, name="new", trials=4, storage=url, sampler="tpe", seed=1,
              in_process=True, progress=False)  # fmt: skip
    store = Store(url, must_exist=True)
    rows = [r for r in store.trials("new") if r.state == "COMPLETE"]
    store.dispose()
    assert rows
    sf = load_space_file(tiny)
    prepared = with_levels(sf, prepare(sf, 0), url, model_fingerprint(sf.model))
    levels = prepared.levels
    built = levels.build_count()
    assert built > 0 and built == levels.stored_levels()
    row = max(rows, key=lambda r: sum(lp.get("sparsity", 0) for lp in r.policy["layers"].values()))
    policy = Policy.from_json(row.policy)
    assert any(lp.data_aware for lp in policy.layers.values())
    out = tmp_path / "t.msz"
    info = export_trial("new", row.number, out, storage=url)
    assert abs(info.ratio - 1.0) <= 0.02
    assert levels.build_count() == built  # export read the levels, built none
    worker = VariantCache(sf.model, calib=prepared.calib, stats=prepared.stats, store=levels)
    measured = worker.model(policy)  # the model a worker evaluates, from the same levels
    if info.freebie:  # the 16-bit allowance: the file holds the fp16 values it was counted at
        measured = worker.rounded(measured)
    assert levels.build_count() == built
    x = prepared.windows[:8, :-1]
    exported = load(out)
    assert torch.allclose(exported(x), measured(x), atol=1e-5)
    assert perplexity(exported, prepared.windows) == pytest.approx(row.perplexity, rel=1e-4)


@pytest.mark.ray
@pytest.mark.slow
def test_two_ray_workers_build_each_level_once(tmp_path, tiny_cache) -> None:
    """Two Ray workers run a sweep with the data-aware defaults: the build log (one line per
    build, from any process) names every (layer, settings) once, and each is on disk."""
    import json

    from microsweep import run_sweep
    from microsweep.prepare import load_space_file, model_fingerprint, prepare, with_levels

    url = f"sqlite:///{tmp_path / 'ray.db'}"
    tiny = str(ROOT / "examples" / "tiny.py")
    result = run_sweep(tiny, name="ray", trials=8, workers=2, storage=url, sampler="tpe",
                       seed=2, progress=False)  # fmt: skip
    assert "FAIL" not in result.states
    sf = load_space_file(tiny)
    levels = with_levels(sf, prepare(sf, 0), url, model_fingerprint(sf.model)).levels
    lines = (levels.root / "builds.log").read_text().splitlines()
    keys = [(e["layer"], json.dumps(e["settings"], sort_keys=True)) for e in map(json.loads, lines)]
    assert keys and len(keys) == len(set(keys)) == levels.stored_levels()
    assert all(e["pid"] != os.getpid() for e in map(json.loads, lines))  # built on workers


def test_a_folder_that_cannot_be_written_builds_in_memory(tmp_path) -> None:
    """A read-only medium or a full disk: levels are built as without a store, nothing fails."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = LevelStore(blocker / "levels")
    settings = LayerPolicy(sparsity=0.5, prune_method="sparsegpt")
    built = store.get_or_build("l", settings, lambda: torch.nn.Linear(2, 2))
    assert isinstance(built, torch.nn.Linear) and not store.writable
    assert store.builds == 1 and store.build_count() == 0 and store.stored_levels() == 0
    store.save_stats({})  # and statistics are simply not kept
