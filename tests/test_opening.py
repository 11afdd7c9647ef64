"""The opening trial's policy: chosen without the planner, counted exactly on the driver."""

from __future__ import annotations

import pytest

from microsweep import Bits, Space, Sparsity
from microsweep.compress import compress
from microsweep.score import Baseline, CountConfig, count, mean_context, micronet_score
from microsweep.search._opening import opening_choices

CONTEXT = mean_context(32)


def _setup(model, rules):
    space = Space(model, rules=rules)
    dense = count(model, context=CONTEXT)
    baseline = Baseline(dense.params, dense.ops)
    return space, baseline, micronet_score(dense.params, dense.ops, baseline)


def _score(space, model, choices, baseline, calib) -> float:
    counted = count(compress(model, space.policy_for(choices), calib=calib), context=CONTEXT)
    return micronet_score(counted.params, counted.ops, baseline)


def test_the_opening_is_the_mildest_uniform_quantization_that_counts_below_dense(tiny_gpt, corpus):
    """Weights first, then activations, one level at a time: the first setting whose count is
    below the dense model's (which keeps the 16-bit allowance a quantized one loses), with the
    score it reports being the exact count of that policy; sparsity stays off."""
    calib = corpus.train[: 4 * 32].view(4, 32)
    rules = {
        "blocks.*.attn.*": dict(sparsity=Sparsity(0.0, 0.5, step=0.1), bits=Bits(4, 8, 16)),
        "blocks.*.mlp.*": dict(
            sparsity=Sparsity(0.0, 0.5, step=0.1), bits=Bits(4, 8, 16), act_bits=Bits(8, 16)
        ),
    }
    space, baseline, dense = _setup(tiny_gpt, rules)
    choices, score = opening_choices(
        space, tiny_gpt, context=CONTEXT, config=CountConfig(), baseline=baseline,
        dense_score=dense, calib=calib,
    )  # fmt: skip
    assert score is not None and score < dense
    assert score == pytest.approx(_score(space, tiny_gpt, choices, baseline, calib), rel=1e-12)
    assert all(knobs["sparsity"] == 0.0 for knobs in choices.values())
    # the mildest setting (weights at 16 bits, inputs unquantized) loses the 16-bit allowance
    # and counts above dense, so the walk went past it
    mildest = {
        key: {**knobs, "bits": 16, **({"act_bits": 32} if "act_bits" in knobs else {})}
        for key, knobs in choices.items()
    }
    assert mildest != choices
    assert _score(space, tiny_gpt, mildest, baseline, calib) >= dense


def test_a_space_without_quantization_opens_at_the_mildest_level_of_each_knob(tiny_gpt):
    space, baseline, dense = _setup(tiny_gpt, {"blocks.*": dict(sparsity=Sparsity(0.2, 0.6))})
    choices, score = opening_choices(
        space, tiny_gpt, context=CONTEXT, config=CountConfig(), baseline=baseline,
        dense_score=dense,
    )  # fmt: skip
    assert score is None
    assert choices and all(knobs == {"sparsity": 0.2} for knobs in choices.values())
