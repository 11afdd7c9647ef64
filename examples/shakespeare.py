"""The demo: a 4-layer char-level GPT on Tiny Shakespeare, searched per layer.

Pretraining takes a few minutes once; the weights are cached in ~/.cache/microsweep. The ranges
are where this model stays near its dense perplexity: beyond ~50% sparsity or below 3 bits the
5% ceiling is out of reach.
"""

from microsweep import Bits, MicroNet, Rank, Space, Sparsity, data, models

corpus = data.tiny_shakespeare()  # a path, $MICROSWEEP_DATA, or a download into the cache
model = models.gpt(
    corpus, n_layer=4, n_head=4, n_embd=128, block_size=64, pretrain_steps=2000, verbose=True
)

space = Space(
    model,
    rules={
        "blocks.*.attn.*": dict(
            sparsity=Sparsity(0.0, 0.5, step=0.05), bits=Bits(4, 6, 8), act_bits=Bits(8, 16)
        ),
        "blocks.*.mlp.*": dict(
            sparsity=Sparsity(0.0, 0.5, step=0.05),
            bits=Bits(3, 4, 6, 8),
            act_bits=Bits(8, 16),
            rank=Rank(0.25, 1.0),
        ),
        "head": dict(bits=Bits(4, 6, 8), act_bits=Bits(8, 16)),
    },
)

objective = MicroNet(
    perplexity_ceiling=1.05, relative_to="dense", baseline="dense", eval_tokens=16384
)
