"""Early stopping: the chunked evaluation matches the full one, hopeless trials stop, and the rule
never stops a trial that ends feasible on a recorded set of real trials."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from microsweep import LayerPolicy, Policy
from microsweep.compress import compress
from microsweep.errors import UsageError
from microsweep.score import StopRule, eval_windows, mean_context, perplexity, window_nll
from microsweep.workers import EvalSettings, TrialRunner


@pytest.fixture(scope="module")
def setup(tiny_gpt, corpus):
    windows = eval_windows(corpus.val, window=32, max_tokens=4096)  # 128 windows
    calib = corpus.train[: 8 * 32].view(8, 32)
    dense = window_nll(tiny_gpt, windows)
    return windows, calib, dense


def _policy(rng: np.random.Generator) -> Policy:
    """A random policy over the tiny model, from gentle to destructive."""
    layers = {}
    for block in range(2):
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            layers[f"blocks.{block}.{name}"] = LayerPolicy(
                sparsity=float(rng.choice([0.0, 0.2, 0.4, 0.6, 0.8, 0.9])),
                bits=int(rng.choice([2, 3, 4, 6, 8, 32])),
                act_bits=int(rng.choice([6, 8, 32])),
            )
    return Policy(layers=layers)


@pytest.fixture(scope="module")
def recorded(setup, tiny_gpt):
    """Per-window NLL of 40 real compressed models: the recorded set the rule is replayed on."""
    windows, calib, _ = setup
    rng = np.random.default_rng(0)
    out = []
    with torch.no_grad():
        for _ in range(40):
            model = compress(tiny_gpt, _policy(rng), calib=calib)
            out.append(window_nll(model, windows))
    return out


def _replay(rule: StopRule, nll: torch.Tensor) -> int | None:
    """The number of windows read when the rule stops, or None if it reads them all."""
    seen: list[int] = []
    for chunk in rule.chunk_indices():
        seen.extend(chunk)
        verdict = rule.verdict(seen, nll[torch.tensor(seen)])
        if verdict.stop and len(seen) < rule.n_windows:
            return len(seen)
    return None


def test_rule_never_stops_a_trial_that_ends_feasible(setup, recorded):
    windows, _, dense = setup
    tokens = windows.shape[1] - 1
    dense_ppl = math.exp(float(dense.sum()) / (dense.numel() * tokens))
    finals = [math.exp(float(n.sum()) / (n.numel() * tokens)) for n in recorded]
    factors = (1.01, 1.02, 1.05, 1.10, 1.25)
    stops = saved = far = 0
    for factor in factors:
        ceiling = factor * dense_ppl
        rule = StopRule(tuple(dense.tolist()), tokens, ceiling)
        for nll, final in zip(recorded, finals, strict=True):
            stopped = _replay(rule, nll)
            if final <= ceiling:
                assert stopped is None, f"false stop at ceiling {ceiling:.4f} (final {final:.4f})"
                continue
            if final > 1.05 * ceiling:  # far over: the rule must catch it
                far += 1
                assert stopped is not None, f"missed: final {final:.4f}, ceiling {ceiling:.4f}"
            if stopped is not None:
                stops += 1
                saved += rule.n_windows - stopped
    # not vacuous: many far trials, and stopped ones skip a good share of their windows
    assert far >= 20
    assert saved > 0.3 * stops * len(dense)


def test_rule_edges():
    rule = StopRule((10.0,) * 64, tokens_per_window=10, ceiling=math.e, chunks=4)
    assert rule.allowed_excess() == pytest.approx(0.0)
    assert rule.chunk_indices()[1] == list(range(1, 64, 4))
    first = rule.chunk_indices()[0]  # 16 windows: enough to stop on
    far = [30.0 + (i % 3) for i in range(16)]
    # NaN stops at once; everything seen never stops; far over stops after min_fraction
    assert rule.verdict([0, 4], [math.nan, 10.0]).stop
    assert not rule.verdict(list(range(64)), [30.0] * 64).stop
    assert rule.verdict(first, far).stop
    assert not rule.verdict(first[:8], far[:8]).stop  # too few windows to rest a stop on
    lenient = StopRule((10.0,) * 64, 10, math.e, chunks=4, min_fraction=0.9)
    assert not lenient.verdict(first, far).stop
    # a handful of long windows never stops early: fewer than MIN_WINDOWS in all
    few = StopRule((10.0,) * 8, 10, math.e, chunks=8)
    assert not any(few.verdict(list(range(k)), [50.0] * k).stop for k in range(2, 8))
    with pytest.raises(UsageError, match="empty"):
        StopRule((), 10, 2.0)
    with pytest.raises(UsageError, match="ceiling"):
        StopRule((1.0,), 10, -1.0)


def test_the_ceilings_log_is_derived_once_for_the_rule_and_the_curve():
    """`log_ceiling` is what the rule's allowance and the fine-tuning curve's cut compare with."""
    from microsweep.score._early_stop import FineTuneCurve

    rule = StopRule((10.0,) * 64, tokens_per_window=10, ceiling=7.5, chunks=4)
    assert rule.log_ceiling == math.log(7.5)
    assert rule.allowed_excess() == pytest.approx(640 * rule.log_ceiling - 640.0)
    windows = torch.zeros(64, 11, dtype=torch.long)
    curve = FineTuneCurve(windows, batch_size=8, rule=rule, steps=10, early_stop=True)
    assert curve.indices == list(range(0, 64, 2)) and curve.rule is rule and curve.may_cut
    assert curve.stopped is None and curve.points == []


def _runner(tiny_gpt, setup, ceiling_factor: float) -> TrialRunner:
    windows, calib, dense = setup
    tokens = windows.shape[1] - 1
    dense_ppl = math.exp(float(dense.sum()) / (dense.numel() * tokens))
    rule = StopRule(tuple(dense.tolist()), tokens, ceiling_factor * dense_ppl)
    settings = EvalSettings(context=mean_context(32), stop=rule, count={"freebie": False})
    return TrialRunner(tiny_gpt, windows, settings, calib=calib)


def test_chunked_evaluation_equals_the_full_one_and_reports_projections(tiny_gpt, setup):
    windows, calib, _ = setup
    runner = _runner(tiny_gpt, setup, 10.0)  # a ceiling nothing here reaches
    policy = Policy(layers={"blocks.0.mlp.c_fc": LayerPolicy(sparsity=0.5, bits=6)})
    res = runner.run(0, policy.to_json())
    assert res.status == "ok"
    full = perplexity(compress(tiny_gpt, policy, calib=calib), windows)
    assert res.perplexity == pytest.approx(full, rel=1e-12)
    inter = res.intermediate
    assert len(inter) == 8 and inter[-1] == pytest.approx(full, rel=1e-12)


def test_hopeless_trial_stops_early_with_its_estimate(tiny_gpt, setup):
    windows, calib, _ = setup
    runner = _runner(tiny_gpt, setup, 1.05)
    policy = Policy(
        layers={f"blocks.{b}.mlp.c_fc": LayerPolicy(sparsity=0.9, bits=3) for b in range(2)}
    )
    res = runner.run(1, policy.to_json())
    assert res.status == "pruned"
    assert res.windows_seen < res.windows == len(windows)
    full = perplexity(compress(tiny_gpt, policy, calib=calib), windows)
    # the estimate is close to the real perplexity, and well over the ceiling
    assert res.perplexity_estimate == pytest.approx(full, rel=0.05)
    assert res.optimistic_perplexity <= res.perplexity_estimate
    assert res.params > 0 and res.layers
    # early_stop=False reads everything, as the sensitivity pass does
    assert runner.run(1, policy.to_json(), early_stop=False).status == "ok"
