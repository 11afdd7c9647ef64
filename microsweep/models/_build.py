"""Make built-in models: build from a recipe, pretrain on a corpus, and cache the weights."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from microsweep._text import clock as _clock
from microsweep.data._corpus import Corpus, cache_dir
from microsweep.errors import UsageError
from microsweep.models.gpt import GPT, GPTConfig
from microsweep.models.lstm import LSTMLM, LSTMConfig

__all__ = [
    "build",
    "gpt",
    "lm_batch_loss",
    "lstm",
    "logits_of",
    "owned_cores",
    "pretrain",
    "pretrain_threads",
    "thread_count",
]

M = TypeVar("M", bound=nn.Module)


def build(recipe: dict[str, Any]) -> nn.Module:
    """An untrained model of the shape a recipe (``model.recipe()``) describes."""
    builder = recipe.get("builder")
    if builder == "gpt":
        return GPT(GPTConfig(**recipe["config"]))
    if builder == "lstm":
        from microsweep.models.lstm import LSTMLM, LSTMConfig

        return LSTMLM(LSTMConfig(**recipe["config"]))
    if builder == "hf":
        from microsweep.models.hf import hf_recipe_model

        return hf_recipe_model(recipe)
    raise UsageError(
        f"unknown model builder {builder!r}; this release builds 'gpt', 'lstm' and 'hf'"
    )


def logits_of(output: object) -> torch.Tensor | object:
    """The logits in a model's output: the output itself when it is a tensor, else its `logits`
    attribute (Hugging Face style output objects) or first element (a tuple); anything else is
    returned as it is for the caller to refuse."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output


