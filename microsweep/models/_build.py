"""Make built-in models: build from a recipe, pretrain on a corpus, and cache the weights."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

import torch
from torch import nn

from microsweep.data._corpus import Corpus, cache_dir
from microsweep.errors import UsageError
from microsweep.models.gpt import GPT, GPTConfig
from microsweep.models.lstm import LSTMLM, LSTMConfig

__all__ = ["build", "gpt", "lm_batch_loss", "lstm", "logits_of", "pretrain"]

M = TypeVar("M", bound=nn.Module)


def build(recipe: dict[str, Any]) -> nn.Module:
    """An untrained model of the shape a recipe (``model.recipe()``) describes."""
    builder = recipe.get("builder")
    if builder == "gpt":
        return GPT(GPTConfig(**recipe["config"]))
    if builder == "lstm":
        from microsweep.models.lstm import LSTMLM, LSTMConfig

        return LSTMLM(LSTMConfig(**recipe["config"]))
    if builder == "hf":
        from microsweep.models.hf import hf_recipe_model

        return hf_recipe_model(recipe)
    raise UsageError(
        f"unknown model builder {builder!r}; this release builds 'gpt', 'lstm' and 'hf'"
    )


def logits_of(output: object) -> torch.Tensor | object:
    """The logits in a model's output: the output itself when it is a tensor, else its `logits`
    attribute (Hugging Face style output objects) or first element (a tuple); anything else is
    returned as it is for the caller to refuse."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output


def lm_batch_loss(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    block_size: int,
    batch_size: int,
    gen: torch.Generator,
    teacher: nn.Module | None = None,
    alpha: float = 0.0,
    temperature: float = 2.0,
) -> torch.Tensor:
    """Next-token cross-entropy on `batch_size` random windows of `tokens` drawn from `gen`
    (shared by pretraining and recovery fine-tuning). With a `teacher` and `alpha` > 0 the loss
    is distillation: (1 - alpha) x cross-entropy + alpha x T^2 x KL(teacher || model), both
    softened by the temperature T (the T^2 keeps the gradient scale as T changes)."""
    ix = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=gen).tolist()
    x = torch.stack([tokens[i : i + block_size] for i in ix])  # (B, T)
    y = torch.stack([tokens[i + 1 : i + 1 + block_size] for i in ix])
    param = next(model.parameters(), None)
    if param is not None and param.device != x.device:  # a model on a GPU
        x, y = x.to(param.device), y.to(param.device)
    logits = logits_of(model(x))  # (B, T, V)
    flat = logits.reshape(-1, logits.size(-1))
    loss = nn.functional.cross_entropy(flat, y.reshape(-1))
    if teacher is None or alpha <= 0.0:
        return loss
    with torch.no_grad():
        target = logits_of(teacher(x)).reshape(-1, logits.size(-1))
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(flat / temperature, dim=-1),
        nn.functional.log_softmax(target / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return (1.0 - alpha) * loss + alpha * temperature**2 * soft


def pretrain(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    steps: int,
    block_size: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    log_every: int = 0,
) -> nn.Module:
    """Train `model` on random windows of `tokens` with AdamW and cosine decay, in place.

    Global RNG state is left as it was: the windows come from a private generator.
    """
    if steps < 0:
        raise UsageError(f"pretrain steps {steps} must be >= 0")
    if len(tokens) <= block_size + 1:
        raise UsageError(f"{len(tokens)} training tokens are too few for block_size {block_size}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        scale = 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.05) * min(1.0, (step + 1) / 50)
        loss = lm_batch_loss(model, tokens, block_size=block_size, batch_size=batch_size, gen=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(
                f"pretrain step {step}/{steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    model.eval()
    return model


def gpt(
    corpus: Corpus,
    *,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    block_size: int = 64,
    pretrain_steps: int = 500,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    cache: bool = True,
    verbose: bool = False,
) -> GPT:
    """A small GPT pretrained on `corpus.train`, reusing cached weights for the same recipe.

    The cache key covers the shape, the corpus fingerprint and every training setting.
    """
    config = GPTConfig(
        vocab_size=corpus.vocab_size,
        block_size=block_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
    )
    train = dict(steps=pretrain_steps, batch_size=batch_size, lr=lr, seed=seed)
    return _pretrained("gpt", lambda: GPT(config), asdict(config), corpus, train, cache, verbose)


def lstm(
    corpus: Corpus,
    *,
    n_embd: int = 200,
    n_hidden: int = 200,
    n_layer: int = 2,
    tie_weights: bool = True,
    block_size: int = 35,
    pretrain_steps: int = 1000,
    batch_size: int = 20,
    lr: float = 3e-3,
    seed: int = 0,
    cache: bool = True,
    verbose: bool = False,
) -> LSTMLM:
    """An LSTM LM pretrained on `corpus.train`, reusing cached weights for the same recipe.

    The defaults are the small word-level setting of the RNN-compression work (2 layers of 200,
    embedding = hidden, 35-token windows), tied; `n_hidden=650` or 1500 gives the larger ones.
    """
    config = LSTMConfig(
        vocab_size=corpus.vocab_size,
        n_embd=n_embd,
        n_hidden=n_hidden,
        n_layer=n_layer,
        tie_weights=tie_weights,
        block_size=block_size,
    )
    train = dict(steps=pretrain_steps, batch_size=batch_size, lr=lr, seed=seed)
    return _pretrained(
        "lstm", lambda: LSTMLM(config), asdict(config), corpus, train, cache, verbose
    )


def _pretrained(
    kind: str,
    make: Callable[[], M],
    config: dict[str, Any],
    corpus: Corpus,
    train: dict[str, Any],
    cache: bool,
    verbose: bool,
) -> M:
    """`make()` (initialised from `train`'s seed, the global RNG left as it was) pretrained on
    `corpus.train` with `train` settings, or loaded from the cache entry keyed by its shape, the
    corpus fingerprint and every training setting."""
    with torch.random.fork_rng():
        torch.manual_seed(train["seed"])
        model = make()
    key_data = {
        "config": config,
        "data": corpus.fingerprint,
        "steps": train["steps"],
        "batch": train["batch_size"],
        "lr": train["lr"],
        "seed": train["seed"],
        "v": 1,
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "models" / f"{kind}-{key}.pt"
    if cache and path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
        return model
    pretrain(
        model,
        corpus.train,
        steps=train["steps"],
        block_size=config["block_size"],
        batch_size=train["batch_size"],
        lr=train["lr"],
        seed=train["seed"],
        log_every=100 if verbose else 0,
    )
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return model
