"""Built-in pretraining: the thread-count rule and the guard that falls back to one thread, the
torch thread count restored afterwards (also on an error), progress lines with elapsed time and
ETA, and the cache key's training settings. No assert depends on how fast the machine is."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from microsweep import models
from microsweep.errors import UsageError
from microsweep.models import _build
from microsweep.models._build import _clock, _lr_at, _Progress, _ThreadGuard

LINE = re.compile(
    r"^pretrain (?P<label>.+): step (?P<done>\d+)/(?P<steps>\d+) loss (?P<loss>[\d.]+|nan), "
    r"(?P<elapsed>[\d:]+) elapsed, ETA (?P<eta>[\d:]+)$"
)


def _seconds(clock: str) -> int:
    """'1:02' or '1:00:05' back to seconds."""
    total = 0
    for part in clock.split(":"):
        total = 60 * total + int(part)
    return total


def _progress_lines(text: str) -> list[re.Match[str]]:
    return [m for m in map(LINE.match, text.splitlines()) if m is not None]


class ThreadSpy(nn.Module):
    """A per-position MLP LM that records the torch thread count of every forward call and,
    when asked, raises at call `fail_at` (to check the thread count is restored on errors)."""

    def __init__(self, vocab: int, width: int = 16, fail_at: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)
        self.seen: list[int] = []
        self.fail_at = fail_at

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        if self.fail_at is not None and len(self.seen) >= self.fail_at:
            raise RuntimeError("boom")
        return self.head(torch.relu(self.emb(ids)))


@pytest.fixture
def threads_set_to_3():
    """Torch at 3 threads (a value no rule here picks on its own), put back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


# --- the thread-count rule ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("owned", "cores", "load", "want"),
    [
        (2, 2, None, 2),  # one per owned core
        (2, 2, 0.0, 2),
        (2, 2, 0.4, 2),  # background noise rounds away
        (2, 2, 0.6, 1),  # most of a core busy elsewhere: a second thread would fight it
        (2, 2, 1.0, 1),
        (2, 2, 7.5, 1),  # never below one
        (1, 2, 0.0, 1),  # pinned to one core
        (16, 4, 0.0, 4),  # never more than the machine has
        (4, 64, 30.0, 4),  # a big machine's load leaves our cores idle
        (8, 8, 3.2, 5),
        (0, 0, None, 1),
    ],
)
def test_thread_count_rule(owned: int, cores: int, load: float | None, want: int) -> None:
    assert models.thread_count(owned, cores, load) == want


def test_owned_cores_from_affinity_capped_by_cgroup_quota(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(_build, "CGROUP_CPU_MAX", tmp_path / "absent")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert models.owned_cores() == 3
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(_build, "CGROUP_CPU_MAX", quota)
    quota.write_text("150000 100000\n")  # --cpus=1.5: two cores' threads
    assert models.owned_cores() == 2
    quota.write_text("max 100000\n")
    assert models.owned_cores() == 3
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS: every core
    assert models.owned_cores() == 8


def test_pretrain_threads_reads_affinity_cores_and_load(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(_build.PRETRAIN_THREADS_ENV, raising=False)
    monkeypatch.setattr(_build, "CGROUP_CPU_MAX", tmp_path / "absent")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert models.pretrain_threads() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (1.3, 0.5, 0.2))
    assert models.pretrain_threads() == 1

    def no_load() -> tuple[float, float, float]:
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert models.pretrain_threads() == 2


def test_a_fixed_pretrain_thread_count_beats_the_rule(corpus, monkeypatch, threads_set_to_3):
    """$MICROSWEEP_PRETRAIN_THREADS fixes the count (weights then do not depend on the load):
    the rule and the probe are skipped; a value that is no positive int is refused."""
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.9, 1.9))  # the rule would say 1
    monkeypatch.setenv(_build.PRETRAIN_THREADS_ENV, "2")
    assert models.pretrain_threads() == 2
    model = ThreadSpy(corpus.vocab_size)
    models.pretrain(model, corpus.train, steps=3, block_size=16, batch_size=4)
    assert model.seen == [2, 2, 2]  # no one-thread probe first
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(_build.PRETRAIN_THREADS_ENV, bad)
        with pytest.raises(UsageError, match="MICROSWEEP_PRETRAIN_THREADS"):
            models.pretrain_threads()


