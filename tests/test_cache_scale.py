"""The variant cache at scale: compact entries (int32 orders, float32 SVDs truncated to the
largest rank asked), shared entries kept ahead of variants, a sequential scan that survives a
budget smaller than it, the size option reaching every worker, and the sweep's hit rate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from microsweep.compress import VariantCache, compress
from microsweep.errors import UsageError
from microsweep.spaces import LayerPolicy, Policy
from tests.conftest import ROOT

TINY = str(ROOT / "examples" / "tiny.py")


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "head"]


def _policy(names: list[str], **settings) -> Policy:
    return Policy(layers={n: LayerPolicy(**settings) for n in names})


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_orders_are_int32_and_svds_float32_truncated_to_the_largest_rank(tiny_gpt) -> None:
    """Entries shared by every level are stored compactly, and the models built from them are
    the ones `compress` builds, value for value; a rank past what was kept recomputes."""
    fc = "blocks.0.mlp.c_fc"  # 128 x 32: full rank 32, break-even 26
    cache = VariantCache(tiny_gpt, max_rank={fc: 12})
    policy = Policy(
        layers={
            fc: LayerPolicy(rank=8, sparsity=0.5),
            "blocks.1.mlp.c_proj": LayerPolicy(rank=6),  # 32 x 128: no hint, kept to 25
            "blocks.0.attn.c_attn": LayerPolicy(sparsity=0.4, bits=8),
        }
    )
    _same_weights(cache.model(policy), compress(tiny_gpt, policy))
    common = dict(cache._common)
    orders = [v for k, (v, _) in common.items() if k[1][0] == "order"]
    assert len(orders) == 3  # c_attn's, and both factors' of c_fc at rank 8
    assert all(o.dtype == torch.int32 for o in orders)
    (u, s, vh), _ = common[(fc, ("svd", "plain"))][0]
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert (u.shape, s.shape, vh.shape) == ((128, 12), (12,), (12, 32))
    assert u.is_contiguous() and u.untyped_storage().nbytes() == 128 * 12 * 4  # no hidden tail
    (_, s2, _), _ = common[("blocks.1.mlp.c_proj", ("svd", "plain"))][0]
    assert s2.numel() == 25  # the largest rank below the break-even
    # float32 keeps the decomposition: singular values as float64 computes them
    exact = torch.linalg.svdvals(tiny_gpt.get_submodule(fc).weight.double())[:12]
    torch.testing.assert_close(s.double(), exact, rtol=1e-6, atol=0)
    # a rank beyond the 12 kept: the SVD is computed again, for 16, and still exact
    more = Policy(layers={fc: LayerPolicy(rank=16, sparsity=0.3)})
    _same_weights(cache.model(more), compress(tiny_gpt, more))
    (_, s3, _), _ = cache._common[(fc, ("svd", "plain"))][0]
    assert s3.numel() == 16
    held = [*cache._variants.values(), *cache._common.values()]
    assert cache.nbytes == sum(size for _, size in held)


def test_a_repeated_policy_hits_every_variant_with_a_budget_just_above_it(tiny_gpt) -> None:
    names = _linears(tiny_gpt)
    policy = _policy(names, sparsity=0.5, bits=8)
    sizing = VariantCache(tiny_gpt)
    sizing.model(policy)
    size = sizing.nbytes
    cache = VariantCache(tiny_gpt, max_bytes=size + 1024)
    cache.model(_policy(names, sparsity=0.3, bits=4))  # another policy fills it first
    cache.model(_policy(names, sparsity=0.7, rank=4))
    cache.model(policy)
    hits, misses = cache.hits, cache.misses
    cache.model(policy)
    assert (cache.hits - hits, cache.misses - misses) == (len(names), 0)
    assert cache.nbytes <= cache.max_bytes


def test_a_scan_larger_than_the_budget_keeps_the_layers_that_fit(tiny_gpt) -> None:
    """Half a policy's bytes: least-recently-used eviction under a scan of the layers in model
    order would find none of them on the repeat; the cache keeps what fits and finds it."""
    names = _linears(tiny_gpt)
    policy = _policy(names, sparsity=0.5, bits=8)
    sizing = VariantCache(tiny_gpt)
    sizing.model(policy)
    cache = VariantCache(tiny_gpt, max_bytes=sizing.nbytes // 2)
    for _ in range(3):
        hits, misses = cache.hits, cache.misses
        cache.model(policy)
        assert cache.nbytes <= cache.max_bytes
    found, built = cache.hits - hits, cache.misses - misses
    assert found + built == len(names)
    assert found >= len(names) // 4, (found, built)


def test_shared_entries_outlive_the_variants(tiny_gpt) -> None:
    """With room for the orders and one policy's variants, a second sparsity evicts the first
    one's variants, never the orders every sparsity is read from."""
    names = _linears(tiny_gpt)
    sizing = VariantCache(tiny_gpt)
    sizing.model(_policy(names, sparsity=0.5))
    common = sizing.common_bytes
    variants = sizing.nbytes - common
    assert common > 0 and variants > 0
    cache = VariantCache(tiny_gpt, max_bytes=common + variants + variants // 2)
    cache.model(_policy(names, sparsity=0.5))
    orders = {k: v for k, (v, _) in cache._common.items()}
    assert len(orders) == len(names)
    for sparsity in (0.7, 0.3, 0.6):
        cache.model(_policy(names, sparsity=sparsity))
        assert {k: v for k, (v, _) in cache._common.items()} == orders  # the same tensors
        kept = {k[1].sparsity for k in cache._variants}
        assert sparsity in kept and len(cache._variants) >= len(names)
    assert cache.nbytes <= cache.max_bytes
    assert cache.builds == 4 * len(names)


def test_each_trial_reports_its_cache_use_and_the_sweep_sums_it(tiny_gpt, corpus) -> None:
    from microsweep.score import eval_windows, mean_context
    from microsweep.search._result import cache_line, cache_summary
    from microsweep.workers import EvalSettings, TrialRunner

    windows = eval_windows(corpus.val, window=32, max_tokens=256)
    settings = EvalSettings(context=mean_context(32), cache_mb=8)
    runner = TrialRunner(tiny_gpt, windows, settings, threads=1)
    assert runner._cache.max_bytes == 8 * 2**20
    names = _linears(tiny_gpt)
    assert len(names) == 8
    policies = [_policy(names, sparsity=s, bits=8).to_json() for s in (0.2, 0.5)]
    policies.append(_policy(names[:3], sparsity=0.2, bits=8).to_json())  # 3 of the first's
    results = [runner.run(i, p) for i, p in enumerate(policies * 2)]
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    uses = [r.cache for r in results]
    assert [(u.hits, u.misses) for u in uses] == [
        (0, len(names)),
        (0, len(names)),
        (3, 0),
        (len(names), 0),
        (len(names), 0),
        (3, 0),
    ]
    assert all(0 < u.nbytes <= u.max_bytes == 8 * 2**20 for u in uses)
    dense = runner.run(9, Policy().to_json())
    assert dense.status == "ok" and dense.cache is None  # nothing looked up
    summary = cache_summary([*uses, dense.cache])
    assert (summary["hits"], summary["misses"]) == (2 * len(names) + 6, 2 * len(names))
    assert 0.0 <= summary["reused"] <= 1.0
    assert summary["reused"] == pytest.approx(summary["hits"] / (summary["hits"] + 16))
    line = cache_line(summary)
    share = round(100 * summary["reused"])
    assert line.startswith(f"cache: {share}% of layer variants reused (22 of 38), ")
    assert line.endswith("of 8 MiB per worker")
    assert cache_summary([None, None]) == {}


def test_cache_size_is_checked_and_sized_from_memory_and_model(tiny_gpt, corpus) -> None:
    from microsweep.score import eval_windows, mean_context
    from microsweep.search import run_sweep
    from microsweep.workers import EvalSettings, TrialRunner, auto_cache_mb, check_cache_mb
    from microsweep.workers._runner import _free_memory

    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(UsageError, match="--cache-mb") as err:
            check_cache_mb(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="--cache-mb -2 must be a whole number"):
        run_sweep(TINY, name="x", trials=1, in_process=True, cache_mb=-2, storage="sqlite://")
    check_cache_mb(0)
    check_cache_mb(None)
    fp32 = 4 * sum(p.numel() for p in tiny_gpt.parameters())  # a tiny model: the floor
    assert auto_cache_mb(tiny_gpt) == 64 and 2 * fp32 < 64 * 2**20
    free = _free_memory(None)
    assert free is not None and free > 0
    big = nn.Linear(8192, 4096, bias=False)  # 128 MiB: 2 copies, unless memory is shorter
    sized = auto_cache_mb(big)
    assert sized == 256 or (64 <= sized < 256 and free < 2**30), (sized, free)
    assert auto_cache_mb(big, share=10**6) == 64  # a share of nothing: the floor
    windows = eval_windows(corpus.val, window=32, max_tokens=64)
    auto = TrialRunner(tiny_gpt, windows, EvalSettings(context=mean_context(32)), threads=1)
    assert auto._cache.max_bytes == 64 * 2**20
    off = TrialRunner(
        tiny_gpt, windows, EvalSettings(context=mean_context(32), cache_mb=0), threads=1
    )
    assert off._cache is None


def test_cli_cache_mb_reaches_the_worker_and_the_sweep_says_its_hit_rate(
    tmp_path, tiny_cache
) -> None:
    """`run --cache-mb 5` in-process: the closing lines give the cache's figure against 5 MiB
    and the study keeps it; a bad value is one line."""
    import optuna

    from microsweep.storage import Store
    from tests.conftest import cli

    bad = cli("run", TINY, "--name", "b", "--cache-mb", "-3", cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "--cache-mb" in bad.stderr and "at least 0" in bad.stderr
    url = f"sqlite:///{tmp_path / 'c.db'}"
    args = ["--trials", "4", "--sampler", "random", "--seed", "1", "--in-process"]
    run = cli("run", TINY, "--name", "c", "--storage", url, "--cache-mb", "5", *args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("cache: ")]
    assert len(lines) == 1 and lines[0].endswith("of 5 MiB per worker"), run.stdout
    store = Store(url, must_exist=True)
    study = optuna.load_study(study_name="c", storage=store.optuna_storage())
    summary = study.user_attrs["cache"]
    assert summary["max_bytes"] == 5 * 2**20 and summary["trials"] >= 1
    assert 0.0 <= summary["reused"] <= 1.0
    assert summary["reused"] == pytest.approx(
        summary["hits"] / (summary["hits"] + summary["misses"])
    )
    store.dispose()


@pytest.mark.ray
@pytest.mark.slow
def test_cache_settings_reach_a_ray_actor(tiny_cache) -> None:
    """A Ray worker's runner gets the cache size asked for, the share of memory for the
    automatic size and the space's largest ranks (Ray actors take the settings by value)."""
    from microsweep.prepare import load_space_file, prepare
    from microsweep.search._workers import WorkerOptions, largest_ranks, make_pool

    sf = load_space_file(TINY)
    prepared = prepare(sf, 0)
    ranks = largest_ranks(sf.space)
    # Rank(0.25, 1.0) on the MLP: 1.0 is full rank, kept below the break-even (26 of 32)
    assert ranks == {f"blocks.{i}.mlp.{n}": 25 for i in (0, 1) for n in ("c_fc", "c_proj")}
    pool = make_pool(sf, prepared, WorkerOptions(workers=1, cache_mb=3, eval_memory_mb=7))
    import ray  # after the pool set Ray's environment (token auth) for its local start

    try:
        actor = pool._idle[0]
        seen = ray.get(
            actor.call.remote(
                lambda r: (
                    r._cache.max_bytes,
                    r.settings.cache_share,
                    dict(r._cache.max_rank),
                    r.settings.memory_bytes,
                )
            ),
            timeout=600,
        )
    finally:
        pool.close()
    assert seen == (3 * 2**20, 1, ranks, 7 * 2**20)
    assert not ray.is_initialized()


def test_eval_memory_limit_reaches_the_runner_and_keeps_the_figures(tmp_path) -> None:
    """`eval_memory_mb` is checked before anything loads, reaches the workers' settings, and a
    1 MiB limit (one window per batch or less) measures the same perplexities as the default."""
    from microsweep.search import run_sweep
    from microsweep.search._workers import WorkerOptions, cache_settings

    with pytest.raises(UsageError, match="--eval-memory-mb"):
        run_sweep(
            TINY, name="bad", trials=2, eval_memory_mb=0, storage=f"sqlite:///{tmp_path}/b.db"
        )
    assert not (tmp_path / "b.db").exists()  # refused before the store opens
    from microsweep.prepare import load_space_file, prepare

    sf = load_space_file(TINY)
    settings = cache_settings(prepare(sf, 0).settings, WorkerOptions(eval_memory_mb=3), sf)
    assert settings.memory_bytes == 3 * 2**20 and settings.batch_size is None
    found = {}
    for limit in (None, 1):
        rows: list[dict] = []
        run_sweep(
            TINY, name="m", trials=3, sampler="random", seed=3, in_process=True,
            storage=f"sqlite:///{tmp_path}/m{limit}.db", progress=False, eval_memory_mb=limit,
            on_trial=rows.append,
        )  # fmt: skip
        found[limit] = [r["perplexity"] for r in rows if r.get("perplexity") is not None]
    assert found[None] and len(found[None]) == len(found[1])
    for a, b in zip(found[None], found[1], strict=True):
        assert b == pytest.approx(a, rel=1e-6)


def test_a_runner_chooses_its_batch_once_from_the_base(tiny_gpt, corpus) -> None:
    """With the batch following the memory limit, a runner probes its base once and reads
    every trial and chunk with that batch (no probe per evaluation); the figures are those of
    one batch of every window."""
    from microsweep.score import batch_for_memory, eval_windows, mean_context
    from microsweep.workers import EvalSettings, TrialRunner

    windows = eval_windows(corpus.val, window=32, max_tokens=32 * 24)
    settings = EvalSettings(context=mean_context(32), eval_memory_mb=1)
    runner = TrialRunner(tiny_gpt, windows, settings, threads=1)
    expected = batch_for_memory(tiny_gpt, windows, 2**20)
    assert 1 < expected < windows.shape[0]  # the limit really splits the windows
    policy = _policy(_linears(tiny_gpt), sparsity=0.5)
    result = runner.run(1, policy.to_json(), early_stop=False, window_nll=True)
    assert runner._reading == (expected, None)
    whole = TrialRunner(tiny_gpt, windows, EvalSettings(context=mean_context(32), batch_size=24))
    direct = whole.run(1, policy.to_json(), early_stop=False, window_nll=True)
    assert whole._reading == (24, None)  # an int batch without a limit: as given
    assert result.window_nll == pytest.approx(direct.window_nll, rel=1e-6)