def lm_batch_loss(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    block_size: int,
    batch_size: int,
    gen: torch.Generator,
    teacher: nn.Module | None = None,
    alpha: float = 0.0,
    temperature: float = 2.0,
) -> torch.Tensor:
    """Next-token cross-entropy on `batch_size` random windows of `tokens` drawn from `gen`
    (shared by pretraining and recovery fine-tuning). With a `teacher` and `alpha` > 0 the loss
    is distillation: (1 - alpha) x cross-entropy + alpha x T^2 x KL(teacher || model), both
    softened by the temperature T (the T^2 keeps the gradient scale as T changes)."""
    ix = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=gen).tolist()
    x = torch.stack([tokens[i : i + block_size] for i in ix])  # (B, T)
    y = torch.stack([tokens[i + 1 : i + 1 + block_size] for i in ix])
    param = next(model.parameters(), None)
    if param is not None and param.device != x.device:  # a model on a GPU
        x, y = x.to(param.device), y.to(param.device)
    logits = logits_of(model(x))  # (B, T, V)
    flat = logits.reshape(-1, logits.size(-1))
    loss = nn.functional.cross_entropy(flat, y.reshape(-1))
    if teacher is None or alpha <= 0.0:
        return loss
    with torch.no_grad():
        target = logits_of(teacher(x)).reshape(-1, logits.size(-1))
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(flat / temperature, dim=-1),
        nn.functional.log_softmax(target / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return (1.0 - alpha) * loss + alpha * temperature**2 * soft


SCHEDULES = ("cosine", "linear")


def _lr_at(step: int, steps: int, lr: float, *, schedule: str, warmup: int) -> float:
    """The learning rate at `step`: linear warm-up over `warmup` steps, then "cosine" (half a
    cosine down to a floor of 5%) or "linear" (straight down to 0 after the last step, a
    one-cycle shape that lets a short run end at a low loss)."""
    ramp = min(1.0, (step + 1) / max(warmup, 1))
    if schedule == "cosine":
        return lr * max(0.5 * (1 + math.cos(math.pi * step / max(steps, 1))), 0.05) * ramp
    return lr * min(1.0, (steps - step) / max(steps - warmup, 1)) * ramp


def owned_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS reports one (else every
    core), cut to a cgroup CPU quota (a container's ``--cpus``) when one is set."""
    cores = os.cpu_count() or 1
    try:
        owned = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        owned = cores
    quota = _cgroup_quota()
    if quota is not None:
        owned = min(owned, max(1, math.ceil(quota)))
    return max(1, owned)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def _cgroup_quota() -> float | None:
    """CPUs' worth of time the cgroup v2 quota allows ("200000 100000" -> 2.0), None if none."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def thread_count(owned: int, cores: int, load: float | None) -> int:
    """Torch threads for pretraining: one per owned core, never more than the machine's cores,
    and no more than the cores the 1-minute load average leaves idle (rounded, at least 1).

    The cap is measured: a step of the demo GPT (4x128) on 2 threads is 1.6x faster than on 1 on
    two quiet cores, but 3-50x slower while one or two other processes keep them busy (threads
    spin waiting for each other), whereas 1 thread only loses its share of the machine.
    """
    threads = max(1, min(owned, cores))
    if load is not None:
        threads = min(threads, max(1, math.floor(cores - load + 0.5)))
    return threads


PRETRAIN_THREADS_ENV = "MICROSWEEP_PRETRAIN_THREADS"
"""Set to a positive int to pretrain on exactly that many threads: the weights then do not
depend on the machine's load (float sums split across threads round differently)."""


def pretrain_threads() -> int:
    """`thread_count` for this process and machine now (see there for the rule), or the count
    `$MICROSWEEP_PRETRAIN_THREADS` fixes."""
    fixed = os.environ.get(PRETRAIN_THREADS_ENV, "").strip()
    if fixed:
        if not fixed.isdigit() or int(fixed) < 1:
            raise UsageError(f"${PRETRAIN_THREADS_ENV}={fixed!r} must be a positive int")
        return int(fixed)
    try:
        load: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on Windows
        load = None
    return thread_count(owned_cores(), os.cpu_count() or 1, load)


class _ThreadGuard:
    """Checks the thread count while training and falls back to one thread for good when more
    do not pay: the load average lags a minute behind work that starts just before or during
    training, and threads that spin against it make steps 10-50x slower.

    With several threads the warm-up step and a probe window of `window` steps run on one, the
    next window on all; they are kept only when faster (given up as soon as that window has
    taken as long as the probe), and dropped later if a window takes `factor` x as long as the
    best on them. With `adapt` False the count is only set.
    """

    def __init__(
        self,
        threads: int,
        adapt: bool = True,
        window: int = 20,
        factor: float = 3.0,
        clock: Callable[[], float] = time.perf_counter,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        self.threads, self.window, self.factor = threads, window, factor
        self.adapt = adapt and threads > 1
        self.clock, self.set_threads = clock, set_threads
        self.probe = math.inf  # seconds per step on one thread, once the probe window ended
        self.best = math.inf  # of the windows on all threads
        self.mark, self.count, self.windows = clock(), -1, 0  # -1: the warm-up step is not timed
        set_threads(1 if self.adapt else threads)

    def step(self) -> str | None:
        """Count a finished step; returns why it went down to one thread when it just did."""
        if not self.adapt:
            return None
        self.count += 1
        now = self.clock()
        if self.count == 0:  # the warm-up step ended
            self.mark = now
            return None
        took = now - self.mark
        if self.windows == 1 and took >= self.probe * self.window:  # slower than 1 already
            return self._drop(f"{took / self.count / self.probe:.1f}x as slow as 1")
        if self.count < self.window:
            return None
        per_step, self.mark, self.count = took / self.window, now, 0
        self.windows += 1
        if self.windows == 1:
            self.probe = per_step
            self.set_threads(self.threads)
        elif per_step > self.factor * self.best:
            return self._drop(f"{per_step / self.best:.1f}x slower than before")
        else:
            self.best = min(self.best, per_step)
        return None

    def _drop(self, why: str) -> str:
        """Go on with one thread for good; says why."""
        self.adapt = False
        self.set_threads(1)
        return f"steps on {self.threads} threads ran {why} (other work on the cores)"


class _Progress:
    """Progress lines on stderr, about every 5% of the steps and at least every `gap` seconds:
    ``pretrain gpt 4x128: step 400/1200 loss 1.62, 0:31 elapsed, ETA 1:02``. The ETA is the
    mean time of the steps after the first (which warms up allocators and caches) times the
    steps left; it is 0 at the end and never negative."""

    def __init__(
        self,
        label: str,
        steps: int,
        every: int = 0,
        gap: float = 20.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.label, self.steps, self.gap, self.clock = label, steps, gap, clock
        self.every = every if every > 0 else max(1, math.ceil(steps / 20))
        self.start = self.last = clock()
        self.warm: float | None = None  # when the first step (or a thread change) ended
        self.warm_done = 1  # the step it ended
        self.loss_sum, self.loss_n = 0.0, 0

    def say(self, text: str) -> None:
        """Print `text` on a line of its own, after the label."""
        print(f"pretrain {self.label}: {text}", file=sys.stderr, flush=True)

    def restart(self, done: int) -> None:
        """Time the ETA from step `done` on: the step rate just changed."""
        self.warm, self.warm_done = self.clock(), done

    def step(self, done: int, loss: float) -> None:
        """Record step `done` (1-based) and its loss; print a line when one is due."""
        now = self.clock()
        if self.warm is None:
            self.warm = now
        self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
        if done % self.every and done != self.steps and now - self.last < self.gap:
            return
        elapsed = now - self.start
        timed = done - self.warm_done
        per_step = (now - self.warm) / timed if timed > 0 else elapsed / max(done, 1)
        eta = max(0.0, per_step * (self.steps - done))
        print(
            f"pretrain {self.label}: step {done}/{self.steps} "
            f"loss {self.loss_sum / self.loss_n:.3f}, {_clock(elapsed)} elapsed, ETA {_clock(eta)}",
            file=sys.stderr,
            flush=True,
        )
        self.last, self.loss_sum, self.loss_n = now, 0.0, 0


def pretrain(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    steps: int,
    block_size: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    schedule: str = "cosine",
    warmup: int = 50,
    threads: int | None = None,
    progress: str | bool = False,
    log_every: int = 0,
) -> nn.Module:
    """Train `model` on random windows of `tokens` with AdamW, in place.

    The learning rate warms up over `warmup` steps and then follows `schedule` ("cosine" or
    "linear", see `_lr_at`). Training runs on `threads` torch threads, or by default on
    `pretrain_threads()` of them, down to one when `_ThreadGuard` finds more slower; the
    caller's thread count is restored afterwards, even on an error.
    With `progress` (True, or a label such as "gpt 4x128") a line with the step, the mean loss
    since the last line, the elapsed time and an estimate of the time left goes to stderr every
    `log_every` steps (default about every 5%). Global RNG state is left as it was: the windows
    come from a private generator.
    """
    if steps < 0:
        raise UsageError(f"pretrain steps {steps} must be >= 0")
    if len(tokens) <= block_size + 1:
        raise UsageError(f"{len(tokens)} training tokens are too few for block_size {block_size}")
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise UsageError(f"pretrain threads={threads!r} must be a positive int or None")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    label = progress if isinstance(progress, str) else type(model).__name__
    meter = _Progress(label, steps, log_every) if progress else None
    before = torch.get_num_threads()
    try:
        fixed = threads is not None or bool(os.environ.get(PRETRAIN_THREADS_ENV, "").strip())
        guard = _ThreadGuard(pretrain_threads() if threads is None else threads, not fixed)
        if meter is not None:
            on = f"{guard.threads} thread{'s' if guard.threads > 1 else ''}"
            if guard.adapt:
                on += f" (the first {guard.window + 1} steps on 1, to see that more pay)"
            meter.say(f"{steps} steps of {batch_size} windows of {block_size} tokens on {on}")
        model.train()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, schedule=schedule, warmup=warmup)
            loss = lm_batch_loss(
                model, tokens, block_size=block_size, batch_size=batch_size, gen=gen
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            switched = guard.step()
            if meter is not None:
                if switched:
                    meter.say(f"{switched}; going on with 1 thread")
                    meter.restart(step + 1)
                meter.step(step + 1, loss.item())
    finally:
        torch.set_num_threads(before)
        model.eval()
    return model


def gpt(
    corpus: Corpus,
    *,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    block_size: int = 64,
    pretrain_steps: int = 500,
    batch_size: int = 16,
    lr: float = 3e-3,
    schedule: str = "cosine",
    warmup: int = 50,
    seed: int = 0,
    cache: bool = True,
    verbose: bool = False,
) -> GPT:
    """A small GPT pretrained on `corpus.train`, reusing cached weights for the same recipe.

    The cache key covers the shape, the corpus fingerprint and every training setting;
    `verbose` prints what is pretrained, where it is cached, and progress with an ETA (stderr).
    """
    config = GPTConfig(
        vocab_size=corpus.vocab_size,
        block_size=block_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
    )
    train = _train_settings(pretrain_steps, batch_size, lr, schedule, warmup, seed)
    label = f"gpt {n_layer}x{n_embd}"
    return _pretrained(
        "gpt", label, lambda: GPT(config), asdict(config), corpus, train, cache, verbose
    )


def lstm(
    corpus: Corpus,
    *,
    n_embd: int = 200,
    n_hidden: int = 200,
    n_layer: int = 2,
    tie_weights: bool = True,
    block_size: int = 35,
    pretrain_steps: int = 1000,
    batch_size: int = 20,
    lr: float = 3e-3,
    schedule: str = "cosine",
    warmup: int = 50,
    seed: int = 0,
    cache: bool = True,
    verbose: bool = False,
) -> LSTMLM:
    """An LSTM LM pretrained on `corpus.train`, reusing cached weights for the same recipe.

    The defaults are the small word-level setting of the RNN-compression work (2 layers of 200,
    embedding = hidden, 35-token windows), tied; `n_hidden=650` or 1500 gives the larger ones.
    `verbose` prints what is pretrained, where it is cached, and progress with an ETA (stderr).
    """
    config = LSTMConfig(
        vocab_size=corpus.vocab_size,
        n_embd=n_embd,
        n_hidden=n_hidden,
        n_layer=n_layer,
        tie_weights=tie_weights,
        block_size=block_size,
    )
    train = _train_settings(pretrain_steps, batch_size, lr, schedule, warmup, seed)
    label = f"lstm {n_layer}x{n_hidden}"
    return _pretrained(
        "lstm", label, lambda: LSTMLM(config), asdict(config), corpus, train, cache, verbose
    )


def _train_settings(
    steps: int, batch_size: int, lr: float, schedule: str, warmup: int, seed: int
) -> dict[str, Any]:
    """The training settings `pretrain` takes and the cache key hashes, by their names there."""
    return dict(
        steps=steps, batch_size=batch_size, lr=lr, schedule=schedule, warmup=warmup, seed=seed
    )


def _pretrained(
    kind: str,
    label: str,
    make: Callable[[], M],
    config: dict[str, Any],
    corpus: Corpus,
    train: dict[str, Any],
    cache: bool,
    verbose: bool,
) -> M:
    """`make()` (initialised from `train`'s seed, the global RNG left as it was) pretrained on
    `corpus.train` with `train` settings (the keyword arguments of `pretrain`), or loaded from
    the cache entry keyed by its shape, the corpus fingerprint and all of `train`."""
    with torch.random.fork_rng():
        torch.manual_seed(train["seed"])
        model = make()
    key_data = {"config": config, "data": corpus.fingerprint, "train": train, "v": 2}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "models" / f"{kind}-{key}.pt"
    if cache and path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
        return model
    if verbose:
        params = sum(p.numel() for p in model.parameters())
        where = f"cached afterwards in {path}" if cache else "not cached (cache=False)"
        print(
            f"pretraining {label} ({params / 1e6:.2f}M parameters) on {corpus.name}; {where}",
            file=sys.stderr,
            flush=True,
        )
    pretrain(
        model,
        corpus.train,
        block_size=config["block_size"],
        progress=label if verbose else False,
        **train,
    )
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.part")  # two processes never clash
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return model
