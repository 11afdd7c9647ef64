"""New compression targets: LSTM gate matrices (`LinearLSTM`), embedding tables (compressed,
low-rank, tied with the head), tensor-trains through a policy, and their `.msz` round trips.

Every model is tiny and built here from a fixed seed (no pretraining); hand-computed counts are
written out with their arithmetic, at fp32 (`CountConfig(freebie=False)`) unless said otherwise.
"""

from __future__ import annotations

import copy
import math
import warnings

import optuna
import pytest
import torch
from torch import nn

from microsweep import Bits, LayerPolicy, Policy, Rank, Space, Sparsity
from microsweep.compress import (
    CompressedEmbedding,
    CompressedLinear,
    LowRankEmbedding,
    TTEmbedding,
    TTLinear,
    compress,
    factorize,
)
from microsweep.compress._tt import tt_lookup_ops, tt_matvec_ops, tt_params, tt_shape
from microsweep.errors import SpaceError, SpaceWarning, UsageError
from microsweep.export import load, read_header, round_to_storage, save
from microsweep.models import GPT, LSTMLM, GPTConfig, LinearLSTM, LSTMConfig, linear_gates_
from microsweep.score import CountConfig, count

FP32 = CountConfig(freebie=False)
"""Count at fp32 (no 16-bit allowance), so a stored fp32 value counts 1 and every op 1."""


def _seed(seed: int = 0) -> None:
    torch.manual_seed(seed)


def _lstmlm(*, vocab: int = 16, e: int = 8, h: int = 8, layers: int = 1, tie: bool = False):
    _seed(0)
    return LSTMLM(
        LSTMConfig(vocab_size=vocab, n_embd=e, n_hidden=h, n_layer=layers, tie_weights=tie)
    ).eval()


