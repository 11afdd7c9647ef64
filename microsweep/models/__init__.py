"""Built-in language models and helpers to pretrain, cache and rebuild them."""

from microsweep.models._build import build, gpt, lm_batch_loss, logits_of, pretrain
from microsweep.models.gpt import GPT, GPTConfig
from microsweep.models.hf import hf
from microsweep.models.lstm import LSTMLM, LSTMConfig

__all__ = [
    "GPT",
    "GPTConfig",
    "LSTMConfig",
    "LSTMLM",
    "build",
    "gpt",
    "hf",
    "lm_batch_loss",
    "logits_of",
    "pretrain",
]
