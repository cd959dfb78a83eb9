"""Tests of nec_serve.imagery on the real sample data in data/samples (read-only)."""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

from nec_serve.errors import InvalidInput
from nec_serve.imagery import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputLimits,
    Normalisation,
    TileGrid,
    check_pixels,
    iter_inputs,
    iter_tar_tiles,
    read_bigearthnet_patch,
    read_raster,
    read_raster_bytes,
    tile_image,
    untile,
)

DATA = Path(__file__).resolve().parents[3] / "data" / "samples"
NAIP = DATA / "naip" / "m_4709963_se_14_1_20090818.tif"
NAIP_2 = DATA / "naip" / "m_4709963_se_14_1_20180716.tif"
LANDSAT = DATA / "landsat" / "1985.tif"
PATCH = DATA / "bigearthnet" / "S2A_MSIL2A_20170617T113321_4_55"


@pytest.fixture(scope="module")
def naip() -> np.ndarray:
    return read_raster(NAIP)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _geotiff_bytes(array: np.ndarray) -> bytes:
    bands, height, width = array.shape
    with rasterio.io.MemoryFile() as mem:
        with mem.open(
            driver="GTiff",
            width=width,
            height=height,
            count=bands,
            dtype=array.dtype,
            crs="EPSG:26914",
            transform=Affine(1.0, 0.0, 485900.0, 0.0, -1.0, 5209247.0),
        ) as ds:
            ds.write(array)
        return mem.read()


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _tiny_npy(name: str = "ok.npy") -> tuple[tarfile.TarInfo, bytes]:
    return _file(name, _npy_bytes(np.zeros((3, 4, 4), np.uint8)))


# ------------------------------------------------------------------------------- reading


def test_read_naip_all_bands_and_known_pixel(naip: np.ndarray) -> None:
    assert naip.dtype == np.uint8
    assert naip.ndim == 3 and naip.shape[0] == 4
    assert naip.shape[1:] in {(723, 934), (724, 934)}
    assert naip.flags.c_contiguous
    with rasterio.open(NAIP) as ds:
        assert naip.shape[1:] == (ds.height, ds.width)
        green = ds.read(2, window=Window(col_off=200, row_off=100, width=1, height=1))
        nir = ds.read(4, window=Window(col_off=933, row_off=ds.height - 1, width=1, height=1))
    assert naip[1, 100, 200] == green[0, 0]
    assert naip[3, -1, -1] == nir[0, 0]


def test_read_naip_band_selection(naip: np.ndarray) -> None:
    rgb = read_raster(NAIP, bands=(1, 2, 3))
    assert rgb.shape == (3, *naip.shape[1:])
    np.testing.assert_array_equal(rgb, naip[:3])
    bgr = read_raster(NAIP, bands=[3, 2, 1])
    np.testing.assert_array_equal(bgr, naip[[2, 1, 0]])


def test_read_landsat() -> None:
    arr = read_raster(LANDSAT)
    with rasterio.open(LANDSAT) as ds:
        count, shape = ds.count, (ds.height, ds.width)
        first = ds.read(1)
    # The README says 3 bands; the files actually hold 4 (colour interp gray + undefined).
    assert arr.shape == (count, *shape) and count >= 3
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[0], first)
    assert read_raster(LANDSAT, bands=[1, 2, 3]).shape == (3, *shape)


def test_read_npy_2d_and_3d(tmp_path: Path, naip: np.ndarray) -> None:
    np.save(tmp_path / "a.npy", naip[:, :50, :60])
    np.save(tmp_path / "b.npy", naip[0, :50, :60])
    np.testing.assert_array_equal(read_raster(tmp_path / "a.npy"), naip[:, :50, :60])
    np.testing.assert_array_equal(read_raster(tmp_path / "b.npy"), naip[None, 0, :50, :60])
    np.testing.assert_array_equal(read_raster(tmp_path / "a.npy", [4, 1]), naip[[3, 0], :50, :60])


def test_read_raster_bytes_matches_file(naip: np.ndarray) -> None:
    from_bytes = read_raster_bytes(NAIP.read_bytes(), NAIP.name, bands=[1, 2, 3])
    np.testing.assert_array_equal(from_bytes, naip[:3])


def test_bigearthnet_patch_rgb() -> None:
    arr = read_bigearthnet_patch(PATCH)
    assert arr.shape == (3, 120, 120) and arr.dtype == np.uint16
    for i, band in enumerate(("B04", "B03", "B02")):
        with rasterio.open(PATCH / f"{PATCH.name}_{band}.tif") as ds:
            np.testing.assert_array_equal(arr[i], ds.read(1))


