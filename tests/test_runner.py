"""The trial runner: real compression and counting, isolation between trials on one worker."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from microsweep import LayerPolicy, Policy
from microsweep.score import eval_windows, mean_context
from microsweep.workers import EvalSettings, TrialRunner


@pytest.fixture(scope="module")
def runner(tiny_gpt, corpus) -> TrialRunner:
    windows = eval_windows(corpus.val, window=32, max_tokens=1024)
    calib = corpus.train[: 8 * 32].view(8, 32)
    return TrialRunner(
        tiny_gpt,
        windows,
        EvalSettings(context=mean_context(32)),
        calib=calib,
        train_tokens=corpus.train,
        threads=1,
    )


def _policy(**layers: LayerPolicy) -> dict:
    return Policy(layers={k.replace("__", "."): v for k, v in layers.items()}).to_json()


def test_dense_policy_is_the_base_model_at_its_16_bit_storage(runner, tiny_gpt):
    """Under the 16-bit allowance the evaluated model is the fp16 artifact the count describes."""
    import copy

    from microsweep.score import perplexity

    res = runner.run(0, Policy().to_json())
    assert res.status == "ok"
    assert res.freebie is True
    rounded = copy.deepcopy(tiny_gpt)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    assert res.perplexity == pytest.approx(perplexity(rounded, runner.windows), rel=1e-9)
    fp32 = perplexity(tiny_gpt, runner.windows)
    assert res.perplexity != fp32 and res.perplexity == pytest.approx(fp32, rel=1e-3)


def test_compression_changes_the_model_and_the_counts(runner):
    dense = runner.run(0, Policy().to_json())
    small = runner.run(
        1, _policy(blocks__0__mlp__c_fc=LayerPolicy(sparsity=0.9, bits=4, act_bits=8))
    )
    assert small.status == "ok", small.error
    assert small.perplexity != dense.perplexity
    row = next(r for r in small.layers if r["name"] == "blocks.0.mlp.c_fc")
    assert row["bits"] == 4 and row["act_bits"] == 8
    dense_row = next(r for r in dense.layers if r["name"] == "blocks.0.mlp.c_fc")
    assert row["params"] < dense_row["params"] / 4  # 10% of values at 4 bits plus mask, scales
    assert small.freebie is False  # quantized below 16 bits: no 16-bit allowance


def test_base_model_is_never_modified(runner, tiny_gpt):
    before = {k: v.clone() for k, v in tiny_gpt.state_dict().items()}
    runner.run(
        2,
        _policy(
            blocks__1__attn__c_attn=LayerPolicy(sparsity=0.5, bits=2, rank=None),
            head=LayerPolicy(bits=4),
        ),
    )
    for k, v in tiny_gpt.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_torch_state_does_not_leak_between_trials(tiny_gpt, runner):
    """A trial's result depends on its number alone, whatever global torch state came before."""
    noisy = TrialRunner(
        tiny_gpt,
        runner.windows,
        runner.settings,
        calib=runner.calib,
        threads=1,
        evaluate=lambda model: 5.0 + float(torch.rand(())),  # reads the global RNG
    )
    policy = _policy(blocks__0__mlp__c_fc=LayerPolicy(sparsity=0.5, bits=8))
    first = noisy.run(5, policy)
    other = noisy.run(6, policy)
    # a previous trial (or user code) leaves global torch state dirty
    torch.set_num_threads(2)
    torch.manual_seed(1234)
    torch.rand(100)
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            second = noisy.run(5, policy)
            assert not torch.is_grad_enabled()  # the caller's grad mode is given back
    finally:
        torch.set_default_dtype(torch.float32)
    assert second.status == "ok", second.error
    assert second.perplexity == first.perplexity != other.perplexity
    assert second.params == first.params and second.ops == first.ops
    assert torch.is_grad_enabled() and torch.get_num_threads() == 1


