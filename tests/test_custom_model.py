"""A custom nn.Module LM written to the README's contract: its own `evaluate`, calibration tokens
given by the space file (no corpus), `act_bits` searched; and the contract's refusals, each at
load time with the part that is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from microsweep.errors import UsageError
from microsweep.prepare import load_space_file
from microsweep.search import run_sweep
from microsweep.storage import Store

CUSTOM = '''
import torch
from torch import nn

from microsweep import Bits, MicroNet, Space, Sparsity
from microsweep.score import perplexity


class TinyLM(nn.Module):
    """ids (B, T) -> logits (B, T, V): an embedding, a two-layer MLP per position, a head."""

    def __init__(self, vocab=40, width=24):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        return self.head(x + self.down(torch.relu(self.up(x))))


torch.manual_seed(0)
model = TinyLM()
gen = torch.Generator().manual_seed(1)
WINDOWS = torch.randint(0, 40, (8, 17), generator=gen)
{calib}

space = Space(
    model,
    rules={{
        "up": dict(
            bits=Bits(4, 8, 32), act_bits=Bits(8, 32), sparsity=Sparsity(0.0, 0.5, step=0.5)
        ),
        "down": dict(bits=Bits(4, 8, 32), act_bits=Bits(8, 32)),
    }},
)
# the residual add and the relu in forward() have no counting rule: accepted within 5%
objective = MicroNet(
    window=16, perplexity_ceiling=None, baseline="dense", uncounted_tolerance=0.05
)


def evaluate(model):
    return perplexity(model, WINDOWS)
'''

CALIB = "calib = torch.randint(0, 40, (4, 16), generator=gen)"


def _space(tmp_path: Path, calib: str = CALIB, name: str = "custom.py") -> str:
    path = tmp_path / name
    path.write_text(CUSTOM.format(calib=calib))
    return str(path)


def test_custom_lm_with_evaluate_and_calib_sweeps_with_act_bits(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    seen: list[dict] = []
    run_sweep(
        _space(tmp_path),
        name="c",
        trials=6,
        storage=url,
        sampler="random",
        seed=2,
        in_process=True,
        progress=False,
        on_trial=seen.append,
    )
    assert [s["state"] for s in seen] == ["COMPLETE"] * 6, [s.get("reason") for s in seen]
    rows = Store(url, must_exist=True).trials("c")
    quantized_inputs = [
        r for r in rows if any(v.get("act_bits") == 8 for v in r.policy["layers"].values())
    ]
    assert quantized_inputs  # activation quantization really ran, calibrated on `calib`
    assert len({round(r.perplexity, 9) for r in rows}) > 1  # the models really changed
    # export without a recipe: the file names the class; load takes a dense instance
    from microsweep import load
    from microsweep.export import ExportError, export_trial

    row = quantized_inputs[0]
    path = tmp_path / "custom.msz"
    info = export_trial("c", row.number, path, storage=url)
    assert info.exact
    with pytest.raises(ExportError, match=r"custom model \(.*TinyLM\); pass load\(path, model="):
        load(path)
    sf = load_space_file(_space(tmp_path))
    model = load(path, model=sf.model)
    assert sf.evaluate(model) == pytest.approx(row.perplexity, rel=1e-6)
    assert model is not sf.model and type(model.up).__name__ == "CompressedLinear"


def test_act_bits_without_calibration_tokens_is_refused_at_load(tmp_path):
    with pytest.raises(UsageError, match=r"rule 'up' quantizes layer inputs.*define `calib`"):
        load_space_file(_space(tmp_path, calib="", name="nocalib.py"))


def test_calib_of_the_wrong_kind_is_refused_at_load(tmp_path):
    bad = "calib = torch.rand(4, 16)"
    with pytest.raises(UsageError, match=r"`calib` must be integer token ids of shape \(B, T\)"):
        load_space_file(_space(tmp_path, calib=bad, name="floatcalib.py"))


def test_a_model_without_logits_is_refused_at_load(tmp_path):
    path = tmp_path / "nologits.py"
    path.write_text(
        CUSTOM.format(calib=CALIB)
        .replace("return self.head(x + self.down(torch.relu(self.up(x))))", "return x.mean(1)")
        .replace("def evaluate(model):", "def _unused(model):")
        + "\nfrom microsweep import data\ncorpus = data.tiny_shakespeare()\n"
    )
    with pytest.raises(UsageError, match=r"gave \(1, 24\); the built-in perplexity needs logits"):
        load_space_file(str(path))


HAND_ATTENTION = """
import torch
from torch import nn

