"""The demo: a 4-layer char-level GPT on Tiny Shakespeare, searched per layer.

Pretraining takes a few minutes once (1800 steps: about 2 minutes of CPU, 70 s on two quiet cores,
with progress and an ETA on stderr); the weights are then cached in ~/.cache/microsweep
($MICROSWEEP_CACHE). The ranges are where this model stays near its dense perplexity: beyond ~50%
sparsity or below 3 bits the 5% ceiling is out of reach.
"""

from microsweep import Bits, MicroNet, Rank, Space, Sparsity, data, models

corpus = data.tiny_shakespeare()  # a path, $MICROSWEEP_DATA, or a download into the cache
# One cycle (warm-up, then the learning rate straight down to 0) reaches in 1800 steps the dense
# perplexity of 2000 cosine steps at lr 3e-3: 5.23 / 5.15 trained on 1 / 2 threads, against
# 5.28 / 5.22 (thread counts round differently, so the weights differ a little).
model = models.gpt(
    corpus,
    n_layer=4,
    n_head=4,
    n_embd=128,
    block_size=64,
    pretrain_steps=1800,
    lr=6e-3,
    schedule="linear",
    verbose=True,  # what is pretrained, where it is cached, and progress with an ETA
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
