"""Each compression technique alone, at three levels, on two small LMs; then the searched mix.

    MICROSWEEP_DATA=/work/shared/data python benchmarks/techniques.py            # full (~20 min)
    MICROSWEEP_DATA=/work/shared/data python benchmarks/techniques.py --quick    # smoke (~2 min)

Models (pretrained once, then cached under $MICROSWEEP_CACHE):

- ``lstm``: examples/lstm_ptb.py's word-level LSTM, 2 x 200, embedding 200 tied to the softmax,
  1500 pretraining steps. Only PTB's validation and test splits are at hand, so it TRAINS ON
  ``valid.txt`` and is EVALUATED ON ``test.txt`` (window 35, the model's block size).
- ``gpt``: a char GPT on Tiny Shakespeare (90/10 split), 2 layers, 2 heads, n_embd 64,
  block 64, 800 pretraining steps; window 64.

Both: perplexity on the first 8,192 evaluation tokens in non-overlapping windows, calibration on
the first 2,048 training tokens, exactly as a sweep with ``MicroNet(eval_tokens=8192)`` prepares
them, so the rows and the searched trial are measured alike.

Each technique is applied ALONE and uniformly to the model's compressible matrices (LSTM: the
four gate matrices ``lstm.weight_{ih,hh}_l{0,1}``; GPT: the eight block Linears), plus the tied
embedding ``wte`` where the technique applies to it (sparsity and bits; a tied table takes no
rank, so every rank method leaves it dense):

1. magnitude pruning (unstructured), sparsity 0.5 / 0.7 / 0.9, matrices and wte;
2. block pruning at the same sparsities, 4x4 tiles on the matrices and 1x4 row segments on wte
   (6022 and 65 rows do not split into 4-row tiles), without and with the reweighted
   group-lasso stage (``group_lasso_steps`` of AdamW on the dense model before the blocks are
   chosen; the stage penalises Linears only, so wte is block-pruned by magnitude on the trained
   weights), plus a control at 0.7 that trains the same steps with penalty 0;
3. weight quantization, 8 / 4 / 3 bits per-row symmetric, matrices and wte (and the same with
   the matrices' inputs at 8 bits: MicroNet counts a multiply at the larger of the two widths,
   and the dense model's 16-bit allowance is lost as soon as anything is below 16 bits);
4. low rank, plain truncated SVD, rank 1/2, 1/4, 1/8 of min(out, in) (also activation-scaled
   SVD, which the earlier version of this benchmark measured);
5. low rank, whitened SVD (data-aware: calibration inputs' Gram matrix), same ranks;
6. tensor-train of TT-rank 48 / 24 / 12 (LSTM) or 16 / 8 / 4 (GPT);
7. autoencoder offline compression (codes of the same sizes as 4.'s ranks, one decoder per
   group), with plain SVD at equal counted parameters beside each level;
8. a shared rank-r basis per group (LSTM: ``ih`` = ih_l0 + ih_l1, ``hh`` = hh_l0 + hh_l1;
   GPT: one group per projection across the blocks), same ranks as 4.;
9. recovery fine-tuning of an aggressive pruned setting (sparsity 0.8 on the matrices and wte)
   with cross-entropy (distill_alpha 0) and with distillation from the dense model (alpha 0.7).

Every row reports counted parameters (32-bit equivalents), ops per token, the export payload in
bytes (the model is saved as .msz after `round_to_storage`, so the file holds what was
evaluated), payload / (params x 4), perplexity and the MicroNet score against the dense model's
own count: ``params / dense_params + ops / dense_ops``, so DENSE SCORES 2.0 (lower is better).
Then one sweep per model (sampler "auto", ceiling 1.05 x dense perplexity) over a space that
combines sparsity + bits + rank on the matrices and sparsity + bits on wte; its best feasible
trial is measured and exported the same way. The conclusion compares it with the best single
technique row within the same ceiling. A row that fails records its error; the run goes on.
Torch runs single-threaded by default (``--threads``): on a shared 2-core machine the tiny
matmuls here are no faster with 2 threads and contend with each other.

Writes benchmarks/results/techniques.json (every number) and techniques.md (the tables).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CEILING = 1.05
SPARSITIES = (0.5, 0.7, 0.9)
BITS = (8, 4, 3)
RANK_FRACTIONS = (1 / 2, 1 / 4, 1 / 8)
AGGRESSIVE_SPARSITY = 0.8
BLOCK = (4, 4)
EMBEDDING_BLOCK = (1, 4)


@dataclass
class Setup:
    """One model and everything its rows are measured with."""

    key: str
    title: str
    data_note: str
    corpus: Any
    model: Any  # dense, gate matrices as Linear children (LSTM), eval mode
    window: int
    windows: Any
    calib: Any
    context: float
    matrices: list[str]
    groups: dict[str, str]  # matrix -> group name (shared basis, autoencoder)
    tt_ranks: tuple[int, ...]
    steps: dict[str, Any]
    rules: Callable[[], dict[str, Any]]
    embedding: str = "wte"
    baseline: Any = None
    dense_ppl: float = math.nan
    rows: list[dict[str, Any]] = field(default_factory=list)


# -- models ------------------------------------------------------------------------------------


def _lstm_setup(quick: bool) -> Setup:
    from microsweep import Bits, Rank, Sparsity, data, models

    corpus = data.ptb(train="valid", val="test")
    size = 32 if quick else 200
    model = models.lstm(
        corpus,
        n_embd=size,
        n_hidden=size,
        n_layer=2,
        pretrain_steps=100 if quick else 1500,
        lr=3e-3,
    )
    model = models.linear_gates_(copy.deepcopy(model), ["lstm"]).eval()
    matrices = [f"lstm.weight_{k}_l{i}" for i in range(2) for k in ("ih", "hh")]

    def rules() -> dict[str, Any]:
        gates = dict(
            sparsity=Sparsity(0.0, 0.9, step=0.1),
            bits=Bits(3, 4, 6, 8),
            rank=Rank(0.125, 1.0, method="whiten"),
        )
        return {
            "lstm.weight_ih_l*": gates,
            "lstm.weight_hh_l*": dict(gates),
            "wte": dict(sparsity=Sparsity(0.0, 0.9, step=0.1), bits=Bits(3, 4, 6, 8)),
        }

    return _finish(
        Setup(
            key="lstm",
            title=f"word LSTM 2x{size} tied, PTB",
            data_note="PTB: trained on valid.txt, evaluated on test.txt (only those splits here)",
            corpus=corpus,
            model=model,
            window=35,
            windows=None,
            calib=None,
            context=0.0,
            matrices=matrices,
            groups={n: n.split("_")[1] for n in matrices},  # ih / hh across the two layers
            tt_ranks=(8, 4, 2) if quick else (48, 24, 12),
            steps=_steps(quick),
            rules=rules,
        ),
        quick,
    )


def _gpt_setup(quick: bool) -> Setup:
    from microsweep import Bits, Rank, Sparsity, data, models

    corpus = data.tiny_shakespeare()
    d, block = (32, 32) if quick else (64, 64)
    model = models.gpt(
        corpus,
        n_layer=2,
        n_head=2,
        n_embd=d,
        block_size=block,
        pretrain_steps=100 if quick else 800,
    ).eval()
    kinds = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    matrices = [f"blocks.{b}.{k}" for b in range(2) for k in kinds]

    def rules() -> dict[str, Any]:
        return {
            "blocks.*": dict(
                sparsity=Sparsity(0.0, 0.9, step=0.1),
                bits=Bits(3, 4, 6, 8),
                rank=Rank(0.125, 1.0, method="whiten"),
            ),
            "wte": dict(sparsity=Sparsity(0.0, 0.9, step=0.1), bits=Bits(3, 4, 6, 8)),
        }

    return _finish(
        Setup(
            key="gpt",
            title=f"char GPT 2 layers, n_embd {d}, block {block}, Tiny Shakespeare",
            data_note="Tiny Shakespeare: first 90% train, last 10% evaluation",
            corpus=corpus,
            model=model,
            window=block,
            windows=None,
            calib=None,
            context=0.0,
            matrices=matrices,
            groups={n: n.split(".", 2)[2] for n in matrices},  # one projection across blocks
            tt_ranks=(4, 2, 1) if quick else (16, 8, 4),
            steps=_steps(quick),
            rules=rules,
        ),
        quick,
    )


def _steps(quick: bool) -> dict[str, Any]:
    return {
        "eval_tokens": 1024 if quick else 8192,
        "calib_tokens": 2048,
        "group_lasso": {
            "group_lasso_steps": 5 if quick else 150,
            "group_lasso_lr": 1e-4,
            "group_lasso_penalty": 1e-4,
            "group_lasso_reweight_every": 10,
        },
        "finetune": {"finetune_steps": 5 if quick else 150, "finetune_lr": 1e-3},
        "trials": 8 if quick else 60,
    }


def _finish(s: Setup, quick: bool) -> Setup:
    """Windows, calibration tokens and context exactly as `microsweep.prepare` builds them."""
    from microsweep import Policy
    from microsweep.compress import compress
    from microsweep.score import (
        Baseline,
        count,
        eval_windows,
        mean_context,
        perplexity,
        round_to_storage,
    )

    s.windows = eval_windows(s.corpus.val, window=s.window, max_tokens=s.steps["eval_tokens"])
    n_calib = max(
        1, min(s.steps["calib_tokens"] // s.window, (len(s.corpus.train) - 1) // s.window)
    )
    s.calib = s.corpus.train[: n_calib * s.window].view(n_calib, s.window)
    s.context = mean_context(s.window)
    # the dense model as stored (fp16 under the 16-bit allowance), counted and measured as a
    # sweep measures "dense": fp16 rounding flushes a few tiny weights to zero, which moves the
    # count by an op or two, so the baseline is taken after it (dense scores exactly 2.0)
    dense = compress(s.model, Policy())
    counts = count(dense, context=s.context)
    if counts.freebie:
        round_to_storage(dense, counts)
        counts = count(dense, context=s.context)
    s.baseline = Baseline.from_counts(counts, "dense")
    s.dense_ppl = perplexity(dense, s.windows)
    return s


# -- measuring one row ---------------------------------------------------------------------------


def _measure(
    s: Setup,
    tmp: Path,
    technique: str,
    level: str,
    policy: Any,
    *,
    build: Callable[[], Any] | None = None,
    note: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compress (or `build`), count, round to storage, evaluate, export; never raises."""
    from microsweep.compress import compress
    from microsweep.export import save
    from microsweep.score import count, micronet_score, perplexity, round_to_storage

    row: dict[str, Any] = {
        "model": s.key,
        "technique": technique,
        "level": level,
        "policy": policy.summary(limit=3),
        "note": note,
        **(extra or {}),
    }
    started = time.perf_counter()
    try:
        model = build() if build is not None else compress(s.model, policy, calib=s.calib)
        model.eval()
        row.update(extra or {})  # what `build` learned on the way (e.g. the stage's dense ppl)
        counts = count(model, context=s.context)
        if counts.freebie:  # stored at fp16: evaluate exactly what the file holds
            round_to_storage(model, counts)
            counts = count(model, context=s.context)
        ppl = perplexity(model, s.windows)
        path = tmp / f"{s.key}-{technique}-{level}.msz".replace("/", "_")
        info = save(model, path, policy=policy, recipe=s.model.recipe())
        file_bytes = path.stat().st_size
        path.unlink()
        row.update(
            params=counts.params,
            ops=counts.ops,
            freebie=counts.freebie,
            bytes=info.payload_bytes,
            file_bytes=file_bytes,
            bytes_ratio=info.payload_bytes / (counts.params * 4),
            exact=info.exact,
            perplexity=ppl,
            ppl_rel=ppl / s.dense_ppl,
            score=micronet_score(counts.params, counts.ops, s.baseline),
            within_ceiling=bool(math.isfinite(ppl) and ppl <= CEILING * s.dense_ppl),
        )
    except Exception as exc:  # one failing row is recorded, the run goes on
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
        row["error"] = f"{type(exc).__name__}: {exc}{where}"
    row["seconds"] = round(time.perf_counter() - started, 2)
    _print_row(row)
    s.rows.append(row)
    return row


