"""What an input or a message can make the services do, on the real broker and S3 server.

* Inputs are identified by their bytes against an allow-list: a GDAL VRT (XML) that points
  at a URL or at a local file, HDF, NetCDF, zip, a bare ``/vsicurl/`` path and a suffix
  that disagrees with the content are refused, whatever their name; an HTTP listener of the
  test's own gets no request and a planted local secret shows up nowhere.
* JPEG and PNG headers are admitted by their declared size before Pillow decodes anything,
  with the same message as every other format; Pillow's own limit is an input error too.
* Names that are not valid Unicode are input errors, never ``internal``.
* A container's declared geometry is bounded like an input's, and decoding to GeoTIFF
  streams in bounded memory.
* The duplicate marker names the delivery: two workflows sharing a bucket, a component and
  an input each get their next message.
* A restarted local controller resumes the feeds of the workflows it has stored.

Every case is followed by a valid message that succeeds. Mocks appear only to inject a
fault (Pillow's limit lowered).
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import tarfile
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
from support import SSL4EO, SSL4EO_BANDS
from support.kafka_s3 import NAIP, Flow, make_handler, naip_tar, uid, wait

from nec_serve.errors import InvalidInput
from nec_serve.imagery import InputLimits, iter_inputs, read_raster
from nec_serve.imagery.readers import read_raster_bytes
from nec_serve.messages import parse_workflow

ROOT = Path(__file__).resolve().parents[3]


class _Recorder:
    """An HTTP server on loopback that records every request (method, path, body).

    It answers ``status``: 404 as a listener that nothing should reach, 200 as a wrapper's
    HTTP trigger that the local KafkaSource posts to.
    """

    def __init__(self, status: int = 404):
        self.requests: list[str] = []
        self.bodies: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self):
                outer.requests.append(f"{self.command} {self.path}")
                outer.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = do_POST = _record

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _vrt(source: str, raw: bool = False) -> bytes:
    """A GDAL VRT whose one band reads ``source`` (a URL, a /vsi path or a local file)."""
    if raw:  # the bytes of any file, as pixels
        band = (
            '<VRTRasterBand dataType="Byte" band="1" subClass="VRTRawRasterBand">'
            f'<SourceFilename relativetoVRT="0">{source}</SourceFilename>'
            "<ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset>"
            "<LineOffset>16</LineOffset></VRTRasterBand>"
        )
    else:
        band = (
            '<VRTRasterBand dataType="Byte" band="1"><SimpleSource>'
            f'<SourceFilename relativeToVRT="0">{source}</SourceFilename>'
            "<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>"
        )
    return f'<VRTDataset rasterXSize="16" rasterYSize="4">{band}</VRTDataset>'.encode()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _png_header(width: int, height: int, colour: int = 2) -> bytes:
    """A PNG signature, IHDR and IEND declaring ``width`` x ``height`` (no image data)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _jpeg_header(width: int, height: int) -> bytes:
    """A JPEG start, an APP0 segment and a frame header declaring ``width`` x ``height``."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00" * 3
    return b"\xff\xd8" + app0 + sof + b"\xff\xd9"


def _objects(flow) -> dict[str, bytes]:
    client = flow.s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=flow.bucket).get("Contents", [])]
    return {k: flow.get(k) for k in keys}


# ------------------------------------------------------------------------------ content


def test_inputs_that_reach_beyond_themselves_are_refused_and_reach_nothing(
    kafka, s3, producer, tiny_export, data_dir, tmp_path, caplog
):
    caplog.set_level(logging.DEBUG)
    flow = Flow(kafka, s3, tmp_path)
    stored = flow.store.root / f"{flow.name}.secret.json"  # the workflow's own credentials
    assert flow.s3.secret_key in stored.read_text()
    work = tmp_path / "work"
    work.mkdir()
    with _Recorder(404) as web:
        metadata = f"/vsicurl/{web.url}/latest/meta-data/iam/security-credentials/role"
        cases = {
            "meta.tif": (_vrt(metadata), "content is XML"),
            "local.tif": (_vrt(str(stored), raw=True), "content is XML"),
            "bom.tiff": (b"\xef\xbb\xbf \n" + _vrt(str(stored), raw=True), "content is XML"),
            "path.tif": (metadata.encode(), "content is a path or URL"),
            "h5.tif": (b"\x89HDF\r\n\x1a\n" + bytes(64), "content is HDF5"),
            "nc.tif": (b"CDF\x01" + bytes(64), "content is NetCDF"),
            "zip.tif": (b"PK\x03\x04" + bytes(64), "content is zip"),
            "vrt.npy": (_vrt(metadata), "content is XML"),
            "vrt.png": (_vrt(str(stored), raw=True), "content is XML"),
            "vrt.jpg": (_vrt(metadata), "content is XML"),
            "members.tar.gz": (_tar_gz({"a.tif": _vrt(metadata)}), "member 'a.tif': content"),
            "plain.tar": (_tar_gz({"a.npy": b"x"}), "content is gzip but the name ends in '.tar'"),
        }
        naip = (data_dir / NAIP).read_bytes()
        cases["naip.png"] = (naip, "content is GeoTIFF but the name ends in '.png'")
        for name, (data, _) in cases.items():
            flow.put(f"input/{name}", data)
        handler = make_handler(flow, tiny_export, producer, work_dir=work)
        for name, (_, match) in cases.items():
            out = handler.handle(flow.name, flow.step(name))
            assert out.done and out.status == "failed", (name, out)
            assert out.failure == "input_error", (name, out)
            assert f"s3://{flow.bucket}/input/{name}" in out.reason, out.reason
            assert match in out.reason, (name, out.reason)
        # The same files given to the CLI: exit 2 and one line, no output, no traceback.
        for name in ("local.tif", "meta.tif"):
            path = tmp_path / name
            path.write_bytes(cases[name][0])
            cli = _cli("compress", str(path), "--model-dir", str(tiny_export), "--bands", "1",
                       "--out", str(tmp_path / "x.necb"))  # fmt: skip
            assert cli.returncode == 2, cli.stderr
            assert "content is XML" in cli.stderr and "Traceback" not in cli.stderr
            assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr
            assert not (tmp_path / "x.necb").exists()
        # GDAL's own line: even bytes that got past the content check open as GeoTIFF only.
        with pytest.raises(InvalidInput, match="not a readable GeoTIFF"):
            _read_as_geotiff(_vrt(metadata))
        assert web.requests == [], web.requests

        flow.put("input/tiles.tar.gz", naip_tar(data_dir, 1))
        ok = handler.handle(flow.name, flow.step("tiles.tar.gz"))
        assert ok.status == "finished", ok.reason
        assert web.requests == []

    # The planted secret is nowhere: outputs, statuses, dead letters, logs, work dirs.
    needle = flow.s3.secret_key
    assert not [k for k, v in _objects(flow).items() if needle.encode() in v]
    records = flow.read(flow.status, 2 * len(cases)) + flow.read(flow.dlq, len(cases) + 1)
    assert len(records) > len(cases) and needle not in json.dumps(records)
    assert not [r for r in caplog.records if needle in r.getMessage()]
    assert not list(work.rglob("*.aux.xml")) and not list(tmp_path.rglob("*.aux.xml"))


def _read_as_geotiff(data: bytes):
    """The GeoTIFF open path alone (no content check), as a second line of defence."""
    from rasterio.errors import RasterioError
    from rasterio.io import MemoryFile

    from nec_serve.imagery.readers import _open_geotiff, gdal_input_env

    try:
        with gdal_input_env(), MemoryFile(data) as mem, _open_geotiff(mem):
            pass
    except RasterioError as err:
        raise InvalidInput(f"not a readable GeoTIFF: {err}") from err


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nec_cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )


# ------------------------------------------------------------------------------ admission


@pytest.mark.parametrize(
    ("name", "data", "declared"),
    [
        ("bomb.png", _png_header(20_000, 20_000), "3x20000x20000 uint8"),
        ("huge.png", _png_header(100_000, 100_000), "3x100000x100000 uint8"),
        ("grey.png", _png_header(90_000, 50_000, colour=0), "1x50000x90000 uint8"),
        ("huge.jpg", _jpeg_header(65_535, 65_535), "3x65535x65535 uint8"),
    ],
)
def test_image_headers_are_admitted_by_declared_size_before_decoding(name, data, declared):
    with pytest.raises(InvalidInput) as err:
        read_raster_bytes(data, name)
    assert f"{name}: declares {declared}" in str(err.value)
    assert "over max_" in str(err.value)


def test_every_format_is_refused_with_the_same_message_shape(tmp_path):
    limits = InputLimits(max_pixels=100)
    npy = io.BytesIO()
    np.save(npy, np.zeros((3, 20, 20), np.uint8))
    from PIL import Image

    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(jpg, "JPEG")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(png, "PNG")
    import rasterio

    with rasterio.open(
        tmp_path / "t.tif", "w", driver="GTiff", width=20, height=20, count=3, dtype="uint8"
    ) as ds:
        ds.write(np.zeros((3, 20, 20), np.uint8))
    files = {"t.npy": npy.getvalue(), "t.jpg": jpg.getvalue(), "t.png": png.getvalue()}
    files["t.tif"] = (tmp_path / "t.tif").read_bytes()
    for name, data in files.items():
        with pytest.raises(InvalidInput) as err:
            read_raster_bytes(data, name, limits=limits)
        assert str(err.value) == (
            f"{name}: declares 3x20x20 uint8 (400 pixels), over max_pixels=100"
        ), name


def test_pillow_limit_is_a_second_line_and_an_input_error():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(buf, "PNG")
    # Our limits let it through; Pillow's, lowered for the test, does not.
    with patch.object(Image, "MAX_IMAGE_PIXELS", 500):
        with pytest.raises(InvalidInput, match=r"p\.png: declares 3x40x50 uint8 .*decoder's limit"):
            read_raster_bytes(buf.getvalue(), "p.png")
    assert read_raster_bytes(buf.getvalue(), "p.png").shape == (3, 40, 50)


def test_truncated_and_lying_image_headers_are_input_errors():
    for data, match in [
        (b"\x89PNG\r\n\x1a\n\x00\x00", "no IHDR chunk"),
        (_png_header(0, 10), "IHDR declares 0x10"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "no frame header"),
        (b"\xff\xd8\xff\xda\x00\x02", "no frame header"),
    ]:
        name = "x.png" if data.startswith(b"\x89") else "x.jpg"
        with pytest.raises(InvalidInput, match=match):
            read_raster_bytes(data, name)


def test_image_bombs_fail_as_input_errors_in_the_wrapper_and_the_cli(
    kafka, s3, producer, tiny_export, data_dir, tmp_path
):
    flow = Flow(kafka, s3, tmp_path)
    bombs = {"bomb.png": _png_header(20_000, 20_000), "huge.jpg": _jpeg_header(65_000, 65_000)}
    for name, data in bombs.items():
        flow.put(f"input/{name}", data)
    handler = make_handler(flow, tiny_export, producer, work_dir=tmp_path)
    for name in bombs:
        out = handler.handle(flow.name, flow.step(name))
        assert out.status == "failed" and out.failure == "input_error", out
        assert "declares 3x" in out.reason and "over max_" in out.reason, out.reason
        assert "DecompressionBomb" not in out.reason and "internal" not in out.reason
        path = tmp_path / name
        path.write_bytes(bombs[name])
        cli = _cli("compress", str(path), "--model-dir", str(tiny_export), "--out",
                   str(tmp_path / "b.necb"))  # fmt: skip
        assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr
        assert "over max_" in cli.stderr and len(cli.stderr.strip().splitlines()) == 1
    flow.put("input/tiles.tar.gz", naip_tar(data_dir, 1))
    assert handler.handle(flow.name, flow.step("tiles.tar.gz")).status == "finished"


# ------------------------------------------------------------------------------ names


def test_names_that_are_not_unicode_are_input_errors(
    kafka, s3, producer, tiny_export, data_dir, tmp_path
):
    flow = Flow(kafka, s3, tmp_path)
    handler = make_handler(flow, tiny_export, producer, work_dir=tmp_path)
    # A filename with a lone surrogate escape in the step message.
    raw = flow.step("X.tif").replace(b"X.tif", b"\\udc80x.tif")
    out = handler.handle(flow.name, raw)
    assert out.status == "failed" and out.failure == "invalid_message", out
    assert "unpaired surrogate" in out.reason
    # A tar member whose name is not UTF-8.
    tile = io.BytesIO()
    np.save(tile, read_raster(data_dir / NAIP, [1, 2, 3])[
        :, :64, :64])  # fmt: skip
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT, encoding="latin-1"
    ) as tf:
        info = tarfile.TarInfo("caf\xe9.npy")  # latin-1 on disk: not UTF-8
        info.size = len(tile.getvalue())
        tf.addfile(info, io.BytesIO(tile.getvalue()))
    flow.put("input/names.tar.gz", buf.getvalue())
    out = handler.handle(flow.name, flow.step("names.tar.gz"))
    assert out.status == "failed" and out.failure == "input_error", out
    assert "is not valid UTF-8 text" in out.reason and "caf\\udce9" in out.reason, out.reason
    # A file whose name is not UTF-8, given to the CLI and found in a folder.
    folder = tmp_path / "folder"
    folder.mkdir()
    bad = os.fsdecode(bytes(folder) + b"/bad\xff.npy")
    np.save(bad, np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(InvalidInput, match=r"folder: name 'bad\\udcff\.npy' is not valid"):
        list(iter_inputs(folder))
    cli = _cli("compress", bad, "--model-dir", str(tiny_export), "--out", str(tmp_path / "n.necb"))
    assert cli.returncode == 2 and "not valid UTF-8" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr
    flow.put("input/tiles.tar.gz", naip_tar(data_dir, 1))
    assert handler.handle(flow.name, flow.step("tiles.tar.gz")).status == "finished"


# ------------------------------------------------------------------------------ containers


def _forged(container: bytes, height: int, width: int) -> bytes:
    """``container`` with every tile claiming a ``height`` x ``width`` source (CRCs valid)."""
    from nec_serve.container import ContainerReader, ContainerWriter, TilePlace

    reader = ContainerReader(io.BytesIO(container))
    records = list(reader)
    out = io.BytesIO()
    with ContainerWriter(out, reader.header) as w:
        for first in (r for r in records if r.part == 0):  # one stream may hold several tiles
            tiles = records[first.index : first.index + first.parts]
            places = [TilePlace(r.source, r.row, r.col, height, width) for r in tiles]
            w.write_stream(first.payload, places)
    return out.getvalue()


_PEAK = """
import resource, sys
from pathlib import Path
from nec_serve.bundle import ModelBundle
from nec_serve.engines import LocalEngine
from nec_serve.pipeline import write_bands
bundle = ModelBundle.load(sys.argv[1])
engine = LocalEngine(bundle)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
done = write_bands(Path(sys.argv[2]), Path(sys.argv[3]), bundle, engine)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(done.images, base // 1024, peak // 1024)
"""


def test_container_geometry_is_bounded_and_bands_decode_in_bounded_memory(
    kafka, s3, producer, rvq_export, data_dir, tmp_path
):
    from nec_serve.bundle import ModelBundle
    from nec_serve.engines import LocalEngine
    from nec_serve.pipeline import compress, write_bands

    bundle = ModelBundle.load(rvq_export)
    buf = io.BytesIO()
    scene = iter_inputs(data_dir / SSL4EO, SSL4EO_BANDS)
    compress(scene, bundle, LocalEngine(bundle), buf, rate=1)
    real = buf.getvalue()
    # Out of every limit: refused before anything is allocated, by the wrapper too.
    flow = Flow(kafka, s3, tmp_path, component="nec-decompress")
    flow.put("input/huge.necb", _forged(real, 20_000, 20_000))
    handler = make_handler(flow, rvq_export, producer, mode="decompress", work_dir=tmp_path)
    out = handler.handle(flow.name, flow.step("huge.necb"))
    assert out.status == "failed" and out.failure == "input_error", out
    assert "declares a 20000x20000 source image" in out.reason and "max_pixels" in out.reason
    (tmp_path / "zero.necb").write_bytes(_forged(real, 0, 64))
    with pytest.raises(InvalidInput, match="declares a 0x64 source image"):
        write_bands(tmp_path / "zero.necb", tmp_path / "z.tif", bundle, LocalEngine(bundle))
    # Within the limits but far larger than its tiles: written tile by tile, in memory
    # bounded by the write cache, not by the 6000 x 6000 x 10 source (1.44 GB as float32).
    big = tmp_path / "big.necb"
    big.write_bytes(_forged(real, 6000, 6000))
    run = subprocess.run(
        [sys.executable, "-c", _PEAK, str(rvq_export), str(big), str(tmp_path / "big.tif")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    images, base_mb, peak_mb = map(int, run.stdout.split())
    assert images == 1 and peak_mb - base_mb < 400, (base_mb, peak_mb)
    import rasterio

    with rasterio.open(tmp_path / "big.tif") as ds:
        assert (ds.count, ds.height, ds.width) == (10, 6000, 6000)
    # A valid container still decodes.
    flow.put("input/ok.necb", real)
    assert handler.handle(flow.name, flow.step("ok.necb")).status == "finished"


# ------------------------------------------------------------------------------ delivery


def test_two_workflows_sharing_a_bucket_component_and_input_each_get_their_message(
    kafka, s3, producer, tiny_export, data_dir, tmp_path
):
    first = Flow(kafka, s3, tmp_path)
    second = Flow(kafka, s3, tmp_path)
    # The second workflow uses the first one's bucket (same component, same input object).
    msg = json.loads(json.dumps(second.msg))
    msg["S3_bucket"]["s3-bucket-name"] = first.bucket
    second.bucket = first.bucket
    second.config = parse_workflow(msg)
    second.store.put(second.config)
    first.put("input/tiles.tar.gz", naip_tar(data_dir, 1))
    a = make_handler(first, tiny_export, producer)
    b = make_handler(second, tiny_export, producer)
    out_a = a.handle(first.name, first.step("tiles.tar.gz"))
    out_b = b.handle(second.name, second.step("tiles.tar.gz"))
    assert out_a.status == out_b.status == "finished"
    assert out_b.reason != "duplicate" and out_a.stats["message_id"] != out_b.stats["message_id"]
    assert len(first.read(first.topic_out, 2, timeout=5)) == 1
    assert len(second.read(second.topic_out, 2, timeout=5)) == 1
    # A redelivery to either is still suppressed.
    assert b.handle(second.name, second.step("tiles.tar.gz")).reason == "duplicate"
    assert a.handle(first.name, first.step("tiles.tar.gz")).reason == "duplicate"
    assert len(second.read(second.topic_out, 2, timeout=5)) == 1


def _controller_process(kafka, topic: str, store: Path, sink: str, flow, log) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable, "-m", "nec_cli", "controller",
            "--bootstrap", kafka.bootstrap_servers,
            "--topic", topic,
            "--config-dir", str(store),
            "--sink", f"nec-compress={sink}",
            "--dead-letter-topic", flow.dlq,
            "--status-topic", flow.status,
            "--metrics-port", "0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )  # fmt: skip


def test_a_restarted_local_controller_resumes_the_feeds_of_stored_workflows(
    kafka, producer, raw_producer, s3, tmp_path
):
    flow = Flow(kafka, s3, tmp_path)
    flow.store.delete(flow.name)
    store = tmp_path / f"ctl-store-{uid()}"
    system = f"system.ML.{uid()}"
    with _Recorder(200) as sink:
        logs = [open(tmp_path / f"controller-{i}.log", "wb") for i in range(2)]
        first = _controller_process(kafka, system, store, sink.url, flow, logs[0])
        raw_producer.send(system, value=json.dumps(flow.msg).encode()).get(10)
        wait(lambda: (store / f"{flow.name}.json").exists(), 90, "the workflow to be stored")
        raw_producer.send(flow.topic_in, value=flow.step("a.tif")).get(10)
        wait(lambda: len(sink.bodies) == 1, 60, "the first feed to deliver")
        first.terminate()
        first.wait(30)
        # Messages queued while no controller runs; nobody publishes the workflow again.
        for name in ("b.tif", "c.tif"):
            raw_producer.send(flow.topic_in, value=flow.step(name)).get(10)
        second = _controller_process(kafka, system, store, sink.url, flow, logs[1])
        try:
            wait(lambda: len(sink.bodies) == 3, 90, "the resumed feed to deliver")
        finally:
            second.terminate()
            second.wait(30)
            for f in logs:
                f.close()
        log = (tmp_path / "controller-1.log").read_text()
        assert "resumed 1 stored workflow(s)" in log, log
        names = [json.loads(b)["S3_bucket_desc"]["filename"] for b in sink.bodies]
        assert names == ["a.tif", "b.tif", "c.tif"]
