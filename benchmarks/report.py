"""How long `microsweep report` takes over a 10,000-trial sweep (acceptance: at most 3 s).

    python benchmarks/report.py                       # both cases on SQLite
    python benchmarks/report.py --cases tiny --postgres --profile
    python benchmarks/report.py --screenshot          # only benchmarks/results/report.png

The store is real and filled fast: a real tiny sweep (examples/tiny.py, 3 trials, random
sampler, in-process) gives a sweep row, the dense model's per-layer counts and the shape of real
trial and per-layer rows. Each case then gets its own sweep row holding those real trials (case
``tiny``) and synthetic ones up to `--trials`, bulk-inserted with SQLAlchemy Core into
microsweep's tables (the report reads no Optuna table):

- settings drawn per target layer from the rules in the sweep's ``space_json`` (sparsity grid,
  bit-widths, activation bits, ranks as fractions of each layer's full rank; tied rules share
  one value), around a per-trial aggressiveness, so the front and the histories look searched;
- per-layer rows as the counter writes them: every counted module, a factorized layer as its
  ``low_rank`` row plus ``.first`` and ``.second``; params and ops scaled from the dense row by
  sparsity, bit-widths and rank; a trial's totals are the sums of its rows, and its summary
  per target layer (`layer_counts`, what the report reads) is packed as `Store.record_trial`
  packs it;
- perplexity from a per-layer damage model scaled so about half the trials meet the ceiling;
  states COMPLETE (feasible or not), PRUNED (stopped early at a projected perplexity, with the
  reason the driver writes) and FAIL (a reason, no layers), the auto sampler's origins,
  policies and summaries written by `Policy`, timings, workers;
- a synthetic sensitivity table (every target layer, knob and level) under a key of its own,
  so the page has all six figures.

Case ``gpt48`` is a 12-block GPT (48 target Linears and the head; its dense rows counted by the
real counter on the untrained model, its space built by `Space` with the tiny file's rules).

Timed: `write_report` end to end (median of `--runs`, a fresh `Store` each run, as the command
builds one), its parts (reading: `report_data` and inside it `store.trials`, `pareto_data`,
`layer_table`, the sensitivity table; drawing: `figures`; rendering: `to_html` of every
figure), and once the `microsweep report` command itself in a fresh process (imports
included). Writes benchmarks/results/report.json.

`--screenshot` instead runs the browser test (tests/test_report_browser.py: a real tiny sweep's
page in headless Chromium, showing a clicked trial) with MICROSWEEP_REPORT_SCREENSHOT set, so
its screenshot lands in benchmarks/results/report.png; the test alone writes only under its
tmp_path.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "benchmarks" / "results" / "report.png"
TARGET_SECONDS = 3.0
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

# the auto sampler's origins and how often each proposes a trial
ORIGINS = (("local", 0.4), ("allocation", 0.25), ("tpe-allocation", 0.2), ("refit", 0.12))
FAIL_REASONS = (
    "RuntimeError: probability tensor contains either `inf`, `nan` or element < 0",
    "interrupted: the driver stopped while the trial ran",
    "WorkerError: the worker died (exit code 137: out of memory?)",
)
# relative damage (NLL units before scaling) per bit-width of weights and inputs
BIT_DAMAGE = {32: 0.0, 16: 0.0004, 8: 0.003, 6: 0.012, 4: 0.05, 3: 0.15, 2: 0.4}


# -- the real base sweep and the cases ---------------------------------------------------------
def base_sweep(url: str) -> dict[str, Any]:
    """Run a real 3-trial tiny sweep into `url`; return its sweep row's fields."""
    from sqlalchemy import select

    from microsweep.search import run_sweep
    from microsweep.storage import Store
    from microsweep.storage._models import SweepRow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_sweep(
            str(ROOT / "examples" / "tiny.py"), name="base", trials=3, storage=url,
            sampler="random", seed=0, in_process=True, progress=False,
        )  # fmt: skip
    store = Store(url)
    with store.session() as s:
        row = s.execute(select(SweepRow.__table__).where(SweepRow.name == "base")).one()
    store.dispose()
    return dict(row._mapping)


