"""The NEC bitstream container (spec: docs/bitstream.md): header, tile groups, trailer.

Format 3 is written; formats 2 and 1 are still read. A container is written and read a
group of tiles at a time, so memory stays bounded by a group (about 1 MiB of payload), not
by the scene. Source names live once, in the groups' name tables; each tile record is a few
varints in its group's index, which is LZMA-compressed when that is smaller; one CRC-32
covers each group. The header names the code (entropy tables and what else decides the
symbols' meaning) by a fingerprint, and decoding refuses another code. NEC payloads are
exactly the bytes that CompressAI's ``EntropyBottleneck.compress`` gives for one image, so
they interoperate with the NEC research code. The format holds no pickle and no code.
"""

from __future__ import annotations

import json
import lzma
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from nec_serve import varint
from nec_serve.errors import CorruptBitstream, TableMismatch

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "ContainerHeader",
    "TileRecord",
    "TilePlace",
    "ContainerWriter",
    "ContainerReader",
]

MAGIC = b"NECB"
#: 3: source names once in name tables, tile records as varints in a group index, one CRC
#: per group of tiles, and a code fingerprint in place of the tables' hash. 2 added
#: source records (georeferencing). Versions 1 and 2 are still read.
FORMAT_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
_HEAD = struct.Struct("<4sHH32sI")  # magic, version, flags, digest, meta length
_TILE = struct.Struct("<IiiIIH")  # v1/v2 tile: index, row, col, source h, source w, name length
_END = struct.Struct("<IQ")  # v1/v2 trailer: tile count, total payload bytes
_U32 = struct.Struct("<I")
_TAG_TILE = b"T"
_TAG_SOURCE = b"S"
_TAG_GROUP = b"G"
_TAG_END = b"E"
_SOURCE = struct.Struct("<HI")  # v2 source record: name length, info length
MAX_META_BYTES = 1 << 20
MAX_NAME_BYTES = 4096
MAX_PAYLOAD_BYTES = 1 << 30
#: Largest ``channels``, ``tokens``, ``img_size`` and band index a header may give.
MAX_GEOMETRY = 1 << 16
#: Format 3 group limits: tiles, index bytes (stored and raw), and the whole group body.
MAX_GROUP_TILES = 1 << 16
MAX_INDEX_BYTES = 1 << 26
MAX_GROUP_BYTES = MAX_PAYLOAD_BYTES + 2 * MAX_INDEX_BYTES
#: A writer closes a group once it holds this much payload or this many tiles.
GROUP_PAYLOAD_BYTES = 1 << 20
GROUP_TILES = 1 << 14
#: The index's LZMA2 stream (raw, no container): dictionary size, what a reader allocates.
INDEX_DICT_BYTES = 1 << 20
_INDEX_LZMA = 1  # group flag: the index is an LZMA2 raw stream
_GEO_EPSG, _GEO_CRS = b"\x01", b"\x02"  # format 3 source info: binary georeferencing
_GEO_TRANSFORM = struct.Struct("<6d")
_META_LZMA = 1  # format 3 header flag: u32 raw length, then the metadata as LZMA2 raw
_LZMA_WRITE = [
    {"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": INDEX_DICT_BYTES, "lc": 2, "pb": 0}
]
_LZMA_READ = [{"id": lzma.FILTER_LZMA2, "dict_size": INDEX_DICT_BYTES}]
_READ_CHUNK = 1 << 20
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
    """What a decoder needs besides the model export whose code it names.

    ``code_sha256`` names the code the tiles were written in: in format 3 the export's code
    fingerprint (its entropy tables and, where the family has them, what else gives the
    symbols their meaning, such as RVQ codebooks; see
    :func:`nec_serve.fingerprint.code_fingerprint`), in formats 1 and 2 the SHA-256 of the
    entropy tables file.

    ``meta`` is a JSON object with at least ``model`` (registry name), ``model_version``,
    ``channels`` and ``tokens`` (symbols per tile are ``channels * tokens``), ``img_size``,
    ``bands`` (1-based band indices read from the source) and ``normalisation``.
    Construction checks the type and range of each of these (``channels``, ``tokens``
    and ``img_size`` integers in ``1..MAX_GEOMETRY``, ``model`` a non-empty string, ...)
    and raises :class:`ValueError` naming the field and the bad value, so code that reads
    a header never meets a field it cannot use.
    """

    code_sha256: str
    meta: dict[str, Any]
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        """Check the fields every decoder relies on."""
        sha = self.code_sha256
        if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= _HEX:
            raise ValueError(f"code_sha256 must be 64 lowercase hex digits, got {sha!r}")
        _check_meta(self.meta)

    @property
    def symbols_per_tile(self) -> int:
        """Symbols coded in each tile's payload."""
        return self.meta["channels"] * self.meta["tokens"]

    @property
    def names_code(self) -> bool:
        """Whether :attr:`code_sha256` is a code fingerprint (format 3), not a tables hash."""
        return self.version >= 3

    def check_code(self, code_sha256: str, tables_sha256: str) -> None:
        """Raise :class:`TableMismatch` unless an export of this code and tables decodes it.

        A format 3 container is compared by code fingerprint, so any export sharing the
        code (say, a classifier export of the same NEC weights) decodes it; formats 1 and 2
        recorded the tables' hash only.
        """
        if self.names_code:
            theirs, what = code_sha256, "code fingerprint (entropy tables and what else decides it)"
        else:
            theirs, what = tables_sha256, "entropy tables"
        if theirs != self.code_sha256:
            raise TableMismatch(
                f"container was coded with {what} {self.code_sha256[:16]}..., but the export "
                f"has {theirs[:16]}...: decode it with an export of the code that wrote it "
                f"(model {self.meta.get('model')!r}, version {self.meta.get('model_version')!r})"
            )

    def to_bytes(self) -> bytes:
        """Header bytes including the trailing CRC32."""
        meta = json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode()
        if len(meta) > MAX_META_BYTES:
            raise ValueError(f"container metadata is {len(meta)} bytes, limit {MAX_META_BYTES}")
        flags, stored = 0, meta
        if self.version >= 3:  # format 3 compresses the metadata when that is smaller
            packed = _lzma(meta)
            if len(packed) + _U32.size < len(meta):
                flags, stored = _META_LZMA, _U32.pack(len(meta)) + packed
        digest = bytes.fromhex(self.code_sha256)
        body = _HEAD.pack(MAGIC, self.version, flags, digest, len(stored)) + stored
        return body + _U32.pack(zlib.crc32(body))


