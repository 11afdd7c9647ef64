"""The container: a fixed prefix, a JSON header and the payload, verified before any use.

Prefix (52 bytes, little-endian): 8-byte magic, u32 format version, u64 header length and the
sha256 of the header bytes. The header (UTF-8 JSON) names the payload's length and sha256, so a
file is fully checked (magic, version, lengths, both checksums) before a tensor is decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from microsweep.errors import MicrosweepError

__all__ = ["FORMAT_VERSION", "MAGIC", "ExportError", "read_container", "write_container"]

MAGIC = b"\x89MSZ\r\n\x1a\n"
"""PNG-style: a high byte and CR/LF/EOF characters, so text-mode copies are caught."""
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ32s")
PREFIX_BYTES = _PREFIX.size


class ExportError(MicrosweepError):
    """A model cannot be exported, or a model file cannot be read back."""


def write_container(path: str | os.PathLike[str], header: dict[str, Any], payload: bytes) -> int:
    """Write prefix + header + payload to `path` atomically; return the header's size in bytes
    (prefix included). The header gets `payload_bytes` and `payload_sha256` added."""
    header = {
        **header,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head), hashlib.sha256(head).digest())
    target = Path(path)
    tmp = target.with_name(target.name + ".part")
    try:
        with open(tmp, "wb") as fh:
            fh.write(prefix)
            fh.write(head)
            fh.write(payload)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):  # a read-only filesystem refuses the cleanup too
            tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {target}: {exc.strerror or exc}") from None
    return len(prefix) + len(head)


def read_container(path: str | os.PathLike[str]) -> tuple[dict[str, Any], bytes, int]:
    """(header, payload, header size) of the file at `path`, after every check passes."""
    target = Path(path)
    try:
        if target.exists() and not target.is_file():  # /dev/zero would be read without end
            raise ExportError(f"{target} is not a regular file; pass an exported .msz file")
        with open(target, "rb") as fh:
            if fh.read(len(MAGIC)) != MAGIC:  # the magic first: no large read of a foreign file
                raise ExportError(f"{target} is not a microsweep model file (bad magic bytes)")
            fh.seek(0)
            data = fh.read()
    except OSError as exc:
        raise ExportError(f"cannot read {target}: {exc.strerror or exc}") from None
    if len(data) < PREFIX_BYTES:
        raise ExportError(f"{target} is truncated: {len(data)} bytes, shorter than its prefix")
    _, version, head_len, head_sha = _PREFIX.unpack_from(data)
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{target} was made by a newer microsweep (format {version}; this release reads "
            f"format {FORMAT_VERSION}); upgrade microsweep to load it"
        )
    if version != FORMAT_VERSION:
        raise ExportError(f"{target} has unknown format version {version}; re-export the model")
    head_end = PREFIX_BYTES + head_len
    if len(data) < head_end:
        raise ExportError(f"{target} is truncated inside its header; export the model again")
    head = data[PREFIX_BYTES:head_end]
    if hashlib.sha256(head).digest() != head_sha:
        raise ExportError(f"{target} is corrupt: header checksum mismatch; export it again")
    try:
        header = json.loads(head.decode())
        size, digest = int(header["payload_bytes"]), str(header["payload_sha256"])
    except (ValueError, KeyError, TypeError):
        raise ExportError(f"{target} is corrupt: unreadable header; export it again") from None
    payload = data[head_end:]
    if len(payload) != size:
        what = "truncated" if len(payload) < size else "corrupt (trailing bytes)"
        raise ExportError(
            f"{target} is {what}: payload is {len(payload)} bytes, header says {size}; "
            "export it again"
        )
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ExportError(f"{target} is corrupt: payload checksum mismatch; export it again")
    if header.get("format") != FORMAT_VERSION:
        raise ExportError(f"{target} is corrupt: header and prefix disagree on the format version")
    return header, payload, head_end