def real_trials(url: str, sweep_id: int) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The base sweep's stored trials and their per-layer rows, as plain column dicts."""
    from sqlalchemy import select

    from microsweep.storage import Store
    from microsweep.storage._models import LayerRow, TrialRow

    store = Store(url)
    out = []
    with store.session() as s:
        trials = s.execute(
            select(TrialRow.__table__)
            .where(TrialRow.sweep_id == sweep_id)
            .order_by(TrialRow.number)
        ).all()
        for t in trials:
            layers = s.execute(
                select(LayerRow.__table__).where(LayerRow.trial_id == t.id).order_by(LayerRow.id)
            ).all()
            out.append((dict(t._mapping), [dict(r._mapping) for r in layers]))
    store.dispose()
    return out


def linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of every Linear in `model`, by name."""
    from torch import nn

    return {
        n: (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


def gpt48_case(base: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
    """Sweep fields of a 12-block GPT under the tiny file's rules: space by `Space`, dense
    rows by the real counter on the untrained model."""
    from microsweep import Bits, Float, Rank, Space, Sparsity
    from microsweep.models import build
    from microsweep.score import count, mean_context

    recipe = {
        "builder": "gpt",
        "config": {
            "vocab_size": 65, "block_size": 32, "n_layer": 12, "n_head": 2, "n_embd": 64,
            "bias": True,
        },
    }  # fmt: skip
    model = build(recipe)
    rules = {
        "blocks.*.attn.*": dict(sparsity=Sparsity(0.0, 0.8, step=0.1), bits=Bits(4, 8, 16, 32)),
        "blocks.*.mlp.*": dict(
            sparsity=Sparsity(0.0, 0.9, step=0.1),
            bits=Bits(4, 8, 32),
            act_bits=Bits(8, 32),
            rank=Rank(0.25, 1.0),
        ),
        "head": dict(bits=Bits(6, 8, 32), tied=True),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = Space(model, rules=rules, hyper={"finetune_lr": Float(1e-5, 1e-3, log=True)})
    counts = count(model, context=mean_context(32))
    fields = {
        **base,
        "space_json": space.to_json(),
        "model_recipe": recipe,
        "dense_layers": [layer.to_json() for layer in counts.layers],
        "dense_params": counts.params,
        "dense_ops": counts.ops,
        "baseline_params": counts.params,
        "baseline_ops": counts.ops,
    }
    return fields, linear_shapes(model)


# -- synthetic trials --------------------------------------------------------------------------
class Synth:
    """Draws trials for one sweep: settings from its rules, per-layer rows scaled from its
    dense rows, a damage model for perplexity."""

    def __init__(
        self, fields: dict[str, Any], shapes: dict[str, tuple[int, int]], seed: int
    ) -> None:
        self.rng = random.Random(seed)
        self.fields = fields
        self.shapes = shapes
        self.rules = fields["space_json"]["rules"]
        self.hyper = fields["space_json"].get("hyper") or {}
        self.dense = fields["dense_layers"]
        self.owner: dict[str, dict[str, Any]] = {}  # target layer -> its rule
        for rule in self.rules:
            for name in rule["layers"]:
                self.owner.setdefault(name, rule)
        self.weight = {name: self.rng.lognormvariate(0.0, 0.6) for name in self.owner}
        self.dense_nll = math.log(fields["dense_perplexity"])
        self.ceiling = fields["ceiling"]
        self.scale = 1.0
        self.scale = self._calibrate()

    # settings ---------------------------------------------------------------------------------
    def _level(self, knob: dict[str, Any], q: float, full: int) -> Any:
        """A value of `knob`; q in 0..1 is how hard to compress."""
        kind = knob["knob"]
        if kind == "Sparsity":
            low, high, step = knob["low"], knob["high"], knob.get("step")
            value = low + q * (high - low)
            if step:
                value = low + round((value - low) / step) * step
            return round(value, 4)
        if kind == "Bits":
            choices = sorted(knob["choices"], reverse=True)  # 32 (off) first
            return choices[min(len(choices) - 1, int(q * len(choices)))]
        if kind == "Rank":
            if knob.get("values"):
                values = sorted(knob["values"], reverse=True)
                return min(full, values[min(len(values) - 1, int(q * len(values)))])
            fraction = knob["high"] - q * (knob["high"] - knob["low"])
            return max(1, min(full, round(fraction * full)))
        raise ValueError(f"unknown knob {kind}")

    def policy(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any], float]:
        """Per-layer settings (non-default only), hyperparameters and the aggressiveness."""
        rng = self.rng
        aggressive = rng.betavariate(2.0, 2.5)
        tied: dict[tuple[int, str], Any] = {}
        layers: dict[str, dict[str, Any]] = {}
        for name, rule in self.owner.items():
            full = min(self.shapes.get(name, (1, 1)))
            out: dict[str, Any] = {}
            for knob_name, knob in rule["settings"].items():
                key = (id(rule), knob_name)
                if rule.get("tied") and key in tied:
                    value = tied[key]
                else:
                    q = min(1.0, max(0.0, rng.gauss(aggressive, 0.22)))
                    if knob_name == "rank" and rng.random() < 0.5:
                        q = -1.0  # half the layers keep their full rank
                    value = None if q < 0 else self._level(knob, q, full)
                    tied[key] = value
                default = {"sparsity": 0.0, "bits": 32, "act_bits": 32, "rank": None}[knob_name]
                if value is not None and value != default:
                    out[knob_name] = value
            layers[name] = out
        hyper = {}
        for key, knob in self.hyper.items():
            if knob["knob"] == "Float" and knob.get("log"):
                lo, hi = math.log(knob["low"]), math.log(knob["high"])
                hyper[key] = math.exp(rng.uniform(lo, hi))
            elif knob["knob"] in ("Float", "Int"):
                hyper[key] = rng.uniform(knob["low"], knob["high"])
            else:
                hyper[key] = rng.choice(knob["choices"])
        return layers, hyper, aggressive

    def damage(self, layers: dict[str, dict[str, Any]]) -> float:
        """NLL increase (before scaling) of a policy: each layer's knobs, weighted per layer."""
        total = 0.0
        for name, lp in layers.items():
            full = max(1, min(self.shapes.get(name, (1, 1))))
            d = 0.5 * lp.get("sparsity", 0.0) ** 3
            d += BIT_DAMAGE.get(lp.get("bits", 32), 0.02)
            d += 0.5 * BIT_DAMAGE.get(lp.get("act_bits", 32), 0.02)
            if lp.get("rank") is not None:
                d += 0.2 * (1.0 - lp["rank"] / full) ** 2
            total += self.weight[name] * d
        return total

    def _calibrate(self) -> float:
        """The damage scale that puts the median policy at the ceiling."""
        state = self.rng.getstate()
        samples = sorted(self.damage(self.policy()[0]) for _ in range(400))
        self.rng.setstate(state)
        budget = math.log(self.ceiling) - self.dense_nll if self.ceiling else 0.1
        return budget / max(samples[len(samples) // 2], 1e-9)

    # rows -------------------------------------------------------------------------------------
    def layer_rows(self, layers: dict[str, dict[str, Any]], freebie: bool) -> list[dict[str, Any]]:
        """The per-layer rows the counter would write for this policy."""
        rows = []
        for d in self.dense:
            name = d["name"]
            base = {
                "layer": name, "kind": d["kind"], "sparsity": d.get("sparsity"),
                "bits": d.get("bits"), "act_bits": d.get("act_bits"), "rank": None,
                "params": float(d["params"]), "mask_bits": 0.0, "mults": float(d["mults"]),
                "adds": float(d["adds"]), "others": float(d["others"]), "ops": float(d["ops"]),
            }  # fmt: skip
            if name not in self.owner:
                if not freebie:  # fp16 allowance lost: stored values count at 32 bits
                    base["params"] *= 2.0
                rows.append(base)
                continue
            lp = layers.get(name, {})
            s, bits, act = lp.get("sparsity", 0.0), lp.get("bits", 32), lp.get("act_bits", 32)
            width = min(bits, 16) if freebie else bits
            kept = (1.0 - s) * width / 16.0
            op_scale = (1.0 - s) * (0.5 + 0.5 * min(bits, act) / 32.0)
            mask = (self.shapes[name][0] * self.shapes[name][1] / 32.0) if s else 0.0
            if lp.get("rank") is None:
                rows.append(
                    {
                        **base, "kind": "compressed_linear" if lp else d["kind"], "sparsity": s,
                        "bits": bits, "act_bits": act, "params": base["params"] * kept + mask,
                        "mask_bits": 32.0 * mask, "mults": base["mults"] * op_scale,
                        "adds": base["adds"] * op_scale, "ops": base["ops"] * op_scale,
                    }
                )  # fmt: skip
                continue
            n_in, n_out = self.shapes[name]
            r = lp["rank"]
            rows.append(
                {
                    **base, "kind": "low_rank", "sparsity": s or None, "bits": None,
                    "act_bits": None, "rank": r, "params": 0.0, "mults": 0.0, "adds": 0.0,
                    "others": 0.0, "ops": 0.0,
                }
            )  # fmt: skip
            for part, share, act_bits in (
                ("first", r * n_in, act),
                ("second", r * n_out, 32),
            ):
                f = share / (n_in * n_out)
                rows.append(
                    {
                        **base, "layer": f"{name}.{part}", "kind": "compressed_linear",
                        "sparsity": s * (1 + self.rng.uniform(-1e-3, 1e-3)), "bits": bits,
                        "act_bits": act_bits, "params": base["params"] * kept * f + mask * f,
                        "mask_bits": 32.0 * mask * f, "mults": base["mults"] * op_scale * f,
                        "adds": base["adds"] * op_scale * f, "ops": base["ops"] * op_scale * f,
                    }
                )  # fmt: skip
        return rows

    def trial(self, number: int, when: datetime) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One finished trial (row fields without ids) and its per-layer rows."""
        from microsweep import LayerPolicy, Policy

        rng = self.rng
        layers, hyper, _ = self.policy()
        policy = Policy(layers={n: LayerPolicy(**lp) for n, lp in layers.items()}, hyper=hyper)
        origin = rng.choices([o for o, _ in ORIGINS], [w for _, w in ORIGINS])[0]
        if number < 4:
            origin = "uniform"
        compute = rng.uniform(0.02, 0.06)
        timings = {
            "compress": compute * 0.25, "count": compute * 0.3, "evaluate": compute * 0.45,
            "total": compute, "sampler": rng.uniform(1e-4, 3e-3), "driver": rng.uniform(8e-4, 2e-3),
        }  # fmt: skip
        row: dict[str, Any] = {
            "number": number, "origin": origin, "worker": f"node-{number % 4} pid 41{number % 4}",
            "policy": policy.to_json(), "summary": policy.summary(), "timings": timings,
            "count_config": self.fields.get("_count_config"), "finished_at": when,
            "reason": None,
        }  # fmt: skip
        if rng.random() < 0.02:
            reason = rng.choice(FAIL_REASONS)
            row.update(
                state="FAIL", reason=reason, score=None, perplexity=None, params=None,
                ops=None, feasible=None, freebie=None,
            )  # fmt: skip
            return row, []
        freebie = all(
            lp.get("bits", 32) >= 16 and lp.get("act_bits", 32) >= 16 for lp in layers.values()
        )
        rows = self.layer_rows(layers, freebie)
        params = sum(r["params"] for r in rows)
        ops = sum(r["ops"] for r in rows)
        score = params / self.fields["baseline_params"] + ops / self.fields["baseline_ops"]
        nll = self.dense_nll + self.scale * self.damage(layers) + rng.gauss(0.0, 0.004)
        ppl = math.exp(nll)
        feasible = self.ceiling is None or ppl <= self.ceiling
        row.update(
            state="COMPLETE", score=score, perplexity=ppl, params=params, ops=ops,
            feasible=feasible, freebie=freebie,
        )  # fmt: skip
        if not feasible and rng.random() < 0.45:  # stopped early at a projected perplexity
            read = rng.choice((16, 24, 32, 40))
            row.update(
                state="PRUNED",
                perplexity=ppl * rng.uniform(0.99, 1.03),
                reason=f"stopped after {read}/64 windows: perplexity heading for {ppl:.4g} "
                f"(at best {ppl * 0.98:.4g}), ceiling {self.ceiling:.4g}",
            )
            timings["evaluate_saved"] = timings["evaluate"] * (64 - read) / 64
        return row, rows

    def sensitivity(self, eval_key: str, label: str, when: datetime) -> list[dict[str, Any]]:
        """A sensitivity table: every target layer alone at each level of each knob."""
        common = {
            "eval_key": eval_key, "model_fingerprint": self.fields["model_fingerprint"],
            "data_fingerprint": self.fields["data_fingerprint"], "label": label,
            "created_at": when, "seconds": 0.03,
        }  # fmt: skip
        dense_ppl = self.fields["dense_perplexity"]
        out = [
            {**common, "layer": "", "knob": "dense", "level": "", "value": 0.0,
             "nll": self.dense_nll, "perplexity": dense_ppl, "params": None, "ops": None}
        ]  # fmt: skip
        for name, rule in self.owner.items():
            full = min(self.shapes.get(name, (1, 1)))
            for knob_name, knob in rule["settings"].items():
                if knob["knob"] == "Sparsity":
                    step = knob.get("step") or 0.1
                    levels = [
                        round(knob["low"] + k * step, 4)
                        for k in range(1, int(round((knob["high"] - knob["low"]) / step)) + 1)
                    ]
                elif knob["knob"] == "Bits":
                    levels = [b for b in knob["choices"] if b < 32]
                else:
                    levels = sorted({self._level(knob, k / 9, full) for k in range(10)})
                for level in levels:
                    lp = {knob_name: level}
                    nll = self.dense_nll + self.scale * self.damage({name: lp})
                    out.append(
                        {
                            **common, "layer": name, "knob": knob_name, "level": str(level),
                            "value": float(level), "nll": nll, "perplexity": math.exp(nll),
                            "params": self.fields["dense_params"] * 0.98,
                            "ops": self.fields["dense_ops"] * 0.98,
                        }
                    )  # fmt: skip
        return out


def synthetic_sweep(
    fields: dict[str, Any],
    shapes: dict[str, tuple[int, int]],
    real: list[tuple[dict[str, Any], list[dict[str, Any]]]],
    trials: int,
    seed: int,
) -> tuple[list[tuple[dict[str, Any], list[dict[str, Any]]]], list[dict[str, Any]]]:
    """`trials` trials (the real ones first) and a sensitivity table for one case."""
    synth = Synth(fields, shapes, seed)
    start = datetime(2026, 1, 1, 12, 0, 0)
    out = [
        ({k: v for k, v in t.items() if k not in ("id", "sweep_id")},
         [{k: v for k, v in r.items() if k not in ("id", "trial_id")} for r in rows])
        for t, rows in real
    ]  # fmt: skip
    for number in range(len(out), trials):
        out.append(synth.trial(number, start + timedelta(seconds=2 * number)))
    return out, synth.sensitivity(fields["eval_key"], fields["name"], start)


# -- filling and timing a store ----------------------------------------------------------------
def _chunks(rows: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def fill(
    url: str,
    fields: dict[str, Any],
    trials: list[tuple[dict[str, Any], list[dict[str, Any]]]],
    sensitivity: list[dict[str, Any]],
) -> dict[str, Any]:
    """Create the case's sweep row and bulk-insert its trials, layers and sensitivity rows."""
    from sqlalchemy import func, insert, select, text

    from microsweep.storage import Store
    from microsweep.storage._models import LayerRow, SensitivityRow, TrialRow
    from microsweep.storage._summary import pack_layer_counts

    store = Store(url)
    sweep_fields = {
        k: v
        for k, v in fields.items()
        if k not in ("id", "created_at", "summary_layers") and not k.startswith("_")
    }  # the summary's layers come from this case's space, as for a sweep that runs
    sweep_fields.update(owner=None, lease_until=None, target_trials=len(trials))
    sweep = store.create_sweep(**sweep_fields)
    names = sweep.summary_layers
    t0 = time.perf_counter()
    with store.engine.begin() as conn:
        trial_id = conn.scalar(select(func.coalesce(func.max(TrialRow.id), 0)))
        layer_id = conn.scalar(select(func.coalesce(func.max(LayerRow.id), 0)))
        trial_rows, layer_rows = [], []
        for t, rows in trials:
            trial_id += 1
            # each trial's counts per target layer, as `Store.record_trial` writes them
            counts = pack_layer_counts(names, ((r["layer"], r["params"], r["ops"]) for r in rows))
            trial_rows.append({**t, "id": trial_id, "sweep_id": sweep.id, "layer_counts": counts})
            for r in rows:
                layer_id += 1
                layer_rows.append({**r, "id": layer_id, "trial_id": trial_id})
        for chunk in _chunks(trial_rows, 2000):
            conn.execute(insert(TrialRow.__table__), chunk)
        for chunk in _chunks(layer_rows, 50_000):
            conn.execute(insert(LayerRow.__table__), chunk)
        conn.execute(insert(SensitivityRow.__table__), sensitivity)
        if conn.dialect.name == "postgresql":  # explicit ids: move the sequences past them
            for table in ("microsweep_trials", "microsweep_layers"):
                conn.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))"
                    )
                )
    if url.startswith("sqlite"):
        with store.engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    store.dispose()
    return {
        "trials": len(trial_rows),
        "layer_rows": len(layer_rows),
        "sensitivity_rows": len(sensitivity),
        "fill_seconds": round(time.perf_counter() - t0, 2),
    }


