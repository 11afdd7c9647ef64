"""Each compression technique alone, at three levels, on two small LMs; then the searched mix;
then the plain and data-aware pruning and quantization methods at equal settings on three LMs.

    MICROSWEEP_DATA=/work/shared/data python benchmarks/techniques.py            # full (~25 min)
    MICROSWEEP_DATA=/work/shared/data python benchmarks/techniques.py --quick    # smoke (~3 min)
    python benchmarks/techniques.py --sections methods     # methods only (~11 min; 2 cached)
    python benchmarks/techniques.py --sections vocab       # the vocabulary section (~20 min)

A run of some sections (or models) replaces those in the JSON it writes and keeps the rest.

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

Section ``methods`` (also on ``llama``: a transformers LlamaConfig model, 4 layers, hidden 128,
4 heads, intermediate 384 so that groups of 128 divide down_proj's inputs, tied table,
char-level on Tiny Shakespeare, window 128, pretrained 3000 steps of 12 windows at one thread
and cached under $MICROSWEEP_CACHE) compresses every block Linear (GPT, Llama) or every gate
matrix (LSTM) uniformly with each method at one setting: weights at 4/3/2 bits per channel and
grouped (RTN, GPTQ, GPTQ with act-order), sparsity 0.5/0.7/0.8 (magnitude, Wanda, SparseGPT),
sparsity 0.5 + 4 bits (magnitude + RTN against SparseGPT + GPTQ in one pass) and 4x4 blocks at
0.5 (by magnitude, Wanda or OBS saliency). The LSTM's rows come twice: the gates alone, and the
gates with the tied table, which takes the same method where the product accepts it on a table
and otherwise records the refusal and stays dense. Each row: perplexity, ppl/dense, score, and
the build seconds per compressed matrix over the seconds of one perplexity evaluation of the
dense model.

Section ``vocab`` (model ``wikitext``: a word-level GPT, 2 layers, n_embd 128, block 64, tied
head, on WikiText-2, TRAINED ON ``valid.txt`` and EVALUATED ON ``test.txt``, since the training
split is not at hand; its vocabulary is therefore valid.txt's 13,777 words, not the full 33,278)
applies each vocabulary technique alone to the tied table and head at three levels: the
factorized tied pair (rank 64/32/16, plain and activation-aware), the tensor-train tied pair
(TT-rank 16/8/4), frequency bands (ranks per band, rare words smaller), bits 8/4/3 and sparsity
0.5/0.7/0.9; then an `auto` sweep whose space offers all of them on the head beside sparsity
and bits on the blocks.

Writes benchmarks/results/techniques.json (every number) and techniques.md (the tables).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import statistics
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
SECTIONS = ("techniques", "methods", "vocab")
TECHNIQUE_MODELS = ("lstm", "gpt")  # the techniques and the sweep; every model gets the methods
METHOD_BITS = (4, 3, 2)
METHOD_SPARSITIES = (0.5, 0.7, 0.8)
GROUP = 128  # input columns per weight scale in the grouped rows, where a matrix allows it
PER_MATRIX = "per-matrix"  # quant_group placeholder: `_group_for` the matrix's inputs
QUANT_METHODS = {
    "rtn": {},
    "gptq": {"quant_method": "gptq"},
    "gptq act-order": {"quant_method": "gptq", "act_order": True},
}
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
JOINT_METHODS = {
    "magnitude+rtn": {},
    "sparsegpt+gptq": {"prune_method": "sparsegpt", "quant_method": "gptq"},
}


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
    table_rows: bool = False  # methods section: rows with the tied table as well (LSTM)
    pretrain: dict[str, Any] = field(default_factory=dict)  # how a model built here was trained
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
            table_rows=True,
        ),
        quick,
    )


def _block_linears(n_layer: int) -> list[str]:
    """The block Linears of microsweep's GPT, in model order."""
    kinds = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    return [f"blocks.{b}.{k}" for b in range(n_layer) for k in kinds]


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
    matrices = _block_linears(2)

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