@dataclass(frozen=True)
class TileRecord:
    """One coded tile: where it came from and its payload.

    ``row``/``col`` are the tile's pixel origin in its source image and
    ``source_height``/``source_width`` that image's size, so a decoder can put a scene back
    together; tiles that are whole images have origin (0, 0).

    ``payload`` is the entropy-coded stream the tile is in. Most streams hold one tile;
    where the family codes several tiles as one stream (:attr:`ModelFamily.shared_streams`),
    the tile is number ``part`` of the ``parts`` tiles of ``payload``, and those records
    share one ``bytes`` object.
    """

    index: int
    source: str
    row: int
    col: int
    source_height: int
    source_width: int
    payload: bytes = field(repr=False)
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class TilePlace:
    """Where a tile comes from: its source image, that image's size, the tile's origin."""

    source: str = ""
    row: int = 0
    col: int = 0
    source_height: int = 0
    source_width: int = 0


class _Group:
    """The tiles a writer holds until it writes them as one group (format 3)."""

    def __init__(self) -> None:
        # The new sources' name table, column by column (names, sizes, infos, transforms).
        self.names = bytearray()
        self.sizes = bytearray()
        self.infos = bytearray()
        self.transforms: list[bytes] = []
        self.new_sources = 0
        self.heads = bytearray()
        self.origins = bytearray()
        self.stream_tiles = bytearray()
        self.lengths = bytearray()
        self.payloads: list[bytes] = []
        self.payload_bytes = 0
        self.tiles = 0

    def index(self) -> bytes:
        out = bytearray()
        varint.put(out, self.new_sources)
        out += self.names + self.sizes + self.infos + _shuffle(self.transforms)
        out += self.heads + self.origins
        varint.put(out, len(self.payloads))
        return bytes(out + self.stream_tiles + self.lengths)

    def to_bytes(self) -> bytes:
        """``tag body_len body crc``; the index compressed when that is smaller."""
        raw = self.index()
        packed = _lzma(raw)
        body = bytearray()
        varint.put(body, self.tiles)
        if len(packed) + 2 < len(raw):
            body.append(_INDEX_LZMA)
            varint.put(body, len(packed))
            varint.put(body, len(raw))
            body += packed
        else:
            body.append(0)
            varint.put(body, len(raw))
            body += raw
        size = bytearray()
        varint.put(size, len(body) + self.payload_bytes)
        crc = zlib.crc32(size + body)
        for payload in self.payloads:
            crc = zlib.crc32(payload, crc)
        return b"".join([_TAG_GROUP, size, body, *self.payloads, _U32.pack(crc)])