def remove(url: str, name: str, eval_key: str) -> None:
    """Delete a case's rows (PostgreSQL is shared; SQLite goes with its temp dir)."""
    from sqlalchemy import delete, select

    from microsweep.storage import Store
    from microsweep.storage._models import LayerRow, SensitivityRow, SweepRow, TrialRow

    store = Store(url)
    with store.engine.begin() as conn:
        sweep_id = conn.scalar(select(SweepRow.id).where(SweepRow.name == name))
        ids = select(TrialRow.id).where(TrialRow.sweep_id == sweep_id)
        conn.execute(delete(LayerRow).where(LayerRow.trial_id.in_(ids)))
        conn.execute(delete(TrialRow).where(TrialRow.sweep_id == sweep_id))
        conn.execute(delete(SensitivityRow).where(SensitivityRow.eval_key == eval_key))
        conn.execute(delete(SweepRow).where(SweepRow.id == sweep_id))
    store.dispose()


def _payload(data: Any) -> str:
    """The per-layer JSON the page embeds for its script."""
    from microsweep.report import _page

    make = getattr(_page, "page_payload", None)  # newer pages; older ones sent the table
    payload = make(data.layers) if make is not None else data.layers.to_json()
    return json.dumps(payload, separators=(",", ":"))


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(url: str, name: str, out_dir: Path, runs: int, profile: bool) -> dict[str, Any]:
    """Time `write_report` (median of `runs`, fresh Store each) and its parts; once the
    command in a fresh process."""
    from microsweep.report import _pareto as pareto_module
    from microsweep.report import (
        figures,
        importances,
        layer_table,
        pareto_data,
        report_data,
        write_report,
    )
    from microsweep.report._sensitivity import figure as sensitivity_figure
    from microsweep.report._sensitivity import sensitivity_data
    from microsweep.storage import Store

    def fresh() -> Store:
        return Store(url, must_exist=True)

    page = out_dir / f"{name}.html"
    write_report(fresh(), name, page)  # warm: imports, plotly's templates, the OS file cache
    totals = []
    for _ in range(runs):
        store = fresh()
        seconds, _ = _timed(lambda s=store: write_report(s, name, page))
        store.dispose()
        totals.append(seconds)

    def median(fn: Callable[[Store], Any]) -> float | str:
        """Median seconds of `fn` on a fresh Store, or why it could not run (the report's
        internals change; end-to-end figures do not depend on them)."""
        times = []
        try:
            for _ in range(runs):
                store = fresh()
                times.append(_timed(lambda s=store: fn(s))[0])
                store.dispose()
        except (AttributeError, TypeError, ImportError) as exc:
            return f"unavailable: {type(exc).__name__}: {exc}"
        return round(statistics.median(times), 4)

    store = fresh()
    data = report_data(store, name)
    sweep = store.get_sweep(name)
    figs = figures(data)
    complete = data.pareto.points
    records = getattr(pareto_module, "trial_records", None)  # one read shared by the parts
    parts: dict[str, Any] = {
        "report_data": median(lambda s: report_data(s, name)),
        "trials_read": median(
            lambda s: records(s, name) if records is not None else s.trials(name)
        ),
        "pareto_data": median(lambda s: pareto_data(s, name)),
        "layer_table": median(lambda s: layer_table(s, name)),
        "importances": median(
            lambda _s: importances(
                data.layers,
                {p.number: p.score for p in complete},
                {p.number: p.perplexity for p in complete},
                {},
            )
        ),
        "sensitivity_data": median(
            lambda s: sensitivity_data(s, sweep.eval_key, ceiling=sweep.ceiling)
        ),
        "figures": median(lambda _s: figures(data)),
        "sensitivity_figure": median(lambda _s: sensitivity_figure(data.sensitivity)),
        "to_html": {
            key: round(
                _timed(
                    lambda f=fig, k=key: f.to_html(
                        include_plotlyjs=k == "pareto",
                        full_html=False,
                        div_id=f"ms-{k}",
                        validate=False,
                    )  # fmt: skip
                )[0],
                4,
            )
            for key, fig in figs.items()
        },
        "payload_json": median(lambda _s: _payload(data)),
    }
    store.dispose()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "microsweep.cli", "report", "--name", name, "--storage", url,
         "-o", str(out_dir / f"{name}-cli.html")],
        capture_output=True, text=True, env=os.environ.copy(), check=False,
    )  # fmt: skip
    cli_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"microsweep report failed: {proc.stderr}")
    result: dict[str, Any] = {
        "build_seconds_median": round(statistics.median(totals), 4),
        "build_seconds_runs": [round(t, 4) for t in totals],
        "cli_seconds": round(cli_seconds, 3),
        "parts": parts,
        "page_bytes": page.stat().st_size,
        "layer_json_bytes": len(_payload(data)),
        "points": len(data.pareto.points),
        "front": len(data.pareto.front),
        "states": data.pareto.states,
        "figures": sorted(figs),
    }
    if profile:
        prof = cProfile.Profile()
        store = fresh()
        prof.runcall(write_report, store, name, page)
        store.dispose()
        text_out = io.StringIO()
        pstats.Stats(prof, stream=text_out).sort_stats("cumulative").print_stats(40)
        print(text_out.getvalue())
        stats = pstats.Stats(prof)
        top = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:25]  # type: ignore[attr-defined]
        result["profile_cumulative_top"] = [
            {"function": f"{Path(f).name}:{line}({fn})", "calls": nc, "cumtime": round(ct, 4)}
            for (f, line, fn), (_cc, nc, _tt, ct, _callers) in top
        ]
    return result


