from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest

from nec_serve import container as framing
from nec_serve.container import MAGIC, ContainerHeader, ContainerReader, ContainerWriter
from nec_serve.errors import CorruptBitstream, InvalidInput, TableMismatch
from nec_serve.tables import EntropyTables
from tests.support import container_v2

SHA = "ab" * 32
META = {"model": "m", "model_version": "1", "channels": 4, "tokens": 3}


def _container(payloads: list[bytes], meta=META) -> bytes:
    buf = io.BytesIO()
    with ContainerWriter(buf, ContainerHeader(SHA, dict(meta))) as w:
        for i, p in enumerate(payloads):
            w.write_tile(
                p,
                source=f"scene-{i // 2}.tif",
                row=16 * i,
                col=-1 if i else 0,
                source_height=100,
                source_width=90,
            )
    return buf.getvalue()


def _read_all(data: bytes):
    reader = ContainerReader(io.BytesIO(data))
    return reader.header, list(reader)


PAYLOADS = [b"\x01\x02\x03\x04" * 5, b"", b"\xff" * 33, bytes(range(256))]


def test_round_trip_preserves_header_and_tiles():
    header, tiles = _read_all(_container(PAYLOADS))
    assert header.code_sha256 == SHA and header.meta == META
    assert header.symbols_per_tile == 12
    assert [t.payload for t in tiles] == PAYLOADS
    assert [t.index for t in tiles] == [0, 1, 2, 3]
    assert tiles[2].source == "scene-1.tif" and tiles[2].row == 32 and tiles[2].col == -1
    assert (tiles[3].source_height, tiles[3].source_width) == (100, 90)


def test_layout_matches_the_written_spec():
    data = _container([b"abcd"])
    magic, version, flags, digest, meta_len = struct.unpack_from("<4sHH32sI", data)
    assert (magic, version, flags, digest.hex()) == (MAGIC, 3, 0, SHA)
    meta_end = 44 + meta_len
    assert data[44:meta_end] == b'{"channels":4,"model":"m","model_version":"1","tokens":3}'
    (crc,) = struct.unpack_from("<I", data, meta_end)
    assert crc == zlib.crc32(data[:meta_end])
    group = data[meta_end + 4 :]
    # one source of 11 bytes, 100 x 90, no info; a tile of the next source (delta +1,
    # zigzag 2, shifted: 4) at its origin; one stream of one tile, 4 bytes
    index = b"\x01\x0bscene-0.tif\x64\x5a\x00" + b"\x04" + b"\x01\x01\x04"
    body = b"\x01" + b"\x00" + bytes([len(index)]) + index + b"abcd"
    assert group[:1] == b"G" and group[1] == len(body) and group[2 : 2 + len(body)] == body
    (crc,) = struct.unpack_from("<I", group, 2 + len(body))
    assert crc == zlib.crc32(group[1 : 2 + len(body)])
    end = group[6 + len(body) :]
    assert end == b"E\x01\x04" + struct.pack("<I", zlib.crc32(b"\x01\x04"))


def test_one_tile_images_cost_a_few_bits_each_beside_their_payloads():
    """2,000 images of 17-byte payloads, named as EuroSAT names them: < 15 % framing."""
    rng = np.random.default_rng(0)
    payloads = [rng.bytes(int(n)) for n in rng.choice([12, 16, 20, 24], 2000)]
    names = sorted(f"Forest_{n}.jpg" for n in rng.choice(27000, 2000, replace=False))
    buf = io.BytesIO()
    with ContainerWriter(buf, ContainerHeader(SHA, dict(META))) as w:
        for name, p in zip(names, payloads, strict=True):
            w.write_tile(p, source=name, source_height=64, source_width=64)
    size, payload = len(buf.getvalue()), sum(map(len, payloads))
    assert size < 1.15 * payload + 200, (size, payload)
    tiles = list(ContainerReader(io.BytesIO(buf.getvalue())))
    assert [t.source for t in tiles] == names and [t.payload for t in tiles] == payloads