from microsweep import Bits, MicroNet, Space


class HandAttention(nn.Module):
    \"\"\"Attention computed by hand: no parameters of its own, no counting rule.\"\"\"

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        return torch.softmax(scores, dim=-1) @ v


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.qkv = nn.Linear(16, 48)
        self.attn = HandAttention()
        self.head = nn.Linear(16, 30)

    def forward(self, ids):
        q, k, v = self.qkv(self.emb(ids)).split(16, dim=-1)
        return self.head(self.attn(q, k, v))


torch.manual_seed(0)
space = Space(LM(), rules={{"qkv": dict(bits=Bits(8, 32))}})
objective = MicroNet(window=16, perplexity_ceiling=None{tolerance})


def evaluate(model):
    return 10.0
"""


def test_parameter_free_work_no_rule_counts_fails_loudly(tmp_path):
    """A module that computes attention by hand (no parameters, no rule) would add nothing to
    the count: the sweep is refused, naming the module and its ops; a stated tolerance lets it
    through with a warning."""
    from microsweep.errors import SpaceWarning
    from microsweep.score import uncounted_work

    path = tmp_path / "hand.py"
    path.write_text(HAND_ATTENTION.format(tolerance=""))
    url = f"sqlite:///{tmp_path / 'h.db'}"
    with pytest.raises(UsageError, match=r"module 'attn' \(HandAttention\) executes .*matmul"):
        run_sweep(str(path), name="h", trials=2, storage=url, in_process=True, progress=False)
    assert Store(url).sweep_names() == []
    sf = load_space_file(str(path))
    [work] = uncounted_work(sf.model, torch.zeros(1, 16, dtype=torch.long))
    # q @ k^T and attn @ v: 2 x 16 x 16 products of 16 terms per token pair -> 2 * 2 * 16 * 16
    assert work.name == "attn" and work.ops["matmul"] == pytest.approx(2 * 2 * 16 * 16)
    assert work.ops["softmax"] == pytest.approx(3 * 16)
    path.write_text(HAND_ATTENTION.format(tolerance=", uncounted_tolerance=0.9"))
    with pytest.warns(SpaceWarning, match="within uncounted_tolerance"):
        run_sweep(str(path), name="h", trials=2, storage=url, in_process=True, progress=False)
    assert Store(url).sweep_names() == ["h"]


def test_an_output_object_with_logits_is_read_by_the_built_in_perplexity():
    """Hugging Face style outputs (an object with `.logits`) need no adapter."""
    from dataclasses import dataclass

    from microsweep.score import perplexity

    @dataclass
    class Output:
        logits: torch.Tensor

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))

        def forward(self, ids: torch.Tensor) -> Output:
            return Output(self.inner(ids))

    model = Wrapped()
    windows = torch.randint(0, 10, (3, 9), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, windows) == pytest.approx(perplexity(model.inner, windows), rel=1e-12)


RULE = """

from microsweep.score import Cost, register_rule


@register_rule(HandAttention)
def _hand_attention(module, name, ctx):
    cost = Cost("attention")
    d, positions = 16, ctx.context
    cost.mul(2 * d * positions, 32, 32)  # q.k over the attended positions, then attn.v
    cost.add(2 * d * positions)
    cost.other(3 * positions)  # softmax
    return cost
"""


@pytest.mark.ray
def test_a_rule_registered_in_the_space_file_counts_on_ray_workers(tmp_path):
    """A counting rule the space file registers also counts on Ray workers, which never run
    the file: the same policies count the same operations there and in-process."""
    path = tmp_path / "ruled.py"
    path.write_text(HAND_ATTENTION.format(tolerance="") + RULE)
    counts = {}
    for mode in ("ray", "local"):
        seen: list[dict] = []
        run_sweep(
            str(path),
            name=mode,
            trials=3,
            storage=f"sqlite:///{tmp_path / f'{mode}.db'}",
            sampler="random",
            seed=4,
            in_process=mode == "local",
            progress=False,
            on_trial=seen.append,
        )
        counts[mode] = [(s["state"], s.get("ops")) for s in seen]
    assert counts["ray"] == counts["local"]
    assert all(state == "COMPLETE" for state, _ in counts["ray"])


def test_hf_without_transformers_says_what_to_install(monkeypatch):
    import sys

    from microsweep import models

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(UsageError, match=r'pip install -e "\.\[hf\]"'):
        models.hf("some/model/dir")
