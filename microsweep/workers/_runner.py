"""`TrialRunner`: compress -> (fine-tune) -> evaluate -> count, for one policy at a time.

A runner holds the base model and the fixed evaluation windows for its whole life and runs trial
after trial. A trial's model shares every tensor the policy leaves alone with the base, and its
compressed layers come from a per-runner `VariantCache` keyed by (layer, settings), so repeated
settings cost a lookup; only training takes a full copy (recovery fine-tuning, and the group-lasso
stage that trains the dense model before block pruning). Before each trial it puts
torch's global state (seed, threads, grad mode, default dtype) back to what it was at start, so
that trials on a reused worker cannot leak into each other. Every failure comes back as a result
with ``status="error"`` and a reason.
"""

from __future__ import annotations

import copy
import gc
import math
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from microsweep.score import StopRule
    from microsweep.spaces import Policy

__all__ = ["EvalSettings", "FT_EVAL_WINDOWS", "TrialRunner", "worker_threads"]

FT_EVAL_WINDOWS = 32
"""Evaluation windows in the fine-tuning curve's subset (`finetune_eval_every`): every m-th
window, m = n // 32 (all of them when there are fewer), so it samples the whole split. A point
costs 32 window forwards without gradients, about one training step of 8 windows (forward and
backward), so k = 10 adds roughly a tenth to fine-tuning time."""