def test_groups_close_at_their_limits_and_sources_span_them(monkeypatch):
    monkeypatch.setattr(framing, "GROUP_TILES", 3)
    payloads = [bytes([i]) * (i + 1) for i in range(8)]
    data = _container(payloads)
    assert data.count(b"G") >= 3
    header, tiles = _read_all(data)
    assert [t.payload for t in tiles] == payloads
    assert [t.source for t in tiles] == [f"scene-{i // 2}.tif" for i in range(8)]
    assert [(t.row, t.col) for t in tiles[:3]] == [(0, 0), (16, -1), (32, -1)]


def test_a_source_revisited_after_others_keeps_its_entry():
    buf = io.BytesIO()
    with ContainerWriter(buf, ContainerHeader(SHA, dict(META))) as w:
        for name in ["a", "b", "a", "c", "b"]:
            w.write_tile(name.encode(), source=name, source_height=5, source_width=5)
    tiles = list(ContainerReader(io.BytesIO(buf.getvalue())))
    assert [(t.source, t.payload) for t in tiles] == [(n, n.encode()) for n in "abacb"]


def test_every_single_byte_flip_is_detected():
    data = _container(PAYLOADS[:2])
    for pos in range(len(data)):
        damaged = bytearray(data)
        damaged[pos] ^= 0x10
        with pytest.raises(CorruptBitstream):
            _read_all(bytes(damaged))


def test_every_truncation_is_detected():
    data = _container(PAYLOADS)
    for cut in range(len(data)):
        with pytest.raises(CorruptBitstream):
            _read_all(data[:cut])