def _ids(vocab: int = 16, shape: tuple[int, int] = (2, 7), seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _row(counts, name: str):
    rows = [lc for lc in counts.layers if lc.name == name]
    assert len(rows) == 1, [lc.name for lc in counts.layers]
    return rows[0]


def _assert_near(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    """Same shape and max |got - want| <= atol (cheaper than torch.testing on a busy machine)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert (got - want).abs().max().item() <= atol


def _exact_adds(weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """CountConfig.adds="exact": sum over rows of max(nnz_row - 1, 0) plus nnz(bias)."""
    row_nnz = (weight.detach() != 0).sum(dim=1)
    bias_nnz = 0 if bias is None else int((bias.detach() != 0).sum())
    return int((row_nnz - 1).clamp(min=0).sum()) + bias_nnz


# ------------------------------------------------------------------ LinearLSTM numerics


LSTM_CASES = {
    "1-layer": dict(num_layers=1),
    "2-layer": dict(num_layers=2),
    "bidirectional": dict(num_layers=2, bidirectional=True),
    "proj": dict(num_layers=1, proj_size=3),
    "proj-bidir-2-layer": dict(num_layers=2, bidirectional=True, proj_size=3),
    "no-bias": dict(num_layers=2, bias=False),
}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("case", list(LSTM_CASES))
def test_linear_lstm_matches_nn_lstm(case, batch_first):
    _seed(1)
    lstm = nn.LSTM(5, 4, batch_first=batch_first, **LSTM_CASES[case]).eval()
    lin = LinearLSTM.from_lstm(lstm)
    # parameters are shared, not copied: the same Parameter objects
    assert lin.weight_ih_l0.weight is lstm.weight_ih_l0
    assert lin.weight_hh_l0.weight is lstm.weight_hh_l0
    if lstm.bias:
        assert lin.weight_ih_l0.bias is lstm.bias_ih_l0
    if lstm.proj_size:
        assert lin.weight_hr_l0.weight is lstm.weight_hr_l0
    if lstm.bidirectional:
        assert lin.weight_hh_l0_reverse.weight is lstm.weight_hh_l0_reverse
    assert not lin.training
    x = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(2))  # (B, T) or (T, B)
    with torch.no_grad():
        y, (h, c) = lstm(x)
        y2, (h2, c2) = lin(x)
        assert y2.shape == y.shape and h2.shape == h.shape and c2.shape == c.shape
        for a, b in ((y, y2), (h, h2), (c, c2)):
            _assert_near(b, a, 1e-5)
        # a given initial state
        dirs = 2 if lstm.bidirectional else 1
        batch = x.shape[0] if batch_first else x.shape[1]
        g = torch.Generator().manual_seed(4)
        h0 = torch.randn(lstm.num_layers * dirs, batch, lstm.proj_size or 4, generator=g)
        c0 = torch.randn(lstm.num_layers * dirs, batch, 4, generator=g)
        y, (h, c) = lstm(x, (h0, c0))
        y2, (h2, c2) = lin(x, (h0, c0))
        for a, b in ((y, y2), (h, h2), (c, c2)):
            _assert_near(b, a, 1e-5)
        # unbatched input (T, n_in), with and without a state
        xu = x[0]
        y, (h, c) = lstm(xu)
        y2, (h2, c2) = lin(xu)
        assert y2.shape == y.shape and h2.shape == h.shape
        for a, b in ((y, y2), (h, h2), (c, c2)):
            _assert_near(b, a, 1e-5)
        y, (h, c) = lstm(xu, (h0[:, 0], c0[:, 0]))
        y2, (h2, c2) = lin(xu, (h0[:, 0], c0[:, 0]))
        for a, b in ((y, y2), (h, h2), (c, c2)):
            _assert_near(b, a, 1e-5)


def test_linear_lstm_gate_names_and_shapes():
    lstm = nn.LSTM(5, 4, num_layers=2, bidirectional=True, proj_size=3)
    lin = LinearLSTM.from_lstm(lstm)
    gates = {n: tuple(m.weight.shape) for n, m in lin.named_children()}
    assert gates == {n: tuple(p.shape) for n, p in lstm.named_parameters() if "weight" in n}
    # 4h = 16 rows; layer 1 reads both directions' projected outputs: 2 * 3 = 6
    assert gates["weight_ih_l1_reverse"] == (16, 6)
    assert gates["weight_hr_l0"] == (3, 4)


def test_linear_gates_swaps_in_place_and_refuses_a_bare_lstm():
    model = _lstmlm()
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
    weight = model.lstm.weight_hh_l0
    assert linear_gates_(model) is model
    assert isinstance(model.lstm, LinearLSTM)
    assert model.lstm.weight_hh_l0.weight is weight
    with torch.no_grad():
        _assert_near(model(ids), before, 1e-5)
    # only the named LSTMs are swapped
    other = _lstmlm()
    linear_gates_(other, names=["not_there"])
    assert type(other.lstm) is nn.LSTM
    with pytest.raises(UsageError):
        linear_gates_(nn.LSTM(3, 2))


# ------------------------------------------------------------------ counting LSTM gates


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_layers=2),
        dict(num_layers=2, bidirectional=True),
        dict(proj_size=3),
        dict(num_layers=2, bidirectional=True, proj_size=2, bias=False),
    ],
)
@pytest.mark.parametrize("config", [FP32, CountConfig(), CountConfig(adds="countingpy")])
def test_dense_linear_lstm_counts_exactly_as_nn_lstm(kwargs, config):
    _seed(2)
    lstm = nn.LSTM(5, 4, **kwargs)
    a = count(lstm, context=1.0, config=config)
    b = count(LinearLSTM.from_lstm(lstm), context=1.0, config=config)
    assert (b.params, b.ops, b.mults, b.adds, b.others, b.freebie) == (
        a.params,
        a.ops,
        a.mults,
        a.adds,
        a.others,
        a.freebie,
    )
    assert a.params > 0 and a.ops > 0


def test_lstm_count_by_hand():
    """input n = 3, hidden h = 2, one layer, fp32, adds "exact", every weight non-zero."""
    _seed(3)
    lstm = nn.LSTM(3, 2)
    with torch.no_grad():
        for p in lstm.parameters():  # no exact zeros: nnz is numel
            p.copy_(p.sign().where(p != 0, torch.ones_like(p)) * (0.1 + p.abs()))
    n, h = 3, 2
    params = 4 * h * (n + h) + 8 * h  # W_ih 8x3 + W_hh 8x2 + two biases of 8 = 24 + 16 + 16
    assert params == 56
    # W_ih x + b_ih: 8*3 = 24 mults, 8*(3-1) + 8 = 24 adds
    # W_hh h + b_hh: 8*2 = 16 mults, 8*(2-1) + 8 = 16 adds
    # join the two: 4h = 8 adds
    # 3h = 6 sigmoids: 6*2 = 12 mults, 6*1 = 6 adds; 2h = 4 tanhs: 4*3 = 12 mults, 4*2 = 8 adds
    # c' = f*c + i*g and h' = o*tanh(c'): 3h = 6 mults, h = 2 adds
    mults = 24 + 16 + 12 + 12 + 6
    adds = 24 + 16 + 8 + 6 + 8 + 2
    assert (mults, adds) == (70, 64)
    for model in (lstm, LinearLSTM.from_lstm(lstm)):
        counts = count(model, context=1.0, config=FP32)
        assert counts.params == params
        assert (counts.mults, counts.adds, counts.others) == (mults, adds, 0)
        assert counts.ops == mults + adds == 134
    gates = count(LinearLSTM.from_lstm(lstm), context=1.0, config=FP32)
    # the LinearLSTM row holds only the gate math; the Linears hold the products
    assert _row(gates, "").mults == 12 + 12 + 6 and _row(gates, "").adds == 8 + 6 + 8 + 2
    assert _row(gates, "weight_ih_l0").mults == 24 and _row(gates, "weight_ih_l0").adds == 24
    assert _row(gates, "weight_hh_l0").params == 8 * 2 + 8
    # in a language model the converted LSTM counts the same as before
    model = _lstmlm(layers=2)
    dense = count(model, context=1.0)
    linear_gates_(model)
    swapped = count(model, context=1.0)
    assert (swapped.params, swapped.ops) == (dense.params, dense.ops)


def test_pruned_quantized_gate_counts_as_the_rule_says():
    model = _lstmlm()  # e = h = 8: every gate matrix is (4h, 8) = (32, 8)
    original = copy.deepcopy(model)
    policy = Policy(layers={"lstm.weight_hh_l0": LayerPolicy(sparsity=0.5, bits=4)})
    out = compress(model, policy)
    assert type(model.lstm) is nn.LSTM  # compress() copies: the original is left alone
    assert isinstance(out.lstm, LinearLSTM)
    gate = out.lstm.weight_hh_l0
    assert isinstance(gate, CompressedLinear) and gate.bits == 4 and gate.sparse
    numel = 32 * 8
    assert int(gate.mask.sum()) == numel - round(0.5 * numel) == 128  # exactly half kept
    nnz = int((gate.weight != 0).sum())
    assert 0 < nnz <= 128  # 4-bit rounding may zero a few kept weights
    assert bool((gate.weight[~gate.mask] == 0).all())
    # every weight on its 4-bit grid: an integer in [-7, 7] times its row's scale
    q = (gate.weight / gate.weight_scale[:, None]).detach()
    assert torch.allclose(q, q.round(), atol=1e-4) and float(q.abs().max()) <= 7 + 1e-4
    # the bias is the original one, kept fp32
    assert torch.equal(gate.bias, original.lstm.bias_hh_l0)
    # other gates untouched
    assert type(out.lstm.weight_ih_l0) is nn.Linear
    assert torch.equal(out.lstm.weight_ih_l0.weight, original.lstm.weight_ih_l0)
    assert torch.equal(out.lstm.weight_ih_l0.bias, original.lstm.bias_ih_l0)

    counts = count(out, context=1.0, config=FP32)
    row = _row(counts, "lstm.weight_hh_l0")
    assert row.kind == "compressed_linear" and row.bits == 4
    assert row.mask_bits == numel == 256  # one bit per element
    assert row.value_bits == nnz * 4 + 32 * 32  # non-zeros at 4 bits + the fp32 bias (4h)
    assert row.const_bits == 32 * 32  # 4h per-row fp32 scales
    assert row.params == (nnz * 4 + 32 * 32 + 256 + 32 * 32) / 32
    assert row.mults == nnz
    assert row.adds == _exact_adds(gate.weight, gate.bias)
    # everything else counts as in the dense model
    dense = count(original, context=1.0, config=FP32)
    for name in ("wte", "head"):
        assert _row(counts, name).params == _row(dense, name).params
        assert _row(counts, name).ops == _row(dense, name).ops
    ih = _row(counts, "lstm.weight_ih_l0")
    assert ih.params == 32 * 8 + 32 and ih.mults == 32 * 8
    # dense hh: 256 + 32 params; compressed it takes the row above instead
    assert counts.params == dense.params - (256 + 32) + row.params
    with torch.no_grad():
        ids = _ids()
        assert not torch.allclose(out(ids), original(ids))


def test_gate_of_reverse_direction_and_unknown_gate():
    _seed(5)

    class Bi(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(4, 4, bidirectional=True, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    model = Bi().eval()
    out = compress(model, Policy(layers={"rnn.weight_hh_l0_reverse": LayerPolicy(bits=8)}))
    assert isinstance(out.rnn.weight_hh_l0_reverse, CompressedLinear)
    assert type(out.rnn.weight_hh_l0) is nn.Linear
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (out(x) - model(x)).abs().max().item()
    assert 0 < diff < 0.05  # 8-bit rounding of one gate matrix moves the output a little
    with pytest.raises(SpaceError):
        compress(model, Policy(layers={"rnn.weight_hh_l1": LayerPolicy(bits=8)}))


def test_space_over_lstm_gates_leaves_the_model_and_prepare_converts_it():
    from microsweep.prepare import prepare_model

    model = _lstmlm()
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
    weight = model.lstm.weight_hh_l0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = Space(
            model, rules={"lstm.weight_*": dict(sparsity=Sparsity(0.0, 0.5), bits=Bits(4, 8))}
        )
    assert type(model.lstm) is torch.nn.LSTM  # building a space changes nothing
    assert prepare_model(space) is model  # the sweep prepares the model in place
    assert isinstance(model.lstm, LinearLSTM)
    assert model.lstm.weight_hh_l0.weight is weight  # shared, not copied
    with torch.no_grad():
        _assert_near(model(ids), before, 1e-5)
    infos = {i.name: i for i in space.layers}
    assert list(infos) == ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]
    assert all(i.kind == "lstm_gate" for i in infos.values())
    assert (infos["lstm.weight_hh_l0"].out_features, infos["lstm.weight_hh_l0"].in_features) == (
        32,
        8,
    )
    trial = optuna.trial.FixedTrial(
        {
            "lstm.weight_ih_l0:sparsity": 0.0,
            "lstm.weight_ih_l0:bits": 8,
            "lstm.weight_hh_l0:sparsity": 0.5,
            "lstm.weight_hh_l0:bits": 4,
        }
    )
    policy = space.suggest(trial)
    assert policy.layers["lstm.weight_hh_l0"] == LayerPolicy(sparsity=0.5, bits=4)
    out = compress(model, policy)
    assert isinstance(out.lstm.weight_hh_l0, CompressedLinear)
    assert out.lstm.weight_hh_l0.sparse and out.lstm.weight_hh_l0.bits == 4
    assert out.lstm.weight_ih_l0.bits == 8 and not out.lstm.weight_ih_l0.sparse


def test_space_lists_embeddings_and_tied_shares():
    model = _lstmlm(tie=True)
    space = Space(model, rules={"wte": dict(bits=Bits(4, 8))})
    (info,) = space.layers
    assert (info.name, info.kind) == ("wte", "embedding")
    assert (info.out_features, info.in_features) == (16, 8)  # V rows of d, as the head sees it
    assert info.shared_with == ("head",)
    assert type(model.lstm) is nn.LSTM  # no gate named: the LSTM stays as it is


# ------------------------------------------------------------------ embedding tables


@pytest.mark.parametrize("sparsity,bits", [(0.5, 4), (0.75, 8), (0.0, 6), (0.25, 32)])
def test_compressed_embedding_count(sparsity, bits):
    model = _lstmlm()  # V = 16, d = 8: a 128-entry table
    out = compress(model, Policy(layers={"wte": LayerPolicy(sparsity=sparsity, bits=bits)}))
    emb = out.wte
    assert isinstance(emb, CompressedEmbedding) and (emb.num_embeddings, emb.embedding_dim) == (
        16,
        8,
    )
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(out.wte(ids), emb.weight[ids])
    v, d = 16, 8
    nnz = int((emb.weight != 0).sum())
    if sparsity:
        assert int(emb.mask.sum()) == v * d - round(sparsity * v * d)
    assert nnz <= v * d - round(sparsity * v * d)
    row = _row(count(out, context=1.0, config=FP32), "wte")
    assert row.kind == "compressed_embedding"
    mask = v * d if sparsity else 0  # one bit per element when sparse
    values = nnz * bits if sparsity else v * d * bits  # dense: every entry stored
    scales = v if bits < 32 else 0  # one fp32 scale per row
    assert row.params == (values + mask) / 32 + scales
    assert (row.mask_bits, row.const_bits) == (mask, scales * 32)
    assert (row.mults, row.adds, row.others, row.ops) == (0, 0, 0, 0)
    if (sparsity, bits) == (0.5, 4):
        # at most 64 non-zeros: (64*4 + 128)/32 + 16 = 12 + 16 = 28 parameters
        assert row.params <= (64 * 4 + 128) / 32 + 16 == 28


def test_block_sparse_embedding_has_one_mask_bit_per_block():
    model = _lstmlm()
    policy = Policy(layers={"wte": LayerPolicy(sparsity=0.5, block=(4, 4), bits=8)})
    emb = compress(model, policy).wte
    assert isinstance(emb, CompressedEmbedding) and emb.block == (4, 4)
    # (16/4) * (8/4) = 8 blocks, round(0.5 * 8) = 4 dropped: 4 kept blocks of 16 values
    tiles = emb.mask.reshape(4, 4, 2, 4).permute(0, 2, 1, 3).reshape(8, 16)
    assert bool((tiles.all(dim=1) | ~tiles.any(dim=1)).all())  # whole blocks
    assert int(tiles.all(dim=1).sum()) == 4
    row = _row(count(compress(model, policy), context=1.0, config=FP32), "wte")
    assert row.mask_bits == 8
    assert row.value_bits == 4 * 16 * 8 == 512  # kept blocks' values at 8 bits (zeros too)
    assert row.const_bits == 16 * 32
    assert row.params == (512 + 8 + 512) / 32 == 32.25
    assert row.ops == 0
    with pytest.raises(SpaceError):  # (3, 3) does not tile (16, 8)
        compress(model, Policy(layers={"wte": LayerPolicy(sparsity=0.5, block=(3, 3))}))


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_low_rank_embedding_count_and_error(rank):
    model = _lstmlm()
    out = compress(model, Policy(layers={"wte": LayerPolicy(rank=rank)}))
    emb = out.wte
    assert isinstance(emb, LowRankEmbedding) and emb.rank == rank
    assert (emb.num_embeddings, emb.embedding_dim) == (16, 8)
    counts = count(out, context=1.0, config=FP32)
    v, d, r = 16, 8, rank
    parts = [_row(counts, n) for n in ("wte", "wte.first", "wte.second")]
    assert parts[0].rank == r
    assert sum(p.params for p in parts) == r * (v + d)  # (V, r) table + (d, r) projection
    assert _row(counts, "wte.first").ops == 0  # the table lookup is indexing
    assert sum(p.mults for p in parts) == r * d
    assert sum(p.adds for p in parts) == (r - 1) * d
    dense = count(model, context=1.0, config=FP32)
    assert counts.params == dense.params - v * d + r * (v + d)
    assert counts.ops == dense.ops + r * d + (r - 1) * d
    # the lookup is the factorized table's row
    table = emb.first.weight @ emb.second.weight.T
    ids = _ids()
    with torch.no_grad():
        _assert_near(out.wte(ids), table[ids], 1e-6)


@pytest.mark.parametrize("rank", [1, 2, 4, 7])
def test_factorized_table_error_is_the_svd_tail(rank):
    _seed(6)
    emb = nn.Embedding(20, 9)
    before = emb.weight.detach().clone()
    low = factorize(emb, rank)
    assert isinstance(low, LowRankEmbedding)
    assert tuple(low.first.weight.shape) == (20, rank)
    assert tuple(low.second.weight.shape) == (9, rank)
    table = (low.first.weight @ low.second.weight.T).detach().double()
    s = torch.linalg.svdvals(emb.weight.detach().double())
    tail = math.sqrt(float((s[rank:] ** 2).sum()))
    err = float(torch.linalg.matrix_norm(emb.weight.detach().double() - table))
    assert err == pytest.approx(tail, rel=1e-4)
    assert torch.equal(emb.weight, before)  # factorize reads the table, never writes it
    assert low.first.weight.data_ptr() != emb.weight.data_ptr()
    with pytest.raises(ValueError):
        factorize(emb, rank, transform=(torch.ones(9), torch.ones(9)))


class _Emb(nn.Module):
    def __init__(self, v: int, d: int) -> None:
        super().__init__()
        _seed(8)
        self.emb = nn.Embedding(v, d)

    def forward(self, idx):
        return self.emb(idx)


def test_block_sparse_low_rank_embedding_refuses_a_block_that_does_not_tile_its_factors():
    """An embedding's factors are a (V, r) table and an r -> d projection whose weight is
    (d, r), not the (r, in) and (out, r) of a Linear's. V=16, d=6, r=4, block (4, 2): the table
    (16, 4) tiles, the projection (6, 4) does not (6 % 4 = 2): a SpaceError before any change."""
    model = _Emb(16, 6)
    policy = Policy(layers={"emb": LayerPolicy(rank=4, sparsity=0.5, block=(4, 2))})
    with pytest.raises(SpaceError):
        compress(model, policy)


def test_block_sparse_low_rank_embedding_accepts_a_block_that_tiles_its_factors():
    """V=16, d=8, r=2, block (4, 2): the table (16, 2) and the projection weight (8, 2) both
    tile, though the Linear-shaped (r, d) = (2, 8) would not."""
    model = _Emb(16, 8)
    policy = Policy(layers={"emb": LayerPolicy(rank=2, sparsity=0.5, block=(4, 2))})
    out = compress(model, policy)
    emb = out.emb
    assert isinstance(emb, LowRankEmbedding)
    assert emb.first.block == (4, 2) and emb.second.block == (4, 2)
    counts = count(out, context=1.0, config=FP32)
    table, proj = _row(counts, "emb.first"), _row(counts, "emb.second")
    # table: (16/4)*(2/2) = 4 blocks, round(0.5*4) = 2 dropped, 2 kept of 8 values
    assert (table.mask_bits, table.value_bits) == (4, 2 * 8 * 32)
    # projection: (8/4)*(2/2) = 2 blocks, round(0.5*2) = 1 dropped, 1 kept of 8 values
    assert (proj.mask_bits, proj.value_bits) == (2, 1 * 8 * 32)
    # the kept block's 4 rows of 2 values: 8 mults, 4*(2-1) = 4 adds
    assert (proj.mults, proj.adds) == (8, 4)


def test_embedding_refusals():
    model = _lstmlm()
    with pytest.raises(SpaceError):
        compress(model, Policy(layers={"wte": LayerPolicy(act_bits=8)}))
    with pytest.raises(SpaceError):
        compress(model, Policy(layers={"wte": LayerPolicy(rank=2, rank_method="whiten")}))
    with pytest.raises(SpaceError):
        Space(model, rules={"wte": dict(act_bits=Bits(8))})
    with pytest.raises(SpaceError):
        Space(model, rules={"wte": dict(rank=Rank(2, method="activation"))})
    Space(model, rules={"wte": dict(rank=Rank(2, method="tt"))})  # plain and tt are fine
    Space(model, rules={"wte": dict(rank=Rank(2))})


# ------------------------------------------------------------------ tied embedding + head


def _tied_cases():
    _seed(0)
    gpt = GPT(GPTConfig(vocab_size=24, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    return {"lstm": (_lstmlm(tie=True, h=12), 16, 8), "gpt": (gpt, 24, 16)}


@pytest.mark.parametrize("which", ["lstm", "gpt"])
def test_tied_embedding_compresses_the_head_too(which):
    model, v, d = _tied_cases()[which]
    assert model.head.weight is model.wte.weight
    out = compress(model, Policy(layers={"wte": LayerPolicy(sparsity=0.5, bits=4)}))
    assert isinstance(out.wte, CompressedEmbedding)
    assert out.head.weight is out.wte.weight  # still one tensor
    assert model.head.weight is model.wte.weight and type(model.wte) is nn.Embedding
    # logits: the dense model with its table replaced by the compressed one
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.wte.weight.copy_(out.wte.weight)
        ids = _ids(v, (2, 6))
        _assert_near(out(ids), ref(ids), 1e-6)
        assert not torch.allclose(out(ids), model(ids))
    # counted once, by the compressed table
    counts = count(out, context=1.0, config=FP32)
    dense = count(model, context=1.0, config=FP32)
    nnz = int((out.wte.weight != 0).sum())
    table = (nnz * 4 + v * d) / 32 + v
    assert _row(counts, "wte").params == table
    head_bias = v if getattr(out.head, "bias", None) is not None else 0
    assert _row(counts, "head").params == head_bias  # the head stores only its bias
    assert counts.params == dense.params - v * d + table
    # the head still multiplies by every stored non-zero
    assert _row(counts, "head").mults == nnz


def test_tied_refusals():
    model = _lstmlm(tie=True)
    with pytest.raises(SpaceError):
        compress(model, Policy(layers={"wte": LayerPolicy(rank=2, rank_method="autoencoder")}))
    with pytest.raises(SpaceError):
        compress(model, Policy(layers={"wte": LayerPolicy(bits=8), "head": LayerPolicy(bits=8)}))
    with pytest.raises(SpaceError):
        Space(model, rules={"wte": dict(rank=Rank(2, method="autoencoder"))})
    with pytest.raises(SpaceError):
        Space(model, rules={"wte": dict(bits=Bits(4, 8)), "head": dict(bits=Bits(4, 8))})
    # a pattern over both tied names leaves the table to the head, and says so
    with pytest.warns(SpaceWarning, match="leaves embedding 'wte' alone: its weight is tied"):
        space = Space(model, rules={"re:wte|head": dict(sparsity=Sparsity(0.0, 0.5))})
    assert [i.name for i in space.layers] == ["head"]
    with pytest.raises(SpaceError):
        Space(model, rules={"wte": dict(act_bits=Bits(8, 16))})
    assert type(model.wte) is nn.Embedding and model.head.weight is model.wte.weight


# ------------------------------------------------------------------ tensor-train via a policy


class _FC(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        _seed(7)
        self.fc = nn.Linear(48, 32)

    def forward(self, x):
        return self.fc(x)


def test_tt_linear_through_a_policy():
    model = _FC()
    out = compress(model, Policy(layers={"fc": LayerPolicy(rank=2, rank_method="tt")}))
    tt = out.fc
    assert isinstance(tt, TTLinear) and type(model.fc) is nn.Linear
    out_f, in_f = tt_shape(32, 48)
    assert (out_f, in_f) == ((4, 8), (6, 8))  # 4*8 = 32 rows, 6*8 = 48 columns
    assert (tt.out_factors, tt.in_factors, tt.ranks) == (out_f, in_f, (2,))
    # cores (1, 4, 6, 2) and (2, 8, 8, 1): 48 + 128 = 176 values
    assert tt_params(out_f, in_f, 2) == 1 * 4 * 6 * 2 + 2 * 8 * 8 * 1 == 176
    # step 1: P=1, (m1 r1 = 8) x (r0 n1 = 6) by Q = n2 = 8: 8*6*8 = 384 mults, 8*5*8 = 320 adds
    # step 2: P = m1 = 4, (m2 r2 = 8) x (r1 n2 = 16), Q = 1: 4*8*16 = 512 mults, 4*8*15 = 480
    assert tt_matvec_ops(out_f, in_f, 2) == (384 + 512, 320 + 480)
    counts = count(out, context=1.0, config=FP32)
    row = _row(counts, "fc")
    assert row.kind == "tt_linear"
    assert counts.params == row.params == tt_params(out_f, in_f, 2) + 32 == 208
    assert (row.mults, row.adds) == (896, 800 + 32)  # plus one add per bias entry
    assert counts.ops == 896 + 832
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = x @ tt.weight_matrix().T + tt.bias
        _assert_near(out(x), want, 1e-5)
        assert torch.equal(tt.bias, model.fc.bias)


def test_tt_embedding_through_a_policy():
    model = _lstmlm()
    out = compress(model, Policy(layers={"wte": LayerPolicy(rank=2, rank_method="tt")}))
    tt = out.wte
    assert isinstance(tt, TTEmbedding)
    rows, cols = tt_shape(16, 8)
    assert (rows, cols) == ((4, 4), (2, 4))
    # cores (1, 4, 2, 2) and (2, 4, 4, 1): 16 + 32 = 48 values
    assert tt_params(rows, cols, 2) == 1 * 4 * 2 * 2 + 2 * 4 * 4 * 1 == 48
    # one step: the (2 x r1=2) partial row times the (2 x 4*1) slice: 2*2*4 = 16 mults, 2*1*4 = 8
    assert tt_lookup_ops(rows, cols, 2) == (16, 8)
    counts = count(out, context=1.0, config=FP32)
    row = _row(counts, "wte")
    assert row.kind == "tt_embedding"
    assert (row.params, row.mults, row.adds) == (48, 16, 8)
    dense = count(model, context=1.0, config=FP32)
    assert counts.params == dense.params - 16 * 8 + 48
    ids = _ids()
    with torch.no_grad():
        _assert_near(out.wte(ids), tt.table()[ids], 1e-6)


def test_tt_refuses_sparsity_and_bits():
    for kwargs in (dict(bits=8), dict(sparsity=0.5), dict(act_bits=8)):
        with pytest.raises(SpaceError):
            LayerPolicy(rank=2, rank_method="tt", **kwargs)
    model = _lstmlm()
    for knob in (dict(bits=Bits(8)), dict(sparsity=Sparsity(0.1, 0.5)), dict(act_bits=Bits(8))):
        with pytest.raises(SpaceError):
            Space(model, rules={"head": dict(rank=Rank(2, method="tt"), **knob)})
    # constants that change nothing are allowed
    Space(model, rules={"head": dict(rank=Rank(2, method="tt"), bits=Bits(32))})


# ------------------------------------------------------------------ export round trips


def _tiny_gpt() -> GPT:
    _seed(0)
    return GPT(GPTConfig(vocab_size=24, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()


def _lstm_case(settings: dict[str, LayerPolicy] | None, **kwargs):
    def make() -> tuple[nn.Module, Policy, int]:
        base = _lstmlm(**kwargs)
        if settings is None:  # no compression: only the gates run as Linears
            return linear_gates_(base), Policy(), 16
        policy = Policy(layers=settings)
        return compress(base, policy), policy, 16

    return make


def _gpt_tied_case() -> tuple[nn.Module, Policy, int]:
    policy = Policy(layers={"wte": LayerPolicy(sparsity=0.5, bits=4)})
    return compress(_tiny_gpt(), policy), policy, 24


EXPORT_CASES = {
    "linear_lstm": _lstm_case(
        {
            "lstm.weight_hh_l0": LayerPolicy(sparsity=0.5, bits=4),
            "lstm.weight_ih_l1": LayerPolicy(bits=8),
            "lstm.weight_hh_l1": LayerPolicy(sparsity=0.5, block=(4, 4), bits=6),
        },
        layers=2,
    ),
    "linear_lstm_dense": _lstm_case(None, layers=2),
    "linear_lstm_tt_and_low_rank_gates": _lstm_case(
        {
            "lstm.weight_hh_l0": LayerPolicy(rank=2, rank_method="tt"),
            "lstm.weight_ih_l0": LayerPolicy(rank=2),
        }
    ),
    "embedding_element": _lstm_case({"wte": LayerPolicy(sparsity=0.5, bits=4)}),
    "embedding_block": _lstm_case({"wte": LayerPolicy(sparsity=0.5, block=(4, 4), bits=8)}),
    "low_rank_embedding": _lstm_case({"wte": LayerPolicy(rank=3)}),
    "low_rank_embedding_compressed": _lstm_case({"wte": LayerPolicy(rank=3, sparsity=0.5, bits=4)}),
    "tied_embedding": _lstm_case({"wte": LayerPolicy(sparsity=0.5, bits=4)}, tie=True, h=12),
    "tied_embedding_gpt": _gpt_tied_case,
    "tt_linear": _lstm_case({"head": LayerPolicy(rank=2, rank_method="tt")}),
    "tt_embedding": _lstm_case({"wte": LayerPolicy(rank=2, rank_method="tt")}),
}


@pytest.mark.parametrize("which", list(EXPORT_CASES))
def test_export_round_trip(which, tmp_path):
    model, policy, vocab = EXPORT_CASES[which]()
    round_to_storage(model, count(model, context=1.0))  # fp16 when the allowance applies
    counts = count(model, context=1.0)
    path = tmp_path / "m.msz"
    info = save(model, path, policy=policy, recipe=model.recipe())
    assert info.counted_params == counts.params and info.freebie == counts.freebie
    assert info.exact
    assert abs(info.ratio - 1) <= 0.02, info
    loaded = load(path, expect_recipe=model.recipe())
    assert {n: type(m) for n, m in loaded.named_modules()} == {
        n: type(m) for n, m in model.named_modules()
    }
    ids = _ids(vocab, (2, 7))
    with torch.no_grad():
        assert (loaded(ids) - model(ids)).abs().max().item() <= 1e-6
    again = count(loaded, context=1.0)
    assert (again.params, again.ops, again.freebie) == (counts.params, counts.ops, counts.freebie)
    assert read_header(path)["policy"] == policy.to_json()
    tied = getattr(model.head, "weight", None)
    if tied is not None and tied is getattr(model.wte, "weight", None):
        assert loaded.head.weight is loaded.wte.weight  # re-tied, stored once
        refs = [sorted(r["refs"]) for r in read_header(path)["tensors"]]
        assert ["head.weight", "wte.weight"] in refs
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            other = loaded.get_submodule(name)
            assert (other.bits, other.sparse, other.block) == (
                module.bits,
                module.sparse,
                module.block,
            )
            assert torch.equal(other.weight, module.weight)
            if module.bits < 32:
                assert torch.equal(other.weight_scale, module.weight_scale)
        if isinstance(module, (TTLinear, TTEmbedding)):
            other = loaded.get_submodule(name)
            assert other.ranks == module.ranks
            assert all(torch.equal(a, b) for a, b in zip(other.cores, module.cores, strict=True))
    if isinstance(getattr(model, "lstm", None), LinearLSTM):
        assert isinstance(loaded.lstm, LinearLSTM)
        assert loaded.lstm.batch_first
        assert loaded.lstm.num_layers == model.lstm.num_layers