def machine() -> dict[str, Any]:
    """Where and on what the figures were taken: the commit (and whether microsweep/report had
    uncommitted changes), the machine, and its load (whether it was shared)."""
    import importlib.metadata as md

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "report_code_changed": bool(git("status", "--porcelain", "microsweep/report")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "sqlalchemy": md.version("sqlalchemy"),
        "plotly": md.version("plotly"),
    }


def screenshot(path: Path) -> None:
    """Refresh the page's screenshot at `path` through the browser test, which writes it only
    when MICROSWEEP_REPORT_SCREENSHOT names a file (so `make test` leaves the tracked one)."""
    env = {
        **os.environ,
        "MICROSWEEP_REPORT_SCREENSHOT": str(path.resolve()),
        "MICROSWEEP_REQUIRE_BROWSER": "1",
    }
    test = ROOT / "tests" / "test_report_browser.py"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
        cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"the browser test failed (exit {proc.returncode}); {path} unchanged")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--cases", default="tiny,gpt48", help="tiny (9 layers), gpt48 (49)")
    parser.add_argument("--runs", type=int, default=3, help="write_report runs (median)")
    parser.add_argument("--postgres", action="store_true", help=f"also on {POSTGRES_URL}")
    parser.add_argument("--profile", action="store_true", help="cProfile one build per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "report.json"))
    parser.add_argument("--keep", help="a folder to keep the SQLite store and pages in")
    parser.add_argument(
        "--screenshot",
        nargs="?",
        const=str(SCREENSHOT),
        help=f"only write the report page's screenshot (default {SCREENSHOT.relative_to(ROOT)})",
    )
    args = parser.parse_args()
    os.environ.setdefault("MICROSWEEP_DATA", str(ROOT.parent / "shared" / "data"))
    if args.screenshot:
        screenshot(Path(args.screenshot))
        return

    from microsweep.models import build
    from microsweep.report._layers import target_layers

    results: dict[str, Any] = {
        "target_seconds": TARGET_SECONDS,
        "runs": args.runs,
        "machine": machine(),
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(args.keep or tmp)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        for leftover in tmp_dir.glob("report.db*"):  # a kept folder: start from nothing
            leftover.unlink()
        sqlite_url = f"sqlite:///{tmp_dir / 'report.db'}"
        t0 = time.perf_counter()
        base = base_sweep(sqlite_url)
        real = real_trials(sqlite_url, base["id"])
        print(f"base sweep: {len(real)} real trials in {time.perf_counter() - t0:.1f}s")
        base["_count_config"] = next((t["count_config"] for t, _ in real), None)
        urls = [("sqlite", sqlite_url)] + ([("postgresql", POSTGRES_URL)] if args.postgres else [])
        for case in args.cases.split(","):
            if case == "tiny":
                fields = dict(base)
                shapes = linear_shapes(build(base["model_recipe"]))
                case_real = real
            elif case == "gpt48":
                fields, shapes = gpt48_case(base)
                case_real = []
            else:
                raise SystemExit(f"unknown case {case!r}; use tiny or gpt48")
            fields["name"] = f"bench-{case}-{uuid.uuid4().hex[:6]}"
            fields["eval_key"] = f"synthetic-{case}-{uuid.uuid4().hex[:12]}"
            fields["target_trials"] = args.trials
            t0 = time.perf_counter()
            trials, sensitivity = synthetic_sweep(fields, shapes, case_real, args.trials, args.seed)
            generate = time.perf_counter() - t0
            for backend, url in urls:
                filled = fill(url, fields, trials, sensitivity)
                try:
                    timing = measure(url, fields["name"], tmp_dir, args.runs, args.profile)
                finally:
                    if backend == "postgresql":
                        remove(url, fields["name"], fields["eval_key"])
                row = {
                    "backend": backend,
                    "target_layers": len(target_layers(fields["space_json"])[0]),
                    **filled,
                    "generate_seconds": round(generate, 2),
                    **timing,
                }
                row["met"] = row["build_seconds_median"] <= TARGET_SECONDS
                results["cases"][f"{case}/{backend}"] = row
                print(
                    f"{case}/{backend}: {row['trials']} trials, {row['layer_rows']} layer rows, "
                    f"{row['target_layers']} target layers: build {row['build_seconds_median']}s "
                    f"(command {row['cli_seconds']}s), page {row['page_bytes'] / 1e6:.1f} MB, "
                    f"met={row['met']}; parts {json.dumps(row['parts'])}"
                )
    results["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    first = next(iter(results["cases"].values()), None)
    if first is not None:  # the acceptance case in the top-level keys: 10,000 trials, SQLite
        for key in ("trials", "layer_rows", "build_seconds_median", "page_bytes", "parts"):
            results[key] = first[key]
        results["met"] = all(c["met"] for c in results["cases"].values())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