class ContainerWriter:
    """Write a format 3 container to a binary file object, a group of tiles at a time.

    Tiles are held until their group is full (:data:`GROUP_PAYLOAD_BYTES` of payload or
    :data:`GROUP_TILES` tiles), then written with one CRC. Use as a context manager; the
    last group and the trailer are written on a clean exit only, so an interrupted write
    leaves a container that readers reject as truncated.
    """

    def __init__(self, fileobj: IO[bytes], header: ContainerHeader):
        if header.version != FORMAT_VERSION:
            raise ValueError(
                f"this writer writes format {FORMAT_VERSION}, the header is format {header.version}"
            )
        self._f = fileobj
        self._count = 0
        self._total = 0
        self._closed = False
        self._group = _Group()
        self._sources: dict[tuple[str, int, int], int] = {}
        self._info: dict[str, tuple[bytes, bytes | None]] = {}  # a source's next entry's info
        self._last_source = -1
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
        """Add one tile whose stream is ``payload``; returns its index.

        It is written with the rest of its group.
        """
        return self.write_stream(
            payload, [TilePlace(source, row, col, source_height, source_width)]
        )

    def write_stream(self, stream: bytes, tiles: Sequence[TilePlace]) -> int:
        """Add one entropy-coded ``stream`` that holds ``tiles``, in order.

        Returns the index of the first of them. A stream of several tiles is for families
        whose codec joins tiles (:attr:`ModelFamily.shared_streams`): one final-state
        flush and one length for all of them.
        """
        if self._closed:
            raise ValueError("container already closed")
        if not tiles or len(tiles) > MAX_GROUP_TILES:
            raise ValueError(f"a stream holds 1..{MAX_GROUP_TILES} tiles, got {len(tiles)}")
        if len(stream) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"tile payload is {len(stream)} bytes, limit {MAX_PAYLOAD_BYTES}")
        for place in tiles:
            for name, value in (("row", place.row), ("col", place.col)):
                if not -(1 << 31) <= value < 1 << 31:
                    raise ValueError(f"tile {name} {value} is outside the 32-bit signed range")
        group = self._group
        if group.payloads and (
            group.payload_bytes + len(stream) > MAX_PAYLOAD_BYTES
            or group.tiles + len(tiles) > MAX_GROUP_TILES
        ):
            self._flush()
            group = self._group
        for place in tiles:
            self._place(group, place)
        varint.put(group.stream_tiles, len(tiles))
        varint.put(group.lengths, len(stream))
        group.payloads.append(stream)
        group.payload_bytes += len(stream)
        group.tiles += len(tiles)
        first = self._count
        self._count += len(tiles)
        self._total += len(stream)
        if group.payload_bytes >= GROUP_PAYLOAD_BYTES or group.tiles >= GROUP_TILES:
            self._flush()
        return first

    def _place(self, group: _Group, place: TilePlace) -> None:
        """One tile's head (its source, whether it has an origin) and origin."""
        number = self._source_number(place.source, place.source_height, place.source_width)
        placed = (place.row, place.col) != (0, 0)
        varint.put(group.heads, varint.zigzag(number - self._last_source) << 1 | placed)
        self._last_source = number
        if placed:
            varint.put_signed(group.origins, place.row)
            varint.put_signed(group.origins, place.col)

    def _source_number(self, name: str, height: int, width: int) -> int:
        """The number of the source ``(name, height, width)``, entered on first use."""
        key = (name, height, width)
        number = self._sources.get(key)
        if number is not None:
            return number
        encoded = name.encode()
        if len(encoded) > MAX_NAME_BYTES:
            raise ValueError(f"tile source name is {len(encoded)} bytes, limit {MAX_NAME_BYTES}")
        for what, value in (("height", height), ("width", width)):
            if not 0 <= value < 1 << 32:
                raise ValueError(f"source {what} {value} is outside 0..2^32-1")
        info, transform = self._info.pop(name, (b"", None))
        group = self._group
        varint.put(group.names, len(encoded))
        group.names += encoded
        varint.put(group.sizes, height)
        varint.put(group.sizes, width)
        varint.put(group.infos, len(info))
        group.infos += info
        if transform is not None:
            group.transforms.append(transform)
        group.new_sources += 1
        number = self._sources[key] = len(self._sources)
        return number

    def write_source(self, source: str, info: dict[str, Any]) -> None:
        """Record where source image ``source`` lies (JSON ``info``: crs, transform, ...).

        Call it before the source's first tile: the info travels in that source's name
        table entry, and a decoder that writes georeferenced output reads it back from
        :attr:`ContainerReader.sources`.
        """
        if self._closed:
            raise ValueError("container already closed")
        body, transform = _encode_info(info)
        if len(source.encode()) > MAX_NAME_BYTES or len(body) > MAX_META_BYTES:
            raise ValueError(f"source record of {source!r} is over the size limits")
        self._info[source] = (body, transform)

    def _flush(self) -> None:
        if self._group.payloads:
            self._f.write(self._group.to_bytes())
        self._group = _Group()

    def close(self) -> None:
        """Write the last group and the trailer (tile count and payload bytes, CRC32)."""
        if self._closed:
            return
        self._flush()
        body = bytearray()
        varint.put(body, self._count)
        varint.put(body, self._total)
        self._f.write(_TAG_END + body + _U32.pack(zlib.crc32(body)))
        self._closed = True

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


