"""The NEC bitstream container: header, tile records, trailer (spec: docs/bitstream.md).

A container is written and read one tile at a time, so memory stays bounded by a tile,
not by the scene. Every part carries a CRC32; the header names the entropy tables by
their SHA-256 and decoding refuses other tables. Payloads are exactly the bytes that
CompressAI's ``EntropyBottleneck.compress`` gives for one image, so they interoperate
with the NEC research code. The format holds no pickle and no code.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from nec_serve.errors import CorruptBitstream, TableMismatch

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "ContainerHeader",
    "TileRecord",
    "ContainerWriter",
    "ContainerReader",
]

MAGIC = b"NECB"
#: 2 added source records (tag ``S``: where a source image lies, for georeferenced output);
#: version 1 containers, which have none, are still read.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_HEAD = struct.Struct("<4sHH32sI")  # magic, version, flags, table sha256, meta length
_TILE = struct.Struct("<IiiIIH")  # index, row, col, source h, source w, name length
_END = struct.Struct("<IQ")  # tile count, total payload bytes
_U32 = struct.Struct("<I")
_TAG_TILE = b"T"
_TAG_SOURCE = b"S"
_TAG_END = b"E"
_SOURCE = struct.Struct("<HI")  # name length, info length
MAX_META_BYTES = 1 << 20
MAX_NAME_BYTES = 4096
MAX_PAYLOAD_BYTES = 1 << 30
#: Largest ``channels``, ``tokens``, ``img_size`` and band index a header may give.
MAX_GEOMETRY = 1 << 16
_HEX = frozenset("0123456789abcdef")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_geometry(value: Any) -> bool:
    return _is_int(value) and 1 <= value <= MAX_GEOMETRY


_SPAN = f"an integer in 1..{MAX_GEOMETRY}"
#: key -> (required, check, what the check wants); the decoders' contract with a header.
_META_FIELDS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "model": (True, lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "channels": (True, _is_geometry, _SPAN),
    "tokens": (True, _is_geometry, _SPAN),
    "img_size": (False, _is_geometry, _SPAN),
    "bands": (
        False,
        lambda v: isinstance(v, list) and v != [] and all(_is_geometry(b) for b in v),
        f"a non-empty list of integers in 1..{MAX_GEOMETRY}",
    ),
    "normalisation": (False, lambda v: isinstance(v, dict), "an object"),
    "model_version": (
        False,
        lambda v: isinstance(v, str) or _is_int(v),
        "a string or an integer",
    ),
    "source_dtype": (False, lambda v: isinstance(v, str), "a string"),
    "family": (False, lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "created_by": (False, lambda v: isinstance(v, str), "a string"),
}


#: The largest value a family's rate knob may record.
MAX_RATE = 64


def _is_rate(value: Any) -> bool:
    return _is_int(value) and 1 <= value <= MAX_RATE


def _fields() -> dict[str, tuple[bool, Callable[[Any], bool], str]]:
    """:data:`_META_FIELDS` and each family's rate knob (an integer in 1..MAX_RATE)."""
    from nec_serve.contract import rate_knobs  # the families name the knobs: not at the top

    rate = (False, _is_rate, f"an integer in 1..{MAX_RATE}")
    return {**_META_FIELDS, **dict.fromkeys(rate_knobs(), rate)}


def _check_meta(meta: Any) -> None:
    """Type- and range-check the metadata fields decoders rely on (docs/bitstream.md)."""
    if not isinstance(meta, dict):
        raise ValueError(f"container metadata must be a JSON object, got {type(meta).__name__}")
    for key, (required, check, expected) in _fields().items():
        if key not in meta:
            if required:
                raise ValueError(f"container metadata lacks {key!r}")
            continue
        if not check(meta[key]):
            raise ValueError(
                f"container metadata field {key!r} must be {expected}, got {_short(meta[key])}"
            )


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (metadata may hold up to 1 MiB)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class ContainerHeader:
    """What a decoder needs besides the named model and its tables.

    ``meta`` is a JSON object with at least ``model`` (registry name), ``model_version``,
    ``channels`` and ``tokens`` (symbols per tile are ``channels * tokens``), ``img_size``,
    ``bands`` (1-based band indices read from the source) and ``normalisation``.
    Construction checks the type and range of each of these (``channels``, ``tokens``
    and ``img_size`` integers in ``1..MAX_GEOMETRY``, ``model`` a non-empty string, ...)
    and raises :class:`ValueError` naming the field and the bad value, so code that reads
    a header never meets a field it cannot use.
    """

    table_sha256: str
    meta: dict[str, Any]
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        """Check the fields every decoder relies on."""
        sha = self.table_sha256
        if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= _HEX:
            raise ValueError(f"table_sha256 must be 64 lowercase hex digits, got {sha!r}")
        _check_meta(self.meta)

    @property
    def symbols_per_tile(self) -> int:
        """Symbols coded in each tile's payload."""
        return self.meta["channels"] * self.meta["tokens"]

    def check_tables(self, table_sha256: str) -> None:
        """Raise :class:`TableMismatch` unless ``table_sha256`` names this container's tables."""
        if table_sha256 != self.table_sha256:
            raise TableMismatch(
                f"container was coded with entropy tables {self.table_sha256[:16]}..., "
                f"but the supplied tables are {table_sha256[:16]}...: decode it with the "
                f"model export that wrote it (model {self.meta.get('model')!r}, version "
                f"{self.meta.get('model_version')!r})"
            )

    def to_bytes(self) -> bytes:
        """Header bytes including the trailing CRC32."""
        meta = json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode()
        if len(meta) > MAX_META_BYTES:
            raise ValueError(f"container metadata is {len(meta)} bytes, limit {MAX_META_BYTES}")
        head = _HEAD.pack(MAGIC, self.version, 0, bytes.fromhex(self.table_sha256), len(meta))
        body = head + meta
        return body + _U32.pack(zlib.crc32(body))


