"""KL divergence from the dense model: the reference kept per sweep, the per-token formula against
sums written out by hand, the runner's KL beside its perplexity (full, subset, stopped early)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from microsweep import LayerPolicy, Policy
from microsweep.errors import UsageError
from microsweep.score import (
    StopRule,
    eval_windows,
    kl_reference,
    mean_context,
    subset_windows,
    window_nll,
    window_nll_kl,
)
from microsweep.workers import EvalSettings, TrialRunner


@pytest.fixture(scope="module")
def windows(corpus) -> torch.Tensor:
    return eval_windows(corpus.val, window=32, max_tokens=16 * 32)


@pytest.fixture(scope="module")
def noisy(tiny_gpt) -> torch.nn.Module:
    """The tiny GPT with every weight perturbed: a trial whose distributions differ."""
    model = copy.deepcopy(tiny_gpt)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return model


def _log_probs(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """float64 next-token log-probabilities (n, T, V), by plain torch."""
    with torch.no_grad():
        return F.log_softmax(model(windows[:, :-1]).double(), dim=-1)


def test_kl_over_the_whole_vocabulary_is_the_sum_written_out(tiny_gpt, noisy, windows):
    """V = 65 <= 256: the reference keeps every token and the KL is exact."""
    ref = kl_reference(tiny_gpt, windows, batch_size=5)  # batches of 5, 5, 5 and 1
    assert ref.exact and ref.k == ref.vocab == 65 and ref.ids is None and ref.log_tail is None
    assert ref.logp.dtype == torch.float32 and ref.logp.shape == (16, 32, 65)
    assert ref.nbytes == 16 * 32 * 65 * 4
    nll, kl = window_nll_kl(noisy, windows, ref, batch_size=3)
    lp, lq = _log_probs(tiny_gpt, windows), _log_probs(noisy, windows)
    p = torch.softmax(lp, dim=-1)
    by_hand = (p * (lp - lq)).sum(dim=-1).sum(dim=1)
    assert kl.dtype == torch.float64 and kl.shape == (16,)
    assert kl.tolist() == pytest.approx(by_hand.tolist(), rel=1e-4)
    assert float(by_hand.min()) > 1e-3  # the perturbation is visible: the test can fail
    # the NLL from the same forward pass is window_nll's, value for value
    assert nll.tolist() == pytest.approx(window_nll(noisy, windows).tolist(), rel=1e-12)


def test_kl_with_the_top_k_tokens_is_the_formula_with_one_tail_outcome(tiny_gpt, noisy, windows):
    """K < V: sum over the kept ids of p (log p - log q) + p_tail (log p_tail - log q_tail),
    p_tail = 1 - sum p and q_tail = 1 - sum q over the same ids; never above the full KL."""
    k = 8
    ref = kl_reference(tiny_gpt, windows, top_k=k)
    assert not ref.exact and ref.k == k and ref.vocab == 65
    assert ref.ids.dtype == torch.int32 and ref.ids.shape == (16, 32, k)
    assert ref.nbytes == 16 * 32 * k * (4 + 4) + 16 * 32 * 4
    lp, lq = _log_probs(tiny_gpt, windows), _log_probs(noisy, windows)
    ids = ref.ids.long()
    # the kept ids are the dense model's k most likely, and the tail holds the rest of the mass
    assert torch.equal(ids.sort(-1).values, lp.topk(k, dim=-1).indices.sort(-1).values)
    kept_mass = ref.logp.double().exp().sum(-1) + ref.log_tail.double().exp()
    assert float((kept_mass - 1).abs().max()) < 1e-5
    p_k, q_k = lp.gather(-1, ids).exp(), lq.gather(-1, ids).exp()
    head = (p_k * (p_k.log() - q_k.log())).sum(-1)
    p_tail, q_tail = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
    by_hand = (head + p_tail * (p_tail.log() - q_tail.log())).sum(dim=1)
    _, kl = window_nll_kl(noisy, windows, ref)
    assert kl.tolist() == pytest.approx(by_hand.tolist(), rel=1e-4)
    _, full = window_nll_kl(noisy, windows, kl_reference(tiny_gpt, windows))
    assert (kl <= full + 1e-9).all() and (kl < full).any()
    # a reference for other windows is refused in one line
    with pytest.raises(UsageError, match="indices must lie in 0..15"):
        window_nll_kl(noisy, windows[:2], ref, indices=[15, 16])


def test_a_large_vocabulary_keeps_the_top_64_by_default():
    """V = 300 > 256: 64 tokens per position and the tail; the model's own KL is 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(300, 16), torch.nn.Linear(16, 300))
    windows = torch.randint(0, 300, (3, 9))
    ref = kl_reference(model, windows)
    assert ref.k == 64 and ref.vocab == 300 and ref.tokens_per_window == 8
    nll, kl = window_nll_kl(model, windows, ref)
    assert float(kl.abs().max()) <= 1e-6
    assert nll.tolist() == pytest.approx(window_nll(model, windows).tolist(), rel=1e-12)