# --- threads set during training and restored after --------------------------------------


def test_pretrain_trains_on_the_rule_and_restores_threads(corpus, monkeypatch, threads_set_to_3):
    monkeypatch.setattr(_build, "pretrain_threads", lambda: 1)
    model = ThreadSpy(corpus.vocab_size)
    models.pretrain(model, corpus.train, steps=4, block_size=16, batch_size=4)
    assert model.seen == [1] * 4
    assert torch.get_num_threads() == threads_set_to_3
    assert not model.training

    model = ThreadSpy(corpus.vocab_size)
    models.pretrain(model, corpus.train, steps=2, block_size=16, batch_size=4, threads=2)
    assert model.seen == [2, 2] and torch.get_num_threads() == threads_set_to_3


def test_threads_restored_when_training_raises(corpus, monkeypatch, threads_set_to_3):
    monkeypatch.setattr(_build, "pretrain_threads", lambda: 1)
    model = ThreadSpy(corpus.vocab_size, fail_at=3)
    with pytest.raises(RuntimeError, match="boom"):
        models.pretrain(model, corpus.train, steps=10, block_size=16, batch_size=4, progress=True)
    assert model.seen == [1, 1, 1]
    assert torch.get_num_threads() == threads_set_to_3

    monkeypatch.setattr(_build, "pretrain_threads", lambda: 2)  # raising after the probe
    model = ThreadSpy(corpus.vocab_size, fail_at=24)
    with pytest.raises(RuntimeError, match="boom"):
        models.pretrain(model, corpus.train, steps=30, block_size=16, batch_size=4)
    assert len(model.seen) == 24 and model.seen[:22] == [1] * 21 + [2]  # then 2 or 1: load
    assert torch.get_num_threads() == threads_set_to_3