@dataclass(frozen=True)
class _Source:
    name: str
    height: int
    width: int


class ContainerReader:
    """Read a container from a binary file object: the header at once, tiles on iteration.

    Format 3 tiles are yielded a group at a time, after the group's CRC has been checked.
    """

    def __init__(self, fileobj: IO[bytes]):
        self._f = fileobj
        self.header = self._read_header()
        self.tile_count: int | None = None
        #: Entropy-coded bytes of the tiles read so far (a shared stream's once).
        self.payload_bytes = 0
        #: Georeferencing of the sources read so far: name -> info (see
        #: :meth:`ContainerWriter.write_source`).
        self.sources: dict[str, dict[str, Any]] = {}

    def _read(self, n: int, what: str) -> bytes:
        """Exactly ``n`` bytes; read in steps, so a lying length allocates nothing big."""
        parts, got = [], 0
        while got < n:
            data = self._f.read(min(n - got, _READ_CHUNK))
            if not data:
                break
            parts.append(data)
            got += len(data)
        if got != n:
            raise CorruptBitstream(f"container truncated: expected {n} bytes of {what}, got {got}")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_header(self) -> ContainerHeader:
        head = self._f.read(_HEAD.size)
        if len(head) < 4 or head[:4] != MAGIC:
            raise CorruptBitstream(f"not an NEC container (magic {head[:4]!r}, expected {MAGIC!r})")
        if len(head) != _HEAD.size:
            raise CorruptBitstream("container truncated inside the header")
        magic, version, flags, digest, meta_len = _HEAD.unpack(head)
        if version not in _READABLE_VERSIONS:
            raise CorruptBitstream(
                f"container format version {version} is not supported (this reader: "
                f"{', '.join(map(str, _READABLE_VERSIONS))})"
            )
        if meta_len > MAX_META_BYTES:
            raise CorruptBitstream(f"container metadata length {meta_len} exceeds the limit")
        stored = self._read(meta_len, "metadata")
        (crc,) = _U32.unpack(self._read(4, "header CRC"))
        if zlib.crc32(head + stored) != crc:
            raise CorruptBitstream("container header CRC mismatch: the header is corrupt")
        meta = _header_meta(stored, flags if version >= 3 else 0)
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
        if self.header.version >= 3:
            return self._groups()
        return self._records()

    # -- format 3 ------------------------------------------------------------------------

    def _groups(self) -> Iterator[TileRecord]:
        count = total = 0
        table: list[_Source] = []
        last = -1
        while True:
            tag = self._read(1, "record tag")
            if tag == _TAG_END:
                self._trailer_v3(count, total)
                return
            if tag != _TAG_GROUP:
                raise CorruptBitstream(f"bad record tag {tag!r} before tile {count}")
            where = f"tile group from tile {count}"
            size_raw, size = self._file_varint(32, f"{where}: length", MAX_GROUP_BYTES)
            body = self._read(size, where)
            (crc,) = _U32.unpack(self._read(4, f"{where} CRC"))
            if zlib.crc32(body, zlib.crc32(size_raw)) != crc:
                raise CorruptBitstream(f"{where}: CRC mismatch, the group is corrupt")
            records, last = self._parse_group(body, where, table, count, last)
            for record in records:
                yield record
                count += 1
                if record.part == 0:  # a stream's bytes count once
                    total += len(record.payload)
                    self.payload_bytes = total

    def _file_varint(self, bits: int, what: str, limit: int) -> tuple[bytes, int]:
        """A varint read from the file byte by byte: (its bytes, its value)."""
        raw = bytearray()
        while len(raw) < (bits + 6) // 7:
            byte = self._read(1, what)
            raw += byte
            if not byte[0] & 0x80:
                break
        return bytes(raw), varint.Cursor(raw, "container").uint(bits, what, limit)

    def _trailer_v3(self, count: int, total: int) -> None:
        _, n = self._file_varint(64, "trailer tile count", 1 << 63)
        _, t = self._file_varint(64, "trailer payload bytes", 1 << 63)
        body = bytearray()
        varint.put(body, n)
        varint.put(body, t)
        (crc,) = _U32.unpack(self._read(4, "trailer CRC"))
        if zlib.crc32(body) != crc:
            raise CorruptBitstream("container trailer CRC mismatch")
        self._check_end(n, t, count, total)

    def _check_end(self, n: int, t: int, count: int, total: int) -> None:
        if (n, t) != (count, total):
            raise CorruptBitstream(
                f"container trailer says {n} tiles / {t} bytes, read {count} / {total}"
            )
        if self._f.read(1):
            raise CorruptBitstream("unexpected bytes after the container trailer")
        self.tile_count = count

    def _parse_group(
        self, body: bytes, where: str, table: list[_Source], first: int, last: int
    ) -> tuple[list[TileRecord], int]:
        """The tile records of one CRC-checked group body; and the last tile's source."""
        cur = varint.Cursor(body, where)
        tiles = cur.uint(32, "tile count", MAX_GROUP_TILES)
        if tiles == 0:
            raise CorruptBitstream(f"{where}: a group holds no tiles")
        index = _Index(self._index_bytes(cur, where), f"{where} index")
        index.read_sources(table, self.sources)
        heads = [index.cur.uint(64, "tile head", 1 << 34) for _ in range(tiles)]
        records: list[tuple[_Source, int, int]] = []
        for i, head in enumerate(heads):
            number = last + varint.unzigzag(head >> 1)
            if not 0 <= number < len(table):
                raise CorruptBitstream(
                    f"{where}: tile {first + i} refers to source {number}, the name table "
                    f"holds {len(table)}"
                )
            last = number
            row, col = (index.cur.int32("row"), index.cur.int32("col")) if head & 1 else (0, 0)
            records.append((table[number], row, col))
        spans, lengths = self._streams(index, tiles, where)
        if index.cur.left:
            raise CorruptBitstream(f"{where} index: {index.cur.left} bytes after the last stream")
        if sum(lengths) != cur.left:
            raise CorruptBitstream(
                f"{where}: streams declare {sum(lengths)} payload bytes, the group holds {cur.left}"
            )
        out, at = [], iter(records)
        for n, length in zip(spans, lengths, strict=True):
            stream = bytes(cur.take(length, f"tile {first + len(out)} payload"))
            for part in range(n):
                src, row, col = next(at)
                i = first + len(out)
                out.append(
                    TileRecord(i, src.name, row, col, src.height, src.width, stream, part, n)
                )
        return out, last

    @staticmethod
    def _streams(index: _Index, tiles: int, where: str) -> tuple[list[int], list[int]]:
        """Tiles per stream and stream lengths; the streams must hold the group's tiles."""
        cur = index.cur
        count = cur.uint(32, "stream count", tiles)
        spans = [cur.uint(32, "tiles in a stream", MAX_GROUP_TILES) for _ in range(count)]
        if 0 in spans or sum(spans) != tiles:
            raise CorruptBitstream(
                f"{where}: its streams hold {sum(spans)} tiles (each at least one), the group "
                f"{tiles}"
            )
        return spans, [cur.uint(32, "payload length", MAX_PAYLOAD_BYTES) for _ in spans]

    @staticmethod
    def _index_bytes(cur: varint.Cursor, where: str) -> bytes:
        """A group's index, decompressed if it is stored compressed."""
        flags = cur.take(1, "flags")[0]
        if flags & ~_INDEX_LZMA:
            raise CorruptBitstream(f"{where}: unknown group flags {flags:#04x}")
        stored = cur.uint(32, "index length", MAX_INDEX_BYTES)
        if not flags & _INDEX_LZMA:
            return bytes(cur.take(stored, "index"))
        raw_len = cur.uint(32, "index raw length", MAX_INDEX_BYTES)
        return _unlzma(bytes(cur.take(stored, "index")), raw_len, f"{where} index")

    # -- formats 1 and 2 -----------------------------------------------------------------

    def _records(self) -> Iterator[TileRecord]:
        count = total = 0
        while True:
            tag = self._read(1, "record tag")
            if tag == _TAG_END:
                body = self._read(_END.size, "trailer")
                (crc,) = _U32.unpack(self._read(4, "trailer CRC"))
                if zlib.crc32(body) != crc:
                    raise CorruptBitstream("container trailer CRC mismatch")
                self._check_end(*_END.unpack(body), count, total)
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
            self.payload_bytes = total

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
        source, info = _source_info(name, body, where)
        if info is None:
            raise CorruptBitstream(f"{where}: must hold a JSON object")
        self.sources[source] = info


