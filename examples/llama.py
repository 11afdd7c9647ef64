"""A Llama-style char model (transformers) on Tiny Shakespeare, searched per layer.

4 layers, hidden 128, 4 attention heads sharing 2 key/value heads (grouped-query attention), a
gated MLP of 384, rotary positions, RMSNorm, tied embeddings, windows of 128 characters: 0.80M
parameters. Pretraining takes 2500 steps once (274 s on one CPU thread beside other work, with
progress and an ETA on stderr); the weights then load from the cache in ~/.cache/microsweep
($MICROSWEEP_CACHE) in about 2 s, keyed by the config, the corpus and every training setting.
The dense perplexity is 4.17 on the 16384 evaluation characters (a unigram model: 28.4).
transformers is an optional extra: ``pip install -e ".[hf]"``.
"""

from transformers import LlamaConfig

from microsweep import Bits, MicroNet, Rank, Space, Sparsity, data, models

corpus = data.tiny_shakespeare()  # a path, $MICROSWEEP_DATA, or a download into the cache
config = LlamaConfig(
    vocab_size=corpus.vocab_size,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped: two query heads read each key/value head
    intermediate_size=384,
    max_position_embeddings=128,  # the window, which evaluation reads from the config
    tie_word_embeddings=True,
)
# One cycle (warm-up, then the learning rate straight down to 0), as the GPT demo is trained.
model = models.hf_pretrained(
    config,
    corpus,
    block_size=128,
    pretrain_steps=2500,
    batch_size=12,
    lr=3e-3,
    schedule="linear",
    warmup=100,
    verbose=True,  # what is pretrained, where it is cached, and progress with an ETA
)

space = Space(
    model,
    rules={
        "model.layers.*.self_attn.*": dict(
            sparsity=Sparsity(0.0, 0.5, step=0.05), bits=Bits(4, 6, 8), act_bits=Bits(8, 16)
        ),
        "model.layers.*.mlp.*": dict(
            sparsity=Sparsity(0.0, 0.5, step=0.05),
            bits=Bits(3, 4, 6, 8),
            act_bits=Bits(8, 16),
            rank=Rank(0.25, 1.0),
        ),
    },
)

objective = MicroNet(
    perplexity_ceiling=1.05, relative_to="dense", baseline="dense", eval_tokens=16384
)