def test_bigearthnet_patch_upsamples_coarse_bands() -> None:
    with rasterio.open(PATCH / f"{PATCH.name}_B05.tif") as ds:
        native = ds.read(1)
    assert native.shape == (60, 60)
    arr = read_bigearthnet_patch(PATCH, bands=("B04", "B05", "B01"))
    assert arr.shape == (3, 120, 120) and arr.dtype == np.uint16
    # Bilinear 2x upsampling keeps the value range and the mean of the 20 m band.
    assert native.min() <= arr[1].min() and arr[1].max() <= native.max()
    assert abs(float(arr[1].mean()) - float(native.mean())) < 0.01 * float(native.mean())


def test_bigearthnet_missing_band(tmp_path: Path) -> None:
    patch = tmp_path / PATCH.name
    shutil.copytree(PATCH, patch)
    (patch / f"{PATCH.name}_B03.tif").unlink()
    with pytest.raises(InvalidInput, match=rf"band B03 missing.*{PATCH.name}_B03\.tif"):
        read_bigearthnet_patch(patch)


# ------------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("tile", [224, 32])
def test_tiling_round_trip_naip(naip: np.ndarray, tile: int) -> None:
    tiles, grid = tile_image(naip, tile)
    _, height, width = naip.shape
    assert grid.count == math.ceil(height / tile) * math.ceil(width / tile)
    assert tiles.shape == (grid.count, 4, tile, tile) and tiles.dtype == naip.dtype
    np.testing.assert_array_equal(tiles[0], naip[:, :tile, :tile])
    row, col = grid.origins()[grid.cols + 1]
    assert (row, col) == (tile, tile)
    np.testing.assert_array_equal(tiles[grid.cols + 1], naip[:, row : row + tile, col : col + tile])
    restored = untile(tiles, grid)
    assert restored.shape == naip.shape
    np.testing.assert_array_equal(restored, naip)
    assert TileGrid.from_dict(json.loads(json.dumps(grid.to_dict()))) == grid


def test_tiling_pads_by_reflection() -> None:
    img = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    tiles, grid = tile_image(img, 4)
    assert (grid.rows, grid.cols, grid.count) == (2, 2, 4)
    # Bottom-left tile: rows 4, then reflected 3, 2, 1.
    np.testing.assert_array_equal(tiles[2][:, :, 0], img[:, [4, 3, 2, 1], 0])
    # Top-right tile: cols 4, 5, 6, then reflected 5.
    np.testing.assert_array_equal(tiles[1][:, 0, :], img[:, 0, [4, 5, 6, 5]])
    np.testing.assert_array_equal(untile(tiles, grid), img)


def test_tiling_image_smaller_than_tile_uses_one_edge_padded_tile() -> None:
    img = np.array([[[7, 9]]], dtype=np.uint16)  # 1 x 2: too small to reflect 31 rows
    tiles, grid = tile_image(img, 32)
    assert tiles.shape == (1, 1, 32, 32) and grid.count == 1
    assert (tiles[0, 0, :, 0] == 7).all() and (tiles[0, 0, :, 1:] == 9).all()
    np.testing.assert_array_equal(untile(tiles, grid), img)


def test_tiling_rejects_bad_arguments(naip: np.ndarray) -> None:
    with pytest.raises(InvalidInput, match="tile size must be a positive integer"):
        tile_image(naip, 0)
    with pytest.raises(InvalidInput, match=r"non-empty \(bands, H, W\)"):
        tile_image(naip[0], 32)
    tiles, grid = tile_image(naip[:, :64, :64], 32)
    with pytest.raises(InvalidInput, match="do not fit the grid"):
        untile(tiles[:3], grid)
    with pytest.raises(InvalidInput, match="inconsistent tile grid"):
        TileGrid.from_dict({"height": 64, "width": 64, "tile": 32, "rows": 3, "cols": 2})
    with pytest.raises(InvalidInput, match=r"missing \['cols'\]"):
        TileGrid.from_dict({"height": 64, "width": 64, "tile": 32, "rows": 2})


# ------------------------------------------------------------------------------- normalisation


def test_normalisation_defaults() -> None:
    rgb8 = Normalisation.for_dtype(np.uint8, 3)
    assert (rgb8.scale, rgb8.mean, rgb8.std) == (255.0, IMAGENET_MEAN, IMAGENET_STD)
    s2 = Normalisation.for_dtype("uint16", 4)
    assert (s2.scale, s2.mean, s2.std) == (10000.0, (0.0,) * 4, (1.0,) * 4)
    assert Normalisation.for_dtype(np.float32, 3).scale == 1.0
    with pytest.raises(InvalidInput, match="no default normalisation for dtype int32"):
        Normalisation.for_dtype(np.int32, 3)


def test_normalisation_round_trip_naip(naip: np.ndarray) -> None:
    tiles, _ = tile_image(naip[:3], 224)
    norm = Normalisation.for_dtype(tiles.dtype, 3)
    x = norm.apply(tiles)
    assert x.dtype == np.float32 and x.shape == tiles.shape
    expected = (tiles[:, 0].astype(np.float64) / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    np.testing.assert_allclose(x[:, 0], expected, atol=1e-5)
    back = norm.invert(x)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, tiles, rtol=0, atol=1e-4)


