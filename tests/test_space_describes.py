"""A `Space` describes a model and never changes it: LSTM gate matrices are layers of the space
while the LSTM stays an `nn.LSTM`; preparing the model for a sweep runs the LSTMs a rule names as
`LinearLSTM`s, with the fingerprint sweeps stored before."""

from __future__ import annotations

import copy
import warnings

import optuna
import pytest
import torch
from torch import nn

from microsweep import Bits, Sparsity
from microsweep.compress import CompressedLinear, compress
from microsweep.errors import UsageError
from microsweep.models import LinearLSTM, linear_gates_
from microsweep.prepare import model_fingerprint, space_from_objects
from microsweep.prepare._spacefile import prepare_model
from microsweep.spaces import LayerPolicy, Space


class TwoLSTMs(nn.Module):
    """Token ids -> logits through two stacked LSTMs, so a rule can name one and not the other."""

    def __init__(self, vocab: int = 16, d: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.post = nn.LSTM(d, d, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x, _ = self.lstm(self.wte(ids))
        x, _ = self.post(x)
        return self.head(x)


RULES = {"lstm.weight_hh_l0": dict(sparsity=Sparsity(0.0, 0.5), bits=Bits(4, 8))}


def _model() -> TwoLSTMs:
    torch.manual_seed(0)
    return TwoLSTMs().eval()


def _space(model: nn.Module) -> Space:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rule's break-even note
        return Space(model, rules=RULES)


def _ids() -> torch.Tensor:
    return torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(1))


def test_building_a_space_leaves_the_model_untouched():
    model = _model()
    modules = [(name, m, type(m)) for name, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _space(model)
    assert [(name, m, type(m)) for name, m in model.named_modules()] == modules
    assert type(model.lstm) is nn.LSTM
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in state.items())


def test_the_space_describes_a_gate_matrix_as_a_layer_without_swapping():
    model = _model()
    space = _space(model)
    assert [(i.name, i.out_features, i.in_features, i.kind) for i in space.layers] == [
        ("lstm.weight_hh_l0", 32, 8, "lstm_gate")
    ]
    (unit,) = space.units()
    assert unit.key == "lstm.weight_hh_l0"
    assert dict(unit.params) == {
        "sparsity": "lstm.weight_hh_l0:sparsity",
        "bits": "lstm.weight_hh_l0:bits",
    }
    trial = optuna.trial.FixedTrial(
        {"lstm.weight_hh_l0:sparsity": 0.5, "lstm.weight_hh_l0:bits": 4}
    )
    policy = space.suggest(trial)
    assert policy.layers == {"lstm.weight_hh_l0": LayerPolicy(sparsity=0.5, bits=4)}
    out = compress(model, policy)  # compressing runs the named LSTM as Linears, on a copy
    assert isinstance(out.lstm.weight_hh_l0, CompressedLinear)
    assert type(model.lstm) is nn.LSTM


def test_preparing_the_model_swaps_only_the_lstm_a_rule_names_with_the_old_fingerprint():
    model = _model()
    # the fingerprint stored by sweeps whose space swapped the LSTM when it was built
    stored = model_fingerprint(linear_gates_(copy.deepcopy(model), ["lstm"]))
    weight = model.lstm.weight_hh_l0
    with torch.no_grad():
        before = model(_ids())
    sf = space_from_objects(_space(model), evaluate=lambda m: 1.0)
    assert sf.model is model
    assert isinstance(model.lstm, LinearLSTM)
    assert model.lstm.weight_hh_l0.weight is weight  # shared, not copied
    assert type(model.post) is nn.LSTM  # no rule touches it
    assert model_fingerprint(sf.model) == stored
    with torch.no_grad():
        assert (model(_ids()) - before).abs().max().item() <= 1e-5
    assert prepare_model(sf.space) is model  # a prepared model stays as it is
    assert model_fingerprint(model) == stored


def test_an_lstm_given_as_the_model_is_refused_when_the_space_is_built():
    with pytest.raises(UsageError, match="wrap it in a module"):
        Space(nn.LSTM(3, 2), rules={"weight_hh_l0": dict(bits=Bits(8))})