def test_built_in_model_restores_threads_and_caches(corpus, monkeypatch, tmp_path, capsys):
    """models.gpt says what it pretrains and where it caches it, trains on the rule's threads,
    restores the caller's, and a second call loads the cached weights silently."""
    monkeypatch.setenv("MICROSWEEP_CACHE", str(tmp_path))
    monkeypatch.setattr(_build, "pretrain_threads", lambda: 1)
    before = torch.get_num_threads()
    kw = dict(n_layer=1, n_head=1, n_embd=8, block_size=8, pretrain_steps=6, verbose=True)
    model = models.gpt(corpus, **kw)
    err = capsys.readouterr().err
    [cached] = (tmp_path / "models").glob("gpt-*.pt")
    first, second = err.splitlines()[:2]
    assert first.startswith("pretraining gpt 1x8 (") and "M parameters) on tinyshakespeare" in first
    assert first.endswith(f"; cached afterwards in {cached}")
    assert second == "pretrain gpt 1x8: 6 steps of 16 windows of 8 tokens on 1 thread"
    assert [int(m["done"]) for m in _progress_lines(err)] == [1, 2, 3, 4, 5, 6]
    assert torch.get_num_threads() == before
    again = models.gpt(corpus, **kw)
    assert capsys.readouterr().err == ""
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_cache_key_covers_every_training_setting(corpus, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MICROSWEEP_CACHE", str(tmp_path))
    monkeypatch.setattr(_build, "pretrain_threads", lambda: 1)
    base = dict(n_layer=1, n_head=1, n_embd=8, block_size=8, pretrain_steps=3, warmup=2)
    changes = [
        {},
        {"pretrain_steps": 4},
        {"batch_size": 8},
        {"lr": 1e-3},
        {"schedule": "linear"},
        {"warmup": 1},
        {"seed": 1},
    ]
    for change in changes:
        models.gpt(corpus, **{**base, **change})
    assert len(list((tmp_path / "models").glob("gpt-*.pt"))) == len(changes)


# --- the thread guard: a probe on one thread, and a fall-back when more get slow ------------


class FakeTime:
    """A clock that each `tick(seconds)` moves on, and a record of the thread counts set."""

    def __init__(self) -> None:
        self.now = 0.0
        self.set: list[int] = []

    def guard(self, threads: int, adapt: bool = True) -> _ThreadGuard:
        return _ThreadGuard(
            threads, adapt, window=4, clock=lambda: self.now, set_threads=self.set.append
        )


def _run(guard: _ThreadGuard, fake: FakeTime, seconds: list[float]) -> list[str | None]:
    """Step the guard once per entry, each step taking that many seconds."""
    said = []
    for took in seconds:
        fake.now += took
        said.append(guard.step())
    return said


def test_guard_keeps_threads_that_pay() -> None:
    fake = FakeTime()
    guard = fake.guard(2)
    said = _run(guard, fake, [5.0] + [0.10] * 4 + [0.06] * 4 + [0.07] * 40)
    assert fake.set == [1, 2] and guard.adapt and set(said) == {None}


def test_guard_drops_threads_slower_than_one_in_the_probe() -> None:
    """Work started just before training (the load average has not seen it yet): the window on
    2 threads is given up once it has taken as long as the probe's 4 steps on one."""
    fake = FakeTime()
    guard = fake.guard(2)
    said = _run(guard, fake, [5.0] + [0.10] * 4 + [0.30] * 2 + [0.01] * 8)
    assert fake.set == [1, 2, 1] and not guard.adapt
    assert said[6] == "steps on 2 threads ran 3.0x as slow as 1 (other work on the cores)"
    assert said[:6] == [None] * 6 and said[7:] == [None] * 8


def test_guard_drops_threads_when_they_get_slow_later() -> None:
    fake = FakeTime()
    guard = fake.guard(4)
    said = _run(guard, fake, [1.0] + [0.1] * 4 + [0.05] * 8 + [0.14] * 4 + [0.2] * 4 + [0.5] * 8)
    assert said[16] is None  # 2.8x the best: noise, kept
    assert said[20] == "steps on 4 threads ran 4.0x slower than before (other work on the cores)"
    assert fake.set == [1, 4, 1] and [s for s in said if s] == [said[20]]


def test_guard_only_sets_a_given_or_single_thread_count() -> None:
    for threads, adapt in ((2, False), (1, True)):
        fake = FakeTime()
        guard = fake.guard(threads, adapt)
        assert _run(guard, fake, [1.0] + [0.1] * 4 + [9.0] * 12) == [None] * 17
        assert fake.set == [threads]


def test_pretrain_probes_one_thread_then_the_rule(corpus, monkeypatch, threads_set_to_3):
    """The rule's 2 threads: the warm-up step and a window of 20 on 1, then 2 until (as the
    machine's load decides; no timing is asserted) perhaps 1 for good."""
    monkeypatch.delenv(_build.PRETRAIN_THREADS_ENV, raising=False)
    monkeypatch.setattr(_build, "pretrain_threads", lambda: 2)
    model = ThreadSpy(corpus.vocab_size)
    models.pretrain(model, corpus.train, steps=50, block_size=16, batch_size=4)
    assert model.seen[:22] == [1] * 21 + [2]
    assert model.seen[21:] == sorted(model.seen[21:], reverse=True) and min(model.seen) == 1
    assert torch.get_num_threads() == threads_set_to_3
    with pytest.raises(UsageError, match="threads=0"):
        models.pretrain(model, corpus.train, steps=1, block_size=16, threads=0)


# --- progress lines ------------------------------------------------------------------------


def test_progress_lines_of_a_real_run(corpus, capsys) -> None:
    """Parsed lines: every ~5% of 40 steps (each 2nd step) and the last, steps counted right,
    elapsed and ETA never negative, elapsed never going back, the ETA 0 at the end."""
    model = ThreadSpy(corpus.vocab_size)
    models.pretrain(
        model, corpus.train, steps=40, block_size=16, batch_size=4, threads=1, progress="spy 1x16"
    )
    lines = _progress_lines(capsys.readouterr().err)
    done = [int(m["done"]) for m in lines]
    assert set(range(2, 41, 2)) <= set(done) and done == sorted(set(done)) and done[-1] == 40
    assert all(m["label"] == "spy 1x16" and m["steps"] == "40" for m in lines)
    assert all(math.isfinite(float(m["loss"])) for m in lines)
    elapsed = [_seconds(m["elapsed"]) for m in lines]
    etas = [_seconds(m["eta"]) for m in lines]
    assert elapsed == sorted(elapsed) and min(elapsed) >= 0 and min(etas) >= 0
    assert etas[-1] == 0


def test_silent_without_progress(corpus, capsys) -> None:
    models.pretrain(ThreadSpy(corpus.vocab_size), corpus.train, steps=3, block_size=8, threads=1)
    assert capsys.readouterr().err == ""


def test_eta_from_steps_after_the_warm_up_step(capsys) -> None:
    """With a clock that makes the first step take 15 s and each later one 2 s, the ETA is 2 s
    per step left (the warm-up step is not counted), falls to 0, and a line comes every 5%
    of the steps; a long gap between lines brings one early."""
    now = [0.0]
    meter = _Progress("m 1x1", 100, gap=1000.0, clock=lambda: now[0])
    for done in range(1, 101):
        now[0] += 15.0 if done == 1 else 2.0
        meter.step(done, 1.0)
    lines = _progress_lines(capsys.readouterr().err)
    assert [int(m["done"]) for m in lines] == list(range(5, 101, 5))
    etas = [_seconds(m["eta"]) for m in lines]
    assert etas == [2 * (100 - d) for d in range(5, 101, 5)]
    assert etas == sorted(etas, reverse=True) and etas[-1] == 0
    assert [_seconds(m["elapsed"]) for m in lines] == [15 + 2 * (d - 1) for d in range(5, 101, 5)]

    now[0] = 0.0
    slow = _Progress("m 1x1", 100, clock=lambda: now[0])
    now[0] = 25.0
    slow.step(1, 2.0)  # 25 s since the start: a line although 1 is no multiple of 5
    [line] = _progress_lines(capsys.readouterr().err)
    assert line["done"] == "1" and line["eta"] == _clock(25.0 * 99) and line["loss"] == "2.000"


def test_clock_format() -> None:
    assert [_clock(s) for s in (0, 59.4, 61, 3599, 3600, 3725, -3)] == [
        "0:00", "0:59", "1:01", "59:59", "1:00:00", "1:02:05", "0:00",
    ]  # fmt: skip


def test_learning_rate_schedules() -> None:
    """'cosine' is the original rule (warm-up x cosine with a 5% floor); 'linear' peaks after
    the warm-up and falls to 0 after the last step."""
    steps, lr = 200, 3e-3
    for step in (0, 10, 49, 50, 120, 199):
        cosine = max(0.5 * (1 + math.cos(math.pi * step / steps)), 0.05)
        old = lr * cosine * min(1.0, (step + 1) / 50)
        assert _lr_at(step, steps, lr, schedule="cosine", warmup=50) == old
    linear = [_lr_at(s, steps, lr, schedule="linear", warmup=20) for s in range(steps)]
    assert max(linear) == pytest.approx(lr) and linear.index(max(linear)) == 19
    assert linear[-1] == pytest.approx(lr / 180) and all(x > 0 for x in linear)
    with pytest.raises(UsageError, match="unknown schedule"):
        models.pretrain(nn.Linear(1, 1), torch.arange(100), steps=1, block_size=4, schedule="x")