def test_normalisation_round_trip_bigearthnet() -> None:
    raw = read_bigearthnet_patch(PATCH)
    norm = Normalisation.for_dtype(raw.dtype, 3)
    back = norm.invert(norm.apply(raw))
    np.testing.assert_allclose(back / norm.scale, raw / norm.scale, rtol=0, atol=1e-4)


def test_normalisation_dict_round_trip_and_validation(naip: np.ndarray) -> None:
    norm = Normalisation(255, (0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8))
    assert Normalisation.from_dict(json.loads(json.dumps(norm.to_dict()))) == norm
    assert norm.apply(naip).shape == naip.shape
    with pytest.raises(InvalidInput, match="std must be > 0"):
        Normalisation.from_dict({"scale": 1.0, "mean": [0.0], "std": [0.0]})
    with pytest.raises(InvalidInput, match=r"missing \['std'\]"):
        Normalisation.from_dict({"scale": 1.0, "mean": [0.0]})
    with pytest.raises(InvalidInput, match="1 mean value.*2 std value"):
        Normalisation.from_dict({"scale": 1.0, "mean": [0.0], "std": [1.0, 1.0]})
    with pytest.raises(InvalidInput, match="scale must be finite and > 0"):
        Normalisation(float("nan"), (0.0,), (1.0,))
    with pytest.raises(InvalidInput, match="has 4 band.*normalisation is for 3"):
        Normalisation.for_dtype(np.uint8, 3).apply(naip)


# ------------------------------------------------------------------------------- archives


@pytest.fixture()
def naip_crops(naip: np.ndarray) -> list[tuple[str, np.ndarray]]:
    other = read_raster(NAIP_2, bands=[1, 2, 3])
    return [
        ("tiles/a_000.npy", naip[:3, :64, :64]),
        ("tiles/a_001.tif", naip[:3, 64:128, :96]),
        ("tiles/b_000.tiff", other[:, 300:364, 500:564]),
        ("tiles/b_001.npy", naip[:, 100:132, 200:264]),
    ]


def _crops_tar(crops: list[tuple[str, np.ndarray]], mode: str = "w:gz") -> bytes:
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    folder = tarfile.TarInfo("tiles")
    folder.type = tarfile.DIRTYPE
    members.append((folder, None))
    members.append(_file("tiles/README.txt", b"not an image, skipped\n"))
    for name, arr in crops:
        data = _npy_bytes(arr) if name.endswith(".npy") else _geotiff_bytes(arr)
        members.append(_file(name, data))
    return _tar(members, mode)


def test_tar_gz_of_real_tiles_in_order(tmp_path: Path, naip_crops: list) -> None:
    archive = tmp_path / "batch.tar.gz"
    archive.write_bytes(_crops_tar(naip_crops))
    got = list(iter_tar_tiles(archive))
    assert [name for name, _ in got] == [name for name, _ in naip_crops]
    for (_, arr), (_, expected) in zip(got, naip_crops, strict=True):
        assert arr.dtype == np.uint8
        np.testing.assert_array_equal(arr, expected)
    # The same through a non-seekable-style file object, with band selection.
    with open(archive, "rb") as f:
        firsts = [arr for _, arr in iter_tar_tiles(f, bands=[1])]
    assert [a.shape[0] for a in firsts] == [1, 1, 1, 1]
    np.testing.assert_array_equal(firsts[2], naip_crops[2][1][:1])


def test_plain_tar_and_iter_inputs_dispatch(tmp_path: Path, naip_crops: list) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "batch.tar").write_bytes(_crops_tar(naip_crops, mode="w"))
    shutil.copy(NAIP, tmp_path / "in" / "scene.tif")
    shutil.copytree(PATCH, tmp_path / "in" / "patch")
    np.save(tmp_path / "in" / "crop.npy", naip_crops[0][1])
    (tmp_path / "in" / "notes.txt").write_text("skipped")
    names = [name for name, _ in iter_inputs(tmp_path / "in")]
    assert names == [
        *(f"batch.tar/{name}" for name, _ in naip_crops),
        "crop.npy",
        "patch",
        "scene.tif",
    ]
    assert [n for n, _ in iter_inputs(tmp_path / "in" / "batch.tar")] == [n for n, _ in naip_crops]
    ((name, arr),) = iter_inputs(tmp_path / "in" / "patch")
    assert name == "patch" and arr.shape == (3, 120, 120)
    ((name, arr),) = iter_inputs(NAIP, bands=[1, 2, 3])
    assert name == NAIP.name and arr.shape[0] == 3


def test_iter_inputs_bigearthnet_folder() -> None:
    items = list(iter_inputs(DATA / "bigearthnet"))
    assert [name for name, _ in items] == sorted(p.name for p in (DATA / "bigearthnet").iterdir())
    assert all(arr.shape == (3, 120, 120) and arr.dtype == np.uint16 for _, arr in items)