def _lzma(data: bytes) -> bytes:
    """``data`` as a raw LZMA2 stream with the format's filter settings."""
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_WRITE)


def _unlzma(packed: bytes, raw_len: int, where: str) -> bytes:
    """The ``raw_len`` bytes a raw LZMA2 stream holds; anything else is corruption."""
    unpacker = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_READ)
    try:
        raw = unpacker.decompress(packed, max_length=raw_len)
    except lzma.LZMAError as err:
        raise CorruptBitstream(f"{where}: the compressed bytes are corrupt: {err}") from err
    if len(raw) != raw_len or not unpacker.eof or unpacker.unused_data:
        raise CorruptBitstream(
            f"{where}: the compressed bytes do not hold the {raw_len} bytes they declare"
        )
    return raw


def _header_meta(stored: bytes, flags: int) -> bytes:
    """The metadata JSON bytes of a CRC-checked header (format 3 may compress them)."""
    if flags & ~_META_LZMA:
        raise CorruptBitstream(f"container header has unknown flags {flags:#06x}")
    if not flags:
        return stored
    if len(stored) < _U32.size:
        raise CorruptBitstream("container metadata: too short for its length field")
    (raw_len,) = _U32.unpack_from(stored)
    if raw_len > MAX_META_BYTES:
        raise CorruptBitstream(f"container metadata length {raw_len} exceeds the limit")
    return _unlzma(stored[_U32.size :], raw_len, "container metadata")


