"""Hugging Face causal LMs built from configs inside the tests (no downloads): GPT-2 with Conv1D
and tied embeddings, and a Llama-style model; counted exactly, swept on Ray, exported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from microsweep import models  # noqa: E402
from microsweep.score import CountConfig, count, mean_context, uncounted_work  # noqa: E402

EXACT = CountConfig(freebie=False)


def _gpt2(**shape: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.hf(transformers.GPT2Config(**shape))


def test_gpt2_conv1d_becomes_linear_with_the_same_function():
    from transformers.pytorch_utils import Conv1D

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    original = transformers.GPT2LMHeadModel(cfg).eval()
    assert any(isinstance(m, Conv1D) for m in original.modules())
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = original(ids).logits
    converted = models.hf(original)
    assert not any(isinstance(m, Conv1D) for m in converted.modules())
    assert isinstance(converted.get_submodule("transformer.h.0.mlp.c_fc"), torch.nn.Linear)
    with torch.no_grad():
        after = converted(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert converted.lm_head.weight is converted.transformer.wte.weight  # tie kept
    assert converted.recipe()["builder"] == "hf"


def test_a_local_directory_loads_like_the_model_saved_there(tmp_path):
    from microsweep.errors import UsageError

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    original = transformers.GPT2LMHeadModel(cfg).eval()
    original.save_pretrained(tmp_path / "gpt2-tiny")
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        expected = original(ids).logits
        got = models.hf(str(tmp_path / "gpt2-tiny"))(ids).logits
    torch.testing.assert_close(got, expected)
    with pytest.raises(UsageError, match="not a local model directory"):
        models.hf(str(tmp_path / "absent"))


def test_gpt2_counts_every_parameter_once_and_ops_like_the_built_in_gpt():
    d, layers, heads, vocab, window = 256, 2, 4, 512, 64
    hf = _gpt2(vocab_size=vocab, n_positions=window, n_embd=d, n_layer=layers, n_head=heads)
    assert uncounted_work(hf, torch.zeros(1, 8, dtype=torch.long)) == []
    counted = count(hf, context=mean_context(window), config=EXACT)
    assert counted.params == sum(p.numel() for p in hf.parameters())  # tied head once
    own = models.GPT(
        models.GPTConfig(
            vocab_size=vocab, block_size=window, n_embd=d, n_layer=layers, n_head=heads
        )
    )
    ours = count(own, context=mean_context(window), config=EXACT)
    assert counted.params == ours.params
    # the only difference: GPT-2's tanh GELU (6 mults, 2 adds, 1 other) against erf (3, 1, 1)
    assert counted.ops - ours.ops == pytest.approx(layers * 4 * d * (9 - 5))
    assert abs(counted.ops / ours.ops - 1) < 0.005


def _family(kind: str) -> torch.nn.Module:
    small = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    small["max_position_embeddings"] = 64
    grouped = dict(small, intermediate_size=128, num_key_value_heads=2)
    config = {
        "llama": lambda: transformers.LlamaConfig(**grouped),
        "qwen2": lambda: transformers.Qwen2Config(**grouped),
        "mistral": lambda: transformers.MistralConfig(**grouped),
        "opt": lambda: transformers.OPTConfig(**small, ffn_dim=128, word_embed_proj_dim=64),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**small, intermediate_size=128),
    }[kind]()
    torch.manual_seed(0)
    return models.hf(config)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "opt", "gpt_neox"])
def test_linear_based_families_are_counted_with_nothing_left_over(kind):
    """Llama, Qwen2, Mistral, OPT and GPT-NeoX style models: every parameter counted once, no
    executed math outside a rule, and a compressed layer changes the count as it should."""
    from microsweep import LayerPolicy, Policy
    from microsweep.compress import compress

    model = _family(kind)
    assert uncounted_work(model, torch.zeros(1, 8, dtype=torch.long)) == []
    dense = count(model, context=mean_context(64), config=EXACT)
    assert dense.params == sum(p.numel() for p in model.parameters())
    attention_rows = [r for r in dense.layers if r.name.endswith(("self_attn", "attention"))]
    assert len(attention_rows) == 2 and all(r.ops > 0 for r in attention_rows)
    name, linear = next(
        (n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".0." in n
    )
    small = compress(model, Policy(layers={name: LayerPolicy(bits=8)}))
    after = count(small, context=mean_context(64), config=EXACT)
    saved = linear.weight.numel() * (1 - 8 / 32)
    assert after.params == pytest.approx(dense.params - saved + linear.out_features, rel=1e-9)


SPACE = """
import transformers

from microsweep import Bits, MicroNet, Space, Sparsity, data, models

corpus = data.tiny_shakespeare()
config = transformers.GPT2Config(
    vocab_size=corpus.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2
)
import torch

torch.manual_seed(0)
model = models.hf(config)
space = Space(
    model,
    rules={
        "transformer.h.*.mlp.*": dict(sparsity=Sparsity(0.0, 0.5, step=0.25), bits=Bits(8, 32)),
        "transformer.h.*.attn.c_attn": dict(bits=Bits(8, 32)),
    },
)
objective = MicroNet(perplexity_ceiling=None, baseline="dense", eval_tokens=512)
"""


@pytest.mark.ray
def test_hf_gpt2_sweeps_on_ray_and_exports_with_equal_perplexity(tmp_path: Path):
    from microsweep import load
    from microsweep.data import tiny_shakespeare
    from microsweep.export import export_trial
    from microsweep.score import eval_windows, perplexity
    from microsweep.search import run_sweep
    from microsweep.storage import Store

    space = tmp_path / "hf_space.py"
    space.write_text(SPACE)
    url = f"sqlite:///{tmp_path / 'hf.db'}"
    seen: list[dict] = []
    run_sweep(
        str(space),
        name="hf",
        trials=3,
        workers=1,
        storage=url,
        sampler="random",
        seed=1,
        progress=False,
        on_trial=seen.append,
    )
    assert [s["state"] for s in seen] == ["COMPLETE"] * 3, [s.get("reason") for s in seen]
    assert all(s["worker"].startswith("node ") for s in seen)
    store = Store(url, must_exist=True)
    rows = store.trials("hf")
    recipe = store.get_sweep("hf").model_recipe
    store.dispose()
    windows = eval_windows(tiny_shakespeare().val, window=32, max_tokens=512)
    row = rows[-1]
    path = tmp_path / "hf.msz"
    info = export_trial("hf", row.number, path, storage=url)
    assert info.exact and abs(info.ratio - 1.0) <= 0.02
    model = load(path, expect_recipe=recipe)
    assert perplexity(model, windows) == pytest.approx(row.perplexity, rel=1e-4)


def test_a_raw_gpt2_space_points_to_models_hf():
    from microsweep import Bits, Space
    from microsweep.errors import SpaceError

    raw = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    )
    with pytest.raises(SpaceError, match=r"Conv1D layers \(GPT-2\): pass microsweep.models.hf"):
        Space(raw, rules={"transformer.h.*.mlp.*": dict(bits=Bits(8, 32))})