# ------------------------------------------------------------------------------- bad input


def test_check_pixels_nan_and_inf() -> None:
    img = np.zeros((3, 8, 8), np.float32)
    img[1, 2, 3] = np.nan
    img[2, 7, 7] = np.inf
    with pytest.raises(InvalidInput, match=r"scene\.npy: 2 non-finite.*\(1, 2, 3\)"):
        check_pixels(img, "scene.npy")
    with pytest.raises(InvalidInput, match="must be shaped"):
        check_pixels(img[0], "x")
    with pytest.raises(InvalidInput, match="image is empty"):
        check_pixels(np.zeros((3, 0, 8), np.uint8), "x")
    check_pixels(img[:1], "fine")


def test_iter_inputs_refuses_nan_npy(tmp_path: Path) -> None:
    img = np.ones((3, 4, 4), np.float32)
    img[0, 1, 2] = -np.inf
    np.save(tmp_path / "bad.npy", img)
    with pytest.raises(InvalidInput, match=r"bad\.npy: 1 non-finite.*\(0, 1, 2\)"):
        list(iter_inputs(tmp_path / "bad.npy"))


@pytest.mark.parametrize("name", ["empty.tif", "empty.npy"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(InvalidInput, match=rf"{name}: file is empty \(0 bytes\)"):
        read_raster(tmp_path / name)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"nope\.tif: no such file"):
        read_raster(tmp_path / "nope.tif")
    with pytest.raises(InvalidInput, match=r"nope: no such file or directory"):
        list(iter_inputs(tmp_path / "nope"))


def test_truncated_geotiff(tmp_path: Path) -> None:
    data = NAIP.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInput, match=r"cut\.tif: not a readable GeoTIFF") as info:
        read_raster(cut)
    assert isinstance(info.value.__cause__, rasterio.errors.RasterioError)
    with pytest.raises(InvalidInput, match=r"cut\.tif: not a readable GeoTIFF"):
        read_raster_bytes(data[:100], "cut.tif")


def test_truncated_npy(tmp_path: Path, naip: np.ndarray) -> None:
    data = _npy_bytes(naip[:, :10, :10])
    (tmp_path / "cut.npy").write_bytes(data[: len(data) - 50])
    with pytest.raises(InvalidInput, match=r"cut\.npy: not a valid \.npy file"):
        read_raster(tmp_path / "cut.npy")


def test_band_out_of_range() -> None:
    with pytest.raises(InvalidInput, match=r"band 5 is out of range; the file has 4 band"):
        read_raster(NAIP, bands=[1, 5])
    with pytest.raises(InvalidInput, match=r"band 0 is out of range.*1-based"):
        read_raster(NAIP, bands=[0])


def test_unsupported_suffix(tmp_path: Path) -> None:
    shutil.copy(NAIP, tmp_path / "scene.jp2")
    with pytest.raises(InvalidInput, match=r"scene\.jp2: unsupported file type '\.jp2'"):
        read_raster(tmp_path / "scene.jp2")
    with pytest.raises(InvalidInput, match=r"unsupported input '\.jp2'"):
        list(iter_inputs(tmp_path / "scene.jp2"))


def test_jpeg_and_png_read_as_pillow_decodes_them(tmp_path: Path) -> None:
    from PIL import Image

    src = next((DATA / "eurosat_rgb" / "Forest").glob("*.jpg"))
    arr = read_raster(src)
    want = np.asarray(Image.open(src)).transpose(2, 0, 1)
    assert arr.shape == (3, 64, 64) and arr.dtype == np.uint8 and np.array_equal(arr, want)
    Image.fromarray(want[1]).save(tmp_path / "green.png")
    assert np.array_equal(read_raster(tmp_path / "green.png"), want[1:2])
    assert np.array_equal(read_raster(src, bands=[3, 1]), want[[2, 0]])
    data = src.read_bytes()
    assert np.array_equal(read_raster_bytes(data, "patch.JPG"), want)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInput, match=r"cut\.jpg: not a readable image"):
        read_raster(tmp_path / "cut.jpg")
    shutil.copy(NAIP, tmp_path / "scene.png")  # a GeoTIFF under another name
    with pytest.raises(InvalidInput, match=r"scene\.png: content is GeoTIFF but the name"):
        read_raster(tmp_path / "scene.png")
    with pytest.raises(InvalidInput, match=r"big\.jpg.*max_pixels"):
        read_raster(src, limits=InputLimits(max_pixels=100), label="big.jpg")


def test_object_npy_refused(tmp_path: Path) -> None:
    obj = np.empty((1, 2, 2), dtype=object)
    obj[0, 0, 0] = {"evil": "payload"}
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    with pytest.raises(InvalidInput, match=r"obj\.npy: holds Python objects.*pickles are refused"):
        read_raster(tmp_path / "obj.npy")


