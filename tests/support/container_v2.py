"""Format 2 (and 1) containers built by hand from docs/bitstream.md, for the readers' tests.

The writer writes format 3 only; readers still read formats 1 and 2, so their tests need
the older bytes, made here from the spec rather than by the code under test.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable

MAGIC = b"NECB"


def _crc(data: bytes) -> bytes:
    return struct.pack("<I", zlib.crc32(data))


def header(sha: str, meta: dict | bytes, version: int = 2) -> bytes:
    """Magic, version, flags, tables hash, metadata and the header CRC."""
    if isinstance(meta, dict):
        meta = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    body = struct.pack("<4sHH32sI", MAGIC, version, 0, bytes.fromhex(sha), len(meta)) + meta
    return body + _crc(body)


def tile(index: int, payload: bytes, source: str = "", row=0, col=0, height=0, width=0) -> bytes:
    """One ``T`` record."""
    name = source.encode()
    body = struct.pack("<IiiIIH", index, row, col, height, width, len(name)) + name
    body += struct.pack("<I", len(payload)) + payload
    return b"T" + body + _crc(body)


def source(name: str, info: dict) -> bytes:
    """One ``S`` record (format 2)."""
    raw, body = name.encode(), json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
    record = struct.pack("<HI", len(raw), len(body)) + raw + body
    return b"S" + record + _crc(record)


def trailer(count: int, total: int) -> bytes:
    """The ``E`` record."""
    body = struct.pack("<IQ", count, total)
    return b"E" + body + _crc(body)


def container(
    sha: str, meta: dict, tiles: Iterable[dict], version: int = 2, sources: dict | None = None
) -> bytes:
    """A whole container: ``tiles`` are keyword arguments of :func:`tile` (no index);
    ``sources`` maps a source name to its info, written before its first tile."""
    out, count, total, seen = [header(sha, meta, version)], 0, 0, set()
    for t in tiles:
        name = t.get("source", "")
        if sources and name in sources and name not in seen:
            out.append(source(name, sources[name]))
            seen.add(name)
        out.append(tile(count, **t))
        count += 1
        total += len(t["payload"])
    out.append(trailer(count, total))
    return b"".join(out)
