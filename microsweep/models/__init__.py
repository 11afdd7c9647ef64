"""Built-in language models and helpers to pretrain, cache and rebuild them."""

from microsweep.models._build import build, gpt, pretrain
from microsweep.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "build", "gpt", "pretrain"]
