"""What a sweep says while it runs: the start-up line, one line per finished trial with the
time spent on trials and an estimate of the time left, and the set-up notes."""

from __future__ import annotations

import sys
import time
from typing import Any

from microsweep._text import clock as _clock

__all__ = ["Progress", "say", "trial_clock"]


def say(enabled: bool, line: str) -> None:
    """One line on stderr when `enabled` (set-up steps, notes)."""
    if enabled:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class Progress:
    """One line per finished trial (or a rewritten line on a terminal), with the time spent on
    trials and an estimate of the time left from their pace. The clock starts when the first
    trial is dispatched (`start`), so the start-up (dense model, workers, sensitivity pass,
    planning) is reported on its own line and never counted as trial time."""

    def __init__(
        self, total: int, stream: Any = None, enabled: bool = True, first: int = 0
    ) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.first = first  # trials finished before this run (a resume)
        self.started = time.perf_counter()
        self._begun = False

    def start(self, startup: float) -> None:
        """Trials begin now; `startup` seconds went before them (said on one line)."""
        if self._begun:
            return
        self._begun = True
        self.started = time.perf_counter()
        if self.enabled:
            self.stream.write(
                f"start-up took {_clock(startup)} (space, dense model, workers, planning); "
                f"{self.total - self.first} trials to run, timed from here\n"
            )
            self.stream.flush()

    def update(self, done: int, states: dict[str, int], best: float | None, last: str) -> None:
        """The line after a trial finished: count, clock, states, best score, that trial."""
        if not self.enabled:
            return
        parts = " ".join(f"{k}={v}" for k, v in sorted(states.items()))
        best_s = f"{best:.5g}" if best is not None else "-"
        clock = trial_clock(self.started, done - self.first, self.total - done)
        line = f"[{done}/{self.total}] {clock} | {parts} | best feasible score {best_s} | {last}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            if done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def trial_clock(started: float, ran: int, left: int) -> str:
    """The time since the first trial was dispatched ("m:ss elapsed") and the time left at the
    pace of the `ran` trials finished since then (", ETA m:ss")."""
    elapsed = max(0.0, time.perf_counter() - started)
    eta = elapsed / ran * max(left, 0) if ran > 0 else None
    return f"{_clock(elapsed)} elapsed" + (f", ETA {_clock(eta)}" if eta is not None else "")
