"""Export: bit packing, save -> load round trips per technique, sizes against the count, bad
files, and an end-to-end export of real sweep trials whose reloaded perplexity matches."""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from microsweep import LayerPolicy, Policy
from microsweep.compress import CompressedLinear, LowRankLinear, compress
from microsweep.errors import MicrosweepError
from microsweep.export import (
    MAGIC,
    ExportError,
    export_trial,
    load,
    read_header,
    round_to_storage,
    save,
)
from microsweep.export._bits import (
    pack_mask,
    pack_signed,
    packed_len,
    unpack_mask,
    unpack_signed,
)
from microsweep.models import GPT, GPTConfig
from microsweep.score import CountConfig, count
from tests.conftest import ROOT

TINY = str(ROOT / "examples" / "tiny.py")
CONFIG = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def gpt() -> GPT:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT(CONFIG).eval()


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 65, (3, 32), generator=torch.Generator().manual_seed(2))


def _linears(model: nn.Module, part: str = "") -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != "head" and part in n
    ]


def _policies(model: nn.Module) -> dict[str, Policy]:
    lin = _linears(model)
    return {
        "dense": Policy(),
        "pruned": Policy(layers={n: LayerPolicy(sparsity=0.8) for n in lin}),
        "quant4": Policy(layers={n: LayerPolicy(bits=4) for n in lin}),
        "quant8": Policy(layers={n: LayerPolicy(bits=8) for n in lin}),
        "act8": Policy(layers={n: LayerPolicy(act_bits=8) for n in lin}),
        "lowrank": Policy(layers={n: LayerPolicy(rank=8) for n in lin}),
        "block": Policy(layers={n: LayerPolicy(sparsity=0.75, block=(4, 4)) for n in lin}),
        "head8": Policy(layers={"head": LayerPolicy(bits=8)}),
        "w16a16": Policy(layers={n: LayerPolicy(bits=16, act_bits=16) for n in lin}),
        "combined": Policy(
            layers={
                **{
                    n: LayerPolicy(sparsity=0.5, bits=4, act_bits=8, rank=8)
                    for n in _linears(model, "mlp")
                },
                **{
                    n: LayerPolicy(sparsity=0.5, block=(4, 4), bits=8)
                    for n in _linears(model, "attn")
                },
                "head": LayerPolicy(bits=6),
            }
        ),
    }


def _compressed(model: nn.Module, policy: Policy, calib: torch.Tensor, config=None) -> nn.Module:
    out = compress(model, policy, calib=calib)
    round_to_storage(out, count(out, context=16.5, config=config or CountConfig()))
    return out


# -- bit packing ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 17))
def test_signed_packing_round_trips_exactly(bits):
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    gen = torch.Generator().manual_seed(bits)
    for n in (1, 7, 1001):
        values = torch.randint(low, high + 1, (n,), generator=gen)
        values[0] = low
        values[-1] = high
        data = pack_signed(values, bits)
        assert len(data) == packed_len(n, bits) == math.ceil(n * bits / 8)
        assert torch.equal(unpack_signed(data, bits, n), values)
    with pytest.raises(ValueError):
        pack_signed(torch.tensor([high + 1]), bits)


def test_mask_packing_and_speed():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 9, 4099):
        mask = torch.rand(n, generator=gen) > 0.5
        data = pack_mask(mask)
        assert len(data) == packed_len(n, 1)
        assert torch.equal(unpack_mask(data, n), mask)
    values = torch.randint(-(1 << 15), 1 << 15, (1_000_000,), generator=gen)
    start = time.perf_counter()
    back = unpack_signed(pack_signed(values, 16), 16, values.numel())
    assert torch.equal(back, values)
    assert time.perf_counter() - start < 5.0  # vectorized: ~0.1 s here


# -- save -> load, per technique --------------------------------------------------------------


