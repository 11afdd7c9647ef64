"""`export_trial`: a stored trial rebuilt exactly as its worker evaluated it, saved to a file."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from ._format import ExportError
from ._layers import custom_recipe
from ._save import ExportInfo, save

__all__ = ["export_trial"]


def export_trial(
    name: str,
    number: int,
    path: str | os.PathLike[str],
    *,
    storage: str | None = None,
    space: Any | None = None,
    corpus: Any | None = None,
    evaluate: Any | None = None,
    calib: Any | None = None,
    train_tokens: Any | None = None,
) -> ExportInfo:
    """Rebuild trial `number` of sweep `name` exactly as its worker evaluated it and `save` it.

    The sweep's stored space file is run again, or for a sweep started from Python objects the
    `space` (and `corpus` or `evaluate`, `calib`, `train_tokens`) given here are used; the model
    must match the stored fingerprint and the corpus the stored data fingerprint. The policy is
    compressed with the same calibration tokens, fine-tuned with the same seed when the policy
    asks for it, and rounded to 16 bits when the 16-bit allowance applies. Only COMPLETE trials
    can be exported.
    """
    from microsweep.prepare import recipe_of, reopen_space, with_levels
    from microsweep.score import CountConfig, count, round_to_storage
    from microsweep.spaces import Policy
    from microsweep.storage import Store
    from microsweep.workers import TrialRunner

    store = Store(storage, must_exist=True)
    try:
        sweep = store.get_sweep(name)
        row = store.trial(name, number)
    finally:
        store.dispose()
    if row.state != "COMPLETE":
        why = f" ({row.reason})" if row.reason else ""
        raise ExportError(
            f"trial {number} of sweep {name!r} is {row.state}{why}; export a COMPLETE trial"
        )
    given = None
    if space is not None:
        from microsweep.prepare import MicroNet, space_from_objects

        given = space_from_objects(
            space, objective=MicroNet.from_json(sweep.objective_json), corpus=corpus,
            evaluate=evaluate, calib=calib, train_tokens=train_tokens,
        )  # fmt: skip
    sf, prepared = reopen_space(sweep, given)  # refuses another model or another corpus
    # the statistics and built levels the workers used: the layers are the ones measured
    prepared = with_levels(sf, prepared, store.url, sweep.model_fingerprint)
    # a model outside microsweep.models is stored under its class; load() takes an instance
    recipe = sweep.model_recipe or recipe_of(sf.model) or custom_recipe(sf.model)
    settings = prepared.settings
    config = (
        CountConfig.from_json(row.count_config)
        if row.count_config
        else CountConfig(**settings.count)
    )
    policy = Policy.from_json(row.policy)
    runner = TrialRunner(
        sf.model,
        prepared.windows,
        settings,
        calib=prepared.calib,
        train_tokens=prepared.train_tokens,
    )
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            runner._reset_torch_state(number)  # the worker's per-trial state: seed, grad mode
            model = _trial_model(runner, policy, prepared)
            runner.finetune(model, policy.hyper)  # as the worker did (none without steps)
            model.eval()
            round_to_storage(model, count(model, context=settings.context, config=config))
    finally:
        torch.set_grad_enabled(grad)
        torch.set_num_threads(threads)
    extra: dict[str, Any] = {
        "sweep": name,
        "trial": number,
        "model_fingerprint": sweep.model_fingerprint,
        "data_fingerprint": sweep.data_fingerprint,
        "perplexity": row.perplexity,
        "params": row.params,
        "ops": row.ops,
        "score": row.score,
    }
    return save(
        model,
        path,
        policy=policy,
        recipe=recipe,
        count_config=config,
        extra=extra,
        base=sf.model,
    )


def _trial_model(runner: Any, policy: Any, prepared: Any) -> torch.nn.Module:
    """The trial's compressed model, built as its worker built it (a copy with tensors of its
    own): after the group-lasso stage when the policy asks for it, else from the sweep's
    statistics and level store, so every data-aware layer is the one the trial measured."""
    from microsweep.compress import VariantCache, compress

    trained = runner.group_lasso(policy)  # as the worker trained it
    if trained is not None:
        return compress(trained, policy, calib=prepared.calib)
    cache = VariantCache(
        runner.base, calib=prepared.calib, stats=prepared.stats, store=prepared.levels
    )
    return copy.deepcopy(cache.model(policy))
