"""Perplexity during recovery fine-tuning (`finetune_eval_every`): the curve's points, training
that is the same with or without it, and a hopeless fine-tune cut short by the stop rule."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from microsweep import LayerPolicy, Policy
from microsweep.score import (
    CountConfig,
    StopRule,
    count,
    eval_windows,
    mean_context,
    nll_to_perplexity,
    perplexity,
    round_to_storage,
    window_nll,
)
from microsweep.score._early_stop import FT_EVAL_WINDOWS
from microsweep.workers import EvalSettings, TrialRunner
from tests._tiny import TinyLM, one_thread, pretrained

WINDOW = 32
PRUNED = {n: LayerPolicy(sparsity=0.9) for n in ("up", "down", "head")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def lm(corpus) -> TinyLM:
    return pretrained(corpus)


@pytest.fixture(scope="module")
def windows(corpus) -> torch.Tensor:
    """64 windows: the curve reads every second one (`FT_EVAL_WINDOWS` = 32)."""
    return eval_windows(corpus.val, window=WINDOW, max_tokens=64 * WINDOW)


@pytest.fixture(scope="module")
def dense_nll(lm, windows) -> torch.Tensor:
    return window_nll(lm, windows)


def _runner(lm, windows, corpus, dense_nll=None, ceiling_factor=None) -> TrialRunner:
    stop = None
    if ceiling_factor is not None:
        dense_ppl = nll_to_perplexity(float(dense_nll.sum()), dense_nll.numel() * WINDOW)
        stop = StopRule(tuple(dense_nll.tolist()), WINDOW, ceiling_factor * dense_ppl)
    settings = EvalSettings(context=mean_context(WINDOW), stop=stop)
    return TrialRunner(lm, windows, settings, train_tokens=corpus.train, threads=1)


def _trial(**hyper) -> dict:
    hyper = {"finetune_steps": 40, "finetune_lr": 3e-3, **hyper}
    return Policy(layers=PRUNED, hyper=hyper).to_json()


def test_the_curve_has_its_steps_and_falls(lm, windows, corpus):
    """Measured (90% pruned, lr 3e-3): 53.1, 49.7, 46.7, 43.9, 41.3, 38.8, 36.5, 34.3, 32.3."""
    assert FT_EVAL_WINDOWS == 32
    runner = _runner(lm, windows, corpus)
    res = runner.run(0, _trial(finetune_eval_every=5))
    assert res.status == "ok", res.error
    curve = res.finetune_curve
    assert [step for step, _ in curve] == list(range(0, 41, 5))
    values = [ppl for _, ppl in curve]
    assert all(b < a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] < 0.7 * values[0]
    assert res.finetune_stopped_at is None
    # the last step is always a point, even off the k grid
    odd = runner.run(0, _trial(finetune_eval_every=15))
    assert [step for step, _ in odd.finetune_curve] == [0, 15, 30, 40]
    # measuring changes nothing in the training: the same model, value for value
    plain = runner.run(0, _trial())
    assert plain.finetune_curve is None
    assert plain.perplexity == res.perplexity == odd.perplexity


def test_without_a_curve_the_training_is_the_old_loop(lm, windows, corpus):
    """The default path, written out as it was before the curve: compress, AdamW steps on
    seeded batches with projection after each, the 16-bit rounding, then the perplexity."""
    from microsweep.compress import compress, project_
    from microsweep.models import lm_batch_loss

    runner = _runner(lm, windows, corpus)
    res = runner.run(3, _trial())
    model = compress(lm, Policy(layers=PRUNED))
    gen = torch.Generator().manual_seed(runner.settings.seed)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    model.train()
    with torch.enable_grad():
        for _ in range(40):
            loss = lm_batch_loss(model, corpus.train, block_size=WINDOW, batch_size=8, gen=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            project_(model)
    model.eval()
    round_to_storage(model, count(model, context=mean_context(WINDOW), config=CountConfig()))
    assert res.perplexity == perplexity(model, windows)


def test_a_hopeless_finetune_is_cut_short(lm, windows, corpus, dense_nll):
    """Ceiling 1.5x dense (20.4): at step 20 the rule's optimistic estimate, lowered by the
    recent rate over the 20 steps left, is 28.3, so fine-tuning stops there (status "pruned").
    Run to the end the same trial ends at 32.6, above the ceiling: the cut was right. With a
    3x ceiling (40.8) nothing is cut and the result is that of a run without a rule."""
    tight = _runner(lm, windows, corpus, dense_nll, ceiling_factor=1.5)
    ceiling = tight.settings.stop.ceiling
    res = tight.run(0, _trial(finetune_eval_every=5))
    assert res.status == "pruned", res.error
    assert res.finetune_stopped_at == 20 < 40
    assert [step for step, _ in res.finetune_curve] == [0, 5, 10, 15, 20]
    assert res.optimistic_perplexity > ceiling and res.perplexity_estimate > ceiling
    assert (res.windows_seen, res.windows) == (32, 64)
    assert "evaluate" not in res.timings and res.params > 0  # counted, not evaluated

    full = tight.run(0, _trial(finetune_eval_every=5), early_stop=False)
    assert full.status == "ok" and full.finetune_stopped_at is None
    assert full.finetune_curve[:5] == res.finetune_curve
    assert full.perplexity > ceiling

    lenient = _runner(lm, windows, corpus, dense_nll, ceiling_factor=3.0)
    kept = lenient.run(0, _trial(finetune_eval_every=5))
    assert kept.status == "ok" and kept.finetune_stopped_at is None
    assert kept.perplexity == full.perplexity < lenient.settings.stop.ceiling


def test_a_diverging_finetune_stops_at_the_first_point(lm, windows, corpus, dense_nll):
    runner = _runner(lm, windows, corpus, dense_nll, ceiling_factor=3.0)
    res = runner.run(0, _trial(finetune_eval_every=5, finetune_lr=1e3))
    assert res.status == "error" and "fine-tuning diverged" in res.error
    assert res.finetune_stopped_at == 5


@pytest.mark.parametrize(
    ("every", "message"),
    [
        (2.5, "finetune_eval_every 2.5 must be a whole number"),
        (-1, "finetune_eval_every -1 must be >= 0"),
    ],
)
def test_bad_eval_every_fails_the_trial(lm, windows, corpus, every, message):
    res = _runner(lm, windows, corpus).run(0, _trial(finetune_eval_every=every))
    assert res.status == "error" and message in res.error