@dataclass(frozen=True)
class TileRecord:
    """One coded tile: where it came from and its payload.

    ``row``/``col`` are the tile's pixel origin in its source image and
    ``source_height``/``source_width`` that image's size, so a decoder can put a scene back
    together; tiles that are whole images have origin (0, 0).
    """

    index: int
    source: str
    row: int
    col: int
    source_height: int
    source_width: int
    payload: bytes = field(repr=False)


class ContainerWriter:
    """Write a container to a binary file object, one tile at a time.

    Use as a context manager; the trailer is written on a clean exit only, so an
    interrupted write leaves a container that readers reject as truncated.
    """

    def __init__(self, fileobj: IO[bytes], header: ContainerHeader):
        self._f = fileobj
        self._count = 0
        self._total = 0
        self._closed = False
        self._f.write(header.to_bytes())

    def write_tile(
        self,
        payload: bytes,
        *,
        source: str = "",
        row: int = 0,
        col: int = 0,
        source_height: int = 0,
        source_width: int = 0,
    ) -> int:
        """Append one tile record; returns its index."""
        if self._closed:
            raise ValueError("container already closed")
        name = source.encode()
        if len(name) > MAX_NAME_BYTES:
            raise ValueError(f"tile source name is {len(name)} bytes, limit {MAX_NAME_BYTES}")
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"tile payload is {len(payload)} bytes, limit {MAX_PAYLOAD_BYTES}")
        fixed = _TILE.pack(self._count, row, col, source_height, source_width, len(name))
        body = fixed + name + _U32.pack(len(payload)) + payload
        self._f.write(_TAG_TILE + body + _U32.pack(zlib.crc32(body)))
        self._count += 1
        self._total += len(payload)
        return self._count - 1

    def write_source(self, source: str, info: dict[str, Any]) -> None:
        """Record where source image ``source`` lies (JSON ``info``: crs, transform, ...).

        Written before the source's first tile; a decoder that writes georeferenced output
        reads it back from :attr:`ContainerReader.sources`.
        """
        if self._closed:
            raise ValueError("container already closed")
        name = source.encode()
        body = json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
        if len(name) > MAX_NAME_BYTES or len(body) > MAX_META_BYTES:
            raise ValueError(f"source record of {source!r} is over the size limits")
        record = _SOURCE.pack(len(name), len(body)) + name + body
        self._f.write(_TAG_SOURCE + record + _U32.pack(zlib.crc32(record)))

    def close(self) -> None:
        """Write the trailer (tile count and total payload bytes, with a CRC32)."""
        if self._closed:
            return
        body = _END.pack(self._count, self._total)
        self._f.write(_TAG_END + body + _U32.pack(zlib.crc32(body)))
        self._closed = True

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class ContainerReader:
    """Read a container from a binary file object: the header at once, tiles on iteration."""

    def __init__(self, fileobj: IO[bytes]):
        self._f = fileobj
        self.header = self._read_header()
        self.tile_count: int | None = None
        #: Source records read so far: name -> info (see :meth:`ContainerWriter.write_source`).
        self.sources: dict[str, dict[str, Any]] = {}

    def _read(self, n: int, what: str) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise CorruptBitstream(
                f"container truncated: expected {n} bytes of {what}, got {len(data)}"
            )
        return data

    def _read_header(self) -> ContainerHeader:
        head = self._f.read(_HEAD.size)
        if len(head) < 4 or head[:4] != MAGIC:
            raise CorruptBitstream(f"not an NEC container (magic {head[:4]!r}, expected {MAGIC!r})")
        if len(head) != _HEAD.size:
            raise CorruptBitstream("container truncated inside the header")
        magic, version, _flags, digest, meta_len = _HEAD.unpack(head)
        if version not in _READABLE_VERSIONS:
            raise CorruptBitstream(
                f"container format version {version} is not supported (this reader: "
                f"{', '.join(map(str, _READABLE_VERSIONS))})"
            )
        if meta_len > MAX_META_BYTES:
            raise CorruptBitstream(f"container metadata length {meta_len} exceeds the limit")
        meta = self._read(meta_len, "metadata")
        (crc,) = _U32.unpack(self._read(4, "header CRC"))
        if zlib.crc32(head + meta) != crc:
            raise CorruptBitstream("container header CRC mismatch: the header is corrupt")
        try:
            parsed = json.loads(meta)
        except (ValueError, RecursionError) as err:
            raise CorruptBitstream(f"container metadata is not valid JSON: {err}") from err
        try:
            return ContainerHeader(digest.hex(), parsed, version)
        except (ValueError, TypeError) as err:
            # The CRC matched, so the writer itself stored metadata no decoder can use.
            raise CorruptBitstream(str(err)) from err

    def __iter__(self) -> Iterator[TileRecord]:
        """Yield tiles in order; raise :class:`CorruptBitstream` on any damage."""
        count = total = 0
        while True:
            tag = self._read(1, "record tag")
            if tag == _TAG_END:
                body = self._read(_END.size, "trailer")
                (crc,) = _U32.unpack(self._read(4, "trailer CRC"))
                if zlib.crc32(body) != crc:
                    raise CorruptBitstream("container trailer CRC mismatch")
                n, t = _END.unpack(body)
                if (n, t) != (count, total):
                    raise CorruptBitstream(
                        f"container trailer says {n} tiles / {t} bytes, read {count} / {total}"
                    )
                if self._f.read(1):
                    raise CorruptBitstream("unexpected bytes after the container trailer")
                self.tile_count = count
                return
            if tag == _TAG_SOURCE and self.header.version >= 2:
                self._read_source(count)
                continue
            if tag != _TAG_TILE:
                raise CorruptBitstream(f"bad record tag {tag!r} before tile {count}")
            record = self._read_tile(count)
            yield record
            count += 1
            total += len(record.payload)

    def _read_tile(self, count: int) -> TileRecord:
        fixed = self._read(_TILE.size, f"tile {count} header")
        index, row, col, sh, sw, name_len = _TILE.unpack(fixed)
        if index != count:
            raise CorruptBitstream(f"tile index {index} where {count} was expected")
        if name_len > MAX_NAME_BYTES:
            raise CorruptBitstream(f"tile {count} name length {name_len} exceeds the limit")
        name = self._read(name_len, f"tile {count} name")
        plen_raw = self._read(4, f"tile {count} payload length")
        (plen,) = _U32.unpack(plen_raw)
        if plen > MAX_PAYLOAD_BYTES:
            raise CorruptBitstream(f"tile {count} payload length {plen} exceeds the limit")
        payload = self._read(plen, f"tile {count} payload")
        (crc,) = _U32.unpack(self._read(4, f"tile {count} CRC"))
        if zlib.crc32(payload, zlib.crc32(fixed + name + plen_raw)) != crc:
            raise CorruptBitstream(f"tile {count} CRC mismatch: the tile is corrupt")
        try:
            source = name.decode()
        except UnicodeDecodeError as err:
            raise CorruptBitstream(f"tile {count} name is not UTF-8") from err
        return TileRecord(index, source, row, col, sh, sw, payload)

    def _read_source(self, count: int) -> None:
        where = f"source record before tile {count}"
        fixed = self._read(_SOURCE.size, where)
        name_len, info_len = _SOURCE.unpack(fixed)
        if name_len > MAX_NAME_BYTES or info_len > MAX_META_BYTES:
            raise CorruptBitstream(f"{where}: lengths exceed the limits")
        name = self._read(name_len, where)
        body = self._read(info_len, where)
        (crc,) = _U32.unpack(self._read(4, f"{where} CRC"))
        if zlib.crc32(fixed + name + body) != crc:
            raise CorruptBitstream(f"{where}: CRC mismatch, the record is corrupt")
        try:
            info = json.loads(body)
            source = name.decode()
        except (ValueError, RecursionError, UnicodeDecodeError) as err:
            raise CorruptBitstream(f"{where}: not valid UTF-8 JSON: {err}") from err
        if not isinstance(info, dict):
            raise CorruptBitstream(f"{where}: must hold a JSON object")
        self.sources[source] = info
