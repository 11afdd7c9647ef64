"""`TrialRunner`: compress -> (fine-tune) -> evaluate -> count, for one policy at a time.

A runner holds the base model and the fixed evaluation windows for its whole life and runs trial
after trial. A trial's model shares every tensor the policy leaves alone with the base, and its
compressed layers come from a per-runner `VariantCache` keyed by (layer, settings), so repeated
settings cost a lookup; only fine-tuning takes a full copy (it trains). Before each trial it puts
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

__all__ = ["EvalSettings", "TrialRunner"]


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
        from microsweep.compress import compress
        from microsweep.score import CountConfig, count, round_to_storage

        t = time.perf_counter()
        steps = int(policy.hyper.get("finetune_steps", 0) or 0)
        shared = self._cache is not None
        if shared:
            model = self._cache.model(policy)
            if steps > 0:  # training needs tensors of its own
                model, shared = copy.deepcopy(model), False
        else:
            model = compress(self.base, policy, calib=self.calib)
        timings["compress"] = time.perf_counter() - t

        if steps > 0:
            t = time.perf_counter()
            self.finetune(model, policy.hyper)
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

        t = time.perf_counter()
        extra: dict[str, Any] = {}
        if self.evaluate_fn is not None:
            ppl = float(self.evaluate_fn(model))
        else:
            ppl, extra = self._evaluate(model, early_stop=early_stop, keep_nll=keep_nll)
        timings["evaluate"] = time.perf_counter() - t
        del model
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
        if not math.isfinite(ppl):
            return {"status": "error", "error": f"perplexity is {ppl} (not finite)", **counted}
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

    def finetune(self, model: nn.Module, hyper: Mapping[str, Any]) -> None:
        """Recovery fine-tuning as the policy's hyperparameters ask: `finetune_steps` steps at
        `finetune_lr`, distilled from the dense model with weight `distill_alpha` (0: plain
        cross-entropy) at temperature `distill_temperature`."""
        steps = int(hyper.get("finetune_steps", 0) or 0)
        if steps <= 0:
            return
        alpha = float(hyper.get("distill_alpha", 0.0))
        temperature = float(hyper.get("distill_temperature", 2.0))
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill_alpha {alpha} must be in [0, 1]")
        if not temperature > 0:
            raise ValueError(f"distill_temperature {temperature} must be above 0")
        lr = float(hyper.get("finetune_lr", 1e-4))
        self._finetune(model, steps, lr, alpha=alpha, temperature=temperature)

    def _finetune(
        self,
        model: nn.Module,
        steps: int,
        lr: float,
        *,
        alpha: float = 0.0,
        temperature: float = 2.0,
    ) -> None:
        """Recovery fine-tuning: AdamW steps on training windows (distilled from the dense
        base when `alpha` > 0), projected back onto the compressed set (masks and quantization
        grids) after every step."""
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
            for _ in range(steps):
                loss = lm_batch_loss(
                    model, self.train_tokens, block_size=block, batch_size=8, gen=gen,
                    teacher=self.base if alpha > 0 else None, alpha=alpha,
                    temperature=temperature,
                )  # fmt: skip
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                project_(model)
        for p in params:
            p.requires_grad_(False)
        model.eval()


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


def _assigned_cpus() -> int | None:
    """The CPUs Ray gave this actor (threads follow them, not the machine's core count); None
    outside Ray."""
    import sys

    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
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
