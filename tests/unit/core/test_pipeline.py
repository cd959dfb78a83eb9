from __future__ import annotations

import io
import json
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch

from nec_cli.main import main
from nec_serve.bundle import ModelBundle
from nec_serve.container import MAGIC, ContainerReader
from nec_serve.engines import LocalEngine
from nec_serve.errors import CorruptBitstream, InvalidInput
from nec_serve.imagery import InputLimits, Normalisation, iter_inputs, read_raster, tile_image
from nec_serve.pipeline import check_decoded_size, compress, decompress

NAIP = "naip/m_4709963_se_14_1_20180716.tif"


@pytest.fixture()
def naip_crop(tmp_path, data_dir):
    """A real NAIP crop (RGB, uint8) as .npy: 3 x 70 x 100 -> 3 x 4 tiles of 32 px."""
    arr = read_raster(data_dir / NAIP, [1, 2, 3])[:, 100:170, 200:300]
    path = tmp_path / "crop.npy"
    np.save(path, arr)
    return path, arr


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compress_decompress_round_trip_on_real_imagery(
    tmp_path, tiny_export, tiny_model, naip_crop, capsys
):
    src, arr = naip_crop
    box = tmp_path / "crop.necb"
    code, out, err = _run(capsys, "compress", src, "--model-dir", tiny_export, "--out", box, "-q")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["tiles"] == 12 and stats["images"] == 1
    assert stats["raw_bytes"] == arr.nbytes
    assert stats["container_bytes"] == box.stat().st_size
    assert stats["bits_per_pixel"] == pytest.approx(8 * box.stat().st_size / (70 * 100), rel=1e-3)
    assert 0 < stats["embedding_rmse"] < 0.5  # rounding to integers: uniform error, RMS ~0.29

    emb_path = tmp_path / "emb.npy"
    code, out, err = _run(
        capsys, "decompress", box, "--model-dir", tiny_export, "--out", emb_path, "-q"
    )
    assert code == 0, err
    emb = np.load(emb_path)
    assert emb.shape == (12, 17, 64) and emb.dtype == np.float32

    # End to end against PyTorch: the decoded embeddings are the dequantized symbols of the
    # same tiles, and each tile's payload is byte-identical to CompressAI's own compress().
    tiles, grid = tile_image(arr, 32)
    x = torch.from_numpy(Normalisation.for_dtype(arr.dtype, 3).apply(tiles))
    with torch.no_grad():
        ref_emb = tiny_model.dequantize(tiny_model.symbols(tiny_model.latent(x)))
        ref_strings = tiny_model.compress(x)["strings"][0]
    np.testing.assert_array_equal(emb, ref_emb.numpy())
    with box.open("rb") as f:
        records = list(ContainerReader(f))
    assert [r.payload for r in records] == ref_strings
    assert [(r.row, r.col) for r in records] == grid.origins()
    assert {r.source for r in records} == {"crop.npy"}
    index = json.loads(emb_path.with_suffix(".tiles.json").read_text())
    assert index[5] == {"tile": 5, "source": "crop.npy", "row": 32, "col": 32}

    # The payloads decode with CompressAI's own decompress too.
    y_hat = tiny_model.bottleneck.decompress([records[0].payload], (17, 1))
    assert torch.equal(y_hat.squeeze(-1).transpose(1, 2)[0], ref_emb[0])


def test_symbols_output_and_inspect(tmp_path, tiny_export, naip_crop, capsys):
    box = tmp_path / "c.necb"
    assert (
        _run(capsys, "compress", naip_crop[0], "--model-dir", tiny_export, "--out", box, "-q")[0]
        == 0
    )
    code, out, _ = _run(capsys, "inspect", box)
    info = json.loads(out)
    assert code == 0 and info["tiles"] == 12 and info["model"] == "mae_vit_compress_adapter_tiny"
    assert info["normalisation"]["scale"] == 255.0
    sym_path = tmp_path / "sym.npy"
    assert (
        _run(
            capsys,
            "decompress",
            box,
            "--model-dir",
            tiny_export,
            "--out",
            sym_path,
            "--output",
            "symbols",
            "-q",
        )[0]
        == 0
    )
    feat_path = tmp_path / "feat.npy"
    assert (
        _run(
            capsys,
            "decompress",
            box,
            "--model-dir",
            tiny_export,
            "--out",
            feat_path,
            "--output",
            "features",
            "-q",
        )[0]
        == 0
    )
    assert np.load(sym_path).dtype == np.int32 and np.load(sym_path).shape == (12, 64, 17)
    assert np.load(feat_path).shape == (12, 16, 32)


