"""`Policy`: the plain, versioned, JSON-serializable result of one suggestion.

A policy maps layer names to `LayerPolicy` settings and carries the plain hyperparameters. It is
what the driver hands a worker and what the store keeps, so it holds no torch or Optuna objects.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from microsweep.errors import SpaceError, UsageError

__all__ = [
    "DATA_AWARE_METHODS",
    "DENSE_METHODS",
    "GROUP_METHODS",
    "METHODS",
    "PRUNE_METHODS",
    "QUANT_METHODS",
    "RankMethod",
    "concrete_block",
    "LayerPolicy",
    "Policy",
    "POLICY_MAX_BYTES",
    "POLICY_VERSION",
    "RANK_METHODS",
    "VALID_BITS",
    "valid_block",
]

POLICY_VERSION = 1
POLICY_MAX_BYTES = 64 * 2**20
"""The largest policy file `Policy.read` takes: a policy names each layer once, so even a model
of thousands of layers stays far below it, and a device or a huge file is refused at once."""
_POLICY_TAG = "microsweep.Policy"
VALID_BITS = frozenset([*range(2, 17), 32])
"""Weight and activation widths: 2..16 quantize, 32 means "not quantized" (fp32)."""


@dataclass(frozen=True)
class RankMethod:
    """What the rest of microsweep needs to know about one way of reaching a rank: its tag in
    `Policy.summary`, whether it reads a layer's calibration inputs, whether it compresses the
    layers of a `group` together, and whether its stored factors stay dense fp32."""

    tag: str
    reads_inputs: bool = False
    grouped: bool = False
    dense_only: bool = False


METHODS: Mapping[str, RankMethod] = MappingProxyType(
    {
        "plain": RankMethod(""),
        "activation": RankMethod("/act", reads_inputs=True),
        "whiten": RankMethod("/white", reads_inputs=True),
        "tt": RankMethod("/tt", dense_only=True),
        "autoencoder": RankMethod("/ae", grouped=True, dense_only=True),
        "shared": RankMethod("/shared", grouped=True, dense_only=True),
    }
)
"""The rank-method vocabulary, name -> traits. How a rank is reached: truncated SVD of the weight
(``plain``), data-aware SVD on calibration inputs (columns scaled by the inputs' magnitude, or
whitened by their Gram matrix; see `microsweep.compress.factorize`), a tensor-train of that
TT-rank (``tt``: `microsweep.compress.TTLinear`, `TTEmbedding`), latent codes of that size with
a learned decoder (``autoencoder``: `DecodedLinear`, one decoder per `group`), or a basis of that
rank shared by the layers of a `group` (``shared``: each keeps its own coefficients). The
techniques that build each form live in `microsweep.compress`."""

RANK_METHODS = tuple(METHODS)
"""Every rank method's name (a view of `METHODS`)."""
DATA_AWARE_METHODS = tuple(n for n, m in METHODS.items() if m.reads_inputs)
"""The rank methods that read a layer's calibration inputs (a view of `METHODS`)."""
GROUP_METHODS = tuple(n for n, m in METHODS.items() if m.grouped)
"""The rank methods that compress the layers of a `group` together (one decoder, one basis)."""
DENSE_METHODS = tuple(n for n, m in METHODS.items() if m.dense_only)
"""The rank methods whose stored factors stay dense fp32 (no sparsity, bits or act_bits)."""


PRUNE_METHODS: Mapping[str, str] = MappingProxyType(
    {"magnitude": "", "wanda": "/wanda", "sparsegpt": "/sgpt"}
)
"""How a sparsity is reached, name -> summary tag: the smallest |w| (``magnitude``), the
smallest |w| times the input's norm per output row (``wanda``), or the OBS saliency on
calibration inputs with the error of each removed weight moved onto the columns not yet done
(``sparsegpt``; given bits with ``gptq``, pruning and quantization in one pass)."""
QUANT_METHODS: Mapping[str, str] = MappingProxyType({"rtn": "", "gptq": "/gptq"})
"""How weights reach their bit grid, name -> summary tag: round-to-nearest (``rtn``) or GPTQ on
calibration inputs (``gptq``; columns in order, or by input energy with ``act_order``, which
with a `quant_group` takes each group's scales from the weight before any update)."""


def valid_block(block: tuple[int, ...]) -> bool:
    """Two ints >= 0, not both 0 (a 0 side spans the whole matrix side)."""
    return (
        len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in block)
        and any(block)
    )


def concrete_block(block: tuple[int, int], shape: tuple[int, ...]) -> tuple[int, int]:
    """`block` for a (rows, cols) matrix: a 0 side becomes the matrix's whole side."""
    return (block[0] or int(shape[0]), block[1] or int(shape[1]))