def test_empty_archives(tmp_path: Path) -> None:
    zero = tmp_path / "zero.tar.gz"
    zero.write_bytes(b"")
    with pytest.raises(InvalidInput, match=r"zero\.tar\.gz: archive file is empty"):
        list(iter_tar_tiles(zero))
    nothing = tmp_path / "nothing.tar.gz"
    nothing.write_bytes(gzip.compress(b""))
    with pytest.raises(InvalidInput, match=r"nothing\.tar\.gz: archive is empty"):
        list(iter_tar_tiles(nothing))
    no_images = tmp_path / "no_images.tgz"
    no_images.write_bytes(_tar([_file("readme.txt", b"hi")]))
    with pytest.raises(InvalidInput, match=r"contains no \.tif/\.tiff/\.npy members"):
        list(iter_inputs(no_images))


def test_truncated_tar_gz(tmp_path: Path, naip_crops: list) -> None:
    data = _crops_tar(naip_crops)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInput, match=r"cut\.tar\.gz: .*(truncated|end-of-stream)"):
        list(iter_tar_tiles(cut))
    # Losing only the gzip trailer (CRC + length) is caught too.
    cut.write_bytes(data[:-4])
    with pytest.raises(InvalidInput, match=r"cut\.tar\.gz: .*truncated.*end-of-stream marker"):
        list(iter_tar_tiles(cut))


def test_truncated_plain_tar_at_member_boundary() -> None:
    data = _tar([_tiny_npy("a.npy"), _tiny_npy("b.npy")], mode="w")
    boundary = 512 + 512  # header + one padded block of a.npy's data
    with pytest.raises(InvalidInput, match="without the end-of-archive marker"):
        list(iter_tar_tiles(io.BytesIO(data[:boundary])))


def test_corrupt_gzip_bytes(naip_crops: list) -> None:
    data = bytearray(_crops_tar(naip_crops))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    with pytest.raises(InvalidInput, match=r"<archive stream>: .*corrupt"):
        list(iter_tar_tiles(io.BytesIO(bytes(data))))
    with pytest.raises(InvalidInput, match=r"not a readable tar archive"):
        list(iter_tar_tiles(io.BytesIO(b"\x1f\x8b\x08\x00garbage that is not deflate")))


def _link(name: str, kind: bytes, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_tiny_npy("../x.npy"), r"member '\.\./x\.npy' has a '\.\.' path component"),
        (_tiny_npy("tiles/../../x.npy"), r"member 'tiles/\.\./\.\./x\.npy' has a '\.\.' path"),
        (_tiny_npy("/abs.npy"), r"member '/abs\.npy' has an absolute path"),
        (_link("link.npy", tarfile.SYMTYPE, "/etc/passwd"), r"member 'link\.npy' is a symlink"),
        (_link("hard.npy", tarfile.LNKTYPE, "ok.npy"), r"member 'hard\.npy' is a hardlink"),
        (_link("fifo.npy", tarfile.FIFOTYPE, ""), r"member 'fifo\.npy' is a device or FIFO"),
        (_link("dev.npy", tarfile.CHRTYPE, ""), r"member 'dev\.npy' is a device or FIFO"),
    ],
)
def test_unsafe_members_refused(tmp_path: Path, member: tuple, message: str) -> None:
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(_tar([_tiny_npy(), member]))
    with pytest.raises(InvalidInput, match=rf"evil\.tar\.gz: {message}"):
        list(iter_tar_tiles(archive))
    assert not (tmp_path / "x.npy").exists()


def test_archive_limits(naip: np.ndarray) -> None:
    big = _file("big.npy", _npy_bytes(naip[:, :100, :100]))
    data = _tar([_tiny_npy("a.npy"), big])
    with pytest.raises(
        InvalidInput, match=r"member 'big\.npy' has \d+ bytes, over max_member_bytes=1000"
    ):
        list(iter_tar_tiles(io.BytesIO(data), max_member_bytes=1000))
    with pytest.raises(InvalidInput, match=r"exceed max_total_bytes=5000 in total"):
        list(iter_tar_tiles(io.BytesIO(data), max_total_bytes=5000))
    with pytest.raises(InvalidInput, match=r"more than max_members=1 members"):
        list(iter_tar_tiles(io.BytesIO(data), max_members=1))
    assert len(list(iter_tar_tiles(io.BytesIO(data), max_member_bytes=50_000))) == 2


def test_bad_member_names_the_member(naip: np.ndarray) -> None:
    data = _tar([_tiny_npy("a.npy"), _file("bad.tif", b"II*\x00 not really a tiff")])
    with pytest.raises(InvalidInput, match=r"member 'bad\.tif': not a readable GeoTIFF"):
        list(iter_tar_tiles(io.BytesIO(data)))
    with pytest.raises(InvalidInput, match=r"member 'a\.npy': band 4 is out of range"):
        list(iter_tar_tiles(io.BytesIO(data), bands=[4]))


