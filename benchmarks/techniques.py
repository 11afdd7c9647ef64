"""Data-aware low rank and distillation on the tiny GPT (the start of issue #10's benchmark).

    python benchmarks/techniques.py

Rank: every Linear of the 2-layer char GPT (examples/tiny.py's model) factorized at ranks 4, 8
and 16 by plain, activation-scaled and whitened SVD (calibration: 16 x 32 training tokens),
perplexity on 8,192 validation tokens. Distillation: 80% sparsity on six layers, then 40
recovery steps at lr 3e-3 with cross-entropy (alpha 0) and with distill_alpha 0.7, as a worker
runs them. Writes benchmarks/results/techniques.json.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    warnings.simplefilter("ignore")
    from microsweep import LayerPolicy, Policy, data, models
    from microsweep.compress import compress
    from microsweep.score import eval_windows, mean_context, perplexity
    from microsweep.workers import EvalSettings, TrialRunner

    os.environ.setdefault("MICROSWEEP_DATA", str(ROOT.parent / "shared" / "data"))
    corpus = data.tiny_shakespeare()
    model = models.gpt(corpus, n_layer=2, n_head=2, n_embd=32, block_size=32, pretrain_steps=300)
    calib = corpus.train[: 16 * 32].view(16, 32)
    windows = eval_windows(corpus.val, window=32, max_tokens=8192)
    linears = [f"blocks.{b}.{n}" for b in range(2)
               for n in ("mlp.c_fc", "mlp.c_proj", "attn.c_attn", "attn.c_proj")]  # fmt: skip
    rank = {"dense": perplexity(model, windows), "perplexity": {}}
    for method in ("plain", "activation", "whiten"):
        row = {}
        for r in (4, 8, 16):
            policy = Policy(layers={n: LayerPolicy(rank=r, rank_method=method) for n in linears})
            row[str(r)] = round(perplexity(compress(model, policy, calib=calib), windows), 4)
        rank["perplexity"][method] = row
        print(f"rank {method}: {row}")

    runner = TrialRunner(
        model, eval_windows(corpus.val, window=32, max_tokens=1024),
        EvalSettings(context=mean_context(32)), calib=calib[:8], train_tokens=corpus.train,
    )  # fmt: skip
    pruned = {n: LayerPolicy(sparsity=0.8) for n in linears if not n.endswith("attn.c_proj")}

    def ppl(hyper: dict) -> float:
        res = runner.run(0, Policy(layers=pruned, hyper=hyper).to_json(), early_stop=False)
        return round(res["perplexity"], 4)

    steps = {"finetune_steps": 40, "finetune_lr": 3e-3}
    distill = {
        "dense": round(runner.run(0, Policy().to_json(), early_stop=False)["perplexity"], 4),
        "pruned": ppl({}),
        "cross_entropy": ppl({**steps, "distill_alpha": 0.0}),
        "distill_alpha_0.7": ppl({**steps, "distill_alpha": 0.7}),
    }
    print(f"distillation: {distill}")
    out = ROOT / "benchmarks" / "results" / "techniques.json"
    out.write_text(json.dumps({"rank": rank, "distillation": distill}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
