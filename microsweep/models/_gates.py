"""`LinearLSTM`: an LSTM whose gate matrices are `nn.Linear` children, so they can be compressed.

`nn.LSTM` keeps its gate matrices as flat parameters (``weight_ih_l0``, ``weight_hh_l0``, ...)
that no per-layer compression can replace. `LinearLSTM` computes the same recurrence with one
Linear per matrix, named like those parameters (``lstm.weight_ih_l0`` is the input-to-hidden
Linear of layer 0, its bias ``b_ih``; ``lstm.weight_hh_l0_reverse`` the hidden-to-hidden one of
the reverse direction), so a rule names a gate matrix exactly as torch names its weight.
`linear_gates_` swaps an `nn.LSTM` for one sharing its parameters: the same numbers, no copy.
"""

from __future__ import annotations

import torch
from torch import nn

from microsweep.errors import UsageError

__all__ = ["LinearLSTM", "gate_names", "linear_gates_"]


def gate_names(num_layers: int, bidirectional: bool, proj_size: int = 0) -> list[str]:
    """The gate-matrix names of an LSTM in torch's order: ``weight_ih_l{k}{_reverse}``,
    ``weight_hh_l{k}{_reverse}`` and, with a projection, ``weight_hr_l{k}{_reverse}``."""
    names = []
    for layer in range(num_layers):
        for suffix in ("", "_reverse") if bidirectional else ("",):
            kinds = ("ih", "hh", "hr") if proj_size else ("ih", "hh")
            names += [f"weight_{kind}_l{layer}{suffix}" for kind in kinds]
    return names


class LinearLSTM(nn.Module):
    """A batch-first or sequence-first LSTM stack whose gate matrices are Linear children.

    Per layer and direction: ``gates = ih(x_t) + hh(h_{t-1})`` (4h rows in torch's i, f, g, o
    order), ``c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g)``, ``h_t = sigmoid(o) tanh(c_t)``,
    projected by ``hr`` when `proj_size` is set. The input product runs over the whole sequence
    at once; only the recurrent one steps. Returns ``(output, (h_n, c_n))`` like `nn.LSTM`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
    ) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        out = proj_size or hidden_size
        directions = 2 if bidirectional else 1
        for name in gate_names(num_layers, bidirectional, proj_size):
            layer = int(name.split("_l")[1].split("_")[0])
            n_in = input_size if layer == 0 else out * directions
            if name.startswith("weight_ih"):
                module = nn.Linear(n_in, 4 * hidden_size, bias=bias)
            elif name.startswith("weight_hh"):
                module = nn.Linear(out, 4 * hidden_size, bias=bias)
            else:
                module = nn.Linear(hidden_size, proj_size, bias=False)
            self.add_module(name, module)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM) -> LinearLSTM:
        """The same LSTM with its parameters shared (not copied) by the gate Linears."""
        with torch.device("meta"):  # every tensor is replaced below: draw no random numbers
            new = cls(
                lstm.input_size,
                lstm.hidden_size,
                lstm.num_layers,
                bias=lstm.bias,
                batch_first=lstm.batch_first,
                dropout=lstm.dropout,
                bidirectional=lstm.bidirectional,
                proj_size=lstm.proj_size,
            )
        for name in gate_names(lstm.num_layers, lstm.bidirectional, lstm.proj_size):
            linear = getattr(new, name)
            linear.weight = getattr(lstm, name)
            if linear.bias is not None:
                linear.bias = getattr(lstm, name.replace("weight", "bias"))
        return new.train(lstm.training)

    def _direction(
        self, x: torch.Tensor, name: str, reverse: bool, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer and direction over (T, B, n_in): outputs (T, B, out), h_T, c_T."""
        ih, hh = getattr(self, f"weight_ih_{name}"), getattr(self, f"weight_hh_{name}")
        hr = getattr(self, f"weight_hr_{name}") if self.proj_size else None
        projected = ih(x)  # (T, B, 4h): the input product of every step at once
        h, c = h0, c0
        outputs = []
        steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        for t in steps:
            i, f, g, o = (projected[t] + hh(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if hr is not None:
                h = hr(h)
            outputs.append(h)
        if reverse:
            outputs.reverse()
        return torch.stack(outputs), h, c

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        directions = 2 if self.bidirectional else 1
        out_size = self.proj_size or self.hidden_size
        n = self.num_layers * directions
        batch = x.shape[1]
        if state is None:
            h0 = x.new_zeros(n, batch, out_size)
            c0 = x.new_zeros(n, batch, self.hidden_size)
        else:
            h0, c0 = state
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        hs, cs = [], []
        for layer in range(self.num_layers):
            outs = []
            for d, suffix in enumerate(("", "_reverse")[:directions]):
                k = layer * directions + d
                y, h, c = self._direction(x, f"l{layer}{suffix}", d == 1, h0[k], c0[k])
                outs.append(y)
                hs.append(h)
                cs.append(c)
            x = outs[0] if directions == 1 else torch.cat(outs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = nn.functional.dropout(x, self.dropout, training=True)
        h_n, c_n = torch.stack(hs), torch.stack(cs)
        if not batched:
            return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            x = x.transpose(0, 1)
        return x, (h_n, c_n)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"batch_first={self.batch_first}, bidirectional={self.bidirectional}"
        )


def linear_gates_(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Replace `nn.LSTM` submodules (those at `names`, or all) by `LinearLSTM`s sharing their
    parameters, in place; returns `model`. An LSTM given as the model itself is refused."""
    found = [(n, m) for n, m in model.named_modules() if type(m) is nn.LSTM]
    for name, lstm in found:
        if names is not None and name not in names:
            continue
        if not name:
            raise UsageError("the model is an nn.LSTM itself; wrap it in a module to compress it")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LinearLSTM.from_lstm(lstm))
    return model