@pytest.mark.parametrize(
    "which",
    [
        "dense",
        "pruned",
        "quant4",
        "quant8",
        "act8",
        "lowrank",
        "block",
        "head8",
        "w16a16",
        "combined",
    ],
)
def test_round_trip_is_exact_and_sized_like_the_count(which, gpt, calib, ids, tmp_path):
    policy = _policies(gpt)[which]
    model = _compressed(gpt, policy, calib)
    counts = count(model, context=16.5)
    info = save(model, tmp_path / "m.msz", policy=policy, recipe=gpt.recipe())
    print(f"{which}: ratio {info.ratio:.4f} ({info.payload_bytes} B / {counts.params:.1f} params)")
    assert info.counted_params == counts.params and info.freebie == counts.freebie
    assert info.exact and info.uncounted_bytes == 0
    assert abs(info.ratio - 1.0) <= 0.02
    assert info.header_bytes + info.payload_bytes == (tmp_path / "m.msz").stat().st_size
    loaded = load(tmp_path / "m.msz", expect_recipe=gpt.recipe())
    with torch.no_grad():
        assert (loaded(ids) - model(ids)).abs().max().item() <= 1e-6
    assert loaded.head.weight is loaded.wte.weight  # re-tied, stored once
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert {n: type(m) for n, m in loaded.named_modules()} == kinds
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            other = loaded.get_submodule(name)
            assert (other.bits, other.act_bits, other.sparse, other.block) == (
                module.bits,
                module.act_bits,
                module.sparse,
                module.block,
            )
            for field in ("weight", "bias", "weight_scale", "act_scale"):
                a, b = getattr(module, field), getattr(other, field)
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), field
    # reloading again gives the same count: the artifact is the counted model
    assert count(loaded, context=16.5).params == counts.params
    assert read_header(tmp_path / "m.msz")["policy"] == policy.to_json()


def test_freebie_rounding_is_what_makes_the_file_exact(gpt, calib, tmp_path):
    model = compress(gpt, Policy(), calib=calib)
    info = save(model, tmp_path / "raw.msz", policy=Policy(), recipe=gpt.recipe())
    assert info.freebie and not info.exact  # fp32 values stored as fp16
    assert round_to_storage(model, count(model, context=1.0))
    info = save(model, tmp_path / "rounded.msz", policy=Policy(), recipe=gpt.recipe())
    assert info.exact
    quant = compress(gpt, _policies(gpt)["quant4"], calib=calib)
    before = {k: v.clone() for k, v in quant.state_dict().items()}
    assert not round_to_storage(quant, count(quant, context=1.0))
    assert all(torch.equal(v, before[k]) for k, v in quant.state_dict().items())


@pytest.mark.parametrize("config", [CountConfig(mask="always"), CountConfig(freebie=False)])
def test_other_count_conventions_are_followed(config, gpt, calib, ids, tmp_path):
    policy = Policy(layers={n: LayerPolicy(sparsity=0.6, bits=4) for n in _linears(gpt, "mlp")})
    for p in (policy, Policy()):
        model = _compressed(gpt, p, calib, config)
        info = save(model, tmp_path / "m.msz", policy=p, recipe=gpt.recipe(), count_config=config)
        assert info.counted_params == count(model, context=1.0, config=config).params
        assert abs(info.ratio - 1.0) <= 0.02, info
        with torch.no_grad():
            assert torch.equal(load(tmp_path / "m.msz")(ids), model(ids))


def test_folded_layernorm_is_stored_and_reported_apart(gpt, calib, ids, tmp_path):
    config = CountConfig(fold_layernorm=True)
    policy = _policies(gpt)["quant4"]
    model = _compressed(gpt, policy, calib, config)
    info = save(model, tmp_path / "m.msz", policy=policy, recipe=gpt.recipe(), count_config=config)
    assert info.uncounted_bytes == 5 * 2 * 32 * 4  # five LayerNorms, gamma and beta, fp32
    assert abs((info.payload_bytes - info.uncounted_bytes) / (info.counted_params * 4) - 1) < 0.02
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m.msz")(ids), model(ids))


def test_low_rank_factors_are_two_matrices(gpt, calib, tmp_path):
    policy = _policies(gpt)["lowrank"]
    model = _compressed(gpt, policy, calib)
    save(model, tmp_path / "m.msz", policy=policy, recipe=gpt.recipe())
    header = read_header(tmp_path / "m.msz")
    rows = {r["refs"][0]: r for r in header["tensors"]}
    assert rows["blocks.0.mlp.c_fc.first.weight"]["shape"] == [8, 32]
    assert rows["blocks.0.mlp.c_fc.second.weight"]["shape"] == [128, 8]
    assert isinstance(load(tmp_path / "m.msz").blocks[0].mlp.c_fc, LowRankLinear)