def test_the_dense_models_kl_from_itself_is_zero(tiny_gpt, windows):
    for top_k in (None, 8):
        ref = kl_reference(tiny_gpt, windows, top_k=top_k, batch_size=7)
        _, kl = window_nll_kl(tiny_gpt, windows, ref, batch_size=4)  # other batches, same KL
        assert float(kl.abs().max()) <= 1e-6, top_k


def test_the_runner_measures_kl_beside_perplexity_full_subset_and_stopped(tiny_gpt, corpus):
    """One forward pass gives both; a subset's KL per window is the full run's at its indices;
    a trial stopped early has the KL of the windows it read."""
    windows = eval_windows(corpus.val, window=32, max_tokens=1024)
    ref = kl_reference(tiny_gpt, windows)
    settings = EvalSettings(context=mean_context(32))
    runner = TrialRunner(tiny_gpt, windows, settings, threads=1, reference=ref)
    plain = TrialRunner(tiny_gpt, windows, settings, threads=1)
    policy = Policy(layers={"blocks.0.mlp.c_fc": LayerPolicy(sparsity=0.7, bits=4)}).to_json()
    full = runner.run(1, policy, window_nll=True)
    assert full.status == "ok", full.error
    tokens = 32 * 32
    assert full.kl > 1e-3 and math.isfinite(full.kl)
    assert full.kl == pytest.approx(sum(full.window_kl) / tokens, rel=1e-12)
    assert len(full.window_kl) == 32 and min(full.window_kl) >= 0
    same = plain.run(1, policy, window_nll=True)  # the KL costs no change to the perplexity
    assert same.kl is None and same.window_kl is None
    assert full.perplexity == pytest.approx(same.perplexity, rel=1e-12)
    assert runner.run(1, policy).window_kl is None  # per-window sums only beside window_nll
    # the dense policy (rounded to its 16-bit storage) is next to the reference
    dense = runner.run(2, Policy().to_json(), window_nll=True)
    assert 0 <= dense.kl < 1e-3 * full.kl
    # a subset: the same per-window values at its indices, and their mean
    picked = subset_windows(32, 5)
    sub = runner.run(1, policy, windows=picked)
    assert sub.window_kl == pytest.approx([full.window_kl[i] for i in picked], rel=1e-9)
    assert sub.kl == pytest.approx(sum(sub.window_kl) / (5 * 32), rel=1e-12)
    # stopped early: the KL over the windows read, which are the first ones in chunk order
    rule = StopRule(dense_nll=tuple(dense.window_nll), tokens_per_window=32, ceiling=1.01)
    strict = TrialRunner(
        tiny_gpt, windows, EvalSettings(context=mean_context(32), stop=rule), threads=1,
        reference=ref,
    )  # fmt: skip
    stopped = strict.run(1, policy)
    assert stopped.status == "pruned" and stopped.windows_seen < 32
    read = subset_windows(32, stopped.windows_seen)
    expected = sum(full.window_kl[i] for i in read) / (len(read) * 32)
    assert stopped.kl == pytest.approx(expected, rel=1e-9)
    with pytest.raises(UsageError, match="the KL reference covers 32 windows"):
        TrialRunner(tiny_gpt, windows[:4], settings, threads=1, reference=ref)


def _sweep(tmp_path, tiny_gpt, corpus, **objective) -> list:
    """A 3-trial random sweep of the tiny GPT's MLP layers, in-process on SQLite; the frozen
    Optuna trials."""
    import optuna

    from microsweep import MicroNet, Space, run_sweep
    from microsweep.spaces import Bits, Sparsity
    from microsweep.storage import Store

    space = Space(
        tiny_gpt,
        rules={
            "blocks.*.mlp.*": dict(
                sparsity=Sparsity(0.3, 0.6, step=0.3, method="magnitude"),
                bits=Bits(4, 8, method="rtn"),
            )
        },
    )
    url = f"sqlite:///{tmp_path / 'kl.db'}"
    run_sweep(
        space, objective=MicroNet(eval_tokens=512, **objective), corpus=corpus, name="kl",
        trials=3, storage=url, sampler="random", seed=0, in_process=True, progress=False,
    )  # fmt: skip
    store = Store(url, must_exist=True)
    return optuna.load_study(study_name="kl", storage=store.optuna_storage()).trials


