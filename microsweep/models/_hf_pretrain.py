"""`hf_pretrained`: a transformers causal LM built from a config, pretrained on a corpus and cached.

The cache works as for the built-in `gpt()` and `lstm()`: the key covers the config, the window,
the corpus fingerprint and every training setting, so a second load of the same recipe reads
the weights from disk in seconds and any change trains afresh.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from microsweep.data._corpus import Corpus
from microsweep.errors import UsageError
from microsweep.models._build import _pretrained, _train_settings
from microsweep.models.hf import _transformers, hf

__all__ = ["hf_pretrained"]

_UNKEYED = ("transformers_version", "use_cache")
"""Config entries left out of the cache key: neither changes the weights (`hf` always turns the
KV cache off, which changes the config object it is given)."""


def hf_pretrained(
    config: Any,
    corpus: Corpus,
    *,
    block_size: int,
    pretrain_steps: int = 1000,
    batch_size: int = 16,
    lr: float = 3e-3,
    schedule: str = "cosine",
    warmup: int = 50,
    seed: int = 0,
    cache: bool = True,
    verbose: bool = False,
) -> nn.Module:
    """The causal LM of a transformers `config` (random initial weights from `seed`, no
    download), made ready by `hf` and pretrained on `corpus.train` in windows of `block_size`
    with `models.pretrain`, or loaded from the cache entry of the same recipe. `verbose` prints
    what is pretrained, where it is cached, and progress with an ETA (stderr)."""
    tf = _transformers()
    if not isinstance(config, tf.PretrainedConfig):
        raise UsageError(
            f"hf_pretrained() takes a transformers config, not {type(config).__name__}; "
            "use models.hf() for a model or a local directory"
        )
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < corpus.vocab_size:
        raise UsageError(
            f"the config's vocab_size {vocab} is smaller than the {corpus.name} vocabulary "
            f"({corpus.vocab_size}); set vocab_size=corpus.vocab_size"
        )
    positions = next(
        (
            getattr(config, key)
            for key in ("n_positions", "max_position_embeddings")
            if isinstance(getattr(config, key, None), int)
        ),
        None,
    )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise UsageError(f"block_size={block_size!r} must be a positive int")
    if positions is not None and block_size > positions:
        raise UsageError(
            f"block_size {block_size} is longer than the config's {positions} positions; "
            "lower block_size or raise max_position_embeddings"
        )
    shape = {k: v for k, v in config.to_dict().items() if k not in _UNKEYED}
    key = {"hf": shape, "block_size": block_size}
    train = _train_settings(pretrain_steps, batch_size, lr, schedule, warmup, seed)
    label = f"{config.model_type} {_depth(config)}x{_width(config)}"
    return _pretrained(
        f"hf-{config.model_type}", label, lambda: hf(config), key, corpus, train, cache, verbose
    )


def _depth(config: Any) -> Any:
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", "?")


def _width(config: Any) -> Any:
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd", "?")
