"""Knobs, rule matching and precedence, definition-time errors, and Policy round trips."""

from __future__ import annotations

import json

import optuna
import pytest
from torch import nn

from microsweep import Bits, Choice, Float, Int, LayerPolicy, Policy, Rank, Space, Sparsity
from microsweep.errors import SpaceError
from microsweep.models import GPT, GPTConfig


@pytest.fixture(scope="module")
def gpt() -> GPT:
    return GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32))


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))


def test_layers_are_the_linears_a_rule_controls(gpt):
    space = Space(gpt, rules={"blocks.*.mlp.*": dict(bits=Bits(4, 8))})
    assert [i.name for i in space.layers] == [
        "blocks.0.mlp.c_fc",
        "blocks.0.mlp.c_proj",
        "blocks.1.mlp.c_fc",
        "blocks.1.mlp.c_proj",
    ]
    assert space.layers[0].out_features == 128 and space.layers[0].in_features == 32


def test_exact_name_beats_pattern_and_first_pattern_wins(gpt):
    space = Space(
        gpt,
        rules={
            "blocks.*.attn.*": dict(bits=Bits(4)),
            "blocks.0.attn.c_proj": dict(bits=Bits(8)),
            "blocks.*": dict(bits=Bits(16)),
        },
    )
    policy = space.suggest(_study().ask())
    assert policy.layers["blocks.0.attn.c_proj"].bits == 8  # exact name
    assert policy.layers["blocks.1.attn.c_proj"].bits == 4  # first matching pattern
    assert policy.layers["blocks.1.mlp.c_fc"].bits == 16
    assert "head" not in policy.layers  # no rule: left alone


def test_regex_and_type_selectors(gpt):
    space = Space(gpt, rules={r"re:blocks\.1\..*c_fc": dict(bits=Bits(4)), nn.Linear: dict(bits=8)})
    policy = space.suggest(_study().ask())
    assert policy.layers["blocks.1.mlp.c_fc"].bits == 4
    assert policy.layers["blocks.0.mlp.c_fc"].bits == 8
    assert policy.layers["head"].bits == 8


def test_tied_rule_shares_one_value_and_one_parameter(gpt):
    study = _study()
    space = Space(gpt, rules={"blocks.*.mlp.*": dict(bits=Bits(2, 4, 8, 16), tied=True)})
    for _ in range(5):
        trial = study.ask()
        policy = space.suggest(trial)
        assert len({lp.bits for lp in policy.layers.values()}) == 1
        assert list(trial.params) == ["blocks.*.mlp.*:bits"]
        study.tell(trial, 0.0)


def test_per_layer_rule_has_one_parameter_per_layer_and_knob(gpt):
    trial = _study().ask()
    Space(gpt, rules={"blocks.0.mlp.*": dict(bits=Bits(4, 8), sparsity=Sparsity(0, 0.5))}).suggest(
        trial
    )
    assert sorted(trial.params) == sorted(
        [
            "blocks.0.mlp.c_fc:bits",
            "blocks.0.mlp.c_fc:sparsity",
            "blocks.0.mlp.c_proj:bits",
            "blocks.0.mlp.c_proj:sparsity",
        ]
    )


def test_rank_fraction_resolves_per_layer_and_full_rank_means_unfactorized(gpt):
    space = Space(
        gpt,
        rules={
            "blocks.0.mlp.c_fc": dict(rank=Rank(0.25, 0.25)),
            "blocks.0.mlp.c_proj": dict(rank=Rank(1.0, 1.0)),
        },
    )
    policy = space.suggest(_study().ask())
    assert policy.layers["blocks.0.mlp.c_fc"].rank == 8  # 0.25 * min(128, 32)
    assert policy.layers["blocks.0.mlp.c_proj"].rank is None
    # 128 x 32: factors of rank r hold 160 r values against 4096; break-even at 25.6
    assert Rank.resolve(3, 128, 32) == 3 and Rank.resolve(25, 128, 32) == 25
    assert Rank.resolve(26, 128, 32) is None and Rank.resolve(0.9, 128, 32) is None
    assert Rank.resolve(1.0, 64, 64) is None and Rank.resolve(31, 64, 64) == 31


