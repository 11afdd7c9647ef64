"""MicroNet counts of Hugging Face GPT-2 small's shape (124M) and of microsweep's own GPT of the
same shape, side by side (random weights: counts depend on shapes only), plus a Llama-style model.

    python benchmarks/hf_counts.py

Writes benchmarks/results/hf_counts.json. Needs transformers (`pip install -e ".[hf]"`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _row(model: torch.nn.Module, window: int) -> dict:
    from microsweep.score import CountConfig, count, mean_context, uncounted_work

    started = time.perf_counter()
    exact = count(model, context=mean_context(window), config=CountConfig(freebie=False))
    default = count(model, context=mean_context(window))
    leftover = uncounted_work(model, torch.zeros(1, 16, dtype=torch.long))
    return {
        "tensor_elements": sum(p.numel() for p in model.parameters()),
        "params_fp32": exact.params,
        "params_with_16bit_allowance": default.params,
        "ops_per_token": exact.ops,
        "ops_per_token_with_16bit_allowance": default.ops,
        "uncounted_modules": [w.name for w in leftover],
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hf_counts.json"))
    args = parser.parse_args()
    import transformers

    from microsweep import models

    torch.manual_seed(0)
    window, d, layers, heads, vocab = 1024, 768, 12, 12, 50257
    hf = models.hf(
        transformers.GPT2Config(
            vocab_size=vocab, n_positions=window, n_embd=d, n_layer=layers, n_head=heads
        )
    )
    own = models.GPT(
        models.GPTConfig(
            vocab_size=vocab, block_size=window, n_embd=d, n_layer=layers, n_head=heads
        )
    )
    out = {"shape": {"n_embd": d, "n_layer": layers, "n_head": heads, "vocab": vocab,
                     "window": window, "context": (window + 1) / 2}}  # fmt: skip
    out["hf_gpt2"] = _row(hf, window)
    del hf
    out["microsweep_gpt"] = _row(own, window)
    del own
    out["ops_ratio_hf_to_own"] = (
        out["hf_gpt2"]["ops_per_token"] / out["microsweep_gpt"]["ops_per_token"]
    )
    llama = models.hf(
        transformers.LlamaConfig(
            vocab_size=32000,
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        )
    )
    out["hf_llama_style_512x8"] = _row(llama, 1024)
    for key in ("hf_gpt2", "microsweep_gpt", "hf_llama_style_512x8"):
        row = out[key]
        print(
            f"{key}: {row['tensor_elements']:,} elements, params {row['params_fp32']:,.0f} "
            f"(fp32), ops {row['ops_per_token']:,.0f} per token, uncounted "
            f"{row['uncounted_modules'] or 'none'}",
            flush=True,
        )
    print(f"ops HF / own: {out['ops_ratio_hf_to_own']:.5f}")
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