def _llama_setup(quick: bool) -> Setup:
    import transformers

    from microsweep import data

    corpus = data.tiny_shakespeare()
    d, layers, inter, block = (32, 2, 96, 32) if quick else (128, 4, 384, 128)
    config = transformers.LlamaConfig(
        vocab_size=corpus.vocab_size,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=inter,
        max_position_embeddings=block,
        tie_word_embeddings=True,
    )
    train = dict(
        steps=100 if quick else 3000,
        batch_size=12,
        lr=2e-3,
        schedule="cosine",
        warmup=100,
        seed=0,
    )
    model, pretrain = _pretrained_hf(config, corpus, train, block)
    kinds = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    kinds += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    matrices = [f"model.layers.{i}.{k}" for i in range(layers) for k in kinds]
    return _finish(
        Setup(
            key="llama",
            title=f"Llama-style char model (transformers), {layers} layers, hidden {d}, "
            f"4 heads, intermediate {inter}, tied, window {block}, Tiny Shakespeare",
            data_note="Tiny Shakespeare: first 90% train, last 10% evaluation",
            corpus=corpus,
            model=model,
            window=block,
            windows=None,
            calib=None,
            context=0.0,
            matrices=matrices,
            groups={},
            tt_ranks=(),
            steps=_steps(quick),
            rules=dict,
            embedding="model.embed_tokens",
            pretrain=pretrain,
        ),
        quick,
    )


