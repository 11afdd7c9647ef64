"""Exported file sizes against the MicroNet count, per compression technique and combined.

    python benchmarks/export_sizes.py [--out benchmarks/results/export_sizes.json]

For a small GPT pretrained on Tiny Shakespeare ($MICROSWEEP_DATA, default ../shared/data) and
each policy: counted parameters (32-bit equivalents), payload and header bytes of the .msz file,
payload / (params x 4), and perplexity of the compressed model before export and after reload.
Writes the rows as JSON and prints an aligned table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _policies(model: Any) -> dict[str, Any]:
    """Seven policies: each technique alone, block-sparse with 4-bit values, and all combined."""
    from torch import nn

    from microsweep import LayerPolicy, Policy

    lin = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "head"}

    def rank(name: str, fraction: float) -> int:
        m = lin[name]
        return max(1, round(fraction * min(m.in_features, m.out_features)))

    mlp = [n for n in lin if ".mlp." in n]
    attn = [n for n in lin if ".attn." in n]
    return {
        "dense": Policy(),
        "pruned 0.8": Policy(layers={n: LayerPolicy(sparsity=0.8) for n in lin}),
        "quantized 4-bit": Policy(
            layers={**{n: LayerPolicy(bits=4) for n in lin}, "head": LayerPolicy(bits=4)}
        ),
        "low-rank 0.25": Policy(layers={n: LayerPolicy(rank=rank(n, 0.25)) for n in lin}),
        "block-sparse 4x4 0.75": Policy(
            layers={n: LayerPolicy(sparsity=0.75, block=(4, 4)) for n in lin}
        ),
        "block-sparse 0.75 4-bit": Policy(
            layers={n: LayerPolicy(sparsity=0.75, block=(4, 4), bits=4) for n in lin}
        ),
        "all combined": Policy(
            layers={
                **{
                    n: LayerPolicy(sparsity=0.5, bits=4, act_bits=8, rank=rank(n, 0.25))
                    for n in mlp
                },
                **{n: LayerPolicy(sparsity=0.5, block=(4, 4), bits=8) for n in attn},
                "head": LayerPolicy(bits=6),
            }
        ),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("policy", "params", "payload B", "header B", "ratio", "ppl before", "ppl after", "16b")
    cells = [head] + [
        (
            r["policy"],
            f"{r['counted_params']:,.1f}",
            f"{r['payload_bytes']:,}",
            f"{r['header_bytes']:,}",
            f"{r['ratio']:.4f}",
            f"{r['ppl_before']:.5f}",
            f"{r['ppl_after']:.5f}",
            "yes" if r["freebie"] else "no",
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export_sizes.json"))
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    os.environ.setdefault("MICROSWEEP_DATA", str(ROOT.parent / "shared" / "data"))

    import torch

    from microsweep import data, models
    from microsweep.compress import compress
    from microsweep.export import load, round_to_storage, save
    from microsweep.score import count, eval_windows, mean_context, perplexity

    corpus = data.tiny_shakespeare()
    block = 64
    model = models.gpt(corpus, n_layer=2, n_head=2, n_embd=64, block_size=block, pretrain_steps=300)
    windows = eval_windows(corpus.val, window=block, max_tokens=args.eval_tokens)
    n_calib = 2048 // block
    calib = corpus.train[: n_calib * block].view(n_calib, block)
    context = mean_context(block)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, policy in _policies(model).items():
            compressed = compress(model, policy, calib=calib)
            counts = count(compressed, context=context)
            round_to_storage(compressed, counts)  # what the trial runner evaluates
            before = perplexity(compressed, windows)
            path = Path(tmp) / "model.msz"
            start = time.perf_counter()
            info = save(compressed, path, policy=policy, recipe=model.recipe())
            saved = time.perf_counter() - start
            start = time.perf_counter()
            loaded = load(path, expect_recipe=model.recipe())
            loaded_s = time.perf_counter() - start
            after = perplexity(loaded, windows)
            with torch.no_grad():
                diff = (loaded(windows[:4, :-1]) - compressed(windows[:4, :-1])).abs().max()
            rows.append(
                {
                    "policy": name,
                    "policy_json": policy.to_json(),
                    "counted_params": info.counted_params,
                    "payload_bytes": info.payload_bytes,
                    "header_bytes": info.header_bytes,
                    "ratio": info.ratio,
                    "tensors": info.tensors,
                    "freebie": info.freebie,
                    "exact": info.exact,
                    "ppl_before": before,
                    "ppl_after": after,
                    "ppl_rel_diff": abs(after - before) / before,
                    "max_logit_diff": float(diff),
                    "save_s": saved,
                    "load_s": loaded_s,
                }
            )
    result = {
        "model": model.recipe(),
        "corpus": "tinyshakespeare",
        "eval_tokens": int(windows[:, 1:].numel()),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(_table(rows))
    print(f"\nratio = payload bytes / (counted params x 4); header excluded. Wrote {out}")


if __name__ == "__main__":
    main()
