"""`TrialRunner`: compress -> (fine-tune) -> evaluate -> count, for one policy at a time.

A runner holds the base model and the fixed evaluation windows for its whole life and runs trial
after trial. A trial's model shares every tensor the policy leaves alone with the base, and its
compressed layers come from a per-runner `VariantCache` keyed by (layer, settings), so repeated
settings cost a lookup; only training takes a full copy (recovery fine-tuning, and the group-lasso
stage that trains the dense model before block pruning; both recipes live in `_recipes.py`).
Before each trial it puts torch's global state (seed, threads, grad mode, default dtype) back to
what it was at start, so that trials on a reused worker cannot leak into each other. Every
failure comes back as a `TrialResult` with ``status="error"`` and a reason; `_result` is the one
place a result is built.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from microsweep.errors import UsageError
from microsweep.score._early_stop import FT_EVAL_WINDOWS, EarlyStop, FineTuneCurve
from microsweep.workers._ray import assigned_cpus, assigned_device, worker_name, worker_threads
from microsweep.workers._recipes import (
    FineTuneRecipe,
    GroupLassoRecipe,
    block_targets,
    finetune_,
    finetune_steps,
    group_lasso_model,
)
from microsweep.workers._result import CacheUse, TrialResult

if TYPE_CHECKING:
    from microsweep.score import Counts, KLReference, StopRule
    from microsweep.spaces import Policy

__all__ = [
    "EvalSettings",
    "FT_EVAL_WINDOWS",
    "TrialRunner",
    "auto_cache_mb",
    "check_cache_mb",
    "check_eval_memory_mb",
    "check_subset",
    "worker_threads",
]

AUTO_CACHE_MODEL_COPIES = 2
"""The automatic variant cache holds at most this many times the model's fp32 bytes: a policy's
layers, int32 orders and float32 SVDs take about 1.3 of them on GPT-2 small, so a repeated
policy is found whole, with room for the variants the next policies share."""

AUTO_CACHE_MIN_MB = 64
"""The automatic variant cache's floor, in MiB: small models get at least this much."""


@dataclass(frozen=True)
class EvalSettings:
    """What a runner needs besides the model: how to evaluate and how to count."""

    context: float
    count: Mapping[str, Any] = field(default_factory=dict)
    # windows per forward pass: None chooses it from `eval_memory_mb` (None: the default limit,
    # `microsweep.score.DEFAULT_EVAL_MEMORY` or a quarter of the device's free memory, whichever
    # is less); an int is capped by the limit only when `eval_memory_mb` is given
    batch_size: int | None = None
    eval_memory_mb: int | None = None
    finetune_block: int | None = None  # default: the evaluation window length
    seed: int = 0
    stop: StopRule | None = None  # chunked evaluation that may end a hopeless trial early
    # the variant cache per worker, MiB: None sizes it from the worker's memory and the model
    # (`auto_cache_mb`, sharing the memory among `cache_share` workers); 0 copies the model
    # per trial. `cache_ranks`: the largest rank a policy can give each layer (its SVD's size)
    cache_mb: int | None = None
    cache_share: int = 1
    cache_ranks: Mapping[str, int] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int | None:
        """The evaluation's memory limit in bytes (None: the score functions' default)."""
        return None if self.eval_memory_mb is None else int(self.eval_memory_mb) << 20


@dataclass
class _Evaluation:
    """The built-in perplexity of a trial: measured, or projected when the stop rule ended the
    reading (`stopped`), with the chunk projections and, when asked, the per-window NLL sums;
    with a KL reference, the KL from the dense model over the windows read."""

    perplexity: float
    intermediate: list[float] = field(default_factory=list)
    window_nll: list[float] | None = None
    stopped: EarlyStop | None = None
    evaluated: list[int] | None = None  # the windows of a subset evaluation, in order
    kl: float | None = None  # mean KL from the dense model per token read, with a reference
    window_kl: list[float] | None = None  # per-window KL sums, beside `window_nll`

    def with_kl(self, kl: torch.Tensor | None, per_window: int, *, keep: bool) -> _Evaluation:
        """This evaluation with the KL of the windows read (their per-window sums `kl`, None
        without a reference): the mean per token, and the sums themselves when `keep`."""
        if kl is not None and kl.numel():
            self.kl = float(kl.sum()) / (kl.numel() * per_window)
            self.window_kl = kl.tolist() if keep else None
        return self