def test_tar_of_real_tiles_and_batching_give_identical_payloads(tmp_path, tiny_export, data_dir):
    import tarfile

    bundle = ModelBundle.load(tiny_export)
    engine = LocalEngine(bundle, threads=1)
    arrays = [
        read_raster(data_dir / NAIP, [1, 2, 3])[:, i * 40 : i * 40 + 40, :64] for i in range(3)
    ]
    archive = tmp_path / "tiles.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for i, a in enumerate(arrays):
            p = tmp_path / f"t{i}.npy"
            np.save(p, a)
            tf.add(p, arcname=f"tiles/t{i}.npy")
    from nec_serve.imagery import iter_inputs

    outs = []
    for batch in (1, 5):
        buf = io.BytesIO()
        compress(iter_inputs(archive), bundle, engine, buf, batch_size=batch)
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]  # batching does not change a byte
    header, records, emb = decompress(io.BytesIO(outs[0]), bundle, engine)
    assert [r.source for r in records][::4] == ["tiles/t0.npy", "tiles/t1.npy", "tiles/t2.npy"]
    assert emb.shape == (12, 17, 64)


def test_wrong_band_count_fails_clearly_and_writes_nothing(tmp_path, tiny_export, data_dir, capsys):
    out = tmp_path / "x.necb"
    code, _, err = _run(
        capsys, "compress", data_dir / NAIP, "--model-dir", tiny_export, "--out", out, "-q"
    )
    assert code == 2
    assert "has 4 bands" in err and "takes 3" in err and "--bands" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (np.full((3, 40, 40), np.nan, dtype=np.float32), "NaN"),
        (np.full((3, 40, 40), np.inf, dtype=np.float32), "inf"),
        (None, "empty"),
    ],
)
def test_bad_pixels_and_empty_files_fail_clearly(tmp_path, tiny_export, capsys, content, match):
    src = tmp_path / "bad.npy"
    if content is None:
        src.write_bytes(b"")
    else:
        np.save(src, content)
    out = tmp_path / "out.necb"
    code, _, err = _run(capsys, "compress", src, "--model-dir", tiny_export, "--out", out, "-q")
    assert code == 2 and match.lower() in err.lower()
    assert not out.exists() and not list(tmp_path.glob(".out.necb*"))