def test_block_sparse_quantized_values_count_their_in_block_zeros(gpt, calib, ids, tmp_path):
    """A block mask cannot locate zeros inside kept blocks, so quantized zeros there are stored
    at b bits each; the count charges whole kept blocks, so file and count agree."""
    from microsweep.score import count

    policy = Policy(
        layers={n: LayerPolicy(sparsity=0.75, block=(4, 4), bits=4) for n in _linears(gpt)}
    )
    model = _compressed(gpt, policy, calib)
    in_block_zeros = sum(
        int(((m.weight == 0) & m.mask).sum())
        for m in model.modules()
        if isinstance(m, CompressedLinear)
    )
    assert in_block_zeros > 0  # the case this test is about does occur at 4 bits
    info = save(model, tmp_path / "m.msz", policy=policy, recipe=gpt.recipe())
    counted = count(model, context=16.5).params
    assert info.counted_params == pytest.approx(counted)
    assert abs(info.ratio - 1.0) <= 0.02, info.ratio
    padding = info.payload_bytes * 8 - round(counted * 32)
    assert 0 <= padding < 8 * 2 * info.tensors  # only whole-byte padding per segment
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m.msz")(ids), model(ids))


def test_runner_evaluates_exactly_what_is_exported(tiny_gpt, corpus, tmp_path):
    from microsweep.score import eval_windows, mean_context, perplexity
    from microsweep.workers import EvalSettings, TrialRunner

    windows = eval_windows(corpus.val, window=32, max_tokens=512)
    calib = corpus.train[: 8 * 32].view(8, 32)
    runner = TrialRunner(tiny_gpt, windows, EvalSettings(context=mean_context(32)), calib=calib)
    policies = [
        (Policy(), True),
        (Policy(layers={"blocks.0.mlp.c_fc": LayerPolicy(sparsity=0.5, bits=16)}), True),
        (Policy(layers={"blocks.0.mlp.c_fc": LayerPolicy(sparsity=0.5, bits=4)}), False),
    ]
    for policy, freebie in policies:
        res = runner.run(0, policy.to_json())
        assert res.status == "ok" and res.freebie is freebie
        model = compress(tiny_gpt, policy, calib=calib)
        round_to_storage(model, count(model, context=mean_context(32)))
        info = save(model, tmp_path / "m.msz", policy=policy, recipe=tiny_gpt.recipe())
        assert info.exact and info.counted_params == res.params
        loaded = load(tmp_path / "m.msz")
        assert perplexity(loaded, windows) == pytest.approx(res.perplexity, rel=1e-9)


# -- refusing bad input -------------------------------------------------------------------------


@pytest.fixture
def saved(gpt, calib, tmp_path) -> Path:
    policy = _policies(gpt)["combined"]
    path = tmp_path / "m.msz"
    save(_compressed(gpt, policy, calib), path, policy=policy, recipe=gpt.recipe())
    return path


def _rewrite(path: Path, change) -> Path:
    data = bytearray(path.read_bytes())
    change(data)
    bad = path.with_name("bad.msz")
    bad.write_bytes(bytes(data))
    return bad


def test_corrupt_payload_byte_is_refused(saved):
    def flip(data: bytearray) -> None:
        data[-10] ^= 0x40

    with pytest.raises(ExportError, match="corrupt: payload checksum"):
        load(_rewrite(saved, flip))


def test_corrupt_header_byte_is_refused(saved):
    def flip(data: bytearray) -> None:
        data[60] ^= 0x01

    with pytest.raises(ExportError, match="corrupt: header checksum"):
        load(_rewrite(saved, flip))


@pytest.mark.parametrize("keep", [0, 5, 30, 200, -1])
def test_truncated_file_is_refused(saved, keep):
    def cut(data: bytearray) -> None:
        del data[keep if keep >= 0 else len(data) - 1 :]

    with pytest.raises(ExportError, match="truncated|not a microsweep model file"):
        load(_rewrite(saved, cut))


def test_trailing_bytes_are_refused(saved):
    with pytest.raises(ExportError, match="trailing bytes"):
        load(_rewrite(saved, lambda data: data.extend(b"\0")))


def test_wrong_magic_is_refused(saved, tmp_path):
    def stamp(data: bytearray) -> None:
        data[:8] = b"PK\x03\x04\0\0\0\0"

    with pytest.raises(ExportError, match="not a microsweep model file"):
        load(_rewrite(saved, stamp))
    text = tmp_path / "t.msz"
    text.write_text("hello")
    with pytest.raises(ExportError, match="not a microsweep model file"):
        load(text)
    with pytest.raises(ExportError, match="cannot read"):
        load(tmp_path / "missing.msz")


def test_newer_format_version_is_refused(saved):
    def bump(data: bytearray) -> None:
        data[len(MAGIC) : len(MAGIC) + 4] = struct.pack("<I", 99)

    with pytest.raises(ExportError, match="newer microsweep.*upgrade"):
        load(_rewrite(saved, bump))