@dataclass
class _Outcome:
    """What one trial's stages produced, for `_result`: the reason it failed (or None), the
    perplexity, the counts and layer rows, the fine-tuning curve and the evaluation."""

    error: str | None = None
    perplexity: float | None = None
    counts: Counts | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)
    curve: FineTuneCurve | None = None
    evaluation: _Evaluation | None = None
    cache: CacheUse | None = None


def _result(number: int, outcome: _Outcome, timings: dict[str, float], worker: str) -> TrialResult:
    """The one place a `TrialResult` is built: "error" when the outcome has a reason, "pruned"
    when the stop rule ended the fine-tune or the evaluation, else "ok"."""
    counts, curve, ev = outcome.counts, outcome.curve, outcome.evaluation
    stopped = (curve.stopped if curve is not None else None) or (ev.stopped if ev else None)
    status = "error" if outcome.error is not None else "pruned" if stopped else "ok"
    result = TrialResult(number, status, error=outcome.error, timings=timings, worker=worker)
    result.cache = outcome.cache
    if counts is not None:
        result.params, result.ops, result.freebie = counts.params, counts.ops, counts.freebie
        result.count_config, result.layers = counts.config.to_json(), outcome.layers
    if curve is not None:
        result.finetune_curve = curve.points
        result.finetune_stopped_at = curve.stopped.step if curve.stopped is not None else None
    if status == "error":
        return result
    if ev is not None:
        result.intermediate, result.window_nll = ev.intermediate, ev.window_nll
        result.evaluated = ev.evaluated
        result.kl, result.window_kl = ev.kl, ev.window_kl
    if stopped is not None:
        result.perplexity_estimate = stopped.projected
        result.optimistic_perplexity = stopped.optimistic
        result.windows_seen, result.windows = stopped.windows_seen, stopped.windows
    else:
        result.perplexity = outcome.perplexity
    return result