def test_trailing_bytes_and_foreign_files_are_refused():
    with pytest.raises(CorruptBitstream, match="after the container trailer"):
        _read_all(_container(PAYLOADS) + b"\0")
    with pytest.raises(CorruptBitstream, match="not an NEC container"):
        _read_all(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(CorruptBitstream, match="not an NEC container"):
        _read_all(b"")


GEO = {"crs": "EPSG:32633", "transform": [10.0, 0.0, 404400.0, 0.0, -10.0, 5342400.0]}


def _with_sources() -> bytes:
    buf = io.BytesIO()
    with ContainerWriter(buf, ContainerHeader(SHA, dict(META))) as w:
        w.write_source("a.tif", GEO)
        w.write_tile(b"t0", source="a.tif")
        w.write_source("b.tif", {"crs": "EPSG:4326", "transform": [1, 0, 0, 0, -1, 0]})
        w.write_tile(b"t1", source="b.tif")
    return buf.getvalue()


def test_source_records_are_read_before_their_tiles():
    reader = ContainerReader(io.BytesIO(_with_sources()))
    seen = []
    for tile in reader:
        seen.append((tile.source, dict(reader.sources[tile.source])))
    assert seen[0] == ("a.tif", GEO) and seen[1][1]["crs"] == "EPSG:4326"
    assert [t.index for t in ContainerReader(io.BytesIO(_with_sources()))] == [0, 1]


def test_damaged_source_records_are_detected():
    data = _with_sources()
    for pos in range(len(data)):
        damaged = bytearray(data)
        damaged[pos] ^= 0x04
        with pytest.raises(CorruptBitstream):
            _read_all(bytes(damaged))


def _v2(version: int = 2, sources: dict | None = None) -> bytes:
    tiles = [
        dict(
            payload=p,
            source=f"scene-{i // 2}.tif",
            row=16 * i,
            col=-1 if i else 0,
            height=100,
            width=90,
        )
        for i, p in enumerate(PAYLOADS)
    ]
    return container_v2.container(SHA, META, tiles, version, sources)


@pytest.mark.parametrize("version", [1, 2])
def test_format_1_and_2_containers_are_still_read(version):
    header, tiles = _read_all(_v2(version))
    assert header.version == version and not header.names_code
    assert [t.payload for t in tiles] == PAYLOADS and [t.index for t in tiles] == [0, 1, 2, 3]
    assert tiles[2].source == "scene-1.tif" and (tiles[2].row, tiles[2].col) == (32, -1)
    assert (tiles[3].source_height, tiles[3].source_width) == (100, 90)


def test_format_2_source_records_are_read_and_format_1_has_none():
    reader = ContainerReader(io.BytesIO(_v2(2, {"scene-1.tif": GEO})))
    assert [t.source for t in reader][2] == "scene-1.tif" and reader.sources == {"scene-1.tif": GEO}
    with pytest.raises(CorruptBitstream, match="bad record tag b'S'"):
        _read_all(_v2(1, {"scene-1.tif": GEO}))


def test_format_2_damage_is_detected_at_every_byte_and_every_cut():
    data = _v2(2, {"scene-0.tif": GEO})
    for pos in range(len(data)):
        damaged = bytearray(data)
        damaged[pos] ^= 0x10
        with pytest.raises(CorruptBitstream):
            _read_all(bytes(damaged))
    for cut in range(len(data)):
        with pytest.raises(CorruptBitstream):
            _read_all(data[:cut])


@pytest.mark.parametrize(
    ("meta", "field"), [({"family": ""}, "family"), ({"codebooks": 0}, "codebooks")]
)
def test_family_and_codebooks_are_checked(meta, field):
    with pytest.raises(ValueError, match=field):
        ContainerHeader(SHA, {**META, **meta})


def test_unknown_version_is_refused():
    data = bytearray(_container([b"x"]))
    data[4:6] = struct.pack("<H", 9)
    with pytest.raises(CorruptBitstream, match="version 9"):
        _read_all(bytes(data))


def test_interrupted_writer_leaves_no_trailer():
    buf = io.BytesIO()
    with pytest.raises(RuntimeError):
        with ContainerWriter(buf, ContainerHeader(SHA, META)) as w:
            w.write_tile(b"abc")
            raise RuntimeError("inference server died")
    with pytest.raises(CorruptBitstream, match="truncated"):
        _read_all(buf.getvalue())


def test_table_mismatch_names_both_hashes():
    header = ContainerHeader(SHA, META)
    header.check_code(SHA, "ef" * 32)
    with pytest.raises(
        TableMismatch, match=r"code fingerprint .*abababababababab.*cdcdcdcdcdcdcdcd"
    ):
        header.check_code("cd" * 32, SHA)
    old = ContainerHeader(SHA, META, version=2)  # formats 1-2 named the tables only
    old.check_code("cd" * 32, SHA)
    with pytest.raises(TableMismatch, match=r"entropy tables abababababababab.*cdcdcdcdcd"):
        old.check_code(SHA, "cd" * 32)


def test_header_requires_the_decoder_fields():
    with pytest.raises(ValueError, match="tokens"):
        ContainerHeader(SHA, {"model": "m", "channels": 1})


def _raw_container(meta: bytes, sha: str = SHA) -> bytes:
    """A container with ``meta`` as its metadata bytes, valid CRCs and no tiles.

    Built by hand from the spec: ContainerWriter refuses metadata like this.
    """
    body = struct.pack("<4sHH32sI", MAGIC, 3, 0, bytes.fromhex(sha), len(meta)) + meta
    end = b"\x00\x00"  # tile count and payload bytes, as varints
    return (
        body + struct.pack("<I", zlib.crc32(body)) + b"E" + end + struct.pack("<I", zlib.crc32(end))
    )


_DROP = object()


def _meta_json(**changes) -> bytes:
    meta = {**META, "img_size": 32, "bands": [1, 2, 3]}
    for key, value in changes.items():
        if value is _DROP:
            del meta[key]
        else:
            meta[key] = value
    return json.dumps(meta).encode()


def test_raw_container_helper_matches_the_writer():
    assert _raw_container(json.dumps(META, sort_keys=True, separators=(",", ":")).encode()) == (
        _container([])
    )
    header, tiles = _read_all(_raw_container(_meta_json(model_version=3)))
    assert header.meta["model_version"] == 3 and tiles == []


@pytest.mark.parametrize(
    ("changes", "field", "got"),
    [
        ({"tokens": "many"}, "tokens", "'many'"),
        ({"tokens": True}, "tokens", "True"),
        ({"tokens": 1.5}, "tokens", "1.5"),
        ({"tokens": 3.0}, "tokens", "3.0"),
        ({"tokens": -3}, "tokens", "-3"),
        ({"tokens": 0}, "tokens", "0"),
        ({"tokens": 10**30}, "tokens", str(10**30)),
        ({"channels": None}, "channels", "None"),
        ({"channels": [4]}, "channels", r"\[4\]"),
        ({"img_size": "32"}, "img_size", "'32'"),
        ({"bands": "x"}, "bands", "'x'"),
        ({"bands": []}, "bands", r"\[\]"),
        ({"bands": [1, 0]}, "bands", r"\[1, 0\]"),
        ({"bands": [1, True]}, "bands", r"\[1, True\]"),
        ({"model": 5}, "model", "5"),
        ({"model": ""}, "model", "''"),
        ({"normalisation": [1, 2]}, "normalisation", r"\[1, 2\]"),
        ({"model_version": False}, "model_version", "False"),
        ({"model_version": {"v": 1}}, "model_version", r"\{'v': 1\}"),
        ({"source_dtype": 8}, "source_dtype", "8"),
    ],
)
def test_bad_metadata_with_valid_crc_is_corrupt_and_names_the_field(changes, field, got):
    data = _raw_container(_meta_json(**changes))
    with pytest.raises(
        CorruptBitstream, match=rf"container metadata field '{field}' must be .*, got {got}$"
    ):
        _read_all(data)
    # The writer refuses the same header before writing a byte.
    with pytest.raises(ValueError, match=rf"field '{field}'"):
        ContainerHeader(SHA, json.loads(_meta_json(**changes)))


def test_metadata_error_message_is_exact():
    with pytest.raises(CorruptBitstream) as info:
        _read_all(_raw_container(_meta_json(tokens="many")))
    assert str(info.value) == (
        "container metadata field 'tokens' must be an integer in 1..65536, got 'many'"
    )
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (_meta_json(tokens=_DROP), "lacks 'tokens'"),
        (_meta_json(model=_DROP), "lacks 'model'"),
        (b"[1, 2, 3]", "must be a JSON object, got list"),
        (b'"model"', "must be a JSON object, got str"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (_meta_json(tokens=float("nan")), "field 'tokens'.*got nan"),
    ],
)
def test_unusable_metadata_is_corrupt(meta, match):
    with pytest.raises(CorruptBitstream, match=match):
        _read_all(_raw_container(meta))


