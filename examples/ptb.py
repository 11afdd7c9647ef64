"""A word-level task: a 2-layer GPT on the Penn Treebank, searched per layer.

Only PTB's validation and test splits are at hand here, so the model trains on `valid.txt`
and is evaluated on `test.txt` (set MICROSWEEP_DATA to a folder holding ptb/, or pass path=).
The head is tied to the 6k-word embedding and costs as many operations per token as both
blocks together, so the vocabulary's knobs matter as much as the blocks': the tied table and
head are cut into frequency bands (the most frequent 10% of words, the next 30%, the rarest
60%), each band with its own rank (a factorized band keeps its table and head factors tied),
bits and sparsity, so rare words can be smaller.
"""

from microsweep import Bands, Bits, MicroNet, Rank, Space, Sparsity, data, models

corpus = data.ptb(train="valid", val="test")
model = models.gpt(
    corpus,
    n_layer=2,
    n_head=4,
    n_embd=128,
    block_size=64,
    pretrain_steps=800,
    lr=2e-3,
    verbose=True,  # what is pretrained, where it is cached, and progress with an ETA
)

space = Space(
    model,
    rules={
        "blocks.*.attn.*": dict(
            sparsity=Sparsity(0.0, 0.6, step=0.1), bits=Bits(4, 6, 8), act_bits=Bits(8, 16)
        ),
        "blocks.*.mlp.*": dict(
            sparsity=Sparsity(0.0, 0.6, step=0.1),
            bits=Bits(3, 4, 6, 8),
            act_bits=Bits(8, 16),
            rank=Rank(0.25, 1.0),
        ),
        "head": dict(
            bands=Bands(0.1, 0.4),
            sparsity=Sparsity(0.0, 0.6, step=0.1),
            bits=Bits(4, 6, 8),
            act_bits=Bits(8, 16),
            rank=Rank(0.0625, 1.0),
        ),
    },
)

objective = MicroNet(
    perplexity_ceiling=1.05, relative_to="dense", baseline="dense", eval_tokens=4096
)