@dataclass(frozen=True)
class EvalSettings:
    """What a runner needs besides the model: how to evaluate and how to count."""

    context: float
    count: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    finetune_block: int | None = None  # default: the evaluation window length
    seed: int = 0
    stop: StopRule | None = None  # chunked evaluation that may end a hopeless trial early
    cache_mb: int = 512  # compressed layer variants kept per worker; 0 copies the model per trial


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
    ) -> None:
        if rules:  # counting rules a space file registered, in a process that did not run it
            from microsweep.score import register_rules

            register_rules(dict(rules))
        self.device = _assigned_device()
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
        self.threads = threads or _assigned_cpus() or torch.get_num_threads()
        self._dtype = torch.get_default_dtype()
        self._cache = None
        if settings.cache_mb > 0:
            from microsweep.compress import VariantCache

            self._cache = VariantCache(model, calib=calib, max_bytes=settings.cache_mb * 2**20)

    def ping(self) -> bool:
        return True

    def _reset_torch_state(self, number: int) -> None:
        torch.set_num_threads(self.threads)
        torch.set_default_dtype(self._dtype)
        torch.set_grad_enabled(False)
        torch.manual_seed(self.settings.seed * 1_000_003 + number)

    def run(
        self,
        number: int,
        policy_json: Mapping[str, Any],
        *,
        early_stop: bool = True,
        window_nll: bool = False,
    ) -> dict[str, Any]:
        """Evaluate one policy; never raises for a trial's own failure.

        With a stop rule in the settings and `early_stop`, the windows are read in chunks and a
        trial that cannot meet the ceiling ends with ``status="pruned"``; `window_nll` adds the
        per-window NLL sums to the result (the dense run records them for the rule).
        """
        from microsweep.spaces import Policy

        timings: dict[str, float] = {}
        started = time.perf_counter()
        grad_mode = torch.is_grad_enabled()
        try:
            self._reset_torch_state(number)
            policy = Policy.from_json(policy_json)
            result = self._run(policy, timings, early_stop=early_stop, keep_nll=window_nll)
        except Exception as exc:  # a worker exception is a FAIL with its reason, not a crash
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
            result = {"status": "error", "error": f"{type(exc).__name__}: {exc}{where}"}
        finally:
            torch.set_grad_enabled(grad_mode)  # the caller's, not ours
            gc.collect(0)  # young objects only: a full collection costs ~90 ms a trial
        timings["total"] = time.perf_counter() - started
        result["timings"] = timings
        result["number"] = number
        result["worker"] = f"{_worker_name()}, threads {self.threads}"
        return result

    def _run(
        self, policy: Any, timings: dict[str, float], *, early_stop: bool, keep_nll: bool
    ) -> dict[str, Any]:
        from microsweep.compress import compress, compress_
        from microsweep.score import CountConfig, count, round_to_storage

        trained = None  # the dense base after the group-lasso stage, when the policy asks for it
        if _whole(policy.hyper, "group_lasso_steps", 0) > 0:
            t = time.perf_counter()
            trained = self.group_lasso(policy)
            if trained is not None:
                timings["group_lasso"] = time.perf_counter() - t

        t = time.perf_counter()
        steps = int(policy.hyper.get("finetune_steps", 0) or 0)
        shared = self._cache is not None and trained is None  # cached layers are the base's
        if shared:
            model = self._cache.model(policy)
            if steps > 0:  # training needs tensors of its own
                model, shared = copy.deepcopy(model), False
        elif trained is not None:  # blocks are selected by magnitude on the trained weights
            model = compress_(trained, policy, calib=self.calib)
        else:
            model = compress(self.base, policy, calib=self.calib)
        timings["compress"] = time.perf_counter() - t

        tuned: dict[str, Any] = {}
        if steps > 0:
            t = time.perf_counter()
            tuned = self.finetune(model, policy.hyper, early_stop=early_stop)
            timings["finetune"] = time.perf_counter() - t

        t = time.perf_counter()
        model.eval()
        config = CountConfig(**self.settings.count)
        counts = count(model, context=self.settings.context, config=config)
        # with the 16-bit allowance the artifact stores fp16: evaluate exactly those values
        if counts.freebie:
            if shared:
                model = self._cache.rounded(model)
            else:
                round_to_storage(model, counts)
            counts = count(model, context=self.settings.context, config=config)
        timings["count"] = time.perf_counter() - t

        extra: dict[str, Any] = {}
        refused: str | None = None  # why what the user's evaluate returned is no perplexity
        cut = "finetune_stopped_at" in tuned  # fine-tuning could not recover: no evaluation
        if cut:
            ppl = tuned["perplexity_estimate"]
        else:
            t = time.perf_counter()
            if self.evaluate_fn is not None:
                ppl, refused = _user_perplexity(self.evaluate_fn(model))
            else:
                ppl, extra = self._evaluate(model, early_stop=early_stop, keep_nll=keep_nll)
            timings["evaluate"] = time.perf_counter() - t
        del model
        extra = {**tuned, **extra}
        layers = [lc.to_json() for lc in counts.layers]
        for row in layers:  # the policy's requested settings sit beside the counted values
            lp = policy.layers.get(row["name"])
            if lp is not None and row.get("sparsity") is None:
                row["sparsity"] = lp.sparsity
        counted = {
            "params": counts.params,
            "ops": counts.ops,
            "freebie": counts.freebie,
            "layers": layers,
            "count_config": counts.config.to_json(),
        }
        if refused is not None:
            return {"status": "error", "error": refused, **counted}
        if not math.isfinite(ppl):
            error = f"perplexity is {ppl} (not finite)"
            if cut:
                error = f"fine-tuning diverged: {error} at step {tuned['finetune_stopped_at']}"
            curve = {k: tuned[k] for k in ("finetune_curve", "finetune_stopped_at") if k in tuned}
            return {"status": "error", "error": error, **curve, **counted}
        if extra.get("pruned"):
            return {"status": "pruned", **extra, **counted}
        return {"status": "ok", "perplexity": ppl, **extra, **counted}

    def _evaluate(
        self, model: nn.Module, *, early_stop: bool, keep_nll: bool
    ) -> tuple[float, dict[str, Any]]:
        """Perplexity on the windows, chunk by chunk when a stop rule is set; the extra keys
        are the intermediate projections, and for a stopped trial its estimate and reach."""
        from microsweep.score import nll_to_perplexity, window_nll

        windows, batch = self.windows, self.settings.batch_size
        rule = self.settings.stop
        tokens = windows.shape[0] * (windows.shape[1] - 1)
        if rule is None or rule.n_windows != windows.shape[0]:
            nll = window_nll(model, windows, batch_size=batch)
            extra = {"window_nll": nll.tolist()} if keep_nll else {}
            return nll_to_perplexity(float(nll.sum()), tokens), extra
        seen: list[int] = []
        values: list[torch.Tensor] = []
        intermediate: list[float] = []
        for chunk in rule.chunk_indices():
            values.append(window_nll(model, windows[chunk], batch_size=batch))
            seen.extend(chunk)
            verdict = rule.verdict(seen, torch.cat(values))
            intermediate.append(verdict.projected)
            if early_stop and verdict.stop and len(seen) < rule.n_windows:
                if not math.isfinite(verdict.projected):
                    return math.inf, {}
                return verdict.projected, {
                    "pruned": True,
                    "perplexity_estimate": verdict.projected,
                    "optimistic_perplexity": verdict.optimistic,
                    "windows_seen": len(seen),
                    "windows": rule.n_windows,
                    "intermediate": intermediate,
                }
        nll = torch.empty(rule.n_windows, dtype=torch.float64)
        nll[torch.tensor(seen)] = torch.cat(values)
        extra: dict[str, Any] = {"intermediate": intermediate}
        if keep_nll:
            extra["window_nll"] = nll.tolist()
        return nll_to_perplexity(float(nll.sum()), tokens), extra

    def group_lasso(self, policy: Policy) -> nn.Module | None:
        """The dense base trained by the reweighted group-lasso stage the policy's hyperparameters
        ask for (a deep copy; the base is untouched), or None when there is nothing to train:
        `group_lasso_steps` 0 or no layer pruned in blocks.

        `group_lasso_steps` AdamW steps at `group_lasso_lr` (default 1e-4, as `finetune_lr`) on
        cross-entropy plus `group_lasso_penalty` (default 1e-4, the authors' factor) x the
        reweighted group lasso, alphas re-estimated every `group_lasso_reweight_every` steps
        (default 10). Penalised: each layer with sparsity > 0, a `block` and no rank, over tiles of
        its block shape (a factorized layer's blocks live in its factors, which do not exist yet).
        """
        from microsweep.compress._group_lasso import group_lasso_train_

        hyper = policy.hyper
        steps = _whole(hyper, "group_lasso_steps", 0)
        penalty = _number(hyper, "group_lasso_penalty", 1e-4)
        lr = _number(hyper, "group_lasso_lr", 1e-4)
        every = _whole(hyper, "group_lasso_reweight_every", 10)
        if penalty < 0:
            raise ValueError(f"group_lasso_penalty {penalty} must be >= 0")
        if not lr > 0:
            raise ValueError(f"group_lasso_lr {lr} must be above 0")
        if every < 1:
            raise ValueError(f"group_lasso_reweight_every {every} must be at least 1")
        targets = {
            name: lp.block
            for name, lp in policy.layers.items()
            if lp.block is not None and lp.sparsity > 0 and lp.rank is None
        }
        if steps <= 0 or not targets:
            return None
        if self.train_tokens is None:
            raise RuntimeError("group_lasso_steps was given but the runner has no training tokens")
        trained = copy.deepcopy(self.base)
        group_lasso_train_(
            trained,
            targets,
            self.train_tokens,
            steps=steps,
            lr=lr,
            penalty=penalty,
            reweight_every=every,
            block_size=self.settings.finetune_block or self.windows.shape[1] - 1,
            batch_size=8,
            seed=self.settings.seed,
        )
        return trained.eval()

    def finetune(
        self, model: nn.Module, hyper: Mapping[str, Any], *, early_stop: bool = False
    ) -> dict[str, Any]:
        """Recovery fine-tuning as the policy's hyperparameters ask: `finetune_steps` steps at
        `finetune_lr`, distilled from the dense model with weight `distill_alpha` (0: plain
        cross-entropy) at temperature `distill_temperature`.

        With `finetune_eval_every` = k > 0 the perplexity of a fixed subset of the windows
        (`FT_EVAL_WINDOWS`) is measured before the first step, after every k-th and after the
        last, returned as ``finetune_curve`` ([step, perplexity] pairs). With a stop rule in the
        settings and `early_stop`, a fine-tune that cannot recover is cut short (`_Curve.add`
        says when) and the result keys of a stopped trial come back, with ``finetune_stopped_at``.
        Without k the training is exactly what it was before the curve existed.
        """
        steps = int(hyper.get("finetune_steps", 0) or 0)
        if steps <= 0:
            return {}
        alpha = float(hyper.get("distill_alpha", 0.0))
        temperature = float(hyper.get("distill_temperature", 2.0))
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill_alpha {alpha} must be in [0, 1]")
        if not temperature > 0:
            raise ValueError(f"distill_temperature {temperature} must be above 0")
        every = _whole(hyper, "finetune_eval_every", 0)
        if every < 0:
            raise ValueError(f"finetune_eval_every {every} must be >= 0 (0: no curve)")
        lr = float(hyper.get("finetune_lr", 1e-4))
        curve = None
        if every > 0:
            rule = self.settings.stop
            if rule is not None and rule.n_windows != self.windows.shape[0]:
                rule = None  # a rule for other windows: _evaluate ignores it too
            curve = _Curve(self.windows, self.settings.batch_size, rule, steps, early_stop)
        self._finetune(model, steps, lr, alpha=alpha, temperature=temperature, curve=curve,
                       every=every)  # fmt: skip
        return {} if curve is None else curve.result()

    def _finetune(
        self,
        model: nn.Module,
        steps: int,
        lr: float,
        *,
        alpha: float = 0.0,
        temperature: float = 2.0,
        curve: _Curve | None = None,
        every: int = 0,
    ) -> None:
        """Recovery fine-tuning: AdamW steps on training windows (distilled from the dense
        base when `alpha` > 0), projected back onto the compressed set (masks and quantization
        grids) after every step; with a `curve`, measured at step 0, every `every` steps and
        at the end, ending early when the curve says so. Measuring draws no random numbers
        and leaves the training flags as they were, so the steps taken are the same with or
        without it."""
        from microsweep.compress import project_
        from microsweep.models import lm_batch_loss

        if self.train_tokens is None:
            raise RuntimeError("finetune_steps was given but the runner has no training tokens")
        block = self.settings.finetune_block or self.windows.shape[1] - 1
        gen = torch.Generator().manual_seed(self.settings.seed)
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.train()
        with torch.enable_grad():
            stop = curve is not None and curve.add(model, 0)
            for step in range(steps):
                if stop:
                    break
                loss = lm_batch_loss(
                    model, self.train_tokens, block_size=block, batch_size=8, gen=gen,
                    teacher=self.base if alpha > 0 else None, alpha=alpha,
                    temperature=temperature,
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


class _Curve:
    """The fine-tuning curve: perplexity on a fixed subset of the evaluation windows at chosen
    steps, and the decision to cut a fine-tune that cannot recover.

    The cut reuses the stop rule's ceiling and its optimistic bound. At a point after at least
    half the steps and with two earlier points, take the rule's optimistic estimate of the
    full-split perplexity from the subset (z standard errors of luck on the unseen windows),
    and lower it further by the recent rate of improvement (the drop in log perplexity per step
    since two points back) carried over every remaining step. If even that stays above the
    ceiling, the fine-tune is cut. Fine-tuning gains shrink as it goes, so carrying the recent
    rate forward overstates what is left to gain: the rule errs towards letting a trial finish.
    A non-finite subset perplexity (the training diverged) cuts at once, at any step.
    """

    def __init__(
        self,
        windows: torch.Tensor,
        batch_size: int,
        rule: StopRule | None,
        steps: int,
        early_stop: bool,
    ) -> None:
        n = windows.shape[0]
        size = min(n, FT_EVAL_WINDOWS)
        every = n // size
        self.indices = list(range(0, every * size, every))
        self.windows = windows[self.indices]
        self.tokens = size * (windows.shape[1] - 1)
        self.batch_size = batch_size
        self.rule = rule
        self.steps = steps
        self.may_cut = early_stop and rule is not None
        self.points: list[list[float]] = []  # [step, subset perplexity]
        self.projected: list[float] = []  # the rule's full-split estimate at each point
        self.stopped: dict[str, Any] | None = None

    def add(self, model: nn.Module, step: int) -> bool:
        """Measure the model at `step`; True when fine-tuning should end here."""
        from microsweep.score import nll_to_perplexity, window_nll

        nll = window_nll(model, self.windows, batch_size=self.batch_size)
        ppl = nll_to_perplexity(float(nll.sum()), self.tokens)
        self.points.append([step, ppl])
        if self.rule is None:
            return False
        verdict = self.rule.verdict(self.indices, nll)
        self.projected.append(verdict.projected)
        if not self.may_cut or step >= self.steps:
            return False
        if not math.isfinite(ppl):  # diverged (NaN, or a mean NLL past float range): no way back
            return self._cut(step, math.inf, math.inf)
        if 2 * step < self.steps or len(self.points) < 3 or verdict.optimistic <= 0:
            return False
        back = self.points[-3][0]
        rate = max(0.0, math.log(self.projected[-3] / verdict.projected) / (step - back))
        best = math.log(verdict.optimistic) - rate * (self.steps - step)
        if best <= math.log(self.rule.ceiling):
            return False
        return self._cut(step, verdict.projected, math.exp(best))

    def _cut(self, step: int, projected: float, optimistic: float) -> bool:
        self.stopped = {
            "pruned": True,
            "perplexity_estimate": projected,
            "optimistic_perplexity": optimistic,
            "windows_seen": len(self.indices),
            "windows": self.rule.n_windows if self.rule is not None else len(self.indices),
            "finetune_stopped_at": step,
        }
        return True

    def result(self) -> dict[str, Any]:
        """``finetune_curve``, and when cut the keys of a stopped trial."""
        return {"finetune_curve": self.points, **(self.stopped or {})}


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


def _assigned_device() -> torch.device | None:
    """The GPU Ray gave this actor (Ray limits CUDA_VISIBLE_DEVICES to it), or None: CPU."""
    import sys

    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized() and ray.get_gpu_ids():
            if torch.cuda.is_available():
                return torch.device("cuda")
    except Exception:  # no runtime context: not a Ray worker
        pass
    return None


def worker_threads(cpus: float) -> int:
    """Torch threads for a worker given `cpus` CPUs, one rule for Ray actors and the in-process
    runner: the whole CPUs, at least 1 (a fraction still runs), at most this machine's cores
    (more threads than cores only contend)."""
    import os

    return max(1, min(int(cpus), os.cpu_count() or 1))


def _assigned_cpus() -> int | None:
    """Threads for the CPUs Ray gave this actor (`worker_threads`: they follow the reservation,
    not the machine's core count); None outside Ray."""
    import sys

    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return worker_threads(cpus)
    except Exception:  # no runtime context: not a Ray worker
        pass
    return None


def _worker_name() -> str:
    """Where a trial ran: the Ray node (first 12 hex digits of its id) and process, or the
    host and process outside Ray."""
    import os
    import socket
    import sys

    ray = sys.modules.get("ray")  # a Ray worker has it; in-process it is not imported for this
    try:
        if ray is not None and ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
            return f"node {node[:12]} pid {os.getpid()}"
    except Exception:  # Ray missing or no runtime context: the host will do
        pass
    return f"{socket.gethostname()} pid {os.getpid()}"