def test_a_sweep_selecting_by_kl_records_every_trials_kl(tmp_path, tiny_gpt, corpus):
    trials = _sweep(tmp_path, tiny_gpt, corpus, select_by="kl")
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 3
    kls = [t.user_attrs["kl"] for t in done]
    assert all(math.isfinite(k) and k >= 0 for k in kls), kls
    assert len(set(kls)) > 1  # measured per trial, not one constant


def test_a_sweep_by_perplexity_builds_no_reference_and_records_no_kl(tmp_path, tiny_gpt, corpus):
    trials = _sweep(tmp_path, tiny_gpt, corpus)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all("kl" not in t.user_attrs for t in trials)


def test_select_by_is_checked_stored_and_read_back(tiny_gpt, corpus):
    """One line for a bad value; stored with the objective; an objective stored before the
    field existed reads as perplexity."""
    from microsweep import MicroNet
    from microsweep.errors import MicrosweepError
    from microsweep.prepare import space_from_objects, with_reference
    from microsweep.prepare._prepared import prepare
    from microsweep.spaces import Bits, Space

    for bad in ("KL", "nll", None, 1):
        with pytest.raises(MicrosweepError) as info:
            MicroNet(select_by=bad)
        assert str(info.value).count("\n") == 0 and "select_by" in str(info.value)
        assert "'perplexity' or 'kl'" in str(info.value)
    kl = MicroNet(select_by="kl")
    assert kl.to_json()["select_by"] == "kl" and MicroNet.from_json(kl.to_json()) == kl
    old = MicroNet().to_json()
    del old["select_by"]
    assert MicroNet.from_json(old).select_by == "perplexity"
    # the reference is built only when asked, on the sweep's windows
    space = Space(tiny_gpt, rules={"blocks.0.mlp.c_fc": dict(bits=Bits(4, 8, method="rtn"))})
    sf = space_from_objects(space, objective=MicroNet(eval_tokens=256), corpus=corpus)
    prepared = prepare(sf, 0)
    assert with_reference(sf, prepared).reference is None
    sf = space_from_objects(space, objective=MicroNet(eval_tokens=256, select_by="kl"),
                            corpus=corpus)  # fmt: skip
    ref = with_reference(sf, prepared).reference
    assert ref is not None and ref.n_windows == prepared.windows.shape[0] == 8
    # a space that measures with its own evaluate() has no distributions to compare
    sf = space_from_objects(space, objective=MicroNet(eval_tokens=256, select_by="kl"),
                            evaluate=lambda model: 5.0)  # fmt: skip
    with pytest.raises(UsageError, match=r"select_by='kl'\) .* its own evaluate"):
        with_reference(sf, prepare(sf, 0))


def test_a_sweep_stored_before_select_by_reopens_with_the_same_objects(tiny_gpt, corpus):
    """Resume and export compare the objective given with the stored one: a stored objective
    without `select_by` is today's default, not a different objective."""
    from types import SimpleNamespace

    from microsweep import MicroNet
    from microsweep.prepare import model_fingerprint, reopen_space, space_from_objects
    from microsweep.spaces import Bits, Space

    space = Space(tiny_gpt, rules={"blocks.0.mlp.c_fc": dict(bits=Bits(4, 8, method="rtn"))})
    objective = MicroNet(eval_tokens=256)
    stored = objective.to_json()
    del stored["select_by"]
    sweep = SimpleNamespace(
        name="old", space_json=space.to_json(), objective_json=stored, seed=0,
        model_fingerprint=model_fingerprint(tiny_gpt), data_fingerprint=corpus.fingerprint,
    )  # fmt: skip
    sf, _ = reopen_space(sweep, space_from_objects(space, objective=objective, corpus=corpus))
    assert sf.objective.select_by == "perplexity"
    with pytest.raises(UsageError, match="the objective given differs"):
        kl = MicroNet(eval_tokens=256, select_by="kl")
        reopen_space(sweep, space_from_objects(space, objective=kl, corpus=corpus))