def _source_info(name: bytes, body: bytes, where: str) -> tuple[str, Any]:
    """A source's name and info.

    The info is a JSON object, None when ``body`` is empty, or the CRS of binary
    georeferencing (its transform comes from the name table's transform column).
    """
    try:
        source = name.decode()
        if body[:1] == _GEO_EPSG:
            cur = varint.Cursor(body[1:], where)
            crs = f"EPSG:{cur.uint(32, 'EPSG code')}"
        elif body[:1] == _GEO_CRS:
            crs = body[1:].decode()
        else:
            info = json.loads(body) if body else None
            if body and not isinstance(info, dict):
                raise CorruptBitstream(f"{where}: source info must be a JSON object")
            return source, info
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise CorruptBitstream(f"{where}: not valid UTF-8 JSON: {err}") from err
    if body[:1] == _GEO_EPSG and cur.left:
        raise CorruptBitstream(f"{where}: {cur.left} bytes after the EPSG code")
    return source, _Crs(crs)


@dataclass(frozen=True)
class _Crs:
    """The CRS of a source with binary georeferencing, until its transform is read."""

    crs: str


def _encode_info(info: dict[str, Any]) -> tuple[bytes, bytes | None]:
    """A source's info as format 3 stores it: ``(info bytes, transform bytes or None)``.

    ``{"crs", "transform"}`` with six floats is binary georeferencing: 0x01 and the EPSG
    code as a varint (when the CRS is ``EPSG:<code>``) or 0x02 and the CRS as UTF-8, its
    transform six float64 in the name table's transform column. Anything else is its JSON
    object.
    """
    transform, crs = info.get("transform"), info.get("crs")
    if (
        set(info) == {"crs", "transform"}
        and isinstance(crs, str)
        and isinstance(transform, list | tuple)
        and len(transform) == 6
        and all(type(v) is float for v in transform)
    ):
        code = crs.removeprefix("EPSG:")
        if crs.startswith("EPSG:") and code.isascii() and code.isdigit() and str(int(code)) == code:
            out = bytearray(_GEO_EPSG)
            varint.put(out, int(code))
            head = bytes(out)
        else:
            head = _GEO_CRS + crs.encode()
        return head, _GEO_TRANSFORM.pack(*transform)
    return json.dumps(info, sort_keys=True, separators=(",", ":")).encode(), None