@dataclass(frozen=True)
class LayerPolicy:
    """Settings for one layer; the defaults leave the layer as it is.

    Order of application (see `microsweep.compress`): factorize to `rank`, prune to `sparsity`
    (unstructured, or in `block`-shaped blocks), then quantize weights to `bits` and inputs
    to `act_bits`.
    """

    sparsity: float = 0.0
    block: tuple[int, int] | None = None
    bits: int = 32
    act_bits: int = 32
    rank: int | None = None
    rank_method: str = "plain"
    group: str | None = None
    prune_method: str = "magnitude"
    quant_method: str = "rtn"
    act_order: bool = False
    quant_group: int | None = None
    band: tuple[int, int] | None = None
    """For a frequency band of a table or output head (a layer named ``"head@1"``): the rows it
    takes, as [start, stop) positions in the vocabulary ranked by falling frequency."""

    def __post_init__(self) -> None:
        if isinstance(self.band, list):
            object.__setattr__(self, "band", tuple(self.band))
        band = self.band
        if band is not None and not (
            len(band) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) for b in band)
            and 0 <= band[0] < band[1]
        ):
            raise SpaceError(
                f"band {band!r} must be two ints [start, stop) with 0 <= start < stop, the rows "
                "it takes in the vocabulary ranked by frequency"
            )
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise SpaceError(f"sparsity {self.sparsity!r} is outside [0, 1); use e.g. 0.5 for half")
        if isinstance(self.block, list):
            object.__setattr__(self, "block", tuple(self.block))
        if self.block is not None and not valid_block(self.block):
            raise SpaceError(
                f"block {self.block!r} must be two ints >= 0 such as (4, 4); 0 spans the whole "
                "side, so (1, 0) prunes whole rows"
            )
        for name in ("bits", "act_bits"):
            value = getattr(self, name)
            if value not in VALID_BITS:
                raise SpaceError(f"{name}={value!r} is not a width in 2..16 or 32 (32 means off)")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise SpaceError(f"rank {self.rank!r} must be a positive int (or None for full rank)")
        if self.rank_method not in RANK_METHODS:
            raise SpaceError(
                f"rank_method {self.rank_method!r} is not one of {', '.join(RANK_METHODS)}"
            )
        if self.rank is None and self.rank_method != "plain":  # no rank: nothing to factorize
            object.__setattr__(self, "rank_method", "plain")
        if self.rank_method in DENSE_METHODS and (
            self.sparsity or self.bits != 32 or self.act_bits != 32
        ):
            raise SpaceError(
                f"rank_method={self.rank_method!r} keeps its factors dense at fp32; drop "
                "sparsity, bits and act_bits from the layer"
            )
        if self.group is not None and not isinstance(self.group, str):
            raise SpaceError(f"group {self.group!r} must be a string naming the layers' rule")
        if self.rank_method not in GROUP_METHODS:
            object.__setattr__(self, "group", None)
        self._check_data_aware()

    def _check_data_aware(self) -> None:
        """The pruning and quantization methods are known names; one that has nothing to act
        on (no sparsity, no bits) falls back to the default, so equal layers compare equal."""
        if self.prune_method not in PRUNE_METHODS:
            raise SpaceError(
                f"prune method {self.prune_method!r} is not one of {', '.join(PRUNE_METHODS)}"
            )
        if self.quant_method not in QUANT_METHODS:
            raise SpaceError(
                f"quantization method {self.quant_method!r} is not one of "
                f"{', '.join(QUANT_METHODS)}"
            )
        if not isinstance(self.act_order, bool):
            raise SpaceError(f"act_order {self.act_order!r} must be True or False")
        g = self.quant_group
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise SpaceError(f"quant_group {g!r} must be a positive int (input columns a scale)")
        if not self.sparsity:
            object.__setattr__(self, "prune_method", "magnitude")
        if self.bits == 32:
            object.__setattr__(self, "quant_method", "rtn")
            object.__setattr__(self, "quant_group", None)
        if self.quant_method != "gptq":
            object.__setattr__(self, "act_order", False)

    @property
    def data_aware(self) -> bool:
        """Whether pruning or weight quantization reads the layer's calibration inputs."""
        return self.prune_method != "magnitude" or self.quant_method != "rtn"

    @property
    def is_identity(self) -> bool:
        """True when applying this policy changes nothing."""
        return (
            self.sparsity == 0.0 and self.bits == 32 and self.act_bits == 32 and self.rank is None
        )

    def to_json(self) -> dict[str, Any]:
        """The non-default fields, so that stored policies stay short."""
        out: dict[str, Any] = {}
        if self.sparsity:
            out["sparsity"] = self.sparsity
        if self.block is not None:
            out["block"] = list(self.block)
        if self.bits != 32:
            out["bits"] = self.bits
        if self.act_bits != 32:
            out["act_bits"] = self.act_bits
        if self.rank is not None:
            out["rank"] = self.rank
        if self.rank_method != "plain":
            out["rank_method"] = self.rank_method
        if self.group is not None:
            out["group"] = self.group
        if self.prune_method != "magnitude":
            out["prune_method"] = self.prune_method
        if self.quant_method != "rtn":
            out["quant_method"] = self.quant_method
        if self.act_order:
            out["act_order"] = True
        if self.quant_group is not None:
            out["quant_group"] = self.quant_group
        if self.band is not None:
            out["band"] = list(self.band)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LayerPolicy:
        unknown = set(data) - {
            "sparsity", "block", "bits", "act_bits", "rank", "rank_method", "group",
            "prune_method", "quant_method", "act_order", "quant_group", "band",
        }  # fmt: skip
        if unknown:
            raise SpaceError(f"unknown layer setting(s) {sorted(unknown)} in policy JSON")
        return cls(**data)