def test_corrupt_container_fails_and_writes_nothing(tmp_path, tiny_export, naip_crop, capsys):
    box = tmp_path / "c.necb"
    _run(capsys, "compress", naip_crop[0], "--model-dir", tiny_export, "--out", box, "-q")
    data = bytearray(box.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / "flipped.necb"
    bad.write_bytes(bytes(data))
    out = tmp_path / "emb.npy"
    code, _, err = _run(capsys, "decompress", bad, "--model-dir", tiny_export, "--out", out, "-q")
    assert code == 2 and "CRC mismatch" in err
    assert not out.exists()
    short = tmp_path / "short.necb"
    short.write_bytes(bytes(data[: len(data) - 30]))
    code, _, err = _run(capsys, "decompress", short, "--model-dir", tiny_export, "--out", out, "-q")
    assert code == 2 and ("truncated" in err or "CRC" in err)


def test_container_from_other_tables_is_refused(tmp_path, tiny_export, naip_crop, capsys):
    box = tmp_path / "c.necb"
    _run(capsys, "compress", naip_crop[0], "--model-dir", tiny_export, "--out", box, "-q")
    other = tmp_path / "other_export"
    shutil.copytree(tiny_export, other)
    from nec_serve.tables import EntropyTables

    t = EntropyTables.load(other / "entropy_tables.bin")
    cdf = t.quantized_cdf.copy()
    cdf[0, 1] += 1  # one count of difference
    changed = EntropyTables(cdf, t.cdf_length, t.offset, t.medians, t.precision)
    changed.save(other / "entropy_tables.bin")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["entropy"]["sha256"] = changed.sha256
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = _run(
        capsys, "decompress", box, "--model-dir", other, "--out", tmp_path / "e.npy", "-q"
    )
    written = ModelBundle.load(tiny_export).code_sha256
    assert code == 2 and "code fingerprint" in err and written[:16] in err


def test_export_directory_with_tampered_tables_is_refused(tmp_path, tiny_export):
    other = tmp_path / "x"
    shutil.copytree(tiny_export, other)
    (other / "entropy_tables.bin.sha256").unlink()
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["entropy"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    from nec_serve.errors import InvalidInput

    with pytest.raises(InvalidInput, match="differs from the manifest"):
        ModelBundle.load(other)
    with pytest.raises(InvalidInput, match="no manifest.json"):
        ModelBundle.load(tmp_path)


def test_export_cli_unknown_model_and_bad_checkpoint(tmp_path, capsys):
    code, _, err = _run(capsys, "export", "--model", "vit_huge_nec", "--out", tmp_path / "e")
    assert code == 2 and "unknown model 'vit_huge_nec'" in err
    ckpt = tmp_path / "c.pth"
    torch.save({"model": {"foo": torch.zeros(1)}}, ckpt)
    code, _, err = _run(
        capsys,
        "export",
        "--model",
        "mae_vit_compress_adapter_tiny",
        "--checkpoint",
        ckpt,
        "--out",
        tmp_path / "e",
    )
    assert code == 2 and "unexpected keys: foo" in err and "missing keys:" in err


def test_bad_bands_argument(tmp_path, tiny_export, naip_crop, capsys):
    code, _, err = _run(
        capsys,
        "compress",
        naip_crop[0],
        "--model-dir",
        tiny_export,
        "--out",
        tmp_path / "o",
        "--bands",
        "0,1,2",
    )
    assert code == 2 and "start at 1" in err


# ------------------------------------------------------------------------------- limits


@pytest.fixture()
def crop_container(tiny_export, naip_crop) -> tuple[ModelBundle, LocalEngine, bytes]:
    """The 12-tile container of the NAIP crop, compressed through the Python API."""
    bundle = ModelBundle.load(tiny_export)
    engine = LocalEngine(bundle, threads=1)
    buf = io.BytesIO()
    compress(iter_inputs(naip_crop[0]), bundle, engine, buf, batch_size=4)
    return bundle, engine, buf.getvalue()


def test_decompress_refuses_more_tiles_than_max_tiles(crop_container):
    bundle, engine, data = crop_container
    _, records, emb = decompress(io.BytesIO(data), bundle, engine, limits=InputLimits(max_tiles=12))
    assert len(records) == 12 and emb.shape == (12, 17, 64)
    decoded = []

    class Counting:
        def decode(self, graph, symbols):
            decoded.append(len(symbols))
            return engine.decode(graph, symbols)

    with pytest.raises(InvalidInput, match=r"^box\.necb: holds more than max_tiles=5 tiles$"):
        decompress(
            io.BytesIO(data),
            bundle,
            Counting(),
            batch_size=2,
            limits=InputLimits(max_tiles=5),
            label="box.necb",
        )
    assert sum(decoded) == 4  # refused before the batch holding tile 6 was decoded


def test_decompress_refuses_output_over_max_decoded_bytes(crop_container):
    bundle, engine, data = crop_container
    tile_bytes = 17 * 64 * 4  # one float32 (tokens, channels) embedding
    limits = InputLimits(max_decoded_bytes=5 * tile_bytes)
    with pytest.raises(InvalidInput, match=r"6 tiles of float32\(17, 64\) decode to 26\.1 KB"):
        decompress(io.BytesIO(data), bundle, engine, batch_size=2, limits=limits)
    with pytest.raises(InvalidInput, match=rf"over max_decoded_bytes={5 * 4 * 17 * 64}"):
        decompress(io.BytesIO(data), bundle, engine, batch_size=8, limits=limits)
    # Symbols are int32 (channels, tokens): the same byte count per tile.
    _, _, sym = decompress(
        io.BytesIO(data),
        bundle,
        None,
        "symbols",
        limits=InputLimits(max_decoded_bytes=12 * tile_bytes),
    )
    assert sym.nbytes == 12 * tile_bytes


def test_check_decoded_size():
    limits = InputLimits(max_tiles=100, max_decoded_bytes=4000)
    check_decoded_size(100, (2, 5), "float32", limits, "c.necb")  # exactly 4000 bytes: fits
    check_decoded_size(0, (197, 768), np.float32, limits, "c.necb")
    with pytest.raises(InvalidInput, match=r"^c\.necb: holds 101 tiles, over max_tiles=100$"):
        check_decoded_size(101, (1,), np.uint8, limits, "c.necb")
    with pytest.raises(
        InvalidInput,
        match=r"^c\.necb: 100 tiles of float32\(2, 6\) decode to 4\.8 KB \(4800 bytes\), "
        r"over max_decoded_bytes=4000$",
    ):
        check_decoded_size(100, (2, 6), np.float32, limits, "c.necb")
    # Defaults: ViT-B embeddings (197 x 768 float32, 605 KB a tile) fit 28,000 tiles.
    check_decoded_size(28_000, (197, 768), np.float32, InputLimits(), "s3://b/x.necb")
    with pytest.raises(InvalidInput, match=r"^s3://b/x\.necb: .*max_decoded_bytes=17179869184$"):
        check_decoded_size(30_000, (197, 768), np.float32, InputLimits(), "s3://b/x.necb")
    for args, match in [
        ((-1, (1,), np.uint8, limits), "tile count must be an integer >= 0"),
        ((True, (1,), np.uint8, limits), "tile count must be an integer >= 0"),
        ((1, (2, -1), np.uint8, limits), "tile shape must hold integers >= 0"),
        ((1, (1,), np.uint8, None), "limits must be an InputLimits"),
    ]:
        with pytest.raises(InvalidInput, match=match):
            check_decoded_size(*args, "c.necb")


def _raw_container(meta: dict, sha: str) -> bytes:
    """A tile-less container with valid CRCs around metadata ContainerWriter would refuse."""
    text = json.dumps(meta).encode()
    body = struct.pack("<4sHH32sI", MAGIC, 1, 0, bytes.fromhex(sha), len(text)) + text
    end = struct.pack("<IQ", 0, 0)
    crc = struct.pack("<I", zlib.crc32(body))
    return body + crc + b"E" + end + struct.pack("<I", zlib.crc32(end))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"tokens": "many"}, CorruptBitstream, r"field 'tokens' must be an integer"),
        ({"tokens": True}, CorruptBitstream, r"field 'tokens'"),
        ({"channels": None}, CorruptBitstream, r"field 'channels'"),
        ({"channels": 64.0}, CorruptBitstream, r"field 'channels'"),
        ({"tokens": 18}, InvalidInput, r"holds 64x18 symbols per tile, the export codes 64x17"),
        ({"model": "other"}, InvalidInput, r"made by model 'other'"),
    ],
)
def test_decompress_of_bad_headers_raises_project_errors(tiny_export, change, error, match):
    bundle = ModelBundle.load(tiny_export)
    meta = {"model": bundle.manifest.model, "channels": bundle.channels, "tokens": bundle.tokens}
    data = _raw_container({**meta, **change}, bundle.tables.sha256)
    with pytest.raises(error, match=match):
        decompress(io.BytesIO(data), bundle, None, "symbols")
    # The unchanged header passes every check; only the missing tiles are refused.
    with pytest.raises(InvalidInput, match="container holds no tiles"):
        decompress(io.BytesIO(_raw_container(meta, bundle.tables.sha256)), bundle, None, "symbols")


def test_decompress_rows_grow_in_place_and_keep_every_batch():
    from nec_serve.pipeline import _Rows

    rows = _Rows(most_bytes=1 << 30)
    first = rows.take(2, (3,), np.dtype(np.int32))
    first[...] = 1
    rows.add(first)  # already there: not appended again
    del first
    rows.add(np.full((3, 3), 2, np.int32))  # copied in, growing in place
    held = rows.take(1, (3,), np.dtype(np.int32))  # a live view: growth copies instead
    held[...] = 3
    rows.add(np.full((5, 3), 4, np.int32))
    out = rows.result()
    assert out.shape == (11, 3) and rows.count == 11 and held.base is not out
    np.testing.assert_array_equal(out[:, 0], [1, 1, 2, 2, 2, 3, 4, 4, 4, 4, 4])
    with pytest.raises(InvalidInput, match="change"):
        rows.take(1, (4,), np.dtype(np.int32))
    capped = _Rows(most_bytes=5 * 12)
    capped.take(4, (3,), np.dtype(np.int32))
    capped.take(1, (3,), np.dtype(np.int32))
    assert len(capped.array) == 5  # doubling stops at the decode limit