def _shuffle(values: list[bytes]) -> bytes:
    """Equal-length records as byte planes: byte 0 of each, then byte 1, ... (compresses)."""
    if not values:
        return b""
    joined = b"".join(values)
    return b"".join(joined[i :: len(values[0])] for i in range(len(values[0])))


def _unshuffle(planes: bytes, count: int, size: int) -> list[bytes]:
    """The inverse of :func:`_shuffle` for ``count`` records of ``size`` bytes."""
    joined = bytearray(count * size)
    for i in range(size):
        joined[i::size] = planes[i * count : (i + 1) * count]
    return [bytes(joined[k * size : (k + 1) * size]) for k in range(count)]


class _Index:
    """A group's decompressed index, read front to back."""

    def __init__(self, data: bytes, where: str):
        self.cur = varint.Cursor(data, where)
        self.where = where

    def read_sources(self, table: list[_Source], infos: dict[str, dict[str, Any]]) -> None:
        """Append the group's new sources to ``table`` and their georeferencing to ``infos``."""
        cur = self.cur
        n = cur.uint(32, "source count")
        if n * 4 > cur.left:  # an entry takes at least 4 bytes
            raise CorruptBitstream(
                f"{self.where}: the name table declares {n} sources in {cur.left} bytes"
            )
        names = [
            bytes(cur.take(cur.uint(32, "name length", MAX_NAME_BYTES), "source name"))
            for _ in range(n)
        ]
        sizes = [(cur.uint(32, "source height"), cur.uint(32, "source width")) for _ in names]
        bodies = [
            bytes(cur.take(cur.uint(32, "source info length", MAX_META_BYTES), "source info"))
            for _ in names
        ]
        entries = [
            _source_info(name, body, f"{self.where} source {len(table) + i}")
            for i, (name, body) in enumerate(zip(names, bodies, strict=True))
        ]
        geo = sum(isinstance(info, _Crs) for _, info in entries)
        size = _GEO_TRANSFORM.size
        transforms = iter(_unshuffle(bytes(cur.take(geo * size, "transforms")), geo, size))
        for (source, info), (height, width) in zip(entries, sizes, strict=True):
            table.append(_Source(source, height, width))
            if isinstance(info, _Crs):
                info = {"crs": info.crs, "transform": list(_GEO_TRANSFORM.unpack(next(transforms)))}
            if info is not None:
                infos[source] = info
