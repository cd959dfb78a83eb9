"""Wrapper and controller against a real Kafka broker and a real S3 server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request

import numpy as np
import pytest
from support.kafka_s3 import NAIP, Flow
from support.kafka_s3 import make_handler as _handler
from support.kafka_s3 import naip_tar as _naip_tar
from support.kafka_s3 import uid as _uid
from support.wire import COMPRESS_KEYS, STEP_KEYS

from nec_dev.stack.s3 import LocalS3
from nec_dev.workflow_demo import wrapper_args
from nec_serve.bundle import ModelBundle
from nec_serve.engines import LocalEngine
from nec_serve.imagery import iter_inputs
from nec_serve.pipeline import compress
from nec_serve.reports import StepReport


def _metric(handler, name: str, **labels) -> float | None:
    """A sample of the handler's own metrics registry (labelled with its step)."""
    return handler.metrics.registry.get_sample_value(
        name, {"step": handler.settings.mode, **labels}
    )


def test_compress_then_decompress_through_s3_and_kafka(
    kafka, s3, producer, tiny_export, data_dir, tmp_path
):
    flow = Flow(kafka, s3, tmp_path)
    archive = _naip_tar(data_dir)
    flow.put("input/tiles.tar.gz", archive)
    handler = _handler(flow, tiny_export, producer)
    out = handler.handle(flow.name, flow.step("tiles.tar.gz"))
    assert out.done and out.status == "finished", out.reason
    assert out.output_key == "result-nec-compress/tiles.necb"

    # The container equals an in-process compression of the same archive.
    bundle = ModelBundle.load(tiny_export)
    local = io.BytesIO()
    src = tmp_path / "tiles.tar.gz"
    src.write_bytes(archive)
    compress(iter_inputs(src, [1, 2, 3]), bundle, LocalEngine(bundle), local, bands=[1, 2, 3])
    assert flow.get(out.output_key) == local.getvalue()

    nxt = flow.read(flow.topic_out, 1)
    assert len(nxt) == 1
    assert nxt[0]["S3_bucket_desc"] == {"folder": "result-nec-compress", "filename": "tiles.necb"}
    assert nxt[0]["previous_component_end"] is True
    assert nxt[0]["meta_information"]["run"] == "test"
    assert nxt[0]["meta_information"]["nec"]["tiles"] == 2 * 2 * 3
    statuses = flow.read(flow.status, 4)
    assert [s["status"] for s in statuses] == ["START", "INFO", "INFO", "SUCCESS"]
    assert [s["nec"]["event"] for s in statuses] == ["started", "progress", "progress", "finished"]
    assert [s.get("overwrite") for s in statuses] == [None, True, True, None]
    assert all(s["workflow_name"] == flow.config.name for s in statuses)
    assert len({s["nec"]["message_id"] for s in statuses}) == 1  # one message, one id
    assert statuses[-1]["nec"]["stats"] == out.stats
    assert statuses[-1]["nec"]["output_key"] == out.output_key
    # meta_information.nec keeps the keys (and their order) it had before reports were typed;
    # the status event's copy adds kafka_s, known once the next message is out.
    published = nxt[0]["meta_information"]["nec"]
    assert list(published) == [*COMPRESS_KEYS, "mode", *STEP_KEYS]
    assert statuses[-1]["nec"]["stats"] == {**published, "kafka_s": out.stats["kafka_s"]}
    assert list(out.stats) == [*published, "kafka_s"]
    assert StepReport.from_wire(published).to_wire() == published

    # The decompress step consumes the compress step's output message as it is.
    dflow = Flow(kafka, s3, tmp_path, component="nec-decompress")
    dflow.put(out.output_key, flow.get(out.output_key))
    dec = _handler(dflow, tiny_export, producer, mode="decompress")
    dout = dec.handle(dflow.name, json.dumps(nxt[0]).encode())
    assert dout.done, dout.reason
    emb = np.load(io.BytesIO(dflow.get("result-nec-decompress/tiles.npy")))
    assert emb.shape == (12, 17, 64) and emb.dtype == np.float32
    index = json.loads(dflow.get("result-nec-decompress/tiles.tiles.json"))
    assert index[0]["source"] == "tiles/t0.npy"


