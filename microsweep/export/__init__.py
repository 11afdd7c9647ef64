"""Export a compressed model to a real artifact whose size is what the MicroNet count says.

``save(model, path, policy=..., recipe=...)`` writes a ``.msz`` file, ``load(path)`` rebuilds
the torch model, ``export_trial(name, number, path)`` does both steps' first half for a stored
sweep trial, and ``round_to_storage`` rounds a model to fp16 when the 16-bit allowance applies
(the trial runner calls it, so evaluated and exported models are the same).

File format, version 1 (all integers little-endian)::

    magic            8 bytes   89 4D 53 5A 0D 0A 1A 0A  ("\\x89MSZ\\r\\n\\x1a\\n")
    format version   u32       1
    header length    u64       H
    header sha256    32 bytes  of the H header bytes
    header           H bytes   UTF-8 JSON
    payload          the tensors, each segment padded to a whole byte

Header keys: ``format``, ``microsweep`` (writer version), ``recipe`` (for
`microsweep.models.build`), ``policy`` (Policy JSON), ``count_config`` (CountConfig JSON),
``freebie``, ``counted_params``, ``extra`` (provenance: export_trial stores the sweep, trial,
``model_fingerprint``, ``data_fingerprint`` and the stored perplexity), ``layers`` ([path, spec]
of each replaced Linear: compressed / low_rank / linear with shapes, bits, act_bits, sparse,
block), ``payload_bytes``, ``payload_sha256`` and ``tensors``, one row per stored tensor:
``refs`` (every module.field name holding it: a tied weight is stored once, re-tied on load),
``shape``, ``values`` (``f32`` raw, ``f16`` raw, or ``int``: two's complement bit-packed at
``bits`` bits, times the per-row fp32 scales of row ``scale``), ``mask`` (None: dense;
``element``: 1 bit per element marking the non-zeros, then only those values; ``block``: 1 bit
per ``block`` tile, then every value of the kept tiles), ``count`` (values stored),
``mask_at``/``values_at`` ([offset, length] in the payload) and ``counted`` (False only for
tensors the count folds away, e.g. LayerNorm under ``fold_layernorm``).

What is stored follows `microsweep.score.count` tensor by tensor: the same rules, the same
owner for a shared tensor, the same widths (fp16 for everything when the 16-bit allowance
applies), the same mask decision, and the quantizer constants (weight scales, input scale).
Bits are packed least-significant first.
"""

from __future__ import annotations

from microsweep.score import round_to_storage

from ._format import FORMAT_VERSION, MAGIC, ExportError
from ._layers import custom_recipe
from ._load import load, read_header
from ._save import ExportInfo, save
from ._trial import export_trial

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "ExportError",
    "ExportInfo",
    "custom_recipe",
    "export_trial",
    "load",
    "read_header",
    "round_to_storage",
    "save",
]