@dataclass(frozen=True)
class Policy:
    """Layer name -> `LayerPolicy`, plus hyperparameters; layers not named are left alone."""

    layers: Mapping[str, LayerPolicy] = field(default_factory=dict)
    hyper: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.hyper.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise SpaceError(f"hyperparameter {key!r} is {value}; it must be finite")

    def to_json(self) -> dict[str, Any]:
        return {
            "type": _POLICY_TAG,
            "version": POLICY_VERSION,
            "layers": {name: lp.to_json() for name, lp in self.layers.items()},
            "hyper": dict(self.hyper),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Policy:
        if not isinstance(data, Mapping) or data.get("type") != _POLICY_TAG:
            raise SpaceError("not a microsweep policy: the JSON has no type 'microsweep.Policy'")
        version = data.get("version")
        if version != POLICY_VERSION:
            raise SpaceError(
                f"policy version {version!r} is not supported by this release "
                f"(it reads version {POLICY_VERSION}); upgrade microsweep"
            )
        layers = {name: LayerPolicy.from_json(lp) for name, lp in data.get("layers", {}).items()}
        return cls(layers=layers, hyper=dict(data.get("hyper", {})))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> Policy:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpaceError(f"policy is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except RecursionError:
            raise SpaceError("policy JSON is nested too deeply to be a policy") from None
        return cls.from_json(data)

    @classmethod
    def read(
        cls,
        path: str | os.PathLike[str],
        *,
        label: str | None = None,
        limit: int = POLICY_MAX_BYTES,
    ) -> Policy:
        """The policy in the JSON file at `path` (``count --policy``, ``run --warm-start``).

        Every problem is a one-line `UsageError` naming the file as `label` (default ``policy
        file PATH``): a path that is not a regular file (a device, FIFO or folder; opened
        without blocking and checked on the open file), a file over `limit` bytes (read with
        that limit, since /dev/zero and /proc files report no size), text that is not UTF-8, or
        JSON that is not a policy.
        """
        name = os.fspath(path)
        where = label or f"policy file {name}"
        try:
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise UsageError(f"cannot read {where}: {exc.strerror or exc}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UsageError(
                    f"{where} is not a regular file; pass a policy JSON file (as 'microsweep "
                    "show --json FILE' writes)"
                )
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(limit + 1)
        except OSError as exc:
            raise UsageError(f"cannot read {where}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        if len(data) > limit:
            size = f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit} bytes"
            raise UsageError(
                f"{where} is larger than {size}, far more than a policy needs; pass a policy "
                "JSON file"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{where} is not UTF-8 text (byte {exc.start})") from None
        try:
            return cls.loads(text)
        except (SpaceError, TypeError, AttributeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"{where}: {first}") from None

    NOTATION = (
        "s=0.50 sparsity (blk: in blocks), w4 weight bits, a8 activation bits, r=32 rank "
        "(/act, /white: data-aware SVD; /tt: tensor-train of that TT-rank; /ae: latent codes "
        "with a learned decoder; /shared: a basis shared across the rule's layers); "
        "layers not named are left dense"
    )
    """What `summary` writes, for the places that show it."""

    def summary(self, limit: int = 6) -> str:
        """A short human line such as ``blocks.0.mlp.c_fc: s=0.50 b=4 r=32; ...``."""
        parts = []
        for name, lp in self.layers.items():
            if lp.is_identity:
                continue
            bits = []
            if lp.sparsity:
                block = "" if lp.block is None else "blk"
                bits.append(f"s={lp.sparsity:.2f}{block}{PRUNE_METHODS[lp.prune_method]}")
            if lp.bits != 32:
                order = "+ao" if lp.act_order else ""
                group = "" if lp.quant_group is None else f"/g{lp.quant_group}"
                bits.append(f"w{lp.bits}{QUANT_METHODS[lp.quant_method]}{order}{group}")
            if lp.act_bits != 32:
                bits.append(f"a{lp.act_bits}")
            if lp.rank is not None:
                how = METHODS[lp.rank_method].tag
                bits.append(f"r={lp.rank}{how}")
            parts.append(f"{name}: {' '.join(bits)}")
        shown = parts[:limit]
        if len(parts) > limit:
            shown.append(f"... {len(parts) - limit} more")
        for key, value in self.hyper.items():
            shown.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
        return "; ".join(shown) if shown else "dense"
