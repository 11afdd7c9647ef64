"""A tiny space for tests and smoke checks: a 2-layer GPT that pretrains in seconds.

The corpus comes from $MICROSWEEP_DATA (a folder with tinyshakespeare/input.txt) or the cache.
"""

from microsweep import Bits, Float, MicroNet, Rank, Space, Sparsity, data, models

corpus = data.tiny_shakespeare()
model = models.gpt(corpus, n_layer=2, n_head=2, n_embd=32, block_size=32, pretrain_steps=300)

space = Space(
    model,
    rules={
        "blocks.*.attn.*": dict(sparsity=Sparsity(0.0, 0.8, step=0.1), bits=Bits(4, 8, 16, 32)),
        "blocks.*.mlp.*": dict(
            sparsity=Sparsity(0.0, 0.9, step=0.1),
            bits=Bits(4, 8, 32),
            act_bits=Bits(8, 32),
            rank=Rank(0.25, 1.0),
        ),
        "head": dict(bits=Bits(6, 8, 32), tied=True),
    },
    hyper={"finetune_lr": Float(1e-5, 1e-3, log=True)},
)

objective = MicroNet(
    perplexity_ceiling=1.10, relative_to="dense", baseline="dense", eval_tokens=2048
)
