"""Built-in language models and helpers to pretrain, cache and rebuild them."""

from microsweep.models._build import (
    build,
    gpt,
    lm_batch_loss,
    logits_of,
    lstm,
    owned_cores,
    pretrain,
    pretrain_threads,
    thread_count,
)
from microsweep.models._gates import LinearLSTM, gate_names, linear_gates_
from microsweep.models._hf_pretrain import hf_pretrained
from microsweep.models.gpt import GPT, GPTConfig
from microsweep.models.hf import hf
from microsweep.models.lstm import LSTMLM, LSTMConfig

__all__ = [
    "GPT",
    "GPTConfig",
    "LSTMConfig",
    "LinearLSTM",
    "LSTMLM",
    "build",
    "gate_names",
    "gpt",
    "hf",
    "hf_pretrained",
    "linear_gates_",
    "lm_batch_loss",
    "logits_of",
    "lstm",
    "owned_cores",
    "pretrain",
    "pretrain_threads",
    "thread_count",
]
