"""Offline weight compression by an auto-decoder: rows of a weight stored as latent codes plus a
small non-linear decoder (Banaei et al. 2023, reference §3), as the layer form `DecodedLinear`.

A weight W (out, in), or the rows of several weights with the same `in` stacked ("one module
type across all layers": one decoder shared by the layers), is replaced by codes Z (rows, k) and
a decoder D: R^k -> R^in, ``D(z) = W2 tanh(W1 z + b1) + b2``, so that ``W_hat = D(Z)``. Codes and
decoder are trained jointly on the weights alone (an auto-decoder: no encoder exists, so none is
stored), full batch, with Adam in float32 for a fixed number of steps from a seeded generator.

Loss (`reconstruction_loss`), over all R stacked rows of the matrices W_m (r_m rows each)::

    loss = 0.909 * (1/R) sum_rows (1 - cos(w, w_hat))
         + 0.091 * sum_m (r_m / R) * ||W_m - W_hat_m||_F^2 / ||W_m||_F^2

The L2 term is each matrix's relative squared error, so the 0.909 / 0.091 weighting means the
same whatever the weights' scale. Data-aware (a calibration Gram matrix G_m = X^T X / n given):
matrix m's term becomes ``tr(E G_m E^T) / tr(W_m G_m W_m^T)`` with E = W_m - W_hat_m, the
relative squared error of the layer's outputs on the calibration inputs.

Initialisation is the truncated SVD at the same k, exactly: with W = U S V^T, the codes are
``atanh(c * U_k)`` (c per column, so every entry lies in [-0.5, 0.5] after the tanh), the first k
hidden units pass each code through (W1 = identity there, b1 = 0) and W2's first k columns are
``V_k S_k / c``; the remaining hidden units start with random W1 rows and zero W2 columns. The
returned state is the lowest-loss one met during training, so the result is never worse than
truncated SVD at the same k by the loss above.

The decoder runs once at load time: a `DecodedLinear` caches its decoded weight for evaluation,
and the counter charges per-token ops of the dense decoded matrix while storing only codes,
decoder and bias (the rules in `microsweep.compress._techniques._autoencoder`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from microsweep.errors import SpaceError

__all__ = [
    "COSINE_WEIGHT",
    "L2_WEIGHT",
    "AutoDecoder",
    "DecodedLinear",
    "compress_linears",
    "reconstruction_loss",
    "train_decoder",
]

COSINE_WEIGHT = 0.909
"""Weight of the mean cosine distance (1 - cos) between a row and its reconstruction."""
L2_WEIGHT = 0.091
"""Weight of the relative squared (L2) reconstruction error."""

ACTIVATIONS: tuple[str, ...] = ("tanh",)
"""Decoder non-linearities this release builds (the SVD-exact initialisation needs atanh)."""

_INIT_SPAN = 0.5
"""Largest |tanh(code)| at initialisation: the pass-through units start near their linear range."""
_TINY = 1e-30
"""Floor of a loss denominator (an all-zero matrix or row)."""


def _check_int(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpaceError(f"{what}={value!r} must be an int >= {low}")
    return value


class AutoDecoder(nn.Module):
    """The shared decoder ``D(z) = W2 tanh(W1 z + b1) + b2`` from codes (..., k) to rows
    (..., out_features). Its weights are plain Parameters, not Linear children: it runs once at
    load time, so the counter charges it storage and no per-token ops."""

    def __init__(
        self,
        code_dim: int,
        hidden: int,
        out_features: int,
        *,
        activation: str = "tanh",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_int(code_dim, "code_dim", 1)
        _check_int(hidden, "hidden", 1)
        _check_int(out_features, "out_features", 1)
        if activation not in ACTIVATIONS:
            raise SpaceError(
                f"decoder activation {activation!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        self.code_dim = code_dim
        self.hidden = hidden
        self.out_features = out_features
        self.activation = activation
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.hidden_weight = nn.Parameter(torch.empty(hidden, code_dim, **kw))
        self.hidden_bias = nn.Parameter(torch.empty(hidden, **kw))
        self.out_weight = nn.Parameter(torch.empty(out_features, hidden, **kw))
        self.out_bias = nn.Parameter(torch.empty(out_features, **kw))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Rows (..., out_features) decoded from `codes` (..., code_dim)."""
        h = torch.tanh(F.linear(codes, self.hidden_weight, self.hidden_bias))
        return F.linear(h, self.out_weight, self.out_bias)

    def spec(self) -> dict[str, Any]:
        """The shapes as a JSON dict, read back by `from_spec`."""
        return {
            "type": "ae_decoder",
            "code_dim": int(self.code_dim),
            "hidden": int(self.hidden),
            "out": int(self.out_features),
            "activation": self.activation,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> AutoDecoder:
        """An uninitialised decoder of the shapes in `spec` (torch.empty only, so it can be
        built on the meta device and filled from a state dict)."""
        if not isinstance(spec, Mapping) or spec.get("type") != "ae_decoder":
            raise SpaceError(f"not an auto-decoder spec: {spec!r}")
        try:
            return cls(
                spec["code_dim"],
                spec["hidden"],
                spec["out"],
                activation=spec.get("activation", "tanh"),
            )
        except KeyError as exc:
            raise SpaceError(f"auto-decoder spec lacks {exc.args[0]!r}: {dict(spec)!r}") from None

    def extra_repr(self) -> str:
        return (
            f"code_dim={self.code_dim}, hidden={self.hidden}, out_features={self.out_features}, "
            f"activation={self.activation}"
        )


class DecodedLinear(nn.Module):
    """A drop-in for ``nn.Linear`` whose weight is ``decoder(codes)``: `codes` (out, k) and an
    `AutoDecoder` that may be the same module object in several layers (cross-layer codes).

    The decoded weight is cached in a plain attribute (not a buffer: nothing extra is exported)
    and reused while no parameter it depends on has changed; with autograd recording and a
    trainable parameter the weight is decoded on every call, so training sees the graph.
    """

    def __init__(
        self,
        decoder: AutoDecoder,
        out_features: int,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(decoder, AutoDecoder):
            raise SpaceError(f"decoder must be an AutoDecoder, got {type(decoder).__name__}")
        _check_int(out_features, "out_features", 1)
        self.in_features = decoder.out_features
        self.out_features = out_features
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.codes = nn.Parameter(torch.empty(out_features, decoder.code_dim, **kw))
        self.decoder = decoder
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        self._decoded: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @property
    def code_dim(self) -> int:
        """k, the length of one row's code."""
        return int(self.codes.shape[1])

    def _sources(self) -> list[torch.Tensor]:
        return [self.codes, *self.decoder.parameters()]

    def weight_matrix(self) -> torch.Tensor:
        """The decoded weight (out, in): cached and reused until a code or decoder parameter
        changes (in place or replaced); decoded afresh, with its graph, when training."""
        sources = self._sources()
        if torch.is_grad_enabled() and any(p.requires_grad for p in sources):
            return self.decoder(self.codes)
        key = tuple(
            (id(p), p.data_ptr(), p._version, p.device, p.dtype, tuple(p.shape)) for p in sources
        )
        held = self._decoded
        stale = held is None or held[0] != key
        if not stale and torch.is_grad_enabled() and held[1].is_inference():
            stale = True  # an inference-mode tensor cannot enter an autograd-recorded op
        if stale:
            with torch.no_grad():
                held = (key, self.decoder(self.codes))
            self._decoded = held
        return held[1]

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight, for code that reads ``linear.weight`` (see `weight_matrix`)."""
        return self.weight_matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, decoded weight, bias)``."""
        return F.linear(x, self.weight_matrix(), self.bias)

    def spec(self) -> dict[str, Any]:
        """The shapes as a JSON dict; the decoder is described by its own `AutoDecoder.spec`
        (once per shared decoder) and passed to `from_spec`."""
        return {
            "type": "decoded",
            "in": int(self.in_features),
            "out": int(self.out_features),
            "code_dim": self.code_dim,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], decoder: AutoDecoder) -> DecodedLinear:
        """An uninitialised layer of the shapes in `spec` around `decoder` (torch.empty only)."""
        if not isinstance(spec, Mapping) or spec.get("type") != "decoded":
            raise SpaceError(f"not a decoded-linear spec: {spec!r}")
        if not isinstance(decoder, AutoDecoder):
            raise SpaceError(f"decoder must be an AutoDecoder, got {type(decoder).__name__}")
        try:
            in_f, k, out_f = spec["in"], spec["code_dim"], spec["out"]
            bias = bool(spec["bias"])
        except KeyError as exc:
            raise SpaceError(f"decoded-linear spec lacks {exc.args[0]!r}: {dict(spec)!r}") from None
        if (in_f, k) != (decoder.out_features, decoder.code_dim):
            raise SpaceError(
                f"decoded-linear spec wants in={in_f}, code_dim={k} but the decoder gives "
                f"out={decoder.out_features}, code_dim={decoder.code_dim}"
            )
        return cls(decoder, out_f, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"code_dim={self.code_dim}, bias={self.bias is not None}"
        )


def _check_weights(weights: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence) or not weights:
        raise SpaceError(f"{what} must be a non-empty list of 2-D tensors")
    out = []
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise SpaceError(f"{what}[{i}] must be a 2-D float tensor")
        if w.shape[0] < 1 or w.shape[1] < 1:
            raise SpaceError(f"{what}[{i}] has an empty shape {tuple(w.shape)}")
        out.append(w)
    in_f = out[0].shape[1]
    if any(w.shape[1] != in_f for w in out):
        shapes = ", ".join(str(tuple(w.shape)) for w in out)
        raise SpaceError(
            f"jointly decoded matrices must share their input size (columns); got {shapes}"
        )
    return out


def _check_grams(
    gram: Sequence[torch.Tensor | None] | None, n: int, in_f: int
) -> list[torch.Tensor | None]:
    if gram is None:
        return [None] * n
    if isinstance(gram, torch.Tensor) or not isinstance(gram, Sequence) or len(gram) != n:
        raise SpaceError(f"gram must be a list of {n} (in, in) tensors or None, one per matrix")
    for i, g in enumerate(gram):
        if g is not None and (not isinstance(g, torch.Tensor) or tuple(g.shape) != (in_f, in_f)):
            raise SpaceError(f"gram[{i}] must be a ({in_f}, {in_f}) tensor or None")
    return list(gram)


def reconstruction_loss(
    weights: Sequence[torch.Tensor],
    decoded: Sequence[torch.Tensor],
    gram: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The training loss of `train_decoder` for matrices `weights` and their reconstructions
    `decoded`: 0.909 x mean cosine distance over all rows + 0.091 x relative squared error
    (per matrix, weighted by its share of the rows; data-aware with ``gram[m]``)."""
    weights = _check_weights(weights, "weights")
    if len(decoded) != len(weights) or any(
        d.shape != w.shape for d, w in zip(decoded, weights, strict=False)
    ):
        raise SpaceError("decoded must hold one tensor of the same shape per weight")
    grams = _check_grams(gram, len(weights), weights[0].shape[1])
    rows = sum(w.shape[0] for w in weights)
    cos_sum = weights[0].new_zeros(())
    l2 = weights[0].new_zeros(())
    for w, d, g in zip(weights, decoded, grams, strict=True):
        dot = (w * d).sum(dim=1)
        norms = (w.norm(dim=1) * d.norm(dim=1)).clamp_min(_TINY)
        cos_sum = cos_sum + (1 - dot / norms).sum()
        err = w - d
        if g is None:
            num, den = err.pow(2).sum(), w.pow(2).sum()
        else:
            g = g.to(w)
            num, den = ((err @ g) * err).sum(), ((w @ g) * w).sum()
        l2 = l2 + (w.shape[0] / rows) * num / den.clamp_min(_TINY)
    return COSINE_WEIGHT * cos_sum / rows + L2_WEIGHT * l2


def _svd_init(
    stacked: torch.Tensor, k: int, hidden: int, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Codes and decoder state (float32) that decode exactly to the rank-k truncated SVD of
    `stacked` (see the module docstring)."""
    u, s, vh = torch.linalg.svd(stacked.double(), full_matrices=False)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    c = _INIT_SPAN / u.abs().amax(dim=0).clamp_min(_TINY)
    codes = torch.atanh(u * c)
    in_f = stacked.shape[1]
    w1 = torch.zeros(hidden, k, dtype=torch.float64)
    w1[:k] = torch.eye(k, dtype=torch.float64)
    b1 = torch.zeros(hidden, dtype=torch.float64)
    extra = hidden - k
    if extra:
        # free units: random directions at a scale where tanh bends over the codes' range
        spread = codes.std(dim=0).clamp_min(1e-3)
        w1[k:] = torch.randn(extra, k, generator=generator, dtype=torch.float64) / (
            spread * math.sqrt(k)
        )
        b1[k:] = torch.randn(extra, generator=generator, dtype=torch.float64) * 0.5
    w2 = torch.zeros(in_f, hidden, dtype=torch.float64)
    w2[:, :k] = (vh.T * s[None, :]) / c[None, :]
    state = {
        "hidden_weight": w1,
        "hidden_bias": b1,
        "out_weight": w2,
        "out_bias": torch.zeros(in_f, dtype=torch.float64),
    }
    return codes.float(), {name: t.float() for name, t in state.items()}


def train_decoder(
    weights: list[torch.Tensor],
    code_dim: int,
    hidden: int | None = None,
    *,
    steps: int = 300,
    lr: float = 3e-2,
    seed: int = 0,
    gram: list[torch.Tensor | None] | None = None,
) -> tuple[list[torch.Tensor], AutoDecoder]:
    """Fit codes (one (rows, code_dim) tensor per matrix) and one shared `AutoDecoder` to the
    stacked rows of `weights` (all with the same number of columns).

    Starts from the rank-`code_dim` truncated SVD (decoded exactly), then runs `steps` full-batch
    Adam steps at `lr` on `reconstruction_loss` (data-aware with `gram`, one (in, in) Gram
    matrix or None per weight) and returns the lowest-loss state met, so ``steps=0`` gives the
    SVD itself. `hidden` defaults to ``2 * code_dim`` and must be >= code_dim. Deterministic for
    a given `seed`; float32 on the weights' device; outputs in the first weight's dtype.
    """
    weights = _check_weights(weights, "weights")
    in_f = weights[0].shape[1]
    grams = _check_grams(gram, len(weights), in_f)
    hidden = _check_training(weights, code_dim, hidden, steps, lr, seed)
    device, dtype = weights[0].device, weights[0].dtype
    targets = [w.detach().to(device=device, dtype=torch.float32) for w in weights]
    if not all(bool(torch.isfinite(t).all()) for t in targets):
        raise SpaceError("weights hold NaN or infinite values")
    stacked = torch.cat(targets)
    # train on weights of unit RMS (Adam's step size is absolute); the scale goes into W2, b2
    scale = float(stacked.pow(2).mean().sqrt()) or 1.0
    targets = [t / scale for t in targets]
    g32 = [None if g is None else g.detach().to(device=device, dtype=torch.float32) for g in grams]

    generator = torch.Generator().manual_seed(seed)
    codes0, state0 = _svd_init(stacked.cpu() / scale, code_dim, hidden, generator)
    decoder = AutoDecoder(code_dim, hidden, in_f, device=device, dtype=torch.float32)
    codes = nn.Parameter(codes0.to(device))
    with torch.no_grad():
        for name, value in state0.items():
            getattr(decoder, name).copy_(value)
    params = [codes, *decoder.parameters()]
    sizes = [w.shape[0] for w in targets]

    def loss_now() -> torch.Tensor:
        decoded = torch.split(decoder(codes), sizes)
        return reconstruction_loss(targets, list(decoded), g32)

    best_state = _fit(params, loss_now, steps, lr)
    if not best_state:
        raise SpaceError("the reconstruction loss is not finite at the SVD start; check weights")
    with torch.no_grad():
        for p, saved in zip(params, best_state, strict=True):
            p.copy_(saved)
        decoder.out_weight.mul_(scale)
        decoder.out_bias.mul_(scale)
    decoder = decoder.to(dtype=dtype)
    out_codes = [c.detach().to(dtype=dtype).clone() for c in torch.split(codes.detach(), sizes)]
    return out_codes, decoder.requires_grad_(True)


def _check_training(
    weights: list[torch.Tensor],
    code_dim: int,
    hidden: int | None,
    steps: int,
    lr: float,
    seed: int,
) -> int:
    """One-line `SpaceError`s for `train_decoder`'s settings; the hidden width to use."""
    in_f = weights[0].shape[1]
    rows = sum(w.shape[0] for w in weights)
    _check_int(code_dim, "code_dim", 1)
    if code_dim > min(rows, in_f):
        raise SpaceError(
            f"code_dim={code_dim} exceeds min(rows, in)={min(rows, in_f)} of the stacked weights"
        )
    hidden = 2 * code_dim if hidden is None else hidden
    _check_int(hidden, "hidden", code_dim)
    _check_int(steps, "steps", 0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise SpaceError(f"lr={lr!r} must be a positive number")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpaceError(f"seed={seed!r} must be an int")
    return hidden


def _fit(params: list[nn.Parameter], loss_now: Any, steps: int, lr: float) -> list[torch.Tensor]:
    """`steps` full-batch Adam steps at `lr` on `loss_now()`; the parameters' values at the
    lowest loss met (the start included), or [] when no loss was finite."""
    best = math.inf
    best_state: list[torch.Tensor] = []
    optimizer = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for step in range(steps + 1):
            loss = loss_now()
            value = float(loss.detach())
            if value < best:
                best = value
                best_state = [p.detach().clone() for p in params]
            if step == steps or not math.isfinite(value):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return best_state


def compress_linears(
    linears: Mapping[str, nn.Linear],
    code_dim: int,
    hidden: int | None = None,
    joint: bool = True,
    *,
    gram: Mapping[str, torch.Tensor] | None = None,
    **train_kw: Any,
) -> dict[str, DecodedLinear]:
    """Replace each Linear of `linears` by a `DecodedLinear` of `code_dim` codes per row: with
    ``joint=True`` all share one decoder trained on their stacked rows (they must share `in`),
    otherwise each gets its own. `gram` maps a name to its (in, in) calibration Gram matrix for
    the data-aware loss; `train_kw` goes to `train_decoder` (steps, lr, seed). Each new layer
    keeps the original bias Parameter and the original's training flag."""
    if not isinstance(linears, Mapping) or not linears:
        raise SpaceError("linears must be a non-empty dict of name -> nn.Linear")
    for name, linear in linears.items():
        if not isinstance(linear, nn.Linear):
            raise SpaceError(f"{name!r} is a {type(linear).__name__}, not an nn.Linear")
    gram = {} if gram is None else gram
    unknown = sorted(set(gram) - set(linears))
    if unknown:
        raise SpaceError(f"gram names layers not in linears: {', '.join(map(repr, unknown))}")
    names = list(linears)
    groups = [names] if joint else [[n] for n in names]
    if joint and len({linears[n].in_features for n in names}) > 1:
        sizes = ", ".join(f"{n}: {linears[n].in_features}" for n in names)
        raise SpaceError(
            f"joint codes need one input size for all layers ({sizes}); "
            "group the layers by input size or pass joint=False"
        )
    out: dict[str, DecodedLinear] = {}
    for group in groups:
        weights = [linears[n].weight.detach() for n in group]
        grams = [gram.get(n) for n in group] if gram else None
        codes, decoder = train_decoder(weights, code_dim, hidden, gram=grams, **train_kw)
        for n, c in zip(group, codes, strict=True):
            linear = linears[n]
            w = linear.weight
            layer = DecodedLinear(
                decoder, linear.out_features, bias=False, device=w.device, dtype=w.dtype
            )
            with torch.no_grad():
                layer.codes.copy_(c)
            if linear.bias is not None:
                layer.bias = linear.bias
            out[n] = layer.train(linear.training)
    return out