def test_finetune_hyperparameters_run_projected_steps(runner):
    base = _policy(blocks__0__mlp__c_fc=LayerPolicy(sparsity=0.8, bits=4))
    tuned = dict(base, hyper={"finetune_steps": 3, "finetune_lr": 1e-3})
    a = runner.run(7, base)
    b = runner.run(7, tuned)
    assert b.status == "ok" and "finetune" in b.timings
    assert b.perplexity != a.perplexity
    # projection keeps the compressed structure: the count is unchanged by fine-tuning
    assert b.params == pytest.approx(a.params, rel=1e-3)


def test_errors_come_back_as_results(runner):
    res = runner.run(9, _policy(no__such__layer=LayerPolicy(bits=8)))
    assert res.status == "error" and "no.such.layer" in res.error
    res = runner.run(10, {"type": "bogus"})
    assert res.status == "error" and "not a microsweep policy" in res.error


def test_cached_variants_give_exactly_the_copied_models_results(runner, tiny_gpt):
    """Trials built from shared tensors and cached layers score value for value as trials on
    full copies: rank, pruning, weight and input quantization, the tied head, the 16-bit
    rounding, and repeats that hit the cache."""
    import dataclasses

    from microsweep.compress import VariantCache

    copying = TrialRunner(
        tiny_gpt,
        runner.windows,
        dataclasses.replace(runner.settings, cache_mb=0),
        calib=runner.calib,
        threads=1,
    )
    cached = TrialRunner(tiny_gpt, runner.windows, runner.settings, calib=runner.calib, threads=1)
    before = {k: v.clone() for k, v in tiny_gpt.state_dict().items()}
    policies = [
        _policy(blocks__0__mlp__c_fc=LayerPolicy(sparsity=0.5, rank=8)),  # 16-bit allowance
        _policy(head=LayerPolicy(bits=6), blocks__1__mlp__c_proj=LayerPolicy(act_bits=8, bits=8)),
        _policy(
            blocks__0__mlp__c_fc=LayerPolicy(sparsity=0.3, rank=4, bits=4, act_bits=8),
            blocks__1__attn__c_attn=LayerPolicy(sparsity=0.6, block=(4, 4), bits=8),
        ),
        _policy(  # data-aware ranks: input statistics from one calibration pass
            blocks__0__mlp__c_proj=LayerPolicy(rank=6, rank_method="whiten", sparsity=0.3),
            blocks__1__mlp__c_fc=LayerPolicy(rank=8, rank_method="activation", bits=8),
        ),
        Policy().to_json(),
    ]
    for i, policy in enumerate(policies * 2):  # the second round hits the cache
        a, b = copying.run(i, policy), cached.run(i, policy)
        assert a.status == b.status == "ok", (a.error, b.error)
        assert b.perplexity == a.perplexity, i
        assert (b.params, b.ops, b.freebie) == (a.params, a.ops, a.freebie)
    cache = cached._cache
    assert isinstance(cache, VariantCache) and cache.hits >= 5 and cache.misses >= 5
    for k, v in tiny_gpt.state_dict().items():  # nothing shared was written to
        assert torch.equal(v, before[k]), k


def test_a_cached_trial_copies_only_what_its_policy_changes(runner, tiny_gpt):
    from microsweep.compress import VariantCache

    cache = VariantCache(tiny_gpt, calib=runner.calib)
    policy = Policy(layers={"blocks.0.mlp.c_fc": LayerPolicy(sparsity=0.5, bits=8)})
    model = cache.model(policy)
    base = dict(tiny_gpt.named_parameters())
    mine = dict(model.named_parameters())
    changed = {n for n in mine if mine[n] is not base.get(n)}
    assert changed == {"blocks.0.mlp.c_fc.weight", "blocks.0.mlp.c_fc.bias"}
    again = cache.model(policy)
    assert again.blocks[0].mlp.c_fc is model.blocks[0].mlp.c_fc  # a lookup, not a rebuild
    # a quantized head takes the embedding with it: one tensor, as in compress()
    tied = cache.model(Policy(layers={"head": LayerPolicy(bits=6)}))
    assert tied.head.weight is tied.wte.weight and tied.wte.weight is not tiny_gpt.wte.weight
    # the byte budget holds: a tiny cache keeps only the latest entry
    small = VariantCache(tiny_gpt, calib=runner.calib, max_bytes=1)
    small.model(policy)
    small.model(Policy(layers={"blocks.1.mlp.c_fc": LayerPolicy(sparsity=0.5, bits=8)}))
    assert len(small) == 1