class TrialRunner:
    """Runs policies against one base model; usable in-process or as a Ray actor."""

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        settings: EvalSettings,
        *,
        calib: torch.Tensor | None = None,
        train_tokens: torch.Tensor | None = None,
        evaluate: Callable[[nn.Module], float] | None = None,
        threads: int | None = None,
        rules: Mapping[type, Any] | None = None,
        stats: Mapping[str, Any] | None = None,
        levels: Any = None,
        reference: KLReference | None = None,
    ) -> None:
        """`stats` are the sweep's layer input statistics (computed once, see
        `microsweep.prepare.with_levels`) and `levels` its `LevelStore`, which the runner's
        variant cache reads built data-aware levels from and writes new ones to. `reference`,
        the dense model's distributions on `windows` (`microsweep.score.kl_reference`), makes
        every evaluation also measure the KL from it (`TrialResult.kl`)."""
        if reference is not None and (
            reference.n_windows != windows.shape[0]
            or reference.tokens_per_window != windows.shape[1] - 1
        ):
            raise UsageError(
                f"the KL reference covers {reference.n_windows} windows of "
                f"{reference.tokens_per_window} tokens, not the runner's {tuple(windows.shape)}; "
                "build it on the same windows"
            )
        if rules:  # counting rules a space file registered, in a process that did not run it
            from microsweep.score import register_rules

            register_rules(dict(rules))
        self.device = assigned_device()
        if self.device is not None:  # a Ray worker given a GPU evaluates on it
            model = model.to(self.device)
            windows = windows.to(self.device)
            calib = calib.to(self.device) if calib is not None else None
        self.base = model.eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.windows = windows
        self.calib = calib
        self.train_tokens = train_tokens
        self.settings = settings
        self.evaluate_fn = evaluate
        self.reference = reference  # stays on the CPU: each batch's slice goes to the device
        self.threads = threads or assigned_cpus() or torch.get_num_threads()
        self._dtype = torch.get_default_dtype()
        self._reading: tuple[int | None, int | None] | None = None  # see `_batch_and_limit`
        self._cache = None
        check_cache_mb(settings.cache_mb)
        cache_mb = settings.cache_mb
        if cache_mb is None:
            cache_mb = auto_cache_mb(model, self.device, share=settings.cache_share)
        if cache_mb > 0:
            from microsweep.compress import VariantCache

            self._cache = VariantCache(
                model,
                calib=calib,
                max_bytes=cache_mb * 2**20,
                stats=_on_device(stats, self.device),
                store=levels,
                max_rank=settings.cache_ranks,
            )

    def ping(self) -> bool:
        """True: the pool's check that an actor started and loaded its model."""
        return True

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(self, *args, **kwargs)` on this runner, under the runner's threads and without
        grad: work other than a trial (the planner's per-layer options) that reads the base
        model, its calibration tokens and its device where the runner lives."""
        threads = torch.get_num_threads()
        grad = torch.is_grad_enabled()
        try:
            torch.set_num_threads(self.threads)
            torch.set_grad_enabled(False)
            return fn(self, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            torch.set_grad_enabled(grad)

    def _reset_torch_state(self, number: int) -> None:
        """Threads, default dtype, grad mode and seed (from the trial number) as at start."""
        torch.set_num_threads(self.threads)
        torch.set_default_dtype(self._dtype)
        torch.set_grad_enabled(False)
        torch.manual_seed(self.settings.seed * 1_000_003 + number)

    @property
    def _block(self) -> int:
        """Training window length: the settings', else the evaluation windows'."""
        return self.settings.finetune_block or self.windows.shape[1] - 1

    def run(
        self,
        number: int,
        policy_json: Mapping[str, Any],
        *,
        early_stop: bool = True,
        window_nll: bool = False,
        windows: Sequence[int] | None = None,
    ) -> TrialResult:
        """Evaluate one policy; never raises for a trial's own failure.

        With a stop rule in the settings and `early_stop`, the windows are read in chunks and a
        trial that cannot meet the ceiling ends with ``status="pruned"``; `window_nll` adds the
        per-window NLL sums to the result (the dense run records them for the rule). `windows`
        (indices into the evaluation windows, see `microsweep.score.subset_windows`) evaluates
        only those, without any early stop: the result's perplexity and `window_nll` are the
        subset's (in the given order) and `evaluated` names them. Timings are `perf_counter`
        spans, so never negative. Only `windows` the runner cannot read raise (`UsageError`).
        """
        from microsweep.spaces import Policy

        subset = check_subset(windows, self.windows.shape[0], self.evaluate_fn is not None)
        if subset is not None:
            early_stop = False
        timings: dict[str, float] = {}
        started = time.perf_counter()
        grad_mode = torch.is_grad_enabled()
        try:
            self._reset_torch_state(number)
            policy = Policy.from_json(policy_json)
            outcome = self._run(
                policy, timings, early_stop=early_stop, keep_nll=window_nll, subset=subset
            )
        except Exception as exc:  # a worker exception is a FAIL with its reason, not a crash
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
            outcome = _Outcome(error=f"{type(exc).__name__}: {exc}{where}")
        finally:
            torch.set_grad_enabled(grad_mode)  # the caller's, not ours
            gc.collect(0)  # young objects only: a full collection costs ~90 ms a trial
        timings["total"] = time.perf_counter() - started
        return _result(number, outcome, timings, f"{worker_name()}, threads {self.threads}")

    def _run(
        self,
        policy: Policy,
        timings: dict[str, float],
        *,
        early_stop: bool,
        keep_nll: bool,
        subset: list[int] | None,
    ) -> _Outcome:
        """The trial's stages in order: group lasso, compress, fine-tune, count, evaluate."""
        cache = self._cache
        looked = (cache.hits, cache.misses) if cache is not None else (0, 0)
        model, shared = self._trial_model(policy, timings)
        use = None
        if cache is not None and (cache.hits, cache.misses) != looked:  # the cache built it
            hits, misses = cache.hits - looked[0], cache.misses - looked[1]
            use = CacheUse(hits, misses, cache.nbytes, cache.max_bytes)
        curve = None
        if finetune_steps(policy.hyper) > 0:
            t = time.perf_counter()
            curve = self.finetune(model, policy.hyper, early_stop=early_stop)
            timings["finetune"] = time.perf_counter() - t
        t = time.perf_counter()
        model, counts = self._count(model, shared)
        timings["count"] = time.perf_counter() - t
        outcome = _Outcome(counts=counts, layers=_layer_rows(counts, policy), curve=curve)
        outcome.cache = use
        if curve is not None and curve.stopped is not None:  # could not recover: no evaluation
            outcome.perplexity = curve.stopped.projected
        else:
            t = time.perf_counter()
            if self.evaluate_fn is not None:
                outcome.perplexity, outcome.error = _user_perplexity(self.evaluate_fn(model))
                if outcome.error is not None:
                    outcome.curve = None  # a refused value: the reason alone, with the counts
            else:
                outcome.evaluation = self._evaluate(
                    model, early_stop=early_stop, keep_nll=keep_nll, subset=subset
                )
                outcome.perplexity = outcome.evaluation.perplexity
            timings["evaluate"] = time.perf_counter() - t
        del model
        ppl = outcome.perplexity
        if outcome.error is None and not math.isfinite(ppl):
            outcome.error = f"perplexity is {ppl} (not finite)"
            if curve is not None and curve.stopped is not None:
                step = curve.stopped.step
                outcome.error = f"fine-tuning diverged: {outcome.error} at step {step}"
        return outcome

    def _trial_model(self, policy: Policy, timings: dict[str, float]) -> tuple[nn.Module, bool]:
        """The policy's compressed model, after the group-lasso stage when asked, and whether
        it shares tensors with the variant cache (then it must not be trained or rounded in
        place)."""
        from microsweep.compress import compress, compress_

        trained = None  # the dense base after the group-lasso stage, when the policy asks for it
        if GroupLassoRecipe.steps_of(policy.hyper) > 0:
            t = time.perf_counter()
            trained = self.group_lasso(policy)
            if trained is not None:
                timings["group_lasso"] = time.perf_counter() - t
        t = time.perf_counter()
        shared = self._cache is not None and trained is None  # cached layers are the base's
        if shared:
            model = self._cache.model(policy)
            if finetune_steps(policy.hyper) > 0:  # training needs tensors of its own
                model, shared = copy.deepcopy(model), False
        elif trained is not None:  # blocks are selected by magnitude on the trained weights
            model = compress_(trained, policy, calib=self.calib)
        else:
            model = compress(self.base, policy, calib=self.calib)
        timings["compress"] = time.perf_counter() - t
        return model, shared

    def _count(self, model: nn.Module, shared: bool) -> tuple[nn.Module, Counts]:
        """Count the model; with the 16-bit allowance round it to the fp16 values the artifact
        stores (a rounded copy when it `shared` the cache's tensors) and count that."""
        from microsweep.score import CountConfig, count, round_to_storage

        model.eval()
        config = CountConfig(**self.settings.count)
        counts = count(model, context=self.settings.context, config=config)
        if counts.freebie:
            if shared:
                model = self._cache.rounded(model)
            else:
                round_to_storage(model, counts)
            counts = count(model, context=self.settings.context, config=config)
        return model, counts

    def _evaluate(
        self, model: nn.Module, *, early_stop: bool, keep_nll: bool, subset: list[int] | None
    ) -> _Evaluation:
        """Perplexity on the windows (or on the `subset`, with its per-window NLL sums),
        chunk by chunk when a stop rule is set (with the chunk projections, and for a stopped
        trial its estimate and reach); with a KL reference, the KL from the dense model over
        the windows read, from the same forward passes."""
        from microsweep.score import nll_to_perplexity

        windows = self.windows
        rule = self.settings.stop
        per_window = windows.shape[1] - 1
        if subset is not None:
            nll, kl = self._read(model, subset)
            ppl = nll_to_perplexity(float(nll.sum()), len(subset) * per_window)
            ev = _Evaluation(ppl, window_nll=nll.tolist(), evaluated=list(subset))
            return ev.with_kl(kl, per_window, keep=True)
        tokens = windows.shape[0] * per_window
        if rule is None or rule.n_windows != windows.shape[0]:
            nll, kl = self._read(model, None)
            kept = nll.tolist() if keep_nll else None
            ev = _Evaluation(nll_to_perplexity(float(nll.sum()), tokens), window_nll=kept)
            return ev.with_kl(kl, per_window, keep=keep_nll)
        seen: list[int] = []
        values: list[torch.Tensor] = []
        kls: list[torch.Tensor] = []
        intermediate: list[float] = []
        for chunk in rule.chunk_indices():
            nll, kl = self._read(model, chunk)
            values.append(nll)
            if kl is not None:
                kls.append(kl)
            seen.extend(chunk)
            verdict = rule.verdict(seen, torch.cat(values))
            intermediate.append(verdict.projected)
            if early_stop and verdict.stop and len(seen) < rule.n_windows:
                read = torch.cat(kls) if kls else None  # the KL over the windows read
                if not math.isfinite(verdict.projected):
                    return _Evaluation(math.inf).with_kl(read, per_window, keep=False)
                stop = EarlyStop(verdict.projected, verdict.optimistic, len(seen), rule.n_windows)
                ev = _Evaluation(verdict.projected, intermediate, stopped=stop)
                return ev.with_kl(read, per_window, keep=False)
        order = torch.tensor(seen)
        nll = torch.empty(rule.n_windows, dtype=torch.float64)
        nll[order] = torch.cat(values)
        kept = nll.tolist() if keep_nll else None
        ev = _Evaluation(nll_to_perplexity(float(nll.sum()), tokens), intermediate, kept)
        kl = None
        if kls:
            kl = torch.empty(rule.n_windows, dtype=torch.float64)
            kl[order] = torch.cat(kls)
        return ev.with_kl(kl, per_window, keep=keep_nll)

    def _read(
        self, model: nn.Module, indices: list[int] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-window NLL sums of the windows at `indices` (all when None), and their KL sums
        from the same forward pass when the runner has a KL reference (else None)."""
        from microsweep.score import window_nll, window_nll_kl

        picked = self.windows if indices is None else self.windows[indices]
        batch, limit = self._batch_and_limit()
        if self.reference is None:
            return window_nll(model, picked, batch_size=batch, memory_bytes=limit), None
        return window_nll_kl(
            model, picked, self.reference, indices=indices, batch_size=batch, memory_bytes=limit
        )

    def _batch_and_limit(self) -> tuple[int | None, int | None]:
        """`batch_size` and `memory_bytes` for every evaluation of this runner. A batch that
        follows the memory limit is chosen once, from the base: a trial's model has the base's
        vocabulary and no wider layer, so no trial or chunk probes the model again. A limit that
        fits one window or less is kept as it is (such a window is read in runs of positions)."""
        if self._reading is None:
            batch, limit = self.settings.batch_size, self.settings.memory_bytes
            if batch is None:
                from microsweep.score import batch_for_memory
                from microsweep.score._kl import EXACT_KL_BYTES_PER_LOGIT, KL_BYTES_PER_LOGIT
                from microsweep.score._perplexity import NLL_BYTES_PER_LOGIT

                per_logit = NLL_BYTES_PER_LOGIT
                if self.reference is not None:
                    exact = self.reference.exact
                    per_logit = EXACT_KL_BYTES_PER_LOGIT if exact else KL_BYTES_PER_LOGIT
                fitted = batch_for_memory(self.base, self.windows, limit, bytes_per_logit=per_logit)
                if fitted > 1:
                    batch, limit = fitted, None
            self._reading = (batch, limit)
        return self._reading

    def group_lasso(self, policy: Policy) -> nn.Module | None:
        """The dense base trained by the group-lasso stage the policy's hyperparameters ask
        for (`GroupLassoRecipe`; a deep copy, the base is untouched), or None when there is
        nothing to train: `group_lasso_steps` 0 or no layer pruned in blocks (`block_targets`).
        """
        recipe = GroupLassoRecipe.from_hyper(policy.hyper)
        targets = block_targets(policy)
        if recipe.steps <= 0 or not targets:
            return None
        if self.train_tokens is None:
            raise RuntimeError("group_lasso_steps was given but the runner has no training tokens")
        return group_lasso_model(
            self.base, recipe, targets, self.train_tokens, block_size=self._block,
            seed=self.settings.seed,
        )  # fmt: skip

    def finetune(
        self, model: nn.Module, hyper: Mapping[str, Any], *, early_stop: bool = False
    ) -> FineTuneCurve | None:
        """Recovery fine-tuning of `model` in place as `hyper` asks (`FineTuneRecipe`); returns
        the fine-tuning curve when `finetune_eval_every` > 0, else None.

        The curve measures a fixed subset of the windows (`FT_EVAL_WINDOWS`) before the first
        step, after every k-th and after the last. With a stop rule in the settings and
        `early_stop`, a fine-tune that cannot recover is cut short (`FineTuneCurve.add` says
        when; the curve's `stopped` then holds where). Without k the training is exactly what
        it was before the curve existed.
        """
        recipe = FineTuneRecipe.from_hyper(hyper)
        if recipe.steps <= 0:
            return None
        if self.train_tokens is None:
            raise RuntimeError("finetune_steps was given but the runner has no training tokens")
        curve = None
        if recipe.eval_every > 0:
            rule = self.settings.stop
            if rule is not None and rule.n_windows != self.windows.shape[0]:
                rule = None  # a rule for other windows: _evaluate ignores it too
            curve = FineTuneCurve(
                self.windows, self.settings.batch_size, rule, recipe.steps, early_stop,
                memory_bytes=self.settings.memory_bytes,
            )  # fmt: skip
        finetune_(
            model, recipe, self.train_tokens, teacher=self.base, block_size=self._block,
            seed=self.settings.seed, curve=curve,
        )  # fmt: skip
        return curve


def check_subset(
    windows: Sequence[int] | None, n_windows: int, user_evaluate: bool = False
) -> list[int] | None:
    """`windows` as a list of distinct window indices below `n_windows` (None: evaluate them
    all), refused in one line otherwise; a space's own `evaluate` has no windows to pick."""
    if windows is None:
        return None
    if user_evaluate or n_windows == 0:
        raise UsageError(
            "windows= evaluates a subset of the built-in perplexity's windows; this sweep's "
            "space measures with its own evaluate(), so evaluate without windows="
        )
    if isinstance(windows, (str, bytes, torch.Tensor)) or not isinstance(windows, Sequence):
        raise UsageError(
            f"windows= must be a list of window indices, not {type(windows).__name__} "
            "(a tensor or array: pass .tolist())"
        )
    if not windows:
        raise UsageError(f"windows= is empty; name some of the {n_windows} evaluation windows")
    picked = []
    for i in windows:
        if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= i < n_windows:
            raise UsageError(
                f"windows=: {i!r} is not an index of the {n_windows} evaluation windows "
                f"(0..{n_windows - 1})"
            )
        picked.append(int(i))
    if len(set(picked)) != len(picked):
        raise UsageError("windows= names a window twice; give each index once")
    return picked


def check_eval_memory_mb(value: Any) -> None:
    """Refuse an evaluation memory limit that is not a whole number of MiB of at least 1 (None:
    the default limit)."""
    _check_mib(
        value, "--eval-memory-mb", 1,
        "the memory one evaluation batch may take; leave it out for min(1 GiB, a quarter of "
        "free memory)",
    )  # fmt: skip


def check_cache_mb(value: Any) -> None:
    """Refuse a variant cache size that is not a whole number of MiB of at least 0 (None:
    sized automatically)."""
    _check_mib(
        value, "--cache-mb", 0,
        "0 copies the model per trial; leave it out to size the cache from the worker's memory "
        "and the model",
    )  # fmt: skip


def _check_mib(value: Any, flag: str, least: int, hint: str) -> None:
    """Refuse in one line a size that is not a whole number of MiB of at least `least`."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
        raise UsageError(
            f"{flag} {value!r} must be a whole number of MiB, at least {least} ({hint})"
        )


def auto_cache_mb(model: nn.Module, device: Any = None, *, share: int = 1) -> int:
    """The variant cache's automatic size in MiB: half the memory free where the worker builds
    its variants (the GPU's, else the system's) split among the `share` workers that use it,
    at most `AUTO_CACHE_MODEL_COPIES` times the model's fp32 bytes, at least
    `AUTO_CACHE_MIN_MB`."""
    seen = {id(t): t.numel() for t in [*model.parameters(), *model.buffers()]}
    size = AUTO_CACHE_MODEL_COPIES * 4 * sum(seen.values())
    free = _free_memory(device)
    if free is not None:
        size = min(size, free // max(1, share) // 2)
    return max(AUTO_CACHE_MIN_MB, size // 2**20)


def _free_memory(device: Any) -> int | None:
    """Bytes free on `device`: the GPU's free memory for CUDA, else the system's available
    memory (/proc/meminfo, else sysconf); None when unknown."""
    if device is not None and torch.device(device).type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except RuntimeError:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _on_device(stats: Mapping[str, Any] | None, device: Any) -> Mapping[str, Any] | None:
    """The sweep's input statistics on the runner's device (as given on the CPU)."""
    if stats is None or device is None:
        return stats
    from dataclasses import replace

    return {
        name: replace(s, gram=s.gram.to(device), abs_mean=s.abs_mean.to(device))
        for name, s in stats.items()
    }


def _layer_rows(counts: Counts, policy: Policy) -> list[dict[str, Any]]:
    """The counter's per-layer rows, with the policy's requested sparsity beside the counted
    values where the counter reports none."""
    layers = [lc.to_json() for lc in counts.layers]
    for row in layers:
        lp = policy.layers.get(row["name"])
        if lp is not None and row.get("sparsity") is None:
            row["sparsity"] = lp.sparsity
    return layers


def _user_perplexity(value: Any) -> tuple[float, str | None]:
    """What the space file's `evaluate` returned, as a perplexity, and why it is refused: a
    value that is no number, or a number at or below zero (scores, ceilings and the planner
    take its log). NaN and infinity pass, for the not-finite check every trial has."""
    try:
        ppl = float(value)
    except (TypeError, ValueError):
        shown = str(value).splitlines()[0][:60] if str(value) else ""
        return math.nan, (
            f"evaluate(model) returned {type(value).__name__} {shown!r}; it must return the "
            "perplexity, a positive finite number"
        )
    if ppl <= 0:
        return ppl, (
            f"evaluate(model) returned {ppl:g}; a perplexity is a positive finite number "
            "(exp of the mean NLL per token)"
        )
    return ppl, None