def _pretrained_hf(
    config: Any, corpus: Any, train: dict[str, Any], block: int
) -> tuple[Any, dict[str, Any]]:
    """The transformers model of `config` pretrained with `train` (the keyword arguments of
    `models.pretrain`) at one thread, or its weights from the cache under $MICROSWEEP_CACHE,
    keyed by the config, the corpus fingerprint, the window and `train` as the built-in models
    are; also how it was trained and how long that took."""
    import torch

    from microsweep import models
    from microsweep.data import cache_dir

    shape = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    key_data = {"config": shape, "data": corpus.fingerprint, "block": block, "train": train}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "models" / f"hf-{config.model_type}-{key}.pt"
    with torch.random.fork_rng():
        torch.manual_seed(train["seed"])
        model = models.hf(config)
    info: dict[str, Any] = {**train, "block_size": block, "threads": 1, "cache": str(path)}
    notes = path.with_suffix(".json")  # the pretraining seconds, kept beside the weights
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if notes.is_file():
            info["seconds"] = json.loads(notes.read_text()).get("seconds")
        info["loaded_from_cache"] = True
        return model.eval(), info
    started = time.perf_counter()
    models.pretrain(
        model,
        corpus.train,
        block_size=block,
        threads=1,
        progress=f"{config.model_type} {config.num_hidden_layers}x{config.hidden_size}",
        **train,
    )
    info.update(loaded_from_cache=False, seconds=round(time.perf_counter() - started, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.name}.{os.getpid()}.part")  # two processes never clash
    torch.save(model.state_dict(), part)
    part.replace(path)
    notes.write_text(json.dumps({"seconds": info["seconds"]}) + "\n")
    return model.eval(), info


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
        row["error"] = _error_text(exc)
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


# -- plain and data-aware methods at equal settings ---------------------------------------------


def _group_for(inputs: int) -> int:
    """Input columns per scale in the grouped rows: GROUP where it divides the matrix's inputs
    and is fewer than them, else the largest divisor of the inputs up to half of them (a group
    of the whole row would repeat the per-channel row)."""
    if inputs > GROUP and inputs % GROUP == 0:
        return GROUP
    return max(g for g in range(1, min(GROUP, inputs // 2) + 1) if inputs % g == 0)


def _method_settings() -> list[tuple[str, str, dict[str, Any]]]:
    """(setting, method, LayerPolicy fields) of every row, the methods of one setting together."""
    rows = []
    for b in METHOD_BITS:
        for grouped in (False, True):
            setting = f"w{b} " + ("grouped" if grouped else "per-channel")
            group = {"quant_group": PER_MATRIX} if grouped else {}
            for method, fields in QUANT_METHODS.items():
                rows.append((setting, method, {"bits": b, **fields, **group}))
    for sp in METHOD_SPARSITIES:
        for method in PRUNE_METHODS:
            rows.append((f"s={sp}", method, {"sparsity": sp, "prune_method": method}))
    for method, fields in JOINT_METHODS.items():
        rows.append(("s=0.5 + w4", method, {"sparsity": 0.5, "bits": 4, **fields}))
    for method in PRUNE_METHODS:
        rows.append(
            ("4x4 blocks s=0.5", method, {"sparsity": 0.5, "block": BLOCK, "prune_method": method})
        )
    return rows


def _layer_policy(fields: dict[str, Any], shape: tuple[int, ...]) -> Any:
    """`fields` on a (rows, inputs) matrix: the grouped rows' group for its inputs, and block
    rows of one where the block's rows do not divide the matrix's (a table of 6022 rows)."""
    from microsweep import LayerPolicy

    fields = dict(fields)
    if fields.get("quant_group") == PER_MATRIX:
        fields["quant_group"] = _group_for(int(shape[1]))
    block = fields.get("block")
    if block is not None and shape[0] % block[0]:
        fields["block"] = (1, block[1])
    return LayerPolicy(**fields)


def _method_policy(s: Setup, fields: dict[str, Any], *, table: bool) -> Any:
    """`fields` on every compressed matrix of `s`, and on its tied table with `table`."""
    from microsweep import Policy

    names = [*s.matrices, s.embedding] if table else s.matrices
    return Policy(layers={n: _layer_policy(fields, _shape(s, n)) for n in names})


def _shape(s: Setup, name: str) -> tuple[int, ...]:
    return tuple(s.model.get_submodule(name).weight.shape)


def _eval_seconds(s: Setup) -> float:
    """Seconds of one perplexity evaluation of the dense model (the median of three)."""
    from microsweep.score import perplexity

    times = []
    for _ in range(3):
        started = time.perf_counter()
        perplexity(s.model, s.windows)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _error_text(exc: BaseException) -> str:
    """A row's error: the exception and the file and line it came from."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _method_row(
    s: Setup,
    setting: str,
    method: str,
    scope: str,
    make_policy: Callable[[], Any],
    eval_seconds: float,
    **extra: Any,
) -> dict[str, Any]:
    """Compress with the policy `make_policy` gives (timed), count, round to storage and
    evaluate; a setting the product refuses records its message, any other error its text."""
    from microsweep.compress import compress
    from microsweep.errors import SpaceError, UsageError
    from microsweep.score import count, micronet_score, perplexity, round_to_storage

    row: dict[str, Any] = {
        "model": s.key,
        "setting": setting,
        "method": method,
        "scope": scope,
        **extra,
    }
    try:
        policy = make_policy()
        row.update(policy=policy.summary(limit=3), layers=len(policy.layers))
        started = time.perf_counter()
        model = compress(s.model, policy, calib=s.calib).eval()
        build = time.perf_counter() - started
        counts = count(model, context=s.context)
        if counts.freebie:  # stored at fp16: evaluate exactly what the file would hold
            round_to_storage(model, counts)
            counts = count(model, context=s.context)
        started = time.perf_counter()
        ppl = perplexity(model, s.windows)
        row.update(
            params=counts.params,
            ops=counts.ops,
            freebie=counts.freebie,
            perplexity=ppl,
            ppl_rel=ppl / s.dense_ppl,
            score=micronet_score(counts.params, counts.ops, s.baseline),
            build_seconds=round(build, 3),
            eval_seconds=round(time.perf_counter() - started, 3),
            build_per_layer_over_eval=build / len(policy.layers) / eval_seconds,
        )
    except (SpaceError, UsageError) as exc:
        row["refused"] = str(exc)
    except Exception as exc:  # one failing row is recorded, the run goes on
        row["error"] = _error_text(exc)
    _print_method_row(row)
    return row


def _table_row(
    s: Setup,
    setting: str,
    method: str,
    fields: dict[str, Any],
    gates: dict[str, Any],
    eval_s: float,
) -> dict[str, Any]:
    """The gates and the tied table together. The product's word on the table alone decides:
    where it refuses the method there, the row records that and is the gates row (the same
    policy), so table support is picked up as soon as the product has it."""
    from microsweep import Policy
    from microsweep.compress import compress
    from microsweep.errors import SpaceError, UsageError

    scope = "gates+table"
    if "score" not in gates:  # the setting itself was refused or failed: nothing to add
        return {**gates, "scope": scope}
    try:
        alone = Policy(layers={s.embedding: _layer_policy(fields, _shape(s, s.embedding))})
        compress(s.model, alone, calib=s.calib)
    except (SpaceError, UsageError) as exc:
        row = {**gates, "scope": scope, "table": f"refused: {exc}"}
        _print_method_row(row)
        return row
    table = _layer_policy(fields, _shape(s, s.embedding))
    return _method_row(
        s,
        setting,
        method,
        scope,
        lambda: _method_policy(s, fields, table=True),
        eval_s,
        table="compressed" + (f", block {table.block}" if table.block else ""),
    )


def _print_method_row(r: dict[str, Any]) -> None:
    head = f"  {r['setting']:<18} {r['method']:<15} {r['scope']:<12}"
    if "score" not in r:
        print(
            f"{head} {'REFUSED' if 'refused' in r else 'ERROR'} {r.get('refused', r.get('error'))}"
        )
        return
    table = f"  table {r['table']}" if "table" in r else ""
    print(
        f"{head} ppl {r['perplexity']:9.3f} ({r['ppl_rel']:.3f}x) score {r['score']:.4f} "
        f"build/layer/eval {r['build_per_layer_over_eval']:.3f}{table}",
        flush=True,
    )


def _methods(s: Setup) -> dict[str, Any]:
    """Every row of the methods section on one model, with what they were measured against."""
    eval_s = _eval_seconds(s)
    print(f"== {s.key}: methods; one evaluation {eval_s:.2f} s", flush=True)
    groups = {n: _group_for(_shape(s, n)[1]) for n in s.matrices}
    if s.table_rows:
        groups[s.embedding] = _group_for(_shape(s, s.embedding)[1])
    scope = "gates" if s.table_rows else "blocks"
    rows = []
    for setting, method, fields in _method_settings():
        if "grouped" in setting:  # name the groups the matrices get, as the rows use them
            sizes = sorted({groups[n] for n in s.matrices}, reverse=True)
            setting = setting.replace("grouped", "g" + "/".join(map(str, sizes)))
        gates = _method_row(
            s, setting, method, scope, lambda f=fields: _method_policy(s, f, table=False), eval_s
        )
        rows.append(gates)
        if s.table_rows:
            rows.append(_table_row(s, setting, method, fields, gates, eval_s))
    return {
        "title": s.title,
        "data": s.data_note,
        "window": s.window,
        "eval_windows": len(s.windows),
        "eval_tokens": len(s.windows) * s.window,
        "calib_tokens": int(s.calib.numel()),
        "matrices": s.matrices,
        "table": s.embedding if s.table_rows else None,
        "groups": groups,
        "pretrain": s.pretrain,
        "dense": {"params": s.baseline.params, "ops": s.baseline.ops, "perplexity": s.dense_ppl},
        "eval_seconds": eval_s,
        "rows": rows,
    }


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


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
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


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    notes = []
    for r in rows:
        text = r.get("note") or ""
        if "stage_dense_ppl" in r:
            text += f"; dense model after the stage: ppl {r['stage_dense_ppl']:.3f}"
        if text:
            notes.append(f"- {r['technique']} {r['level']}: {text}")
    return notes


def _markdown(result: dict[str, Any]) -> str:
    """Both sections' tables, each from the JSON-ready `result` (a merged run's earlier part
    included)."""
    out = []
    if "models" in result:
        out += _techniques_markdown(result)
    if "methods" in result:
        out += _methods_markdown(result["methods"], result.get("models", {}))
    if "vocab" in result:
        out += _vocab_markdown(result["vocab"])
    return "\n".join(out) + "\n"


def _techniques_markdown(result: dict[str, Any]) -> list[str]:
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
    for m in result["models"].values():
        dense_ppl = m["dense"]["perplexity"]
        out += [
            f"## {m['title']}",
            "",
            f"{m['data']}; {m['eval_windows']} windows of {m['window']} "
            f"tokens; dense perplexity {dense_ppl:.3f}, ceiling {CEILING * dense_ppl:.3f}.",
            "",
            _table(m["rows"]),
            "",
        ]
        notes = _notes(m["rows"])
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
    return out


METHOD_COLUMNS = (
    "setting",
    "method",
    "scope",
    "ppl",
    "ppl/dense",
    "score",
    "build s/layer / eval s",
    "table",
)


def _methods_markdown(methods: dict[str, Any], techniques: dict[str, Any]) -> list[str]:
    """The methods section: one table per model; `techniques` (the other section's models)
    only to say where a model's dense perplexity differs from the one measured there."""
    seconds = sum(m.get("seconds", 0.0) for m in methods["models"].values())
    product = methods.get("product") or {}
    at = (
        f" on microsweep at commit {product['commit'][:10]}"
        + (" with uncommitted changes" if product.get("modified") else "")
        if product.get("commit")
        else ""
    )
    out = [
        "# Plain and data-aware methods at equal settings",
        "",
        f"Generated by `{methods['command']}`{at} in {seconds:.0f} s (models built or "
        f"read from the cache), torch threads {methods['threads']}. Each row compresses every "
        "block Linear (GPT, Llama) or every LSTM gate matrix uniformly with one method at one "
        "setting (gates+table: the LSTM's tied table too, where the product accepts the method "
        "on a table); calibration on the first 2,048 training tokens, ppl on the first 8,192 "
        "evaluation tokens. Score = params/dense_params + ops/dense_ops against the model's own "
        "dense count (dense = 2.0, lower is better; a row quantized below 16 bits loses the "
        "dense model's 16-bit allowance, so what it leaves dense counts at 32 bits: why the "
        "LSTM's gates-only bit rows score above 2.0). build s/layer / eval s: seconds of "
        "`compress` (copy, calibration pass, the method) per compressed matrix over the seconds "
        "of one perplexity evaluation of the dense model (median of three). Grouped rows: one "
        f"fp32 scale per row and run of g inputs, g = {GROUP} where it divides a matrix's "
        "inputs and is fewer than them, else the largest divisor up to "
        "half the inputs (a whole row would repeat the per-channel row); listed per model.",
        "",
    ]
    refusals: list[str] = []
    for key, m in methods["models"].items():
        dense = m["dense"]["perplexity"]
        other = techniques.get(key, {}).get("dense", {}).get("perplexity")
        differs = (
            f" (the techniques section above measured {other:.3f} on weights pretrained in "
            "its own run)"
            if other is not None and abs(other / dense - 1) > 1e-4
            else ""
        )
        by_group: dict[int, list[str]] = {}
        for name, g in m["groups"].items():
            kind = re.sub(r"\.\d+\.", ".*.", name)  # one entry per matrix of the blocks
            if kind not in by_group.setdefault(g, []):
                by_group[g].append(kind)
        groups = "; ".join(f"g={g}: {', '.join(n)}" for g, n in sorted(by_group.items()))
        pre = m.get("pretrain") or {}
        trained = (
            f" Pretrained {pre['steps']} steps of {pre['batch_size']} windows of "
            f"{pre['block_size']} at lr {pre['lr']} ({pre['schedule']}, warm-up "
            f"{pre['warmup']}), one thread"
            + (f", {pre['seconds']:.0f} s" if pre.get("seconds") else "")
            + "; weights cached under $MICROSWEEP_CACHE."
            if pre
            else ""
        )
        out += [
            f"## {m['title']}",
            "",
            f"{m['data']}; {m['eval_windows']} windows of {m['window']} tokens; **dense "
            f"perplexity {dense:.3f}**{differs}; one evaluation {m['eval_seconds']:.3f} s; "
            f"{len(m['matrices'])} matrices compressed"
            + (f" (and the table {m['table']} in the gates+table rows)" if m.get("table") else "")
            + f".{trained} Groups: {groups}.",
            "",
            _method_table(m["rows"], refusals),
            "",
        ]
    if refusals:
        out += ["Refusals and errors:", ""]
        out += [f"- [{i}] {text}" for i, text in enumerate(refusals, 1)]
        out += [""]
    return out


def _method_table(rows: list[dict[str, Any]], refusals: list[str]) -> str:
    """The rows as a table; each distinct refusal or error text goes once into `refusals`
    and the cells cite its number."""

    def cite(text: str) -> str:
        if text not in refusals:
            refusals.append(text)
        return f"[{refusals.index(text) + 1}]"

    columns = METHOD_COLUMNS if any("table" in r for r in rows) else METHOD_COLUMNS[:-1]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        table = r.get("table", "")
        if table.startswith("refused: "):
            table = "refused " + cite(table.removeprefix("refused: "))
        cells = [r["setting"], r["method"], r["scope"]]
        if "score" not in r:
            what = "refused" if "refused" in r else "error"
            cells += [f"{what} {cite(r.get('refused') or r['error'])}", "", "", ""]
        else:
            cells += [
                f"{r['perplexity']:.3f}",
                f"{r['ppl_rel']:.3f}",
                f"{r['score']:.4f}",
                f"{r['build_per_layer_over_eval']:.3f}",
            ]
        cells += [table] if len(columns) == len(METHOD_COLUMNS) else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


# -- the vocabulary: table and head of a word-level model ------------------------------------

VOCAB_RANKS = (64, 32, 16)  # of n_embd 128: 1/2, 1/4, 1/8
VOCAB_TT_RANKS = (16, 8, 4)
VOCAB_BANDS = (0.1, 0.4)  # the most frequent 10% of words, the next 30%, the rarest 60%
VOCAB_BAND_RANKS = ((128, 64, 16), (64, 32, 8), (32, 16, 4))  # frequent .. rare


def _wikitext_setup(quick: bool) -> Setup:
    from microsweep import Bits, Rank, Sparsity, data, models

    corpus = data.wikitext2(train="valid", val="test")
    d, block = (32, 32) if quick else (128, 64)
    model = models.gpt(
        corpus,
        n_layer=2,
        n_head=4,
        n_embd=d,
        block_size=block,
        pretrain_steps=100 if quick else 1200,
        lr=2e-3,
    ).eval()
    matrices = _block_linears(2)

    def rules() -> dict[str, Any]:
        return {
            "blocks.*": dict(
                sparsity=Sparsity(0.0, 0.7, step=0.1), bits=Bits(4, 6, 8), act_bits=Bits(8, 16)
            ),
            "head": _vocab_head_rule(Bits, Rank, Sparsity),
        }

    return _finish(
        Setup(
            key="wikitext",
            title=f"word GPT 2 layers, n_embd {d}, block {block}, tied head, WikiText-2",
            data_note=(
                "WikiText-2: trained on valid.txt, evaluated on test.txt (the training split is "
                f"not at hand here), so the vocabulary is valid.txt's {len(corpus.vocab):,} "
                "words, not the full 33,278"
            ),
            corpus=corpus,
            model=model,
            window=block,
            windows=None,
            calib=None,
            context=0.0,
            matrices=matrices,
            groups={},
            tt_ranks=VOCAB_TT_RANKS,
            steps=_steps(quick),
            rules=rules,
            embedding="wte",
        ),
        quick,
    )


def _vocab_head_rule(Bits: Any, Rank: Any, Sparsity: Any) -> dict[str, Any]:  # noqa: N803
    """The searched knobs of the tied table and head: rank (the factorized pair), bits, sparsity
    and, where the product has them, frequency bands."""
    rule = dict(
        sparsity=Sparsity(0.0, 0.6, step=0.1),
        bits=Bits(4, 6, 8),
        act_bits=Bits(8, 16),
        rank=Rank(0.0625, 1.0),
    )
    bands = _bands_knob()
    if bands is not None:
        rule["bands"] = bands(*VOCAB_BANDS)
    return rule


def _bands_knob() -> Any:
    try:
        from microsweep import Bands
    except ImportError:
        return None
    return Bands


def _vocab(s: Setup, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Each vocabulary technique alone on the tied table and head at three levels, then the
    searched combination (blocks and head)."""
    from microsweep import LayerPolicy, Policy

    table = s.model.get_submodule(s.embedding)
    vocab, width = table.weight.shape
    _measure(s, tmp, "dense", "-", Policy())
    for r in VOCAB_RANKS:
        r = min(r, width)
        _measure(
            s, tmp, "factorized tied pair", f"r={r}", Policy(layers={"head": LayerPolicy(rank=r)})
        )
    for r in VOCAB_RANKS:
        r = min(r, width)
        policy = Policy(layers={"head": LayerPolicy(rank=r, rank_method="activation")})
        _measure(s, tmp, "factorized tied pair, activation-aware", f"r={r}", policy)
    for r in VOCAB_TT_RANKS:
        policy = Policy(layers={"head": LayerPolicy(rank=r, rank_method="tt")})
        _measure(s, tmp, "tensor-train tied pair", f"tt-rank {r}", policy)
    bands = _band_policies(s)
    for level, policy in bands:
        _measure(s, tmp, "frequency bands", level, policy)
    for b in BITS:
        _measure(s, tmp, "bits", f"w{b}", Policy(layers={"head": LayerPolicy(bits=b)}))
    for sp in SPARSITIES:
        _measure(s, tmp, "sparsity", f"s={sp}", Policy(layers={"head": LayerPolicy(sparsity=sp)}))
    search = {"skipped": True} if args.no_search else _search(s, tmp, tmp, args.sweep_timeout)
    return {
        "title": s.title,
        "data": s.data_note,
        "vocab": vocab,
        "n_embd": width,
        "window": s.window,
        "eval_windows": len(s.windows),
        "eval_tokens": len(s.windows) * s.window,
        "calib_tokens": int(s.calib.numel()),
        "levels": {
            "ranks": VOCAB_RANKS,
            "tt_ranks": VOCAB_TT_RANKS,
            "bands": VOCAB_BANDS,
            "band_ranks": VOCAB_BAND_RANKS,
            "bits": BITS,
            "sparsity": SPARSITIES,
        },
        "bands_available": bool(bands),
        "steps": s.steps,
        "dense": {"params": s.baseline.params, "ops": s.baseline.ops, "perplexity": s.dense_ppl},
        "rows": s.rows,
        "search": search,
    }


def _band_policies(s: Setup) -> list[tuple[str, Any]]:
    """The banded head at three levels (rare bands at smaller ranks), as policies of a Space
    with `Bands` on the head; none where the product has no bands."""
    Bands = _bands_knob()  # noqa: N806
    if Bands is None:
        return []
    from microsweep import LayerPolicy, Policy, Rank, Space

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = Space(
            s.model, rules={"head": dict(bands=Bands(*VOCAB_BANDS), rank=Rank(0.0625, 1.0))}
        )
    infos = list(space.layers)  # "head@0", ... with each band's rows
    out = []
    for ranks in VOCAB_BAND_RANKS:
        layers = {  # a rank at or past a band's full rank leaves it dense
            i.name: LayerPolicy(rank=r, band=i.band)
            for i, r in zip(infos, ranks, strict=True)
            if r < i.full_rank
        }
        out.append(("ranks " + "/".join(map(str, ranks)), Policy(layers=layers)))
    return out


def _vocab_markdown(v: dict[str, Any]) -> list[str]:
    out = [
        "",
        "# The vocabulary of a word-level model: each technique alone on the tied table and head",
        "",
        f"## {v['title']}",
        "",
        f"{v['data']}; {v['eval_windows']} windows of {v['window']} tokens; dense perplexity "
        f"{v['dense']['perplexity']:.3f}, {v['dense']['params']:,.0f} params, "
        f"{v['dense']['ops']:,.0f} ops per token. Every technique acts on the tied table and "
        "head alone (the blocks stay dense): the factorized tied pair (rank r of the shared "
        f"{v['vocab']:,} x {v['n_embd']} matrix, plain and activation-aware SVD), the tensor-train "
        f"tied pair (one set of cores), frequency bands {v['levels']['bands']} (cumulative "
        "vocabulary shares by calibration frequency; ranks per band frequent to rare), bits "
        "and sparsity. The seed paper's PTB table has the same shape: technique, level, size, "
        "perplexity.",
        "",
        _table(v["rows"]),
    ]
    search = v.get("search", {})
    if search.get("row"):
        r = search["row"]
        out += [
            "",
            f"Searched combination (`auto`, {search.get('trials')} trials, ceiling {CEILING}x "
            f"dense perplexity, knobs on the blocks and on the head): score {r['score']:.4f}, "
            f"{r['params']:,.0f} params, {r['ops']:,.0f} ops, ppl {r['perplexity']:.3f}; "
            f"policy {r['policy']}.",
        ]
    elif search.get("error"):
        out += ["", f"Searched combination: {search['error']}"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny models and few tokens: a smoke run"
    )
    parser.add_argument(
        "--models",
        default="lstm,gpt,llama",
        help="comma list of lstm, gpt, llama (llama takes only the methods section)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma list of techniques (each technique alone, and the sweep) and methods "
        "(plain and data-aware methods at equal settings)",
    )
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
    makers = {
        "lstm": _lstm_setup,
        "gpt": _gpt_setup,
        "llama": _llama_setup,
        "wikitext": _wikitext_setup,
    }
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    sections = [k.strip() for k in args.sections.split(",") if k.strip()]
    if unknown := [k for k in keys if k not in makers]:
        parser.error(f"unknown model {unknown[0]!r}; use lstm, gpt, llama or wikitext")
    if unknown := [k for k in sections if k not in SECTIONS]:
        parser.error(f"unknown section {unknown[0]!r}; use {' or '.join(SECTIONS)}")
    warnings.simplefilter("ignore")
    os.environ.setdefault("MICROSWEEP_DATA", str(ROOT.parent / "shared" / "data"))
    os.environ.setdefault("MICROSWEEP_PRETRAIN_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict[str, Any] = {}
    if "techniques" in sections:
        result.update(
            quick=args.quick,
            threads=args.threads,
            ceiling=CEILING,
            score_convention="params/dense_params + ops/dense_ops with Baseline = the dense "
            "model's own count: dense = 2.0, lower is better",
            levels={
                "sparsity": SPARSITIES,
                "bits": BITS,
                "rank_fractions": RANK_FRACTIONS,
                "block": BLOCK,
                "embedding_block": EMBEDDING_BLOCK,
                "aggressive_sparsity": AGGRESSIVE_SPARSITY,
            },
            models={},
        )
    if "methods" in sections:
        result["methods"] = {
            "command": "python benchmarks/techniques.py"
            + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
            "quick": args.quick,
            "threads": args.threads,
            "settings": {
                "bits": METHOD_BITS,
                "group": GROUP,
                "quant_methods": QUANT_METHODS,
                "sparsity": METHOD_SPARSITIES,
                "prune_methods": PRUNE_METHODS,
                "joint": JOINT_METHODS,
                "block": BLOCK,
            },
            "product": _product_version(),
            "models": {},
        }
    technique_seconds = 0.0
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if "vocab" in sections:
            t0 = time.perf_counter()
            print("== wikitext: preparing", flush=True)
            s = _wikitext_setup(args.quick)
            if args.trials is not None:
                s.steps["trials"] = args.trials
            print(f"== {s.title}: dense perplexity {s.dense_ppl:.3f}", flush=True)
            result["vocab"] = _vocab(s, tmp, args)
            result["vocab"].update(quick=args.quick, seconds=round(time.perf_counter() - t0, 1))
        for key in keys:
            if key == "wikitext":
                continue  # the vocab section's model
            techniques = "techniques" in sections and key in TECHNIQUE_MODELS
            if not techniques and "methods" not in sections:
                continue
            t0 = time.perf_counter()
            print(f"== {key}: preparing", flush=True)
            s = makers[key](args.quick)
            if args.trials is not None:
                s.steps["trials"] = args.trials
            print(
                f"== {s.title}: dense perplexity {s.dense_ppl:.3f} on {len(s.windows)} windows",
                flush=True,
            )
            if techniques:
                result["models"][key] = _technique_section(s, tmp, args)
                result["models"][key]["seconds"] = round(time.perf_counter() - t0, 1)
                technique_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
            if "methods" in sections:
                result["methods"]["models"][key] = _methods(s)
                result["methods"]["models"][key]["seconds"] = round(time.perf_counter() - t0, 1)
    if "techniques" in sections:
        result["seconds"] = round(technique_seconds, 1)
    quick_out = Path(tempfile.gettempdir()) / "techniques-quick.json"
    out = args.out or (quick_out if args.quick else RESULTS / "techniques.json")
    if out.is_file():  # keep what this run did not measure
        result = _merge(_revive(json.loads(out.read_text())), result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_clean(result), indent=2) + "\n")
    md = _markdown(result)
    out.with_suffix(".md").write_text(md)
    print()
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')} ({time.perf_counter() - started:.0f} s)")
    return 0


def _product_version() -> dict[str, Any]:
    """The commit of the checkout measured and whether microsweep/ differs from it there."""
    import subprocess

    def git(*args: str) -> str:
        run = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        )
        return run.stdout.strip() if run.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    modified = bool(git("status", "--porcelain", "--", "microsweep")) if commit else None
    return {"commit": commit or None, "modified": modified}


def _technique_section(s: Setup, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Each technique alone on `s`, then the sweep and the conclusion: the model's entry."""
    _techniques(s, tmp)
    search = {"skipped": True} if args.no_search else _search(s, tmp, tmp, args.sweep_timeout)
    conclusion = _conclude(s, search)
    print(f"== {s.key}: {conclusion['text']}", flush=True)
    return {
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
    }


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` over an earlier file's `old`: each section this run measured replaces that of
    `old` model by model, and the sections and models it did not measure are kept (those of
    a run at the other --quick setting are dropped)."""
    out = dict(new)
    if "models" not in new:
        if "models" in old and old.get("quick") == _quick(new):
            out.update({k: v for k, v in old.items() if k != "methods"})
    elif old.get("quick") == new["quick"]:
        out["models"] = {**old.get("models", {}), **new["models"]}
    earlier = old.get("methods")
    if earlier and earlier.get("quick") == _quick(new):
        if "methods" not in new:
            out["methods"] = earlier
        else:
            out["methods"] = {
                **new["methods"],
                "models": {**earlier["models"], **new["methods"]["models"]},
            }
    if "vocab" not in new and old.get("vocab", {}).get("quick") == _quick(new):
        out["vocab"] = old["vocab"]
    methods = {"methods": out.pop("methods")} if "methods" in out else {}
    return {**out, **methods}  # the techniques' keys first, as a full run writes them


def _quick(result: dict[str, Any]) -> bool:
    return bool(result.get("quick", result.get("methods", {}).get("quick")))


def _revive(value: Any) -> Any:
    """The numbers `_clean` wrote as strings (inf, nan) as floats again."""
    if isinstance(value, dict):
        return {k: _revive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_revive(v) for v in value]
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return value


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