def test_file_for_another_model_is_refused(saved, gpt):
    other = {"builder": "gpt", "config": {**gpt.recipe()["config"], "n_embd": 64}}
    with pytest.raises(ExportError, match="for another model"):
        load(saved, expect_recipe=other)
    assert isinstance(load(saved, expect_recipe=gpt.recipe()), GPT)


def test_malformed_table_with_valid_checksums_is_refused(gpt, tmp_path):
    from microsweep.export._format import write_container

    path = tmp_path / "odd.msz"
    header = {"format": 1, "recipe": gpt.recipe(), "layers": [], "tensors": [{"refs": 1}]}
    write_container(path, header, b"")
    with pytest.raises(ExportError, match="corrupt"):
        load(path)
    write_container(path, {**header, "tensors": []}, b"")
    with pytest.raises(ExportError, match="another model: it has no values"):
        load(path)  # a valid but empty file never yields a half-built model


def test_declared_shapes_are_checked_before_anything_is_allocated(saved, tmp_path):
    """A crafted table row (valid checksums) that declares a huge block-masked tensor under a
    real weight's name is refused from the meta skeleton, before its mask is expanded."""
    from microsweep.export._format import write_container

    header = read_header(saved)
    header.pop("header_bytes")
    row = dict(header["tensors"][0])
    row.update(shape=[10**7, 10**7], mask="block", block=[10**7, 10**7], count=1)
    path = tmp_path / "crafted.msz"
    write_container(path, {**header, "tensors": [row]}, b"\xff" * 16)
    with pytest.raises(ExportError, match="does not fit the rebuilt model"):
        load(path)


def test_load_draws_no_random_numbers(saved):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load(saved)
    assert torch.equal(torch.rand(3), expected)


def test_save_refuses_models_it_cannot_write_faithfully(gpt, calib, tmp_path):
    policy = _policies(gpt)["quant4"]
    model = _compressed(gpt, policy, calib)
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight.add_(1e-3)  # off the 4-bit grid
    with pytest.raises(ExportError, match="off its 4-bit grid"):
        save(model, tmp_path / "m.msz", policy=policy, recipe=gpt.recipe())
    assert not list(tmp_path.iterdir())  # nothing half-written
    other = {"builder": "gpt", "config": {**gpt.recipe()["config"], "n_layer": 3}}
    with pytest.raises(ExportError, match="another model"):
        save(gpt, tmp_path / "m.msz", policy=Policy(), recipe=other)
    with pytest.raises(MicrosweepError):
        save(gpt, tmp_path / "m.msz", policy={"type": "bogus"}, recipe=gpt.recipe())


# -- a real sweep, exported trial by trial ---------------------------------------------------


def test_exported_trials_reproduce_their_stored_perplexity(sqlite_url, tmp_path, tiny_gpt):
    from microsweep.score import eval_windows, perplexity
    from microsweep.search import run_sweep
    from microsweep.storage import Store, TrialRecord

    run_sweep(
        TINY, name="ex", trials=3, storage=sqlite_url, seed=2, in_process=True, progress=False
    )
    store = Store(sqlite_url, must_exist=True)
    rows = [r for r in store.trials("ex") if r.state == "COMPLETE"]
    recipe = store.get_sweep("ex").model_recipe
    store.dispose()
    assert rows
    from microsweep.data import tiny_shakespeare

    windows = eval_windows(tiny_shakespeare().val, window=32, max_tokens=2048)
    for row in rows:
        path = tmp_path / f"trial{row.number}.msz"
        info = export_trial("ex", row.number, path, storage=sqlite_url)
        print(f"trial {row.number}: ratio {info.ratio:.4f} freebie {info.freebie}")
        assert info.counted_params == pytest.approx(row.params, rel=1e-12)
        assert abs(info.ratio - 1.0) <= 0.02 and info.exact
        model = load(path, expect_recipe=recipe)
        assert perplexity(model, windows) == pytest.approx(row.perplexity, rel=1e-4)
        assert read_header(path)["extra"]["trial"] == row.number
    with pytest.raises(MicrosweepError, match="no finished trial 99"):
        export_trial("ex", 99, tmp_path / "x.msz", storage=sqlite_url)
    store = Store(sqlite_url)
    sweep_id = store.get_sweep("ex").id
    store.record_trial(
        sweep_id, TrialRecord(state="FAIL", reason="boom", policy={}, summary=""), number=50
    )
    store.dispose()
    with pytest.raises(ExportError, match="trial 50 of sweep 'ex' is FAIL \\(boom\\)"):
        export_trial("ex", 50, tmp_path / "x.msz", storage=sqlite_url)
    assert not (tmp_path / "x.msz").exists()
