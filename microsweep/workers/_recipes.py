"""The training recipes a policy's hyperparameters ask for: recovery fine-tuning with projection,
and the reweighted group-lasso stage that trains the dense model before block pruning.

Each recipe is a frozen dataclass whose fields carry the hyperparameter name they are read from
(`HYPERPARAMETERS` lists them all), their default and how they are parsed, so a name appears in
one place. `from_hyper` reads `policy.hyper` and refuses a bad value in one line (a
`ValueError`, which the runner turns into the trial's error).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from microsweep.score._early_stop import FineTuneCurve

__all__ = [
    "HYPERPARAMETERS",
    "FineTuneRecipe",
    "GroupLassoRecipe",
    "block_targets",
    "finetune_",
    "finetune_steps",
    "group_lasso_model",
]

TRAIN_BATCH = 8
"""Training windows per step, for fine-tuning and the group-lasso stage."""


def _count(hyper: Mapping[str, Any], key: str, default: Any) -> int:
    """A step count as fine-tuning always read it: int() of the value, a missing or empty one 0."""
    return int(hyper.get(key, default) or 0)


def _float(hyper: Mapping[str, Any], key: str, default: Any) -> float:
    """float() of the value, the default when missing."""
    return float(hyper.get(key, default))


def _whole(hyper: Mapping[str, Any], key: str, default: int) -> int:
    """A whole-number hyperparameter (an int, or a float without a fraction), else a one-line
    `ValueError`."""
    value = hyper.get(key, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise ValueError(f"{key} {value!r} must be a whole number")
    return int(value)


def _number(hyper: Mapping[str, Any], key: str, default: float) -> float:
    """A finite numeric hyperparameter, else a one-line `ValueError`."""
    value = hyper.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} {value!r} must be a finite number")
    return float(value)


Parser = Callable[[Mapping[str, Any], str, Any], Any]


def _hyper(name: str, default: Any, parse: Parser) -> Any:
    """A recipe field read from hyperparameter `name` by `parse`, `default` when missing."""
    return field(default=default, metadata={"hyper": name, "parse": parse})


def _read(cls: type, hyper: Mapping[str, Any], names: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields `names` (default: all) of recipe `cls` as `hyper` gives them, in field order."""
    return {
        f.name: f.metadata["parse"](hyper, f.metadata["hyper"], f.default)
        for f in fields(cls)
        if not names or f.name in names
    }


@dataclass(frozen=True)
class FineTuneRecipe:
    """Recovery fine-tuning: `steps` AdamW steps at `lr`, distilled from the dense model with
    weight `distill_alpha` (0: plain cross-entropy) at `distill_temperature`; with `eval_every`
    = k > 0 the fine-tuning curve is measured every k steps."""

    steps: int = _hyper("finetune_steps", 0, _count)
    distill_alpha: float = _hyper("distill_alpha", 0.0, _float)
    distill_temperature: float = _hyper("distill_temperature", 2.0, _float)
    eval_every: int = _hyper("finetune_eval_every", 0, _whole)
    lr: float = _hyper("finetune_lr", 1e-4, _float)

    @classmethod
    def from_hyper(cls, hyper: Mapping[str, Any]) -> FineTuneRecipe:
        """The recipe `hyper` asks for; without steps nothing else is read (or checked)."""
        steps = finetune_steps(hyper)
        if steps <= 0:
            return cls()
        recipe = cls(**_read(cls, hyper))
        if not 0.0 <= recipe.distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha {recipe.distill_alpha} must be in [0, 1]")
        if not recipe.distill_temperature > 0:
            raise ValueError(f"distill_temperature {recipe.distill_temperature} must be above 0")
        if recipe.eval_every < 0:
            raise ValueError(f"finetune_eval_every {recipe.eval_every} must be >= 0 (0: no curve)")
        return recipe


