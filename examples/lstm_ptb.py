"""A word-level LSTM on the Penn Treebank, its gate matrices and embedding searched per layer.

The small setting of the RNN-compression work: 2 LSTM layers of 200, embedding = hidden, tied
embedding and softmax. Only PTB's validation and test splits are at hand here, so the model
trains on `valid.txt` and is evaluated on `test.txt` (set MICROSWEEP_DATA to a folder holding
ptb/, or pass path=). The rules name the gate matrices as torch names the LSTM's parameters;
the sweep runs the LSTM with one Linear per gate matrix so each can be pruned, quantized or
factorized. The tied table holds most of the parameters and feeds the head's operations.
"""

from microsweep import Bits, MicroNet, Rank, Space, Sparsity, data, models

corpus = data.ptb(train="valid", val="test")
model = models.lstm(
    corpus,
    n_embd=200,
    n_hidden=200,
    n_layer=2,
    pretrain_steps=1500,
    lr=3e-3,
    verbose=True,  # what is pretrained, where it is cached, and progress with an ETA
)

space = Space(
    model,
    rules={
        "lstm.weight_ih_l*": dict(
            sparsity=Sparsity(0.0, 0.8, step=0.1), bits=Bits(4, 6, 8), rank=Rank(0.25, 1.0)
        ),
        "lstm.weight_hh_l*": dict(
            sparsity=Sparsity(0.0, 0.8, step=0.1), bits=Bits(4, 6, 8), rank=Rank(0.25, 1.0)
        ),
        "wte": dict(sparsity=Sparsity(0.0, 0.9, step=0.1), bits=Bits(3, 4, 6, 8)),
    },
)

objective = MicroNet(
    perplexity_ceiling=1.05, relative_to="dense", baseline="dense", eval_tokens=8192
)