def test_tar_error_message_is_not_a_bare_tarfile_error() -> None:
    with pytest.raises(InvalidInput, match=re.escape("not a readable tar archive")):
        list(iter_tar_tiles(io.BytesIO(b"this is not a tar archive" * 40)))


def test_corrupt_tar_header_after_first_member() -> None:
    data = bytearray(_tar([_tiny_npy("a.npy"), _tiny_npy("b.npy")], mode="w"))
    data[1024:1030] = b"XXXXXX"  # second header: tarfile alone would just stop here
    with pytest.raises(InvalidInput, match="corrupt tar header at byte 1024"):
        list(iter_tar_tiles(io.BytesIO(bytes(data))))


# ------------------------------------------------------------------------------- limits

HUGE = (3, 100_000, 100_000)  # 30 GB of uint8


def _npy_header_only(shape: tuple[int, ...], descr: str = "|u1", data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue() + data


@pytest.fixture(scope="module")
def sparse_tif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GeoTIFF declaring 3 x 100,000 x 100,000 uint8 with one small window written."""
    path = tmp_path_factory.mktemp("sparse") / "sparse.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=HUGE[2],
        height=HUGE[1],
        count=HUGE[0],
        dtype="uint8",
        tiled=True,
        blockxsize=1024,
        blockysize=1024,
        SPARSE_OK="TRUE",
        compress="deflate",
        crs="EPSG:26914",
        transform=Affine(1.0, 0.0, 485900.0, 0.0, -1.0, 5209247.0),
    ) as ds:
        ds.write(np.full((3, 16, 16), 7, np.uint8), window=Window(0, 0, 16, 16))
    assert path.stat().st_size < 1_000_000
    return path


def _peak_alloc(fn) -> int:
    """Peak bytes traced (NumPy reports its buffers to tracemalloc) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_default_limits_admit_sentinel2_and_naip() -> None:
    limits = InputLimits()
    # A Sentinel-2 tile at 10 m: RGB, the four 10 m bands, or 8 of 13 bands read.
    assert limits.check_image("s2", 3, 10980, 10980, np.uint16) == 3 * 10980 * 10980 * 2
    assert limits.check_image("s2", 13, 10980, 10980, np.uint16, read_bands=8) > 1 << 30
    with pytest.raises(InvalidInput, match=r"s2: declares 13x10980x10980 uint16 .* max_image"):
        limits.check_image("s2", 13, 10980, 10980, np.uint16)
    for path in sorted((DATA / "naip").glob("*.tif")):
        arr = read_raster(path, limits=limits)
        assert arr.shape[0] == 4 and arr.dtype == np.uint8


@pytest.mark.parametrize(
    "field", ["max_pixels", "max_bands", "max_image_bytes", "max_decoded_bytes", "max_tiles"]
)
@pytest.mark.parametrize("value", [0, -1, True, 1.5, "10", None])
def test_input_limits_are_validated(field: str, value: object) -> None:
    with pytest.raises(InvalidInput, match=rf"InputLimits\.{field} must be an integer >= 1"):
        InputLimits(**{field: value})
    assert getattr(InputLimits(**{field: np.int64(7)}), field) == 7


def test_npy_declaring_30_gb_is_refused_before_allocation(tmp_path: Path) -> None:
    data = _npy_header_only(HUGE, data=bytes(900))
    assert len(data) < 1100
    path = tmp_path / "huge.npy"
    path.write_bytes(data)
    message = r"huge\.npy: declares 3x100000x100000 uint8 \(30\.0 GB decoded\), over " + (
        r"max_image_bytes=2147483648"
    )
    for read in (lambda: read_raster(path), lambda: read_raster_bytes(data, "huge.npy")):
        with pytest.raises(InvalidInput, match=message):
            read()
    # Nothing near the declared size is allocated, even with generous byte limits.
    roomy = InputLimits(max_image_bytes=1 << 40, max_decoded_bytes=1 << 40)

    def read_roomy() -> None:
        with pytest.raises(InvalidInput, match=r"10000000000 pixels\), over max_pixels="):
            read_raster(path, limits=roomy)

    assert _peak_alloc(read_roomy) < 10_000_000
    with pytest.raises(InvalidInput, match=r"declares 3x100000x100000 .* over max_bands=2"):
        read_raster(path, limits=InputLimits(max_bands=2))


def test_npy_declaring_30_gb_inside_tar_gz(tmp_path: Path) -> None:
    archive = tmp_path / "in.tar.gz"
    archive.write_bytes(_tar([_tiny_npy("a.npy"), _file("x.npy", _npy_header_only(HUGE))]))
    seen = []
    with pytest.raises(
        InvalidInput, match=r"in\.tar\.gz: member 'x\.npy': declares 3x100000x100000 uint8"
    ) as info:
        for name, _ in iter_inputs(archive):
            seen.append(name)
    assert "max_image_bytes=2147483648" in str(info.value)
    assert seen == ["a.npy"]


def test_npy_header_and_data_length_must_agree(tmp_path: Path) -> None:
    short = _npy_header_only((3, 10, 10), data=bytes(250))
    with pytest.raises(InvalidInput, match=r"s\.npy: not a valid \.npy file \(truncated\).*"):
        read_raster_bytes(short, "s.npy")
    (tmp_path / "s.npy").write_bytes(short)
    with pytest.raises(InvalidInput, match=r"declares 3x10x10 uint8 \(300 bytes.*250 bytes"):
        read_raster(tmp_path / "s.npy")
    with pytest.raises(InvalidInput, match=r"member 's\.npy': not a valid \.npy file \(trunc"):
        list(iter_tar_tiles(io.BytesIO(_tar([_file("s.npy", short)]))))
    long = _npy_bytes(np.ones((3, 4, 4), np.uint16)) + b"extra"
    with pytest.raises(InvalidInput, match=r"has trailing bytes"):
        read_raster_bytes(long, "l.npy")
    # Fortran order and big-endian data still load, as np.load would give them.
    arr = np.asfortranarray(np.arange(24, dtype=">u2").reshape(2, 3, 4))
    got = read_raster_bytes(_npy_bytes(arr), "f.npy")
    assert got.dtype == np.uint16 and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)
    with pytest.raises(InvalidInput, match=r"z\.npy: content is zip \(or \.npz\)"):
        buf = io.BytesIO()
        np.savez(buf, a=np.zeros(3))
        read_raster_bytes(buf.getvalue(), "z.npy")