def test_suggested_values_stay_in_range_and_hyper_is_carried(gpt):
    study = _study()
    space = Space(
        gpt,
        rules={
            "blocks.*.mlp.*": dict(
                sparsity=Sparsity(0.1, 0.9, step=0.1), bits=Bits(2, 4), rank=Rank(4, 8)
            )
        },
        hyper={
            "lr": Float(1e-5, 1e-3, log=True),
            "steps": Int(0, 10),
            "opt": Choice("adam", "sgd"),
        },
    )
    for _ in range(20):
        trial = study.ask()
        policy = space.suggest(trial)
        for lp in policy.layers.values():
            assert 0.1 - 1e-9 <= lp.sparsity <= 0.9 + 1e-9
            assert abs(lp.sparsity * 10 - round(lp.sparsity * 10)) < 1e-6
            assert lp.bits in (2, 4) and lp.rank in (4, 8)
        assert 1e-5 <= policy.hyper["lr"] <= 1e-3 and policy.hyper["opt"] in ("adam", "sgd")
        study.tell(trial, 1.0)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"nothing.*": dict(bits=Bits(8))}, "matches no Linear, Embedding or LSTM gate"),
        ({"blocks.*": dict(bits=8), "blocks.0.*": dict(bits=4)}, "shadowed"),
        ({"head": dict(rank=Rank(0.5, method="autoencoder"))}, "shares its weight with 'wte'"),
        ({"blocks.0.mlp.c_fc": dict(rank=Rank(8, 64))}, "above layer 'blocks.0.mlp.c_fc'"),
        ({"blocks.0.mlp.c_fc": dict(sparsity=Sparsity(0, 0.5, block=(5, 4)))}, "does not tile"),
        ({"blocks.0.mlp.c_fc": dict(colour=Bits(8))}, "unknown setting"),
        ({"blocks.0.mlp.c_fc": dict(bits=Sparsity(0, 0.5))}, "bits takes Bits"),
        ({"re:blocks[": dict(bits=8)}, "bad regular expression"),
        ({}, "rules is empty"),
    ],
)
def test_bad_spaces_fail_at_definition(gpt, rules, message):
    with pytest.raises(SpaceError, match=message.replace("[", r"\[").replace("(", r"\(")):
        Space(gpt, rules=rules)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Bits(1), "not a width in 2..16 or 32"),
        (lambda: Bits(17), "not a width"),
        (lambda: Bits(), "at least one"),
        (lambda: Sparsity(0.0, 1.0), "outside"),
        (lambda: Sparsity(-0.1, 0.5), "outside"),
        (lambda: Sparsity(0.8, 0.2), "above high"),
        (lambda: Rank(0), ">= 1"),
        (lambda: Rank(0.0, 0.5), "outside"),
        (lambda: Float(1e-3, 1e-5), "above high"),
        (lambda: Float(0.0, 1.0, log=True), "log=True needs low > 0"),
        (lambda: LayerPolicy(bits=33), "bits=33"),
        (lambda: LayerPolicy(sparsity=1.0), "outside"),
    ],
)
def test_bad_knobs_fail_with_a_clear_message(make, message):
    with pytest.raises(SpaceError, match=message):
        make()


def test_policy_json_round_trip_for_every_setting():
    policy = Policy(
        layers={
            "a": LayerPolicy(sparsity=0.5, block=(4, 4), bits=4, act_bits=8, rank=7),
            "b": LayerPolicy(bits=16),
            "c": LayerPolicy(),
        },
        hyper={"finetune_lr": 3e-4, "steps": 5, "opt": "adam"},
    )
    text = policy.dumps()
    data = json.loads(text)
    assert data["type"] == "microsweep.Policy" and data["version"] == 1
    back = Policy.loads(text)
    assert back == policy
    assert back.layers["a"].block == (4, 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"type": "other"}', "not a microsweep policy"),
        ('{"type": "microsweep.Policy", "version": 99, "layers": {}}', "version 99"),
        ('{"type": "microsweep.Policy", "version": 1, "layers": {"a": {"bits": 1}}}', "bits=1"),
        ('{"type": "microsweep.Policy", "version": 1, "layers": {"a": {"rnk": 3}}}', "unknown"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_policy_json_is_refused(text, message):
    with pytest.raises(SpaceError, match=message):
        Policy.loads(text)


def test_step_grid_values_are_decimals():
    """Optuna's step grid gives 0.1 * 3 = 0.30000000000000004; the policy gets 0.3."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    knob, hyper = Sparsity(0.0, 0.9, step=0.1), Float(0.0, 1.0, step=0.1)
    seen = set()
    for _ in range(60):
        trial = study.ask()
        for value in (knob.suggest(trial, "s"), hyper.suggest(trial, "h")):
            assert repr(value) == repr(round(value, 1)), value
            seen.add(value)
    assert {0.3, 0.7} <= seen  # the values whose raw grid arithmetic is noisy