@dataclass(frozen=True)
class GroupLassoRecipe:
    """The group-lasso stage: `steps` AdamW steps at `lr` (default 1e-4, as `finetune_lr`) on
    cross-entropy plus `penalty` (default 1e-4, the authors' factor) x the reweighted group
    lasso, alphas re-estimated every `reweight_every` steps (default 10)."""

    steps: int = _hyper("group_lasso_steps", 0, _whole)
    penalty: float = _hyper("group_lasso_penalty", 1e-4, _number)
    lr: float = _hyper("group_lasso_lr", 1e-4, _number)
    reweight_every: int = _hyper("group_lasso_reweight_every", 10, _whole)

    @classmethod
    def steps_of(cls, hyper: Mapping[str, Any]) -> int:
        """`group_lasso_steps` alone (0 when missing), checked as a whole number."""
        return _read(cls, hyper, ("steps",))["steps"]

    @classmethod
    def from_hyper(cls, hyper: Mapping[str, Any]) -> GroupLassoRecipe:
        """The stage `hyper` asks for, every value checked."""
        recipe = cls(**_read(cls, hyper))
        if recipe.penalty < 0:
            raise ValueError(f"group_lasso_penalty {recipe.penalty} must be >= 0")
        if not recipe.lr > 0:
            raise ValueError(f"group_lasso_lr {recipe.lr} must be above 0")
        if recipe.reweight_every < 1:
            raise ValueError(
                f"group_lasso_reweight_every {recipe.reweight_every} must be at least 1"
            )
        return recipe


HYPERPARAMETERS: dict[str, Any] = {
    f.metadata["hyper"]: f.default
    for cls in (FineTuneRecipe, GroupLassoRecipe)
    for f in fields(cls)
}
"""Every training hyperparameter a policy may carry, with its default."""


def finetune_steps(hyper: Mapping[str, Any]) -> int:
    """`finetune_steps` as the recipe reads it (0: no fine-tuning)."""
    return _read(FineTuneRecipe, hyper, ("steps",))["steps"]


def block_targets(policy: Any) -> dict[str, tuple[int, int]]:
    """The layers the group-lasso stage penalises, with their block shape: sparsity > 0, a
    `block` and no rank (a factorized layer's blocks live in factors that do not exist yet)."""
    return {
        name: lp.block
        for name, lp in policy.layers.items()
        if lp.block is not None and lp.sparsity > 0 and lp.rank is None
    }


def group_lasso_model(
    base: nn.Module,
    recipe: GroupLassoRecipe,
    targets: Mapping[str, tuple[int, int]],
    train_tokens: torch.Tensor,
    *,
    block_size: int,
    seed: int,
) -> nn.Module:
    """A deep copy of `base` trained by the group-lasso stage on `targets`' block tiles (the
    base is untouched), in eval mode."""
    from microsweep.compress import group_lasso_train_

    trained = copy.deepcopy(base)
    group_lasso_train_(
        trained,
        dict(targets),
        train_tokens,
        steps=recipe.steps,
        lr=recipe.lr,
        penalty=recipe.penalty,
        reweight_every=recipe.reweight_every,
        block_size=block_size,
        batch_size=TRAIN_BATCH,
        seed=seed,
    )
    return trained.eval()


def finetune_(
    model: nn.Module,
    recipe: FineTuneRecipe,
    train_tokens: torch.Tensor,
    *,
    teacher: nn.Module,
    block_size: int,
    seed: int,
    curve: FineTuneCurve | None = None,
) -> None:
    """Recovery fine-tuning in place: AdamW steps on training windows (distilled from
    `teacher` when `distill_alpha` > 0), projected back onto the compressed set (masks and
    quantization grids) after every step; with a `curve`, measured at step 0, every
    `eval_every` steps and at the end, ending early when the curve says so. Measuring draws no
    random numbers and leaves the training flags as they were, so the steps taken are the same
    with or without it."""
    from microsweep.compress import project_
    from microsweep.models import lm_batch_loss

    steps, every, alpha = recipe.steps, recipe.eval_every, recipe.distill_alpha
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    model.train()
    with torch.enable_grad():
        stop = curve is not None and curve.add(model, 0)
        for step in range(steps):
            if stop:
                break
            loss = lm_batch_loss(
                model, train_tokens, block_size=block_size, batch_size=TRAIN_BATCH, gen=gen,
                teacher=teacher if alpha > 0 else None, alpha=alpha,
                temperature=recipe.distill_temperature,
            )  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            project_(model)
            done = step + 1
            if curve is not None and (done % every == 0 or done == steps):
                stop = curve.add(model, done)
    for p in params:
        p.requires_grad_(False)
    model.eval()