def test_long_bad_values_are_cut_in_messages():
    header, _ = _read_all(_raw_container(_meta_json(model="x" * 5000)))
    assert header.meta["model"] == "x" * 5000  # long but valid
    with pytest.raises(CorruptBitstream) as info:
        _read_all(_raw_container(_meta_json(model=5000 * [1])))
    text = str(info.value)
    assert text.startswith("container metadata field 'model' must be a non-empty string, got [1,")
    assert text.endswith("...") and len(text) < 200


def test_table_sha_must_be_hex():
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        ContainerHeader("zz" * 32, META)
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        ContainerHeader(None, META)


def _tables() -> EntropyTables:
    cdf = np.array([[0, 30000, 60000, 65536, 0], [0, 1, 2, 3, 65536]], dtype=np.int32)
    return EntropyTables(cdf, np.array([4, 5]), np.array([-1, -2]), np.array([0.25, -1.5]))


def test_tables_file_round_trip_and_hash_sidecar(tmp_path):
    t = _tables()
    path = tmp_path / "entropy_tables.bin"
    sha = t.save(path)
    loaded = EntropyTables.load(path)
    assert loaded.sha256 == sha == t.sha256
    np.testing.assert_array_equal(loaded.quantized_cdf, t.quantized_cdf)
    data = bytearray(path.read_bytes())
    data[16 + 4 * 2 * 2] ^= 1  # lowest bit of medians[0]: still valid tables, other hash
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match="does not match"):
        EntropyTables.load(path)


@pytest.mark.parametrize(
    ("cdf", "match"),
    [
        ([[1, 30000, 65536]], "do not start at 0"),
        ([[0, 30000, 65535]], "do not end at 65536"),
        ([[0, 30000, 30000, 65536]], "not strictly increasing"),
    ],
)
def test_invalid_tables_are_refused(cdf, match):
    n = len(cdf[0])
    with pytest.raises(InvalidInput, match=match):
        EntropyTables(np.array(cdf), np.array([n]), np.array([0]), np.array([0.0]))


def test_truncated_tables_file_is_refused():
    data = _tables().to_bytes()
    with pytest.raises(InvalidInput, match="header says"):
        EntropyTables.from_bytes(data[:-4])
    with pytest.raises(InvalidInput, match="not an entropy table"):
        EntropyTables.from_bytes(b"XXXX" + data[4:])