def test_distillation_loss_is_exact_at_its_ends(tiny_gpt, corpus):
    """alpha 0 is the plain cross-entropy; a student that is its own teacher has KL 0."""
    from microsweep.models import lm_batch_loss

    def loss(**kw):
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            return float(lm_batch_loss(tiny_gpt, corpus.train, block_size=16, batch_size=4,
                                       gen=gen, **kw))  # fmt: skip

    plain = loss()
    assert loss(teacher=tiny_gpt, alpha=0.0) == plain
    assert loss(teacher=tiny_gpt, alpha=1.0, temperature=3.0) == pytest.approx(0.0, abs=1e-6)
    assert loss(teacher=tiny_gpt, alpha=0.5) == pytest.approx(0.5 * plain, rel=1e-6)


def test_distillation_recovers_a_pruned_model(tiny_gpt, corpus):
    """Recovery fine-tuning distilled from the dense model lowers the perplexity of a heavily
    pruned model, with masks kept (the counts do not move); a bad alpha fails the trial.

    Counted without the 16-bit allowance: its fp16 rounding flushes a fine-tuned weight that
    lands within 3e-8 of zero to an exact zero, a multiply fewer that has nothing to do with
    the masks (it happens or not depending on the pretrained weights)."""
    windows = eval_windows(corpus.val, window=32, max_tokens=1024)
    runner = TrialRunner(
        tiny_gpt,
        windows,
        EvalSettings(context=mean_context(32), count={"freebie": False}),
        calib=corpus.train[: 8 * 32].view(8, 32),
        train_tokens=corpus.train,
        threads=1,
    )
    layers = {
        f"blocks__{b}__{n}": LayerPolicy(sparsity=0.8)
        for b in range(2)
        for n in ("mlp__c_fc", "mlp__c_proj", "attn__c_attn")
    }
    pruned = Policy(layers={k.replace("__", "."): v for k, v in layers.items()})
    before = runner.run(0, pruned.to_json(), early_stop=False)
    hyper = {"finetune_steps": 40, "finetune_lr": 3e-3, "distill_alpha": 0.7}
    tuned = runner.run(1, Policy(layers=pruned.layers, hyper=hyper).to_json(), early_stop=False)
    assert before.status == tuned.status == "ok", tuned.error
    assert tuned.perplexity < 0.97 * before.perplexity
    assert (tuned.params, tuned.ops) == (before.params, before.ops)
    bad = Policy(layers=pruned.layers, hyper={**hyper, "distill_alpha": 1.5}).to_json()
    res = runner.run(2, bad, early_stop=False)
    assert res.status == "error" and "distill_alpha 1.5" in res.error


