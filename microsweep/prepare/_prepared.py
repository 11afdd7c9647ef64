"""Preparing a sweep: the space file's model and objective turned into what workers, search,
export and `count` all need (evaluation windows, calibration tokens, count settings, the dense
measurement, fingerprints of model and data, the model's recipe).

This sits below `search` and above `spaces`, `compress`, `score` and `workers`, so every layer
above shares one definition of how a sweep sees its model.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

import torch

from microsweep.errors import StorageError, UsageError
from microsweep.prepare._objective import MicroNet
from microsweep.prepare._spacefile import INLINE_PATH, SpaceFile, load_space_source

if TYPE_CHECKING:
    from microsweep.workers import TrialResult

__all__ = [
    "Prepared",
    "check_counted",
    "check_counts",
    "eval_key",
    "measure_dense",
    "model_fingerprint",
    "prepare",
    "recipe_of",
    "reopen_space",
    "sweep_eval_key",
    "versions",
    "with_stop_rule",
]


def _digest(tensor: torch.Tensor | None) -> str | None:
    if tensor is None:
        return None
    data = tensor.detach().cpu().contiguous().reshape(-1).to(torch.int64).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def eval_key(
    *,
    model_fingerprint: str,
    data_fingerprint: str,
    windows: torch.Tensor,
    calib: torch.Tensor | None,
    objective: MicroNet,
    evaluate_source: str | None,
) -> str:
    """A key naming everything a measurement depends on: the model, the data, the evaluation
    windows and calibration tokens, the count options (the 16-bit rounding follows them) and,
    for a user `evaluate`, the space file that defines it."""
    parts = {
        "model": model_fingerprint,
        "data": data_fingerprint,
        "windows": [list(windows.shape), _digest(windows) if windows.numel() else None],
        "calib": _digest(calib),
        "count": dict(sorted(objective.count.items())),
        "evaluate": (
            hashlib.sha256(evaluate_source.encode()).hexdigest()[:16] if evaluate_source else None
        ),
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


PROBE_TAG = "|probe-windows"
"""What a sweep's sensitivity probes add to its evaluation key: they read a fixed subset of the
windows (`search.ProbeBudget`: the first quarter in the stop rule's order), so their NLLs are not
the full evaluation's and are kept apart."""


def probe_key(eval_key: str) -> str:
    """The key a sweep's sensitivity table is stored under when its probes read the subset."""
    return eval_key + PROBE_TAG


def table_key(store: Any, eval_key: str) -> str:
    """The key `eval_key`'s sensitivity table is stored under in `store`: the probe-window
    one when it has rows, else the key itself (a table measured on every window)."""
    return probe_key(eval_key) if store.sensitivity(probe_key(eval_key)) else eval_key


def model_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits naming a model's state (names, dtypes, shapes and every byte): sweeps,
    sensitivity tables and exports refuse a model that is not the one they measured."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            h.update(f"{value.dtype}{tuple(value.shape)}".encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:  # extra state
            h.update(repr(value).encode())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on, stored with each sweep."""
    out = {"python": sys.version.split()[0]}
    for pkg in ("microsweep", "torch", "optuna", "ray", "sqlalchemy", "plotly"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "?"
    return out


@dataclass
class Prepared:
    """The tensors and settings every worker receives once."""

    windows: torch.Tensor
    calib: torch.Tensor | None
    train_tokens: torch.Tensor | None
    settings: Any
    data_fingerprint: str
    # the sweep's layer input statistics and level store, when a data-aware method needs them
    # (`with_levels`): computed once, shipped to every worker with the tensors above
    stats: dict[str, Any] | None = None
    levels: Any = None
    # the dense model's next-token distributions on the windows (a `score.KLReference`), when
    # the objective selects by KL (`with_reference`): built once, shipped like `stats`
    reference: Any = None


def prepare(sf: SpaceFile, seed: int) -> Prepared:
    """Evaluation windows, calibration and training tokens and evaluation settings of a space
    file, built the same way by a sweep, its resume, export and `count`."""
    from microsweep.score import eval_windows, mean_context
    from microsweep.workers import EvalSettings

    obj = sf.objective
    model = sf.model
    config = getattr(model, "config", None)
    block = next(
        (
            getattr(config, key)
            for key in ("block_size", "n_positions", "max_position_embeddings")
            if isinstance(getattr(config, key, None), int)
        ),
        None,
    )
    window = obj.window or block
    if window is None:
        raise UsageError(
            "MicroNet(window=...) is needed: the model's config has no block_size, n_positions "
            "or max_position_embeddings"
        )
    if sf.corpus is not None:
        windows = eval_windows(sf.corpus.val, window=window, max_tokens=obj.eval_tokens)
        n_calib = max(1, min(obj.calib_tokens // window, (len(sf.corpus.train) - 1) // window))
        calib = sf.corpus.train[: n_calib * window].view(n_calib, window)
        train = sf.corpus.train
        data_fp = getattr(sf.corpus, "fingerprint", "") or "unknown"
    else:  # the user's evaluate; calibration and training tokens from the file when given
        windows = torch.zeros(0, window + 1, dtype=torch.long)
        calib, train, data_fp = sf.calib, sf.train_tokens, "user-evaluate"
    settings = EvalSettings(
        context=mean_context(window), count=dict(obj.count), seed=seed, finetune_block=window
    )
    return Prepared(windows, calib, train, settings, data_fp)


def reopen_space(sweep: Any, given: SpaceFile | None = None) -> tuple[SpaceFile, Prepared]:
    """Re-run a sweep's stored space source (or take the objects `given` again, for a sweep
    defined in Python) and rebuild its tensors, refusing when the model or corpus is not the
    one the sweep was measured on (used by resume and export)."""
    if given is not None:
        sf = given
        sf.space.pin_methods(sweep.space_json)  # the methods it ran with, not today's defaults
        # the stored objective read as today's (a field added since has its default)
        stored_objective = MicroNet.from_json(sweep.objective_json).to_json()
        for what, have, stored in (
            ("space", sf.space.to_json(), sweep.space_json),
            ("objective", sf.objective.to_json(), json.loads(json.dumps(stored_objective))),
        ):
            if json.loads(json.dumps(have)) != stored:
                raise UsageError(
                    f"the {what} given differs from the one sweep {sweep.name!r} ran with; pass "
                    f"the same {what} (its rules and knobs are stored with the sweep)"
                )
    elif sweep.space_path == INLINE_PATH:
        raise UsageError(
            f"sweep {sweep.name!r} was defined from Python objects, so there is no space file "
            "to re-run; call resume_sweep / export_trial with the same space (and corpus or "
            "evaluate) as keyword arguments"
        )
    else:
        sf = load_space_source(sweep.space_source, sweep.space_path)
        sf.space.pin_methods(sweep.space_json)
    if model_fingerprint(sf.model) != sweep.model_fingerprint:
        raise StorageError(
            f"the model {'given' if given is not None else 'built by the stored space file'} "
            f"differs from sweep {sweep.name!r}'s (fingerprint mismatch); rebuild it exactly as "
            "when the sweep ran"
        )
    prepared = prepare(sf, sweep.seed or 0)
    if prepared.data_fingerprint != sweep.data_fingerprint:
        raise StorageError(f"the corpus differs from the one sweep {sweep.name!r} was measured on")
    return sf, prepared


def check_counts(trials: int, workers: int) -> None:
    """Refuse a trial or worker count that is not a positive integer."""
    if not isinstance(trials, int) or trials < 1:
        raise UsageError(f"--trials {trials} must be a positive number")
    if not isinstance(workers, int) or workers < 1:
        raise UsageError(f"--workers {workers} must be a positive number")


def recipe_of(model: torch.nn.Module) -> dict[str, Any] | None:
    """The model's `recipe()` (how to rebuild it), or None for a model without one."""
    recipe = getattr(model, "recipe", None)
    return recipe() if callable(recipe) else None


