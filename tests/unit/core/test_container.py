from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest

from nec_serve.container import MAGIC, ContainerHeader, ContainerReader, ContainerWriter
from nec_serve.errors import CorruptBitstream, InvalidInput, TableMismatch
from nec_serve.tables import EntropyTables

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
    assert header.table_sha256 == SHA and header.meta == META
    assert header.symbols_per_tile == 12
    assert [t.payload for t in tiles] == PAYLOADS
    assert [t.index for t in tiles] == [0, 1, 2, 3]
    assert tiles[2].source == "scene-1.tif" and tiles[2].row == 32 and tiles[2].col == -1
    assert (tiles[3].source_height, tiles[3].source_width) == (100, 90)


def test_layout_matches_the_written_spec():
    data = _container([b"abcd"])
    magic, version, flags, digest, meta_len = struct.unpack_from("<4sHH32sI", data)
    assert (magic, version, flags, digest.hex()) == (MAGIC, 2, 0, SHA)
    meta_end = 44 + meta_len
    assert data[44:meta_end] == b'{"channels":4,"model":"m","model_version":"1","tokens":3}'
    (crc,) = struct.unpack_from("<I", data, meta_end)
    assert crc == zlib.crc32(data[:meta_end])
    tile = data[meta_end + 4 :]
    assert tile[:1] == b"T"
    assert struct.unpack_from("<IiiIIH", tile, 1) == (0, 0, 0, 100, 90, 11)
    assert tile[23:34] == b"scene-0.tif"
    assert struct.unpack_from("<I", tile, 34) == (4,) and tile[38:42] == b"abcd"
    assert struct.unpack_from("<I", tile, 42) == (zlib.crc32(tile[1:42]),)
    end = tile[46:]
    assert end[:1] == b"E" and struct.unpack_from("<IQ", end, 1) == (1, 4)
    assert len(end) == 1 + 12 + 4


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


def test_version_1_containers_are_still_read_and_have_no_source_records():
    data = bytearray(_container(PAYLOADS))
    data[4:6] = struct.pack("<H", 1)
    meta_len = struct.unpack_from("<I", data, 40)[0]
    end = 44 + meta_len
    data[end : end + 4] = struct.pack("<I", zlib.crc32(bytes(data[:end])))
    header, tiles = _read_all(bytes(data))
    assert header.version == 1 and [t.payload for t in tiles] == PAYLOADS
    v1 = bytearray(_with_sources())
    v1[4:6] = struct.pack("<H", 1)
    v1[end : end + 4] = struct.pack("<I", zlib.crc32(bytes(v1[:end])))
    with pytest.raises(CorruptBitstream, match="bad record tag b'S'"):
        _read_all(bytes(v1))


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
    header.check_tables(SHA)
    with pytest.raises(TableMismatch, match=r"abababababababab.*cdcdcdcdcdcdcdcd"):
        header.check_tables("cd" * 32)


def test_header_requires_the_decoder_fields():
    with pytest.raises(ValueError, match="tokens"):
        ContainerHeader(SHA, {"model": "m", "channels": 1})


def _raw_container(meta: bytes, sha: str = SHA) -> bytes:
    """A container with ``meta`` as its metadata bytes, valid CRCs and no tiles.

    Built by hand from the spec: ContainerWriter refuses metadata like this.
    """
    body = struct.pack("<4sHH32sI", MAGIC, 2, 0, bytes.fromhex(sha), len(meta)) + meta
    end = struct.pack("<IQ", 0, 0)
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