def _print_row(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"  {r['technique']:<22} {r['level']:<12} ERROR {r['error']}", flush=True)
        return
    print(
        f"  {r['technique']:<22} {r['level']:<12} params {r['params']:>11.1f} ops {r['ops']:>11.1f}"
        f" bytes {r['bytes']:>9} ratio {r['bytes_ratio']:.4f} ppl {r['perplexity']:9.3f}"
        f" ({r['ppl_rel']:.3f}x) score {r['score']:.4f}  [{r['seconds']:.1f}s]",
        flush=True,
    )


def _rank_of(s: Setup, name: str, fraction: float) -> int:
    w = s.model.get_submodule(name).weight
    return max(1, round(fraction * min(w.shape)))


# -- the techniques ------------------------------------------------------------------------------


def _techniques(s: Setup, tmp: Path) -> None:
    from microsweep import LayerPolicy, Policy
    from microsweep.compress import compress, compress_
    from microsweep.score import perplexity
    from microsweep.workers import EvalSettings, TrialRunner

    emb, mats = s.embedding, s.matrices

    def uniform(matrix: LayerPolicy, table: LayerPolicy | None = None, hyper=None) -> Policy:
        layers = {n: matrix for n in mats}
        if table is not None:
            layers[emb] = table
        return Policy(layers=layers, hyper=hyper or {})

    def per_layer(make: Callable[[str], LayerPolicy]) -> Policy:
        return Policy(layers={n: make(n) for n in mats})

    _measure(s, tmp, "dense", "-", Policy())
    for sp in SPARSITIES:
        _measure(
            s,
            tmp,
            "magnitude",
            f"s={sp}",
            uniform(LayerPolicy(sparsity=sp), LayerPolicy(sparsity=sp)),
        )

    runner = TrialRunner(
        s.model,
        s.windows,
        EvalSettings(context=s.context, finetune_block=s.window, seed=0, cache_mb=0),
        calib=s.calib,
        train_tokens=s.corpus.train,
    )
    gl = s.steps["group_lasso"]
    for sp in SPARSITIES:
        mat, tab = (
            LayerPolicy(sparsity=sp, block=BLOCK),
            LayerPolicy(sparsity=sp, block=EMBEDDING_BLOCK),
        )
        policy = uniform(mat, tab)
        _measure(s, tmp, "block", f"s={sp}", policy)
        variants = [("block+group_lasso", gl)]
        if sp == 0.7:  # the same training without the penalty: what the stage adds by itself
            variants.append(("block+train(penalty 0)", {**gl, "group_lasso_penalty": 0.0}))
        for name, hyper in variants:
            stage = Policy(layers={n: mat for n in mats}, hyper=hyper)  # the stage takes Linears
            learned: dict[str, Any] = {}

            def build(stage=stage, policy=policy, learned=learned):
                trained = runner.group_lasso(stage)
                learned["stage_dense_ppl"] = perplexity(trained, s.windows)
                return compress_(trained, policy, calib=s.calib)

            _measure(
                s,
                tmp,
                name,
                f"s={sp}",
                Policy(layers=policy.layers, hyper=hyper),
                build=build,
                extra=learned,
                note="the stage penalises the matrices (it takes Linears only); wte is "
                "block-pruned by magnitude on the trained weights",
            )

    for b in BITS:
        _measure(s, tmp, "quantization", f"w{b}", uniform(LayerPolicy(bits=b), LayerPolicy(bits=b)))
    for b in BITS:  # inputs at 8 bits too: a multiply is counted at the larger of the two widths
        _measure(
            s,
            tmp,
            "quantization+a8",
            f"w{b}a8",
            uniform(LayerPolicy(bits=b, act_bits=8), LayerPolicy(bits=b)),
            note="wte takes no act_bits (its input is token ids)",
        )

    for method, label in (
        ("plain", "lowrank_svd"),
        ("activation", "lowrank_activation"),
        ("whiten", "lowrank_whiten"),
    ):
        for frac in RANK_FRACTIONS:
            policy = per_layer(
                lambda n, f=frac, m=method: LayerPolicy(rank=_rank_of(s, n, f), rank_method=m)
            )
            _measure(s, tmp, label, f"r={frac:g}", policy, extra={"rank_fraction": frac})

    for r in s.tt_ranks:
        _measure(
            s,
            tmp,
            "tensor_train",
            f"tt={r}",
            per_layer(lambda n, r=r: LayerPolicy(rank=r, rank_method="tt")),
        )

    for frac in RANK_FRACTIONS:
        policy = per_layer(
            lambda n, f=frac: LayerPolicy(
                rank=_rank_of(s, n, f), rank_method="autoencoder", group=s.groups[n]
            )
        )
        row = _measure(s, tmp, "autoencoder", f"k={frac:g}", policy, extra={"rank_fraction": frac})
        if "params" in row:  # plain SVD with the uniform rank whose count is nearest the AE's
            rank, params = _svd_rank_at(s, row["params"])
            _measure(
                s,
                tmp,
                "svd_at_ae_params",
                f"k={frac:g}",
                per_layer(lambda n, r=rank: LayerPolicy(rank=r)),
                note=f"plain SVD rank {rank}: {params:.0f} params vs the autoencoder's "
                f"{row['params']:.0f}",
                extra={"rank": rank, "matched_params": row["params"]},
            )

    for frac in RANK_FRACTIONS:
        policy = per_layer(
            lambda n, f=frac: LayerPolicy(
                rank=_rank_of(s, n, f), rank_method="shared", group=s.groups[n]
            )
        )
        _measure(s, tmp, "shared_basis", f"r={frac:g}", policy, extra={"rank_fraction": frac})

    ft = s.steps["finetune"]
    pruned = uniform(
        LayerPolicy(sparsity=AGGRESSIVE_SPARSITY), LayerPolicy(sparsity=AGGRESSIVE_SPARSITY)
    )
    _measure(s, tmp, "distill", "no recovery", pruned)
    for alpha in (0.0, 0.7):
        hyper = {**ft, "distill_alpha": alpha}
        policy = Policy(layers=pruned.layers, hyper=hyper)

        def build(policy=policy, hyper=hyper):
            model = compress(s.model, policy, calib=s.calib)
            runner.finetune(model, hyper)
            return model

        label = "cross-entropy" if alpha == 0 else f"distill a={alpha}"
        _measure(
            s,
            tmp,
            "distill",
            label,
            policy,
            build=build,
            note=f"s={AGGRESSIVE_SPARSITY} everywhere, {ft['finetune_steps']} steps at "
            f"lr {ft['finetune_lr']}",
        )


