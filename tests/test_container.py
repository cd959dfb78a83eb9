from __future__ import annotations

import io
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
    assert (magic, version, flags, digest.hex()) == (MAGIC, 1, 0, SHA)
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