# -- format 3: fields the writer never gets wrong, built by hand with valid CRCs ----------


def _varint(value: int) -> bytes:
    out = bytearray()
    framing.varint.put(out, value)
    return bytes(out)


def _v3(index: bytes, payloads: bytes, tiles: int, *, flags: int = 0, raw_len=None) -> bytes:
    """Header, one group of ``tiles`` tiles with this index and payload, trailer."""
    body = _varint(tiles) + bytes([flags]) + _varint(len(index))
    if raw_len is not None:
        body += _varint(raw_len)
    body += index + payloads
    size = _varint(len(body))
    group = b"G" + size + body + struct.pack("<I", zlib.crc32(size + body))
    end = _varint(tiles) + _varint(len(payloads))
    trailer = b"E" + end + struct.pack("<I", zlib.crc32(end))
    return ContainerHeader(SHA, dict(META)).to_bytes() + group + trailer


ONE_SOURCE = b"\x01\x01a\x08\x08\x00"  # one source "a", 8 x 8, no info
S1 = b"\x01\x01"  # one stream of one tile (its length follows)


def test_hand_built_group_reads_back():
    _, tiles = _read_all(_v3(ONE_SOURCE + b"\x04" + b"\x01\x01\x03", b"xyz", 1))
    assert [(t.source, t.source_height, t.payload) for t in tiles] == [("a", 8, b"xyz")]


@pytest.mark.parametrize(
    ("index", "payloads", "tiles", "match"),
    [
        (b"\x7f" + b"\x01a" * 3, b"", 1, "declares 127 sources in 6 bytes"),
        (ONE_SOURCE + b"\x08" + S1 + b"\x00", b"", 1, "refers to source 1, the name table holds 1"),
        (ONE_SOURCE + b"\x03" + S1 + b"\x00", b"", 1, "refers to source -2"),
        (ONE_SOURCE + b"\x04" + S1 + b"\x80\x80\x80\x80\x80\x01", b"", 1, "longer than a 32-bit"),
        (ONE_SOURCE + b"\x04" + S1 + b"\x80\x80\x80\x80\x10", b"", 1, "overflows 32 bits"),
        (ONE_SOURCE + b"\x04" + S1 + b"\x82\x00", b"ab", 1, "not minimally encoded"),
        (
            ONE_SOURCE + b"\x04" + S1 + b"\x03",
            b"ab",
            1,
            "declare 3 payload bytes, the group holds 2",
        ),
        (ONE_SOURCE + b"\x04" + S1 + b"\x02\x00", b"ab", 1, "1 bytes after the last stream"),
        (ONE_SOURCE + b"\x04" + S1, b"", 1, "truncated inside payload length"),
        (ONE_SOURCE + b"\x04" + b"\x02\x01\x01\x00\x00", b"", 1, "stream count 2 exceeds 1"),
        (ONE_SOURCE + b"\x04" + b"\x01\x02\x00", b"", 1, "streams hold 2 tiles .*, the group 1"),
        (ONE_SOURCE + b"\x04\x00" + b"\x02\x02\x00\x00\x00", b"", 2, "streams hold 2 tiles"),
        (ONE_SOURCE, b"", 0, "a group holds no tiles"),
        (b"\x01\x02\xff\xfe\x01\x01\x00\x04" + S1 + b"\x00", b"", 1, "not valid UTF-8"),
        (b"\x01\x01a\x01\x01\x02[]\x04" + S1 + b"\x00", b"", 1, "info must be a JSON object"),
        (ONE_SOURCE + b"\x05\x81\x80\x80\x80\x10\x00" + S1 + b"\x00", b"", 1, "row"),
    ],
)
def test_malformed_group_index_is_corrupt_and_says_what(index, payloads, tiles, match):
    with pytest.raises(CorruptBitstream, match=match):
        _read_all(_v3(index, payloads, tiles))