def test_redelivery_overwrites_with_identical_bytes(
    kafka, s3, producer, tiny_export, data_dir, tmp_path
):
    flow = Flow(kafka, s3, tmp_path)
    flow.put("input/tiles.tar.gz", _naip_tar(data_dir, 1))
    handler = _handler(flow, tiny_export, producer)
    first = handler.handle(flow.name, flow.step("tiles.tar.gz"))
    data = flow.get(first.output_key)
    second = handler.handle(flow.name, flow.step("tiles.tar.gz"))
    assert second.output_key == first.output_key and flow.get(second.output_key) == data
    keys = flow.s3.client().list_objects_v2(Bucket=flow.bucket, Prefix="result-")["Contents"]
    assert [k["Key"] for k in keys] == ["result-nec-compress/tiles.necb"]


def _bad_tar(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("../escape.npy" if kind == "dotdot" else "/abs.npy")
        if kind == "link":
            info = tarfile.TarInfo("link.npy")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)
        else:
            payload = io.BytesIO()
            np.save(payload, np.zeros((3, 8, 8), np.uint8))
            info.size = payload.getbuffer().nbytes
            payload.seek(0)
            tf.addfile(info, payload)
    return buf.getvalue()


BAD_INPUTS = {
    "malformed json": (None, b"{not json", "not valid JSON"),
    "missing field": (None, b'{"previous_component_end": true}', "missing field"),
    "mistyped field": (
        None,
        b'{"previous_component_end": true, "S3_bucket_desc": {"folder": 5, "filename": "x"}}',
        "must be str",
    ),
    "previous step failed": (
        None,
        b'{"previous_component_end": false, "S3_bucket_desc": '
        b'{"folder": "input", "filename": "x.tif"}}',
        "previous component did not end",
    ),
    "missing object": (None, "nothing.tar.gz", "does not exist"),
    "empty archive": (b"", "empty.tar.gz", "is empty"),
    "corrupt archive": (b"\x1f\x8b\x08\x00garbage" * 10, "corrupt.tar.gz", "corrupt"),
    "truncated archive": ("truncated", "cut.tar.gz", "truncated"),
    "dotdot member": (_bad_tar("dotdot"), "dotdot.tar.gz", ".."),
    "absolute member": (_bad_tar("abs"), "abs.tar.gz", "absolute"),
    "link member": (_bad_tar("link"), "link.tar.gz", "link"),
    "wrong band count": ("naip4", "naip.tif", "has 4 bands"),
    "oversized": ("big", "big.npy", "over the limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_clearly_and_is_dead_lettered(
    case, kafka, s3, producer, tiny_export, data_dir, tmp_path
):
    flow = Flow(kafka, s3, tmp_path)
    content, name_or_raw, match = BAD_INPUTS[case]
    if isinstance(name_or_raw, bytes):
        raw = name_or_raw
    else:
        raw = flow.step(name_or_raw)
        if content == "truncated":
            content = _naip_tar(data_dir)[:5000]
        elif content == "naip4":
            content = (data_dir / NAIP).read_bytes()
        elif content == "big":
            content = b"\x93NUMPY" + b"\0" * 4096
        if content is not None:
            flow.put(f"input/{name_or_raw}", content)
    handler = _handler(
        flow,
        tiny_export,
        producer,
        max_input_bytes=4000,
        bands=None if case == "wrong band count" else (1, 2, 3),
    )
    if case not in ("oversized",):
        handler.settings = type(handler.settings)(
            **{**handler.settings.__dict__, "max_input_bytes": 64 << 20}
        )
    out = handler.handle(flow.name, raw)
    assert out.done and out.status == "failed"
    assert match in out.reason, out.reason
    # Reasons name the input object, never the wrapper's local files.
    assert "nec-step-" not in out.reason and tempfile.gettempdir() not in out.reason
    if content is not None:
        assert f"s3://{flow.bucket}/input/{name_or_raw}" in out.reason, out.reason
    dead = flow.read(flow.dlq, 1)
    assert len(dead) == 1 and match in dead[0]["error"]
    failed = [s for s in flow.read(flow.status, 1) if s["status"] == "CRITICAL"]
    assert failed and match in failed[0]["nec"]["reason"]
    assert failed[0]["description"] == out.reason[:300]
    expected = "invalid_message" if content is None and case != "missing object" else "input_error"
    assert failed[0]["nec"]["failure"] == expected == out.failure
    assert _metric(handler, "nec_wrapper_messages_failed_total", reason=expected) == 1
    assert "s3cr3t" not in json.dumps(dead) and flow.s3.secret_key not in json.dumps(dead)
    assert not [
        o
        for o in flow.s3.client().list_objects_v2(Bucket=flow.bucket).get("Contents", [])
        if o["Key"].startswith("result-")
    ]


def test_unknown_workflow_is_dead_lettered(kafka, s3, producer, tiny_export, tmp_path):
    flow = Flow(kafka, s3, tmp_path)
    handler = _handler(flow, tiny_export, producer)
    out = handler.handle("nec-never-published", flow.step("x.tif"))
    assert out.done and "no workflow config 'nec-never-published'" in out.reason
    assert flow.read(flow.dlq, 1)[0]["config"] == "nec-never-published"
    assert out.failure == "unknown_workflow"
    assert _metric(handler, "nec_wrapper_messages_failed_total", reason="unknown_workflow") == 1


def test_s3_unavailable_is_retried_then_failed(kafka, producer, tiny_export, data_dir, tmp_path):
    with LocalS3() as s3:
        flow = Flow(kafka, s3, tmp_path)
        flow.put("input/tiles.tar.gz", _naip_tar(data_dir, 1))
        handler = _handler(flow, tiny_export, producer, attempts=2, s3_timeout_s=1.0)
        s3.stop()
        t0 = time.monotonic()
        out = handler.handle(flow.name, flow.step("tiles.tar.gz"))
        assert time.monotonic() - t0 < 60
    assert out.done and out.status == "failed"
    assert "gave up after 2 attempts" in out.reason and "S3 unreachable" in out.reason
    assert "gave up after 2 attempts" in flow.read(flow.dlq, 1)[0]["error"]
    assert _metric(handler, "nec_wrapper_retries_total", what="step") == 1
    assert _metric(handler, "nec_wrapper_messages_failed_total", reason="transient_exhausted") == 1
    assert _metric(handler, "nec_wrapper_messages_total", outcome="failed") == 1
    assert _metric(handler, "nec_wrapper_dead_lettered_total") == 1


def test_inference_server_unavailable_is_retried_then_failed(
    kafka, s3, producer, tiny_export, data_dir, tmp_path
):
    from nec_dev.triton import free_port
    from nec_serve.serving.client import TritonEngine

    flow = Flow(kafka, s3, tmp_path)
    flow.put("input/tiles.tar.gz", _naip_tar(data_dir, 1))
    engine = TritonEngine(
        f"grpc://127.0.0.1:{free_port()}", ModelBundle.load(tiny_export), retries=1, backoff_s=0.1
    )
    out = _handler(flow, tiny_export, producer, attempts=2, engine=engine).handle(
        flow.name, flow.step("tiles.tar.gz")
    )
    assert out.done and out.status == "failed" and "unavailable" in out.reason


def test_poison_message_does_not_block_the_partition(
    kafka, s3, producer, tiny_export, data_dir, tmp_path
):
    from nec_wrapper.triggers import run_consumer

    flow = Flow(kafka, s3, tmp_path)
    flow.put("input/tiles.tar.gz", _naip_tar(data_dir, 1))
    producer.send(flow.topic_in, value={"garbage": True}).get(10)
    producer.send(flow.topic_in, value=json.loads(flow.step("tiles.tar.gz"))).get(10)
    handler = _handler(flow, tiny_export, producer)
    stop = threading.Event()
    worker = threading.Thread(
        target=run_consumer,
        args=(handler, kafka.bootstrap_servers, f"g-{_uid()}", lambda: [flow.topic_in], stop),
    )
    worker.start()
    try:
        nxt = flow.read(flow.topic_out, 1, timeout=60)
    finally:
        stop.set()
        worker.join(30)
    assert len(nxt) == 1 and nxt[0]["S3_bucket_desc"]["filename"] == "tiles.necb"
    assert len(flow.read(flow.dlq, 1)) == 1


def test_wrapper_killed_mid_step_completes_once_after_restart(
    kafka, s3, producer, tiny_export, data_dir, tmp_path
):
    flow = Flow(kafka, s3, tmp_path)
    buf = io.BytesIO()  # 8 NAIP scenes: 5520 tiles at 32 px, several seconds of work
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for i in range(4):  # the sample data has two scenes: each four times
            for path in sorted((data_dir / "naip").glob("*.tif")):
                tf.add(path, arcname=f"{i}_{path.name}")
    scene = buf.getvalue()
    flow.put("input/scene.tar.gz", scene)
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    args = wrapper_args(
        "compress",
        tiny_export,
        kafka.bootstrap_servers,
        flow.store.root,
        work_dir,
        trigger="kafka",
        bands="1,2,3",
        group=f"g-{_uid()}",
        batch_size=4,
    )
    args += ["--status-topic", flow.status, "--dead-letter-topic", flow.dlq]
    cmd = [sys.executable, "-m", "nec_cli", *args]
    producer.send(flow.topic_in, value=json.loads(flow.step("scene.tar.gz"))).get(10)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The step's work directory holds the downloaded input while the step runs.
        deadline = time.monotonic() + 90
        while not list(work_dir.glob("nec-step-*/in/scene.tar.gz")):
            assert time.monotonic() < deadline and first.poll() is None, "step never started"
            time.sleep(0.005)
        first.kill()  # SIGKILL in the middle of the step: no cleanup, no commit
        first.wait(10)
        left = list(work_dir.glob("nec-step-*"))
        assert len(left) == 1  # what a killed step leaves behind
        assert not [s for s in flow.read(flow.status, 2, timeout=2) if s["status"] == "SUCCESS"]
        second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if any(s["status"] == "SUCCESS" for s in flow.read(flow.status, 3, timeout=2)):
                    break
            nxt = flow.read(flow.topic_out, 1, timeout=10)
        finally:
            second.terminate()
            second.wait(20)
    finally:
        if first.poll() is None:
            first.kill()
    assert len(nxt) == 1  # completed once: one next message, nothing lost
    assert not left[0].exists()  # the restarted wrapper removed the dead step's directory
    bundle = ModelBundle.load(tiny_export)
    local = io.BytesIO()
    src = tmp_path / "scene.tar.gz"
    src.write_bytes(scene)
    compress(
        iter_inputs(src, [1, 2, 3]),
        bundle,
        LocalEngine(bundle),
        local,
        bands=[1, 2, 3],
        batch_size=4,
    )
    assert flow.get("result-nec-compress/scene.necb") == local.getvalue()


def test_controller_provisions_local_sources_and_http_trigger(
    kafka, s3, producer, tiny_export, data_dir, tmp_path
):
    from nec_controller.app import Controller
    from nec_controller.sources import LocalSources
    from nec_wrapper.triggers import make_http_server

    flow = Flow(kafka, s3, tmp_path)
    flow.store.delete(flow.name)  # the controller stores it
    flow.put("input/tiles.tar.gz", _naip_tar(data_dir, 1))
    handler = _handler(flow, tiny_export, producer)
    server = make_http_server(handler, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sources = LocalSources(
        kafka.bootstrap_servers, {"nec-compress": f"http://127.0.0.1:{server.server_port}"}
    )
    ctl = Controller(flow.store, sources, producer, dead_letter_topic=flow.dlq)
    try:
        raw = json.dumps(flow.msg).encode()
        assert ctl.handle(raw) == "published"
        assert ctl.handle(raw) == "unchanged"  # idempotent
        assert flow.store.names() == [flow.name]
        assert ctl.handle(b'{"workflow_status": "published"}') == "rejected"
        assert "missing field 'workflow_name'" in flow.read(flow.dlq, 1)[0]["error"]

        producer.send(flow.topic_in, value=json.loads(flow.step("tiles.tar.gz"))).get(10)
        nxt = flow.read(flow.topic_out, 1, timeout=60)
        assert len(nxt) == 1 and nxt[0]["S3_bucket_desc"]["filename"] == "tiles.necb"

        # Structured-mode CloudEvent straight to the HTTP trigger.
        event = {
            "specversion": "1.0",
            "id": "1",
            "source": "test",
            "type": "t",
            "data": json.loads(flow.step("tiles.tar.gz")),
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{server.server_port}/{flow.name}",
            json.dumps(event).encode(),
            headers={"Content-Type": "application/cloudevents+json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200 and json.loads(resp.read())["status"] == "finished"

        stop = dict(flow.msg, workflow_status="stopping")
        assert ctl.handle(json.dumps(stop).encode()) == "stopped"
        assert flow.store.names() == [] and not sources.running
        assert ctl.handle(json.dumps(stop).encode()) == "unchanged"
    finally:
        sources.close()
        server.shutdown()


def test_rvq_family_rate_per_message_and_georeferenced_output(
    kafka, s3, producer, rvq_export, tiny_export, data_dir, tmp_path
):
    """meta_information.codebooks picks the rate; decompress puts a GeoTIFF in S3."""
    import rasterio

    scene = data_dir / "ssl4eo_s12" / "ssl4eos12_val_0080717_0.tif"
    bands = (2, 3, 4, 5, 6, 7, 8, 9, 11, 12)
    flow = Flow(kafka, s3, tmp_path)
    flow.put("input/scene.tif", scene.read_bytes())
    handler = _handler(flow, rvq_export, producer, bands=bands)
    sizes = {}
    for n in (2, 6):
        msg = json.loads(flow.step("scene.tif"))
        msg["meta_information"]["codebooks"] = n
        out = handler.handle(flow.name, json.dumps(msg).encode())
        assert out.done and out.status == "finished", out.reason
        assert out.stats["codebooks"] == n
        assert list(out.stats) == [*COMPRESS_KEYS, "codebooks", "mode", *STEP_KEYS, "kafka_s"]
        sizes[n] = len(flow.get(out.output_key))
    assert sizes[2] < sizes[6]
    bad = json.loads(flow.step("scene.tif"))
    bad["meta_information"]["codebooks"] = 9
    out = handler.handle(flow.name, json.dumps(bad).encode())
    assert out.status == "failed" and "codebooks must be in 1..8" in out.reason
    assert "meta_information.codebooks" in out.reason
    for value in ("4", True, 10**40):
        bad["meta_information"]["codebooks"] = value
        out = handler.handle(flow.name, json.dumps(bad).encode())
        assert out.done and out.status == "failed" and "meta_information.codebooks" in out.reason
    bad["meta_information"]["codebooks"] = 2  # a NEC step has no codebooks to choose
    out = _handler(flow, tiny_export, producer).handle(flow.name, json.dumps(bad).encode())
    assert out.status == "failed" and "applies to the RVQ family" in out.reason
    nxt = flow.read(flow.topic_out, 2)
    assert [m["meta_information"]["codebooks"] for m in nxt] == [2, 6]

    dflow = Flow(kafka, s3, tmp_path, component="nec-decompress")
    assert [m["S3_bucket_desc"]["filename"] for m in nxt] == ["scene.c2.necb", "scene.c6.necb"]
    dflow.put("result-nec-compress/scene.c6.necb", flow.get("result-nec-compress/scene.c6.necb"))
    dec = _handler(dflow, rvq_export, producer, mode="decompress")
    dout = dec.handle(dflow.name, json.dumps(nxt[-1]).encode())
    assert dout.done and dout.status == "finished", dout.reason
    assert dout.output_key == "result-nec-decompress/scene.c6.tif"
    assert dout.stats["codebooks"] == 6 and dout.stats["output"] == "bands"
    head = ["mode", "output", "tiles", "images", "codebooks", "decode_s", "coding_s"]
    assert list(dout.stats) == [*head, "inference_s", *STEP_KEYS, "kafka_s"]
    with (
        rasterio.open(io.BytesIO(dflow.get(dout.output_key))) as out,
        rasterio.open(scene) as ref,
    ):
        assert (out.crs, out.transform, out.shape) == (ref.crs, ref.transform, ref.shape)
        assert out.count == 10 and out.dtypes[0] == "uint16" and out.descriptions[0] == "B02"


def test_markers_are_read_as_hints(kafka, s3, tmp_path):
    from nec_serve import s3 as s3io

    flow = Flow(kafka, s3, tmp_path)
    client = s3.client()
    assert s3io.get_json(client, flow.bucket, "absent.json") is None
    flow.put("m/ok.json", b'{"output_key": "result-x/a.tar"}')
    assert s3io.get_json(client, flow.bucket, "m/ok.json") == {"output_key": "result-x/a.tar"}
    for name, body in (("bad", b"not json"), ("list", b"[1]"), ("big", b" " * 70_000 + b"{}")):
        flow.put(f"m/{name}.json", body)
        assert s3io.get_json(client, flow.bucket, f"m/{name}.json") == {}


def test_rvq_images_decoded_to_a_tar_are_published_once(
    kafka, s3, producer, rvq_export, data_dir, tmp_path
):
    """A container of several images decodes to a .tar; its redelivery is a duplicate."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for path in sorted((data_dir / "eurosat_ms").glob("*/*.tif"))[:3]:
            tf.add(path, arcname=f"ms/{path.name}")
    flow = Flow(kafka, s3, tmp_path)
    flow.put("input/patches.tar.gz", buf.getvalue())
    handler = _handler(flow, rvq_export, producer, bands=(2, 3, 4, 5, 6, 7, 8, 9, 12, 13))
    out = handler.handle(flow.name, flow.step("patches.tar.gz"))
    assert out.done and out.status == "finished", out.reason
    nxt = flow.read(flow.topic_out, 1)
    dflow = Flow(kafka, s3, tmp_path, component="nec-decompress")
    dflow.put(out.output_key, flow.get(out.output_key))
    dec = _handler(dflow, rvq_export, producer, mode="decompress")
    first = dec.handle(dflow.name, json.dumps(nxt[0]).encode())
    assert first.status == "finished", first.reason
    assert first.output_key == "result-nec-decompress/patches.tar"
    with tarfile.open(fileobj=io.BytesIO(dflow.get(first.output_key))) as tar:
        assert len(tar.getnames()) == 3
    again = _handler(dflow, rvq_export, producer, mode="decompress")  # a restarted wrapper
    second = again.handle(dflow.name, json.dumps(nxt[0]).encode())
    assert second.reason == "duplicate" and second.output_key == first.output_key
    assert len(dflow.read(dflow.topic_out, 1)) == 1  # published once