class _TinyLM(torch.nn.Module):
    """ids (B, T) -> logits (B, T, V), small enough to build in a test."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.head = torch.nn.Linear(8, 20)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def test_an_evaluate_that_returns_no_perplexity_fails_the_trial():
    """Scores, ceilings and the planner take the log of a perplexity: evaluate must return a
    positive finite number, and anything else is a FAIL naming evaluate."""
    import math

    windows = torch.zeros(0, 17, dtype=torch.long)
    for value, needle in (
        (-5.0, "evaluate(model) returned -5;"),
        (0, "evaluate(model) returned 0;"),
        ("abc", "evaluate(model) returned str 'abc'"),
        (None, "evaluate(model) returned NoneType"),
        (math.nan, "not finite"),
        (math.inf, "not finite"),
    ):
        runner = TrialRunner(
            _TinyLM(), windows, EvalSettings(context=8.5), evaluate=lambda m, v=value: v, threads=1
        )
        res = runner.run(0, Policy().to_json())
        assert res.status == "error" and needle in res.error, (value, res.error)
        assert "\n" not in res.error
    ok = TrialRunner(_TinyLM(), windows, EvalSettings(context=8.5), evaluate=lambda m: 3)
    assert ok.run(0, Policy().to_json()).perplexity == 3.0


def test_in_process_threads_follow_cpus_per_worker_and_are_given_back():
    """--in-process runs each trial on `worker_threads(cpus_per_worker)` torch threads, as a Ray
    worker would (at least 1, at most the machine's cores), and puts the caller's back."""
    import os

    from microsweep.errors import UsageError
    from microsweep.workers import make_pool

    seen: list[int] = []

    def evaluate(model: torch.nn.Module) -> float:
        seen.append(torch.get_num_threads())
        return 5.0

    cores = os.cpu_count() or 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        for cpus, threads in ((1, 1), (0.5, 1), (1.9, 1), (10_000, cores), (cores, cores)):
            pool = make_pool(
                1,
                model=_TinyLM(),
                windows=torch.zeros(0, 17, dtype=torch.long),
                settings=EvalSettings(context=8.5),
                evaluate=evaluate,
                in_process=True,
                cpus_per_worker=cpus,
            )
            pool.submit(0, Policy().to_json())
            res = pool.wait()
            assert res is not None and res.status == "ok", res
            assert seen[-1] == threads and res.worker.endswith(f"threads {threads}"), cpus
            assert torch.get_num_threads() == cores  # given back after the trial
        for bad in (0, -1, float("nan")):
            with pytest.raises(UsageError, match="--cpus-per-worker"):
                make_pool(
                    1, model=_TinyLM(), windows=torch.zeros(0, 17, dtype=torch.long),
                    settings=EvalSettings(context=8.5), in_process=True, cpus_per_worker=bad,
                )  # fmt: skip
    finally:
        torch.set_num_threads(before)


def test_every_result_is_a_trial_result_with_timings_never_negative(runner):
    """ok, error and exception paths all come back as one `TrialResult` with perf_counter
    timings (>= 0, a total covering the stages) and the worker that ran it."""
    from microsweep.workers import TrialResult

    results = [
        runner.run(3, Policy().to_json()),
        runner.run(4, _policy(no__such__layer=LayerPolicy(bits=8))),
        runner.run(5, {"type": "bogus"}),
    ]
    assert [r.status for r in results] == ["ok", "error", "error"]
    for number, res in zip((3, 4, 5), results, strict=True):
        assert isinstance(res, TrialResult) and res.number == number
        assert res.timings and all(v >= 0 for v in res.timings.values()), res.timings
        stages = sum(v for k, v in res.timings.items() if k != "total")
        assert res.timings["total"] >= stages
        assert res.worker and res.worker.endswith("threads 1")
    assert results[0].measured_perplexity == results[0].perplexity
    assert results[1].perplexity is None and results[1].layers == []


def test_training_hyperparameters_are_declared_once_with_their_defaults():
    """The recipes read every training hyperparameter by the name `HYPERPARAMETERS` lists."""
    from microsweep.workers._recipes import HYPERPARAMETERS, FineTuneRecipe, GroupLassoRecipe

    assert HYPERPARAMETERS == {
        "finetune_steps": 0,
        "distill_alpha": 0.0,
        "distill_temperature": 2.0,
        "finetune_eval_every": 0,
        "finetune_lr": 1e-4,
        "group_lasso_steps": 0,
        "group_lasso_penalty": 1e-4,
        "group_lasso_lr": 1e-4,
        "group_lasso_reweight_every": 10,
    }
    assert FineTuneRecipe.from_hyper({"distill_alpha": 7}) == FineTuneRecipe()  # no steps
    tuned = FineTuneRecipe.from_hyper({"finetune_steps": 5, "finetune_lr": 3e-3})
    assert (tuned.steps, tuned.lr, tuned.distill_temperature) == (5, 3e-3, 2.0)
    with pytest.raises(ValueError, match="group_lasso_reweight_every 0 must be at least 1"):
        GroupLassoRecipe.from_hyper({"group_lasso_steps": 5, "group_lasso_reweight_every": 0})


def test_subset_windows_follow_the_stop_rules_chunks():
    """The first k windows in chunk order (chunk c holds c, c + 8, ...), a prefix of one order."""
    from microsweep.errors import UsageError
    from microsweep.score import StopRule, subset_windows

    assert subset_windows(20, 5) == [0, 8, 16, 1, 9]
    assert subset_windows(20, 3, chunks=4) == [0, 4, 8]
    assert subset_windows(5, 99) == [0, 1, 2, 3, 4]  # more than there are: all, in chunk order
    rule = StopRule(dense_nll=(1.0,) * 20, tokens_per_window=4, ceiling=3.0)
    assert subset_windows(20, 20) == [i for chunk in rule.chunk_indices() for i in chunk]
    assert subset_windows(20, 7) == subset_windows(20, 12)[:7]
    for bad in ((0, 3), (20, 0), (20, True)):
        with pytest.raises(UsageError, match="must be an int >= 1"):
            subset_windows(*bad)


def test_a_subset_evaluation_gives_the_full_evaluations_values_at_its_windows(
    runner, tiny_gpt, corpus
):
    """windows= evaluates those windows alone, without early stop, through the runner and the
    in-process pool: per-window NLLs as the full evaluation's at the same indices, in order."""
    import math

    from microsweep.errors import UsageError
    from microsweep.score import StopRule, subset_windows
    from microsweep.workers import make_pool

    policy = _policy(blocks__0__mlp__c_fc=LayerPolicy(sparsity=0.7, bits=4))
    full = runner.run(11, policy, window_nll=True)
    assert full.status == "ok" and full.evaluated is None and len(full.window_nll) == 32
    picked = subset_windows(32, 6)[::-1] + [31]  # any order: results follow it
    sub = runner.run(11, policy, windows=picked)
    assert sub.status == "ok" and sub.evaluated == picked
    assert sub.window_nll == pytest.approx([full.window_nll[i] for i in picked], rel=1e-9)
    tokens = len(picked) * (runner.windows.shape[1] - 1)
    assert sub.perplexity == pytest.approx(math.exp(sum(sub.window_nll) / tokens), rel=1e-12)
    assert sub.perplexity != pytest.approx(full.perplexity, rel=1e-6)
    assert sub.params == full.params and sub.ops == full.ops  # the same trial, counted alike
    # a stop rule whose ceiling nothing meets prunes a full evaluation, never a subset
    dense = runner.run(12, Policy().to_json(), window_nll=True)
    rule = StopRule(dense_nll=tuple(dense.window_nll), tokens_per_window=32, ceiling=1.01)
    strict = TrialRunner(
        tiny_gpt, runner.windows, replace(runner.settings, stop=rule), calib=runner.calib,
        threads=1,
    )  # fmt: skip
    assert strict.run(11, policy).status == "pruned"
    pool = make_pool(
        1, model=tiny_gpt, windows=runner.windows, settings=strict.settings, calib=runner.calib,
        in_process=True,
    )  # fmt: skip
    pool.submit(11, policy, windows=picked)
    pooled = pool.wait()
    assert pooled.status == "ok" and pooled.evaluated == picked
    assert pooled.window_nll == pytest.approx(sub.window_nll, rel=1e-9)
    for bad, why in (
        ([], "is empty"),
        ([0, 32], "32 is not an index of the 32"),
        ([1, 1], "twice"),
        (torch.tensor([1]), "pass .tolist()"),
    ):
        with pytest.raises(UsageError, match=why):
            pool.submit(11, policy, windows=bad)
    assert pool.free == 1  # nothing ran