def test_unknown_group_flags_and_a_damaged_compressed_index_are_corrupt():
    index = ONE_SOURCE + b"\x04" + S1 + b"\x03"
    with pytest.raises(CorruptBitstream, match="unknown group flags 0x02"):
        _read_all(_v3(index, b"xyz", 1, flags=2))
    packed = framing.lzma.compress(
        index, format=framing.lzma.FORMAT_RAW, filters=framing._LZMA_WRITE
    )
    _, tiles = _read_all(_v3(packed, b"xyz", 1, flags=1, raw_len=len(index)))
    assert tiles[0].payload == b"xyz"
    with pytest.raises(CorruptBitstream, match="do not hold the 99 bytes"):
        _read_all(_v3(packed, b"xyz", 1, flags=1, raw_len=99))
    with pytest.raises(CorruptBitstream, match="do not hold the 3 bytes"):
        _read_all(_v3(packed, b"xyz", 1, flags=1, raw_len=3))
    with pytest.raises(CorruptBitstream, match="index: the compressed bytes are corrupt"):
        _read_all(_v3(b"\xff" * 12, b"xyz", 1, flags=1, raw_len=len(index)))


def test_a_group_length_beyond_the_limit_is_refused_before_reading():
    data = bytearray(_container([b"abc"]))
    at = data.index(b"G") + 1
    huge = _varint(framing.MAX_GROUP_BYTES + 1)
    damaged = bytes(data[:at]) + huge + bytes(data[at + 1 :])
    with pytest.raises(CorruptBitstream, match="exceeds"):
        _read_all(damaged)


def test_writer_refuses_what_format_3_cannot_hold():
    w = ContainerWriter(io.BytesIO(), ContainerHeader(SHA, dict(META)))
    with pytest.raises(ValueError, match="row 2147483648 is outside"):
        w.write_tile(b"", row=1 << 31)
    with pytest.raises(ValueError, match="name is 4097 bytes"):
        w.write_tile(b"", source="x" * 4097)
    with pytest.raises(ValueError, match="writes format 3, the header is format 2"):
        ContainerWriter(io.BytesIO(), ContainerHeader(SHA, dict(META), version=2))


BIG_META = {**META, "normalisation": {"scale": 1.0, "mean": [0.125] * 40, "std": [0.5] * 40}}


def _header(flags: int, stored: bytes) -> bytes:
    body = struct.pack("<4sHH32sI", MAGIC, 3, flags, bytes.fromhex(SHA), len(stored)) + stored
    end = b"\x00\x00"
    return (
        body + struct.pack("<I", zlib.crc32(body)) + b"E" + end + struct.pack("<I", zlib.crc32(end))
    )


def test_large_metadata_is_stored_compressed_and_reads_back():
    data = ContainerHeader(SHA, BIG_META).to_bytes()
    raw = json.dumps(BIG_META, sort_keys=True, separators=(",", ":")).encode()
    assert struct.unpack_from("<H", data, 6) == (1,) and len(data) < len(raw)
    header, _ = _read_all(_container([], meta=BIG_META))
    assert header.meta == BIG_META


def test_bad_header_flags_and_lying_metadata_lengths_are_corrupt():
    raw = json.dumps(BIG_META, sort_keys=True, separators=(",", ":")).encode()
    packed = framing._lzma(raw)
    assert _read_all(_header(1, struct.pack("<I", len(raw)) + packed))[0].meta == BIG_META
    with pytest.raises(CorruptBitstream, match="unknown flags 0x0002"):
        _read_all(_header(2, raw))
    with pytest.raises(CorruptBitstream, match=f"do not hold the {len(raw) + 1} bytes"):
        _read_all(_header(1, struct.pack("<I", len(raw) + 1) + packed))
    with pytest.raises(CorruptBitstream, match="exceeds the limit"):
        _read_all(_header(1, struct.pack("<I", framing.MAX_META_BYTES + 1) + packed))
    with pytest.raises(CorruptBitstream, match="too short"):
        _read_all(_header(1, b"\x01"))
    # Formats 1 and 2 reserved the field and rejected nothing on it: still so.
    old = container_v2.container(SHA, META, [dict(payload=b"x")])
    flagged = bytearray(old)
    flagged[6:8] = b"\x07\x00"
    meta_end = 44 + struct.unpack_from("<I", old, 40)[0]
    flagged[meta_end : meta_end + 4] = struct.pack("<I", zlib.crc32(bytes(flagged[:meta_end])))
    assert [t.payload for t in _read_all(bytes(flagged))[1]] == [b"x"]