def test_sparse_geotiff_declaring_30_gb_is_refused(tmp_path: Path, sparse_tif: Path) -> None:
    message = r"declares 3x100000x100000 uint8 \(30\.0 GB decoded\), over max_image_bytes="
    with pytest.raises(InvalidInput, match=rf"sparse\.tif: {message}"):
        read_raster(sparse_tif)
    with pytest.raises(InvalidInput, match=r"1 band\(s\) read \(10\.0 GB decoded\)"):
        read_raster(sparse_tif, bands=[1])
    with pytest.raises(InvalidInput, match=r"\(10000000000 pixels\), over max_pixels="):
        read_raster(sparse_tif, bands=[1], limits=InputLimits(max_image_bytes=1 << 40))
    archive = tmp_path / "in.tar.gz"
    archive.write_bytes(_tar([_tiny_npy("a.npy"), _file("big.tif", sparse_tif.read_bytes())]))
    with pytest.raises(InvalidInput, match=rf"in\.tar\.gz: member 'big\.tif': {message}"):
        list(iter_inputs(archive))
    with pytest.raises(InvalidInput, match=rf"big\.tif: {message}"):
        read_raster_bytes(sparse_tif.read_bytes(), "big.tif")


def test_sparse_geotiff_read_allocates_nothing_large(sparse_tif: Path) -> None:
    def read() -> None:
        with pytest.raises(InvalidInput, match="max_image_bytes"):
            read_raster(sparse_tif)

    assert _peak_alloc(read) < 10_000_000


def test_geotiff_block_size_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "blocks.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=32, height=32, count=1, dtype="uint8",
        tiled=True, blockxsize=256, blockysize=256, crs="EPSG:26914",
        transform=Affine(1.0, 0.0, 485900.0, 0.0, -1.0, 5209247.0),
    ) as ds:  # fmt: skip
        ds.write(np.ones((1, 32, 32), np.uint8))
    assert read_raster(path, limits=InputLimits(max_pixels=256 * 256)).shape == (1, 32, 32)
    with pytest.raises(InvalidInput, match=r"blocks of 65536 pixels, over max_pixels=1024"):
        read_raster(path, limits=InputLimits(max_pixels=1024))


def test_budget_of_one_input_across_tar_members(naip_crops: list) -> None:
    sizes = [arr.nbytes for _, arr in naip_crops]  # declared == decoded for these crops
    limits = InputLimits(max_decoded_bytes=sizes[0] + sizes[1] + 100)
    seen = []
    with pytest.raises(InvalidInput) as info:
        for name, _ in iter_tar_tiles(io.BytesIO(_crops_tar(naip_crops)), limits=limits):
            seen.append(name)
    assert seen == [naip_crops[0][0], naip_crops[1][0]]
    text = str(info.value)
    assert f"member '{naip_crops[2][0]}'" in text
    assert f"over max_decoded_bytes={sizes[0] + sizes[1] + 100}" in text
    assert len(list(iter_tar_tiles(io.BytesIO(_crops_tar(naip_crops)), limits=InputLimits()))) == 4