def measure_dense(sf: SpaceFile, prepared: Prepared) -> TrialResult:
    """The dense run's `TrialResult`: perplexity and counts of the unmodified model, measured
    exactly as trials are (with the NLL of each window, for the early-stop rule). A perplexity
    that is not a positive finite number (a user `evaluate` returning -5.0, say) is refused
    here, before anything is stored."""
    from microsweep.spaces import Policy
    from microsweep.workers import TrialRunner

    runner = TrialRunner(
        sf.model, prepared.windows, prepared.settings, calib=prepared.calib, evaluate=sf.evaluate
    )
    res = runner.run(-1, Policy().to_json(), early_stop=False, window_nll=True)
    if res.status != "ok":
        raise UsageError(f"the dense model cannot be evaluated: {res.error}")
    ppl = res.perplexity
    if not (math.isfinite(ppl) and ppl > 0):  # the ceiling, scores and planner take its log
        source = "evaluate(model) returned" if sf.evaluate is not None else "measured"
        raise UsageError(
            f"the dense model's perplexity is {ppl} ({source}); a perplexity is a positive "
            "finite number"
        )
    check_counted(sf, prepared, res.ops)
    return res


def check_counted(sf: SpaceFile, prepared: Prepared, counted_ops: float) -> None:
    """Refuse a model whose forward pass does math no counting rule covers (a silent zero in
    the score), unless it stays within the objective's `uncounted_tolerance`, which warns."""
    import warnings

    from microsweep.errors import SpaceWarning
    from microsweep.score import uncounted_line, uncounted_work
    from microsweep.score._trace import ForwardError

    window = prepared.windows.shape[1] - 1 if prepared.windows.numel() else 8
    source = prepared.calib if prepared.calib is not None else prepared.windows
    length = max(1, min(window, 16))
    if source is not None and source.numel():
        ids = source[:1, :length]
    else:
        ids = torch.zeros(1, length, dtype=torch.long)
    param = next(iter(sf.model.parameters()), None)
    if param is not None:
        ids = ids.to(param.device)
    try:
        work = uncounted_work(sf.model, ids)
    except ForwardError as exc:  # the user's forward raised: say which file's model it was
        where = "the space given as objects" if sf.path == INLINE_PATH else f"space file {sf.path}"
        raise UsageError(f"{where}: {exc}") from None
    if not work:
        return
    line, fraction = uncounted_line(work, counted_ops)
    if fraction > sf.objective.uncounted_tolerance:
        raise UsageError(
            f"{line}; register a rule for {work[0].kind} with microsweep.score.register_rule, or "
            "accept it with MicroNet(uncounted_tolerance=...)"
        )
    warnings.warn(f"{line} (within uncounted_tolerance)", SpaceWarning, stacklevel=2)


def with_stop_rule(
    sf: SpaceFile, prepared: Prepared, dense: TrialResult, ceiling: float | None
) -> Prepared:
    """`prepared` whose settings read windows in chunks against `ceiling`, when the objective
    asks for early stopping and the built-in perplexity is used."""
    from dataclasses import replace

    from microsweep.score import StopRule

    nll = dense.window_nll
    if not sf.objective.early_stop or ceiling is None or sf.evaluate is not None or not nll:
        return prepared
    rule = StopRule(
        dense_nll=tuple(nll),
        tokens_per_window=prepared.windows.shape[1] - 1,
        ceiling=ceiling,
    )
    return replace(prepared, settings=replace(prepared.settings, stop=rule))


def sweep_eval_key(sf: SpaceFile, prepared: Prepared, model_fp: str) -> str:
    """`eval_key` of a prepared space file: where its sensitivity measurements are stored."""
    return eval_key(
        model_fingerprint=model_fp,
        data_fingerprint=prepared.data_fingerprint,
        windows=prepared.windows,
        calib=prepared.calib,
        objective=sf.objective,
        evaluate_source=sf.source if sf.evaluate is not None else None,
    )