def test_damage_to_a_compressed_header_is_detected_at_every_byte():
    data = _container([b"abc"], meta=BIG_META)
    for pos in range(len(data)):
        damaged = bytearray(data)
        damaged[pos] ^= 0x01
        with pytest.raises(CorruptBitstream):
            _read_all(bytes(damaged))


def test_a_stream_of_several_tiles_is_shared_by_their_records():
    buf = io.BytesIO()
    places = [framing.TilePlace("s.tif", 0, 64 * i, 64, 192) for i in range(3)]
    with ContainerWriter(buf, ContainerHeader(SHA, dict(META))) as w:
        assert w.write_tile(b"one", source="a.tif") == 0
        assert w.write_stream(b"joint", places) == 1
        assert w.write_tile(b"two", source="b.tif") == 4
    reader = ContainerReader(io.BytesIO(buf.getvalue()))
    tiles = list(reader)
    assert [(t.index, t.part, t.parts) for t in tiles] == [
        (0, 0, 1),
        (1, 0, 3),
        (2, 1, 3),
        (3, 2, 3),
        (4, 0, 1),
    ]
    assert tiles[1].payload is tiles[3].payload and tiles[2].payload == b"joint"
    assert [t.col for t in tiles[1:4]] == [0, 64, 128]
    assert reader.payload_bytes == len(b"one" + b"joint" + b"two") and reader.tile_count == 5
    with pytest.raises(ValueError, match="a stream holds 1..65536 tiles, got 0"):
        ContainerWriter(io.BytesIO(), ContainerHeader(SHA, dict(META))).write_stream(b"", [])


@pytest.mark.parametrize(
    "info",
    [
        GEO,
        {"crs": 'PROJCS["x"]', "transform": [0.5, 0.0, -1e300, 0.0, -0.5, 2.0]},
        {"crs": "EPSG:0326", "transform": [1.0, 0.0, 0.0, 0.0, -1.0, 0.0]},
        {"crs": "EPSG:4326", "transform": [1, 0, 0, 0, -1, 0]},  # integers: kept as JSON
        {"crs": "EPSG:4326", "transform": [1.0] * 6, "nodata": 0},
    ],
)
def test_georeferencing_reads_back_exactly(info):
    buf = io.BytesIO()
    with ContainerWriter(buf, ContainerHeader(SHA, dict(META))) as w:
        w.write_source("a.tif", info)
        w.write_tile(b"t", source="a.tif")
    reader = ContainerReader(io.BytesIO(buf.getvalue()))
    list(reader)
    assert reader.sources == {"a.tif": info}
    assert json.dumps(reader.sources["a.tif"], sort_keys=True) == json.dumps(info, sort_keys=True)


def test_binary_georeferencing_is_smaller_than_its_json():
    head, transform = framing._encode_info(GEO)
    assert len(head) == 1 + 3 and len(transform) == 48  # tag, EPSG 32633; six float64
    assert len(head + transform) < len(json.dumps(GEO))


def test_transforms_are_stored_as_byte_planes():
    values = [bytes(range(k, k + 48)) for k in range(3)]
    planes = framing._shuffle(values)
    assert planes[:3] == bytes([0, 1, 2]) and framing._unshuffle(planes, 3, 48) == values


@pytest.mark.parametrize(
    ("info", "tail", "match"),
    [
        (b"\x01\x81\x01", b"", "transforms declares 48 bytes"),
        (b"\x01\x81\x01\x00", b"\0" * 48, "1 bytes after the EPSG code"),
        (b"\x01\x81", b"\0" * 48, "truncated inside EPSG code"),
        (b"\x02\xff\xfe", b"\0" * 48, "not valid UTF-8"),
        (b"\x03", b"\0" * 48, "not valid UTF-8 JSON"),
    ],
)
def test_malformed_binary_georeferencing_is_corrupt(info, tail, match):
    index = b"\x01\x01a\x08\x08" + bytes([len(info)]) + info + tail + b"\x04" + S1 + b"\x00"
    with pytest.raises(CorruptBitstream, match=match):
        _read_all(_v3(index, b"", 1))
