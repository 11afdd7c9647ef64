"""`models.hf_pretrained`, which examples/llama.py pretrains with: a tiny Llama config trains,
lands in the cache under a key of its recipe, loads back unchanged, and bad input is refused."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from microsweep import models  # noqa: E402
from microsweep.data import cache_dir  # noqa: E402
from microsweep.errors import UsageError  # noqa: E402
from microsweep.score import eval_windows, perplexity  # noqa: E402


def _config(corpus, **shape: int):
    base = dict(
        vocab_size=corpus.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    return transformers.LlamaConfig(**{**base, **shape})


def _cached(kind: str) -> set[str]:
    return {p.name for p in (cache_dir() / "models").glob(f"{kind}-*.pt")}


def test_pretrains_caches_and_reloads_the_same_weights(corpus, capsys):
    before = _cached("hf-llama")
    train = dict(block_size=16, pretrain_steps=40, batch_size=4, lr=1e-2, warmup=5, seed=3)
    trained = models.hf_pretrained(_config(corpus), corpus, verbose=True, **train)
    added = _cached("hf-llama") - before
    assert len(added) == 1
    assert "pretrain llama 1x16: step 40/40" in capsys.readouterr().err
    windows = eval_windows(corpus.val, window=16, max_tokens=512)
    torch.manual_seed(3)
    untrained = models.hf(_config(corpus))
    assert perplexity(trained, windows) < 0.8 * perplexity(untrained, windows)

    again = models.hf_pretrained(_config(corpus), corpus, verbose=True, **train)
    assert "pretrain" not in capsys.readouterr().err  # read from the cache, not trained
    assert _cached("hf-llama") - before == added
    for (name, a), (_, b) in zip(
        trained.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert again.recipe()["builder"] == "hf" and not again.training

    other = models.hf_pretrained(_config(corpus), corpus, **{**train, "pretrain_steps": 2})
    assert len(_cached("hf-llama") - before) == 2  # another training setting, another entry
    assert not torch.equal(other.lm_head.weight, trained.lm_head.weight)


def test_refuses_what_cannot_train(corpus):
    with pytest.raises(UsageError, match="vocab_size 10 is smaller"):
        models.hf_pretrained(_config(corpus, vocab_size=10), corpus, block_size=16)
    with pytest.raises(UsageError, match="longer than the config's 16 positions"):
        models.hf_pretrained(_config(corpus), corpus, block_size=32)
    with pytest.raises(UsageError, match="takes a transformers config"):
        models.hf_pretrained({"model_type": "llama"}, corpus, block_size=16)