def test_budget_across_a_folder_walk(tmp_path: Path, naip_crops: list) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(_crops_tar(naip_crops[:2], mode="w"))
    np.save(tmp_path / "in" / "b.npy", naip_crops[2][1])
    total = sum(arr.nbytes for _, arr in naip_crops[:3])
    names = [
        n for n, _ in iter_inputs(tmp_path / "in", limits=InputLimits(max_decoded_bytes=total))
    ]
    assert names == ["a.tar/tiles/a_000.npy", "a.tar/tiles/a_001.tif", "b.npy"]
    with pytest.raises(
        InvalidInput, match=rf"in/b\.npy: declares .* max_decoded_bytes={total - 1}"
    ):
        list(iter_inputs(tmp_path / "in", limits=InputLimits(max_decoded_bytes=total - 1)))
    # BigEarthNet patches charge the band files they decode (3 x 120 x 120 uint16 each).
    per_patch = 3 * 120 * 120 * 2
    for name in ("p1", "p2", "p3"):
        shutil.copytree(PATCH, tmp_path / "patches" / name)
    seen = []
    with pytest.raises(InvalidInput, match=r"_B0\d\.tif: declares 1x120x120 uint16.*max_decoded"):
        for name, _ in iter_inputs(
            tmp_path / "patches", limits=InputLimits(max_decoded_bytes=2 * per_patch + 1)
        ):
            seen.append(name)
    assert len(seen) == 2
    with pytest.raises(InvalidInput, match=r"_B04\.tif: declares .* over max_pixels=100"):
        read_bigearthnet_patch(PATCH, limits=InputLimits(max_pixels=100))


def _bad_inputs(root: Path) -> dict[str, Path]:
    """One bad input of each kind under ``root``, by the name the test uses."""
    data = NAIP.read_bytes()
    (root / "cut.tif").write_bytes(data[: len(data) // 2])
    (root / "junk.tif").write_bytes(b"II*\x00 not really a tiff" * 4)
    (root / "huge.npy").write_bytes(_npy_header_only(HUGE))
    (root / "a.tar.gz").write_bytes(
        _tar([_tiny_npy("ok.npy"), _file("x.npy", _npy_header_only(HUGE))])
    )
    (root / "folder").mkdir()
    (root / "folder" / "junk.tif").write_bytes(b"II*\x00 not really a tiff" * 4)
    return {p.name: p for p in root.iterdir()} | {"missing.tif": root / "missing.tif"}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("cut.tif", r"not a readable GeoTIFF"),
        ("junk.tif", r"not a readable GeoTIFF"),
        ("huge.npy", r"declares 3x100000x100000 uint8 .* over max_image_bytes"),
        ("a.tar.gz", r"member 'x\.npy': declares 3x100000x100000 uint8 .* max_image_bytes"),
        ("folder", r"/junk\.tif: not a readable GeoTIFF"),
        ("missing.tif", r"no such file or directory"),
    ],
)
def test_label_replaces_the_local_path_in_errors(tmp_path: Path, name: str, message: str) -> None:
    local = tmp_path / "nec-step-x" / "in"
    local.mkdir(parents=True)
    path = _bad_inputs(local)[name]
    label = f"s3://b/input/{name}"
    with pytest.raises(InvalidInput, match=rf"^{re.escape(label)}.*{message}") as info:
        list(iter_inputs(path, label=label))
    text = str(info.value)
    assert str(tmp_path) not in text and "nec-step-x" not in text
    # Without a label the local path is named, as before.
    with pytest.raises(InvalidInput, match=re.escape(str(path))):
        list(iter_inputs(path))


def test_label_keeps_item_names(tmp_path: Path, naip_crops: list) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_crops_tar(naip_crops))
    names = [n for n, _ in iter_inputs(archive, label="s3://b/input/a.tar.gz")]
    assert names == [n for n, _ in naip_crops]
    bad = np.ones((3, 4, 4), np.float32)
    bad[0, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(InvalidInput, match=r"^s3://b/nan\.npy: 1 non-finite") as info:
        list(iter_inputs(tmp_path / "nan.npy", label="s3://b/nan.npy"))
    assert str(tmp_path) not in str(info.value)


# ------------------------------------------------------------------------------- package


def test_light_names_import_without_rasterio_and_every_name_resolves() -> None:
    # A fresh interpreter: this one has imported rasterio already.
    code = """
import sys
from nec_serve.imagery import InputLimits, Normalisation, TileGrid
assert "rasterio" not in sys.modules, sorted(m for m in sys.modules if "rasterio" in m)
import nec_serve.imagery as imagery
missing = [name for name in imagery.__all__ if not hasattr(imagery, name)]
assert not missing, missing
assert set(imagery.__all__) <= set(dir(imagery))
from nec_serve.imagery.limits import human_bytes
assert human_bytes(30 * 10**9) == "30.0 GB"
try:
    imagery.no_such_name
except AttributeError as err:
    assert "no_such_name" in str(err)
else:
    raise AssertionError("unknown names must raise AttributeError")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