def _svd_rank_at(s: Setup, target: float) -> tuple[int, float]:
    """The uniform plain-SVD rank whose whole-model count is nearest `target` parameters."""
    from microsweep import LayerPolicy, Policy
    from microsweep.compress import compress
    from microsweep.score import count

    cache: dict[int, float] = {}

    def params(r: int) -> float:
        if r not in cache:
            policy = Policy(layers={n: LayerPolicy(rank=r) for n in s.matrices})
            cache[r] = count(compress(s.model, policy), context=s.context).params
        return cache[r]

    lo, hi = 1, min(min(s.model.get_submodule(n).weight.shape) for n in s.matrices)
    while lo < hi:  # the count rises with the rank: the first rank at or above the target
        mid = (lo + hi) // 2
        if params(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    best = min({max(1, lo - 1), lo}, key=lambda r: abs(params(r) - target))
    return best, params(best)


# -- the searched combination -------------------------------------------------------------------


def _search(s: Setup, tmp: Path, storage_dir: Path, timeout: float | None) -> dict[str, Any]:
    from microsweep import MicroNet, Policy, Space, open_sweep, run_sweep

    storage = f"sqlite:///{storage_dir / 'techniques.db'}"
    name = f"techniques-{s.key}-{int(time.time())}"
    out: dict[str, Any] = {"name": name, "sampler": "auto", "trials": s.steps["trials"]}
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            space = Space(copy.deepcopy(s.model), rules=s.rules())
        out["space"] = {k: {kk: vv.to_json() for kk, vv in v.items()} for k, v in s.rules().items()}
        objective = MicroNet(
            perplexity_ceiling=CEILING,
            relative_to="dense",
            baseline="dense",
            eval_tokens=s.steps["eval_tokens"],
            window=s.window,
        )
        res = run_sweep(
            space,
            objective=objective,
            corpus=s.corpus,
            name=name,
            trials=s.steps["trials"],
            storage=storage,
            sampler="auto",
            seed=0,
            in_process=True,
            progress=False,
            timeout=timeout,
        )
        out.update(
            states=res.states,
            timed_out=res.timed_out,
            sensitivity=res.sensitivity,
            best_uniform_number=res.best_uniform_number,
            best_uniform_score=res.best_uniform_score,
        )
        sweep = open_sweep(name, storage)
        out["dense"] = sweep.dense
        best = sweep.best()
        if best is None:
            out["error"] = "no feasible trial"
        else:
            out["best"] = {
                k: best[k]
                for k in ("trial", "score", "perplexity", "params", "ops", "origin", "policy")
            }
            policy = Policy.from_json(best["policy"])
            row = _measure(s, tmp, "SEARCHED (auto)", f"trial {best['trial']}", policy)
            row["policy"] = policy.summary(limit=20)
            out["row"] = row
        sweep.close()
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


# -- conclusions and tables ---------------------------------------------------------------------


TRAINED = ("distill", "block+group_lasso", "block+train(penalty 0)")
SUMMARY_KEYS = ("technique", "level", "score", "perplexity", "ppl_rel", "params", "ops", "bytes")


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return (
        {k: r[k] for k in SUMMARY_KEYS}
        if (r := min(rows, key=lambda r: r["score"], default=None))
        else None
    )


def _conclude(s: Setup, search: dict[str, Any]) -> dict[str, Any]:
    """The best single-technique row within the ceiling (overall, weights only, without any
    training), the searched trial against it, and the autoencoder against SVD at equal params."""
    singles = [
        r for r in s.rows if "score" in r and r["technique"] not in ("dense", "SEARCHED (auto)")
    ]
    feasible = [r for r in singles if r["within_ceiling"]]
    out: dict[str, Any] = {
        "ceiling_perplexity": CEILING * s.dense_ppl,
        "feasible_single_rows": len(feasible),
        "best_single": _best(feasible),
        "best_single_weights_only": _best(
            [r for r in feasible if r["technique"] != "quantization+a8"]
        ),
        "best_single_without_training": _best(
            [r for r in feasible if r["technique"] not in TRAINED]
        ),
        "failed_rows": [
            f"{r['technique']} {r['level']}: {r['error']}" for r in s.rows if "error" in r
        ],
    }
    ae = {r["level"]: r for r in s.rows if r["technique"] == "autoencoder" and "score" in r}
    svd = {r["level"]: r for r in s.rows if r["technique"] == "svd_at_ae_params" and "score" in r}
    out["autoencoder_vs_svd"] = [
        {
            "level": lv,
            "ae_params": ae[lv]["params"],
            "svd_params": svd[lv]["params"],
            "svd_rank": svd[lv].get("rank"),
            "ae_ppl": ae[lv]["perplexity"],
            "svd_ppl": svd[lv]["perplexity"],
            "ae_score": ae[lv]["score"],
            "svd_score": svd[lv]["score"],
        }
        for lv in ae
        if lv in svd
    ]
    row = search.get("row")
    if row and "score" in row:
        out["searched"] = {k: row[k] for k in SUMMARY_KEYS}
        out["searched_within_ceiling"] = row["within_ceiling"]
        for key in ("best_single", "best_single_weights_only"):
            if out[key]:
                out[f"searched_over_{key}"] = row["score"] / out[key]["score"]
    parts = []
    b = out["best_single"]
    if b:
        parts.append(
            f"best single technique within {CEILING:.2f}x dense perplexity: "
            f"{b['technique']} {b['level']} (score {b['score']:.4f}, ppl {b['perplexity']:.3f})"
        )
        w = out["best_single_weights_only"]
        if w and w["technique"] != b["technique"]:
            parts.append(f"weights only: {w['technique']} {w['level']} (score {w['score']:.4f})")
    else:
        parts.append("no single-technique row is within the ceiling")
    if "searched_over_best_single" in out:
        ratio = out["searched_over_best_single"]
        parts.append(
            f"the searched combination scores {row['score']:.4f} (ppl {row['perplexity']:.3f}) "
            f"= {ratio:.3f}x the best single technique"
            + (
                f" and {out['searched_over_best_single_weights_only']:.3f}x the best "
                "weights-only one"
                if "searched_over_best_single_weights_only" in out
                else ""
            )
        )
    elif search.get("error"):
        parts.append(f"search: {search['error']}")
    out["text"] = "; ".join(parts)
    return out


COLUMNS = (
    "technique",
    "level",
    "params",
    "ops/token",
    "bytes",
    "bytes/(params*4)",
    "ppl",
    "ppl/dense",
    "score",
    "<=1.05x",
)


def _table(s: Setup) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in s.rows:
        if "error" in r:
            lines.append(
                f"| {r['technique']} | {r['level']} | error: {r['error'][:150]} |" + " |" * 7
            )
            continue
        lines.append(
            f"| {r['technique']} | {r['level']} | {r['params']:,.0f} | {r['ops']:,.0f} | "
            f"{r['bytes']:,} | {r['bytes_ratio']:.4f} | {r['perplexity']:.3f} | "
            f"{r['ppl_rel']:.3f} | "
            f"{r['score']:.4f} | {'yes' if r['within_ceiling'] else 'no'} |"
        )
    return "\n".join(lines)


def _notes(s: Setup) -> list[str]:
    notes = []
    for r in s.rows:
        text = r.get("note") or ""
        if "stage_dense_ppl" in r:
            text += f"; dense model after the stage: ppl {r['stage_dense_ppl']:.3f}"
        if text:
            notes.append(f"- {r['technique']} {r['level']}: {text}")
    return notes


def _markdown(result: dict[str, Any], setups: list[Setup]) -> str:
    out = [
        "# Compression techniques, each alone, and the searched combination",
        "",
        "Generated by `benchmarks/techniques.py` "
        + ("(--quick) " if result["quick"] else "")
        + f"in {result['seconds']:.0f} s, torch threads {result['threads']}. "
        "Score = params/dense_params + ops/dense_ops against each model's own dense count "
        "(dense = 2.0, lower is better); params are 32-bit equivalents (the dense model is "
        "counted at 16 bits under the MicroNet allowance, lost once anything is quantized "
        "below 16 bits); ops per token; bytes = .msz export payload; ppl on the evaluation "
        "split; <=1.05x: within the ceiling of 1.05 x dense perplexity.",
        "",
    ]
    for s in setups:
        m = result["models"][s.key]
        out += [
            f"## {s.title}",
            "",
            f"{s.data_note}; {len(s.windows)} windows of {s.window} "
            f"tokens; dense perplexity {s.dense_ppl:.3f}, ceiling {CEILING * s.dense_ppl:.3f}.",
            "",
            _table(s),
            "",
        ]
        notes = _notes(s)
        if notes:
            out += ["Notes:", "", *notes, ""]
        sr = m["search"]
        if "row" in sr:
            uni = sr.get("best_uniform_score")
            trials = sum(sr.get("states", {}).values())
            probes = sr.get("sensitivity", {}).get("probes", "?")
            out += [
                f"Searched: sweep `{sr['name']}` (sampler auto), {trials} "
                f"trials {sr.get('states')}, {sr['seconds']:.0f} s including the sensitivity pass "
                f"({probes} probes); best uniform trial score "
                + (f"{uni:.4f}" if uni is not None else "-")
                + f"; best feasible trial {sr['best']['trial']} (stored score "
                f"{sr['best']['score']:.4f}, ppl {sr['best']['perplexity']:.3f}): "
                f"`{sr['row']['policy']}`.",
                "",
            ]
        elif "error" in sr:
            out += [f"Search: {sr['error']}", ""]
        c = m["conclusion"]
        if c["autoencoder_vs_svd"]:
            out += [
                "Autoencoder vs plain SVD at equal counted params: "
                + "; ".join(
                    f"{a['level']}: AE ppl {a['ae_ppl']:.3f} ({a['ae_params']:,.0f} params, score "
                    f"{a['ae_score']:.4f}) vs SVD r={a['svd_rank']} ppl {a['svd_ppl']:.3f} "
                    f"({a['svd_params']:,.0f}, {a['svd_score']:.4f})"
                    for a in c["autoencoder_vs_svd"]
                )
                + ".",
                "",
            ]
        out += [f"**Conclusion:** {c['text']}.", ""]
    return "\n".join(out) + "\n"


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny models and few tokens: a smoke run"
    )
    parser.add_argument("--models", default="lstm,gpt", help="comma list of lstm, gpt")
    parser.add_argument("--trials", type=int, default=None, help="sweep trials per model")
    parser.add_argument(
        "--sweep-timeout",
        type=float,
        default=None,
        help="seconds per sweep after which no trial starts",
    )
    parser.add_argument("--no-search", action="store_true", help="skip the sweeps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default: "
        "benchmarks/results/techniques.json; with --quick $TMPDIR/techniques-quick.json)",
    )
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    os.environ.setdefault("MICROSWEEP_DATA", str(ROOT.parent / "shared" / "data"))
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    makers = {"lstm": _lstm_setup, "gpt": _gpt_setup}
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    result: dict[str, Any] = {
        "quick": args.quick,
        "threads": args.threads,
        "ceiling": CEILING,
        "score_convention": "params/dense_params + ops/dense_ops with Baseline = the dense "
        "model's own count: dense = 2.0, lower is better",
        "levels": {
            "sparsity": SPARSITIES,
            "bits": BITS,
            "rank_fractions": RANK_FRACTIONS,
            "block": BLOCK,
            "embedding_block": EMBEDDING_BLOCK,
            "aggressive_sparsity": AGGRESSIVE_SPARSITY,
        },
        "models": {},
    }
    setups = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for key in keys:
            t0 = time.perf_counter()
            print(f"== {key}: preparing", flush=True)
            s = makers[key](args.quick)
            if args.trials is not None:
                s.steps["trials"] = args.trials
            print(
                f"== {s.title}: dense perplexity {s.dense_ppl:.3f} on {len(s.windows)} windows",
                flush=True,
            )
            _techniques(s, tmp)
            search = (
                {"skipped": True} if args.no_search else _search(s, tmp, tmp, args.sweep_timeout)
            )
            conclusion = _conclude(s, search)
            print(f"== {s.key}: {conclusion['text']}", flush=True)
            setups.append(s)
            result["models"][key] = {
                "title": s.title,
                "data": s.data_note,
                "window": s.window,
                "eval_windows": len(s.windows),
                "eval_tokens": len(s.windows) * s.window,
                "calib_tokens": int(s.calib.numel()),
                "matrices": s.matrices,
                "groups": s.groups,
                "tt_ranks": s.tt_ranks,
                "steps": s.steps,
                "dense": {
                    "params": s.baseline.params,
                    "ops": s.baseline.ops,
                    "perplexity": s.dense_ppl,
                },
                "rows": s.rows,
                "search": search,
                "conclusion": conclusion,
                "seconds": round(time.perf_counter() - t0, 1),
            }
    result["seconds"] = round(time.perf_counter() - started, 1)
    quick_out = Path(tempfile.gettempdir()) / "techniques-quick.json"
    out = args.out or (quick_out if args.quick else RESULTS / "techniques.json")
    out.write_text(json.dumps(_clean(result), indent=2) + "\n")
    md = _markdown(result, setups)
    out.with_suffix(".md").write_text(md)
    print()
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')} ({result['seconds']:.0f} s)")
    return 0


def _clean(value: Any) -> Any:
    """JSON-ready: non-finite floats as strings (strict JSON has no NaN), tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
