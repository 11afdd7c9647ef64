"""`hf`: a Hugging Face causal LM made ready for microsweep, without user code.

GPT-2's `Conv1D` layers become `nn.Linear` with the transposed weight (the same function), so
rules name them like any Linear and compression, counting and export treat them alike. The KV
cache is switched off (a trial reads whole windows), the model is put in eval mode, and it
gets a `recipe()` (``{"builder": "hf", "config": ...}``) so an exported file can be rebuilt.
transformers is an optional extra: ``pip install -e ".[hf]"``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

from microsweep.errors import UsageError

__all__ = ["hf", "hf_recipe_model"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UsageError(
            'Hugging Face models need transformers: pip install -e ".[hf]" (or pip install '
            "transformers)"
        ) from None
    return transformers


def hf(model: Any, **overrides: Any) -> nn.Module:
    """A causal LM ready to sweep, from a transformers model, a config (random initial weights,
    no download) or a local directory (`from_pretrained(path)`); `overrides` go to the config
    (for example ``attn_implementation="eager"``)."""
    tf = _transformers()
    if isinstance(model, tf.PreTrainedModel):
        out = model
    elif isinstance(model, tf.PretrainedConfig):
        for key, value in overrides.items():
            setattr(model, key, value)
        out = tf.AutoModelForCausalLM.from_config(model)
    elif isinstance(model, (str, os.PathLike)):
        if not os.path.isdir(model):
            raise UsageError(
                f"{model} is not a local model directory; pass a folder saved with "
                "save_pretrained (this tool does not download), a config or a model"
            )
        out = tf.AutoModelForCausalLM.from_pretrained(os.fspath(model), **overrides)
    else:
        raise UsageError(
            f"hf() takes a transformers model, config or local directory, not "
            f"{type(model).__name__}"
        )
    convert_conv1d_(out)
    out.config.use_cache = False
    out.recipe = functools.partial(_recipe, out.config.to_dict())
    return out.eval()


def _recipe(config: dict[str, Any]) -> dict[str, Any]:
    return {"builder": "hf", "config": config}


def convert_conv1d_(model: nn.Module) -> nn.Module:
    """Replace every transformers `Conv1D` (y = x W + b, W of shape (in, out)) by the equal
    `nn.Linear` (weight W^T) in place; ties to other modules' parameters are not involved."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return model
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        weight = module.weight.detach()
        linear = nn.Linear(
            weight.shape[0],
            weight.shape[1],
            bias=module.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias.detach())
        linear.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model


def hf_recipe_model(recipe: dict[str, Any]) -> nn.Module:
    """The untrained model a ``{"builder": "hf"}`` recipe describes (weights come from a file)."""
    tf = _transformers()
    config = dict(recipe["config"])
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise UsageError("the recipe's Hugging Face config has no model_type")
    cfg = tf.AutoConfig.for_model(model_type, **config)
    return hf(cfg)
