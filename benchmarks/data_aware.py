"""Data-aware compression levels against the plain ones on a space file's model: every block
Linear at one setting, perplexity on the objective's windows, statistics from its calibration
tokens, and the build seconds.

    python benchmarks/data_aware.py                      # examples/shakespeare.py
    python benchmarks/data_aware.py --space examples/ptb.py

Writes benchmarks/results/data_aware.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "3-bit rtn": dict(bits=3),
    "3-bit gptq": dict(bits=3, quant_method="gptq"),
    "3-bit gptq act-order": dict(bits=3, quant_method="gptq", act_order=True),
    "4-bit rtn group 32": dict(bits=4, quant_group=32),
    "4-bit gptq group 32": dict(bits=4, quant_method="gptq", quant_group=32),
    "70% magnitude": dict(sparsity=0.7),
    "70% sparsegpt": dict(sparsity=0.7, prune_method="sparsegpt"),
    "70% wanda": dict(sparsity=0.7, prune_method="wanda"),
    "50% + 4-bit magnitude/rtn": dict(sparsity=0.5, bits=4),
    "50% + 4-bit sparsegpt/gptq": dict(
        sparsity=0.5, bits=4, prune_method="sparsegpt", quant_method="gptq"
    ),
    "50% 4x4 blocks magnitude": dict(sparsity=0.5, block=(4, 4)),
    "50% 4x4 blocks obs": dict(sparsity=0.5, block=(4, 4), prune_method="sparsegpt"),
}


def _layer_errors(model, calib) -> dict:  # noqa: ANN001
    """||(W - W')X||^2 / ||WX||^2 of every Linear alone on the calibration inputs: 3-bit
    round-to-nearest against GPTQ, 70% magnitude against SparseGPT."""
    import torch

    from microsweep.compress import input_stats
    from microsweep.compress._obs import gptq, output_error, sparsegpt
    from microsweep.compress._prune import magnitude_mask
    from microsweep.compress._quantize import quantize_rows

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    stats = input_stats(model, linears, calib)
    out = {}
    for name, layer in linears.items():
        w, g = layer.weight.detach(), stats[name].gram
        out[name] = {
            "rtn_3bit": output_error(w, quantize_rows(w, 3)[0], g),
            "gptq_3bit": output_error(w, gptq(w, g, 3)[0], g),
            "magnitude_70": output_error(w, w * magnitude_mask(w, 0.7), g),
            "sparsegpt_70": output_error(w, sparsegpt(w, g, 0.7)[0], g),
        }
    better = sum(e["gptq_3bit"] < e["rtn_3bit"] for e in out.values())
    pruned = sum(e["sparsegpt_70"] < e["magnitude_70"] for e in out.values())
    print(f"output error: GPTQ lower on {better}/{len(out)} layers, SparseGPT on {pruned}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "examples" / "shakespeare.py"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_aware.json"))
    args = parser.parse_args()
    os.environ.setdefault("MICROSWEEP_DATA", str(ROOT.parent / "shared" / "data"))
    import torch

    from microsweep.compress import compress
    from microsweep.policy import LayerPolicy, Policy
    from microsweep.prepare import load_space_file, prepare
    from microsweep.score import perplexity

    torch.set_num_threads(1)
    sf = load_space_file(args.space)
    prepared = prepare(sf, 0)
    model = sf.model
    names = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "blocks." in n
    ]
    t0 = time.perf_counter()
    dense = perplexity(model, prepared.windows)
    eval_s = time.perf_counter() - t0
    rows = {}
    for label, settings in SETTINGS.items():
        t0 = time.perf_counter()
        policy = Policy(layers={n: LayerPolicy(**settings) for n in names})
        out = compress(model, policy, calib=prepared.calib)
        build_s = time.perf_counter() - t0
        ppl = perplexity(out, prepared.windows)
        rows[label] = {"perplexity": ppl, "increase": ppl - dense, "build_s": build_s}
        print(f"{label:28s} ppl {ppl:.4f} (+{ppl - dense:.4f}) build {build_s:.2f}s", flush=True)
    errors = _layer_errors(model, prepared.calib)
    result = {
        "space": os.path.relpath(args.space, ROOT),
        "dense_perplexity": dense,
        "windows": list(prepared.windows.shape),
        "calib": list(prepared.calib.shape) if prepared.calib is not None else None,
        "layers": len(names),
        "evaluation_s": eval_s,
        "rows": rows,
        "layer_output_error": errors,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"dense {dense:.4f}; wrote {out_path}")


if __name__ == "__main__":
    main()
