"""No single record stops a consumer: the controller, both wrapper triggers and the local
KafkaSource against a real Kafka broker and a real S3 server, fed what a platform may send.

Mocks appear only to inject faults (an unexpected exception, an API that answers 503).
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
from support.kafka_s3 import Flow, make_handler, naip_tar, uid, wait

from nec_serve.config_store import LocalConfigStore
from nec_serve.messages import config_name, legacy_config_name

SECRET = "wJalrXUtnFEMI-K7MDENG-PLANTED-SECRET-0042"
DEEP = b"[" * 100_000 + b"]" * 100_000
# Records no consumer may choke on, with what the failure must say.
POISON = [
    (None, "no value (a Kafka tombstone"),
    (DEEP, "nests 100000 levels deep"),
    (b"\xff\xfe\x00garbage", "not UTF-8 text"),
    (b'{"previous_component_end": tr', "not valid JSON"),
]


def _records(kafka, topic: str, timeout: float = 5.0) -> list[bytes | None]:
    """Every record of ``topic``, raw."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=int(timeout * 1000),
    )
    out = [r.value for r in consumer]
    consumer.close()
    return out


def _committed(kafka, group: str, topic: str) -> int | None:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=group)
    try:
        return consumer.committed(TopicPartition(topic, 0))
    finally:
        consumer.close()


def _send_all(raw_producer, topic: str, values) -> None:
    for value in values:  # keyed: Kafka takes a null value (a tombstone) only with a key
        raw_producer.send(topic, key=b"k", value=value).get(10)


# ------------------------------------------------------------------------------ controller


class _Controller:
    """The controller's consume loop in a thread, on a flow's own topics."""

    def __init__(self, kafka, flow, sinks: dict[str, str], producer, **kw):
        from nec_controller.app import Controller, run_controller
        from nec_controller.sources import LocalSources

        self.topic = f"system.ML.{uid()}"
        self.group = f"ctl-{uid()}"
        self.sources = LocalSources(kafka.bootstrap_servers, sinks)
        self.controller = Controller(
            flow.store,
            self.sources,
            producer,
            dead_letter_topic=flow.dlq,
            status_topic=flow.status,
            **kw,
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=run_controller,
            args=(self.controller, kafka.bootstrap_servers, self.topic, self.stop, self.group),
            daemon=True,
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)
        self.sources.close()


def test_controller_survives_poison_and_applies_the_next_message(
    kafka, s3, producer, raw_producer, tmp_path
):
    flow = Flow(kafka, s3, tmp_path)
    flow.store.delete(flow.name)  # the controller stores it
    truncated = json.dumps(flow.msg).encode()[:-60]
    poison = [*POISON, (truncated, "not valid JSON")]
    with _Controller(kafka, flow, {"nec-compress": "http://127.0.0.1:9"}, producer) as ctl:
        _send_all(raw_producer, ctl.topic, [v for v, _ in poison])
        raw_producer.send(ctl.topic, value=json.dumps(flow.msg).encode()).get(10)
        wait(lambda: flow.store.names() == [flow.name], 60, "the valid workflow to be stored")
        assert ctl.controller.store.get(flow.name).topic_in == flow.topic_in
        assert flow.name in ctl.sources.running
        wait(lambda: _committed(kafka, ctl.group, ctl.topic) == len(poison) + 1, 30, "commit")
    dead = flow.read(flow.dlq, len(poison))
    assert len(dead) == len(poison)  # one record per poison message, in order
    for record, (_, match) in zip(dead, poison, strict=True):
        assert match in record["error"], record
        assert record["component_name"] == "nec-controller"
    failed = [s for s in flow.read(flow.status, len(poison)) if s["status"] == "CRITICAL"]
    assert len(failed) == len(poison)
    assert flow.s3.secret_key not in json.dumps(dead)


def test_controller_rejecting_a_workflow_stores_nothing(kafka, s3, producer, tmp_path):
    from nec_controller.app import Controller
    from nec_controller.sources import LocalSources

    flow = Flow(kafka, s3, tmp_path)
    flow.store.delete(flow.name)
    sources = LocalSources(kafka.bootstrap_servers, {"other-service": "http://127.0.0.1:9"})
    ctl = Controller(flow.store, sources, producer, flow.dlq, flow.status)
    assert ctl.handle(json.dumps(flow.msg).encode()) == "rejected"
    assert list(flow.store.root.iterdir()) == []  # no config, no credentials
    assert "no local sink for service 'nec-compress'" in flow.read(flow.dlq, 1)[0]["error"]
    assert flow.read(flow.status, 1)[0]["status"] == "CRITICAL"

    # A source that fails after the config was written takes the config with it.
    sources.sinks["nec-compress"] = "http://127.0.0.1:9"
    with patch.object(sources, "ensure", side_effect=RuntimeError("boom")):
        assert ctl.handle(json.dumps(flow.msg).encode()) == "rejected"
    assert list(flow.store.root.iterdir()) == []
    assert "internal error (RuntimeError): boom" in flow.read(flow.dlq, 2)[-1]["error"]


def test_controller_retries_an_unavailable_api_then_fails_clearly(kafka, s3, producer, tmp_path):
    from kubernetes.client.exceptions import ApiException

    from nec_controller.app import Controller
    from nec_controller.sources import LocalSources

    flow = Flow(kafka, s3, tmp_path)
    flow.store.delete(flow.name)
    sources = LocalSources(kafka.bootstrap_servers, {"nec-compress": "http://127.0.0.1:9"})
    ctl = Controller(flow.store, sources, producer, flow.dlq, flow.status, backoff_s=0.01)
    real = sources.ensure
    outages = iter([ApiException(status=503), ApiException(status=503)])

    def flaky(config):
        err = next(outages, None)
        if err:
            raise err
        return real(config)

    try:
        with patch.object(sources, "ensure", side_effect=flaky):
            assert ctl.handle(json.dumps(flow.msg).encode()) == "published"
        assert flow.store.names() == [flow.name]
        stopping = json.dumps(dict(flow.msg, workflow_status="stopping")).encode()
        with patch.object(sources, "remove", side_effect=ApiException(status=503)):
            assert ctl.handle(stopping) == "rejected"
        assert "gave up after 3 attempts" in flow.read(flow.dlq, 1)[0]["error"]
    finally:
        sources.close()


def test_names_from_an_earlier_release_are_removed_on_stopping(kafka, s3, producer, tmp_path):
    from nec_controller.app import Controller
    from nec_controller.sources import LocalSources

    flow = Flow(kafka, s3, tmp_path)
    legacy = legacy_config_name(flow.topic_in)
    assert legacy != flow.name

    def as_legacy(store: LocalConfigStore) -> None:  # the store as an earlier release left it
        for suffix in (".json", ".secret.json"):
            (store.root / f"{flow.name}{suffix}").rename(store.root / f"{legacy}{suffix}")

    sources = LocalSources(kafka.bootstrap_servers, {"nec-compress": "http://127.0.0.1:9"})
    stopping = dict(flow.msg, workflow_status="stopping")
    try:
        # "wf.in" and "WF.IN" had one legacy name: stopping the one that is not stored
        # under it leaves the other's config alone.
        as_legacy(flow.store)
        upper = dict(stopping, Topics={"in": flow.topic_in.upper()})
        assert legacy_config_name(flow.topic_in.upper()) == legacy
        ctl = Controller(flow.store, sources, producer, flow.dlq, flow.status)
        assert ctl.handle(json.dumps(upper).encode()) == "unchanged"
        assert flow.store.names() == [legacy]
        # Stopping the workflow that is stored under it removes it.
        assert ctl.handle(json.dumps(stopping).encode()) == "stopped"
        assert flow.store.names() == []
    finally:
        sources.close()


def test_a_name_already_taken_by_another_topic_is_refused(kafka, s3, producer, tmp_path):
    from nec_controller.app import Controller
    from nec_controller.sources import LocalSources

    flow = Flow(kafka, s3, tmp_path)
    other = dict(flow.msg, Topics={"in": "another.topic", "out": "x.out"})
    for suffix in (".json", ".secret.json"):  # as if both topics had the same name
        taken = flow.store.root / f"{config_name('another.topic')}{suffix}"
        taken.write_bytes((flow.store.root / f"{flow.name}{suffix}").read_bytes())
    sources = LocalSources(kafka.bootstrap_servers, {"nec-compress": "http://127.0.0.1:9"})
    ctl = Controller(flow.store, sources, producer, flow.dlq, flow.status)
    assert ctl.handle(json.dumps(other).encode()) == "rejected"
    assert "is taken by topic" in flow.read(flow.dlq, 1)[0]["error"]
    assert not sources.running


# ------------------------------------------------------------------------------ wrappers


def _consume(handler, kafka, topic: str):
    from nec_wrapper.triggers import run_consumer

    stop = threading.Event()
    group = f"g-{uid()}"
    worker = threading.Thread(
        target=run_consumer,
        args=(handler, kafka.bootstrap_servers, group, lambda: [topic], stop),
        daemon=True,
    )
    worker.start()
    return stop, worker, group


def test_kafka_trigger_survives_poison_and_unexpected_errors(
    kafka, s3, producer, raw_producer, tiny_export, data_dir, tmp_path
):
    flow = Flow(kafka, s3, tmp_path)
    flow.put("input/tiles.tar.gz", naip_tar(data_dir, 1))
    flow.put("input/other.tar.gz", naip_tar(data_dir, 1))
    handler = make_handler(flow, tiny_export, producer)
    real_run = handler._run

    def fault(workflow, step):  # an error no code path expects, once
        if step.filename == "other.tar.gz":
            raise KeyError("surprise")
        return real_run(workflow, step)

    _send_all(raw_producer, flow.topic_in, [v for v, _ in POISON])
    _send_all(raw_producer, flow.topic_in, [flow.step("other.tar.gz"), flow.step("tiles.tar.gz")])
    with patch.object(handler, "_run", side_effect=fault):
        stop, worker, group = _consume(handler, kafka, flow.topic_in)
        try:
            nxt = flow.read(flow.topic_out, 1, timeout=90)
            wait(lambda: _committed(kafka, group, flow.topic_in) == 6, 30, "commit")
        finally:
            stop.set()
            worker.join(30)
    assert [m["S3_bucket_desc"]["filename"] for m in nxt] == ["tiles.necb"]
    dead = flow.read(flow.dlq, 5)
    assert len(dead) == 5
    for record, match in zip(dead, [m for _, m in POISON] + ["KeyError"], strict=True):
        assert match in record["error"], record
    failed = [s for s in flow.read(flow.status, 9) if s["status"] == "CRITICAL"]
    assert len(failed) == 5 and "internal error (KeyError)" in failed[-1]["description"]
    assert "internal error (KeyError)" in failed[-1]["nec"]["reason"]
    assert failed[-1]["nec"]["failure"] == "internal"


class _Sink(BaseHTTPRequestHandler):
    """A sink that always fails: what a broken wrapper looks like to a KafkaSource."""

    hits = 0

    def do_POST(self):  # noqa: N802
        type(self).hits += 1
        self.rfile.read(int(self.headers["Content-Length"] or 0))
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_trigger_and_local_kafkasource_survive_poison(
    kafka, s3, producer, raw_producer, tiny_export, data_dir, tmp_path
):
    from nec_controller.sources import LocalKafkaSource
    from nec_wrapper.triggers import make_http_server

    flow = Flow(kafka, s3, tmp_path)
    flow.put("input/tiles.tar.gz", naip_tar(data_dir, 1))
    flow.put("input/other.tar.gz", naip_tar(data_dir, 1))
    handler = make_handler(flow, tiny_export, producer)
    server = make_http_server(handler, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    real_run = handler._run

    def fault(workflow, step):
        if step.filename == "other.tar.gz":
            raise ZeroDivisionError("division by zero")
        return real_run(workflow, step)

    source = LocalKafkaSource(
        flow.name,
        flow.topic_in,
        f"http://127.0.0.1:{server.server_port}",
        kafka.bootstrap_servers,
        backoff_s=0.05,
        producer=producer,
        dead_letter_topic=flow.dlq,
    )
    _send_all(raw_producer, flow.topic_in, [v for v, _ in POISON])
    _send_all(raw_producer, flow.topic_in, [flow.step("other.tar.gz"), flow.step("tiles.tar.gz")])
    try:
        with patch.object(handler, "_run", side_effect=fault):
            source.start()
            nxt = flow.read(flow.topic_out, 1, timeout=90)
            wait(lambda: source.delivered == 6, 30, "every record to be answered")
    finally:
        source.stop()
        server.shutdown()
    assert [m["S3_bucket_desc"]["filename"] for m in nxt] == ["tiles.necb"]
    assert source.dead_lettered == 0  # the wrapper answered 200 for every record
    dead = flow.read(flow.dlq, 5)
    assert len(dead) == 5
    poison_matches = [m.replace("a Kafka tombstone", "") for _, m in POISON]
    poison_matches[0] = "message is empty"  # a KafkaSource posts a null value as no body
    for record, match in zip(dead, [*poison_matches, "ZeroDivisionError"], strict=True):
        assert match in record["error"], record


def test_local_kafkasource_gives_up_on_a_sink_that_never_accepts(
    kafka, s3, producer, raw_producer, tmp_path
):
    from nec_controller.sources import LocalKafkaSource

    flow = Flow(kafka, s3, tmp_path)
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    source = LocalKafkaSource(
        flow.name,
        flow.topic_in,
        f"http://127.0.0.1:{sink.server_port}",
        kafka.bootstrap_servers,
        backoff_s=0.01,
        retries=2,
        producer=producer,
        dead_letter_topic=flow.dlq,
    )
    _send_all(raw_producer, flow.topic_in, [flow.step("a.tif"), flow.step("b.tif")])
    source.start()
    try:
        wait(lambda: source.dead_lettered == 2, 30, "both records to be dead-lettered")
    finally:
        source.stop()
        sink.shutdown()
    assert _Sink.hits >= 6  # 1 + 2 retries each
    dead = flow.read(flow.dlq, 2)
    assert [d["message"]["S3_bucket_desc"]["filename"] for d in dead] == ["a.tif", "b.tif"]
    assert all("after 3 attempts: sink answered 500" in d["error"] for d in dead)


@pytest.mark.parametrize(
    ("headers", "body", "match"),
    [
        ({"Content-Length": "many"}, b"", "Content-Length 'many' is not a number"),
        ({"Content-Length": "-5"}, b"", "Content-Length -5 is negative"),
        ({}, b"x" * (3 << 20), "over the limit of 2097152 bytes"),
        (
            {"Content-Type": "application/cloudevents+json"},
            b'{"specversion": "1.0", "data_base64": "%%%"}',
            "data_base64 is not base64",
        ),
        (
            {"Content-Type": "application/cloudevents+json"},
            b'{"specversion": "1.0", "data_base64": 17}',
            "data_base64 is not base64",
        ),
    ],
)
def test_http_trigger_fails_requests_it_cannot_read(
    headers, body, match, kafka, s3, producer, tiny_export, tmp_path
):
    from nec_wrapper.triggers import make_http_server

    flow = Flow(kafka, s3, tmp_path)
    server = make_http_server(make_handler(flow, tiny_export, producer), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
        conn.putrequest("POST", f"/{flow.name}")
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            conn.putheader(key, value)
        conn.endheaders()
        conn.send(body)
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        conn.close()
    finally:
        server.shutdown()
    assert resp.status == 200 and answer["status"] == "failed" and match in answer["reason"]
    assert match in flow.read(flow.dlq, 1)[0]["error"]


# ------------------------------------------------------------------------------ bombs


def _npy_bomb() -> bytes:
    """A ~100-byte .npy whose header declares a 3 x 100,000 x 100,000 uint8 array."""
    buf = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": (3, 100_000, 100_000)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + b"\0" * 64


def _tiff_bomb(path: Path) -> bytes:
    """A sparse GeoTIFF declaring 3 x 100,000 x 100,000 with one small block written."""
    import rasterio
    from rasterio.windows import Window

    profile = dict(
        driver="GTiff",
        width=100_000,
        height=100_000,
        count=3,
        dtype="uint8",
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
        sparse_ok=True,
    )
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.ones((3, 256, 256), np.uint8), window=Window(0, 0, 256, 256))
    return path.read_bytes()


def test_decompression_bombs_fail_before_allocating(kafka, s3, producer, tiny_export, tmp_path):
    flow = Flow(kafka, s3, tmp_path)
    tiff = _tiff_bomb(tmp_path / "bomb.tif")
    assert len(tiff) < 2 << 20
    flow.put("input/bomb.npy", _npy_bomb())
    flow.put("input/bomb.tif", tiff)
    handler = make_handler(flow, tiny_export, producer, work_dir=tmp_path)
    for name in ("bomb.npy", "bomb.tif"):
        t0 = time.monotonic()
        out = handler.handle(flow.name, flow.step(name))
        assert time.monotonic() - t0 < 30
        assert out.done and out.status == "failed", out
        assert f"s3://{flow.bucket}/input/{name}" in out.reason, out.reason
        assert "declares 3x100000x100000" in out.reason and "max_" in out.reason, out.reason
        assert str(tmp_path) not in out.reason and "nec-step-" not in out.reason
    assert len(flow.read(flow.dlq, 2)) == 2
    assert not list(tmp_path.glob("nec-step-*"))


def _container_with_meta(meta: dict) -> bytes:
    """A container with valid CRCs whose header holds ``meta`` as it is, and no tiles."""
    from nec_serve.container import _END, _HEAD, _TAG_END, _U32, MAGIC

    body = json.dumps(meta).encode()
    head = _HEAD.pack(MAGIC, 1, 0, b"\0" * 32, len(body)) + body
    end = _END.pack(0, 0)
    return head + _U32.pack(zlib.crc32(head)) + _TAG_END + end + _U32.pack(zlib.crc32(end))


def test_a_container_with_a_mistyped_geometry_field_fails_clearly(
    kafka, s3, producer, tiny_export, tmp_path
):
    import subprocess
    import sys

    meta = {"model": "mae_vit_compress_adapter_tiny", "channels": 64, "tokens": "many"}
    data = _container_with_meta(meta)
    assert struct.unpack("<4s", data[:4])[0] == b"NECB"
    flow = Flow(kafka, s3, tmp_path, component="nec-decompress")
    flow.put("input/bad.necb", data)
    out = make_handler(flow, tiny_export, producer, mode="decompress").handle(
        flow.name, flow.step("bad.necb")
    )
    assert out.done and out.status == "failed"
    assert "'tokens'" in out.reason and "many" in out.reason, out.reason
    assert "'tokens'" in flow.read(flow.dlq, 1)[0]["error"]

    path = tmp_path / "bad.necb"
    path.write_bytes(data)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "nec_cli",
            "decompress",
            str(path),
            "--model-dir",
            str(tiny_export),
            "--out",
            str(tmp_path / "out.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2, cli.stderr
    assert "'tokens'" in cli.stderr and "Traceback" not in cli.stderr


# ------------------------------------------------------------------------------ secrets


def test_a_planted_secret_is_found_nowhere_afterwards(
    kafka, s3, producer, raw_producer, tiny_export, tmp_path, caplog
):
    """A truncated ``published`` message and a truncated step message, both holding a
    credential, go through the controller and a wrapper; then every topic but the two
    inputs, the broker's files of those topics, the logs and the stores are searched."""
    caplog.set_level(logging.DEBUG)
    flow = Flow(kafka, s3, tmp_path)
    published = dict(flow.msg)
    published["S3_bucket"] = dict(flow.msg["S3_bucket"], aws_secret_access_key=SECRET)
    cut_published = json.dumps(published).encode()[:-70]
    assert SECRET.encode() in cut_published and json.dumps(published).encode()[-70:] != b""
    step = json.loads(flow.step("x.tif"))
    step["meta_information"] = {"aws_secret_access_key": SECRET, "note": "x"}
    cut_step = json.dumps(step).encode()[:-12]
    assert SECRET.encode() in cut_step
    # A credential under a key no pattern knows, the message cut 12 characters into it.
    step["meta_information"] = {"note": SECRET}
    innocent = json.dumps(step)
    cut_innocent = innocent[: innocent.index(SECRET) + 12].encode()

    with _Controller(kafka, flow, {"nec-compress": "http://127.0.0.1:9"}, producer) as ctl:
        raw_producer.send(ctl.topic, value=cut_published).get(10)
        wait(lambda: _committed(kafka, ctl.group, ctl.topic) == 1, 60, "the controller")
    handler = make_handler(flow, tiny_export, producer, work_dir=tmp_path)
    raw_producer.send(flow.topic_in, value=cut_step).get(10)
    raw_producer.send(flow.topic_in, value=cut_innocent).get(10)
    stop, worker, group = _consume(handler, kafka, flow.topic_in)
    try:
        wait(lambda: _committed(kafka, group, flow.topic_in) == 2, 60, "the wrapper")
    finally:
        stop.set()
        worker.join(30)
    assert len(flow.read(flow.dlq, 3)) == 3  # all were dead-lettered

    from kafka import KafkaConsumer

    admin = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    inputs = {ctl.topic, flow.topic_in}  # where the platform itself wrote the secret
    topics = admin.topics() - inputs
    admin.close()
    assert {flow.dlq, flow.status} <= topics
    needle = SECRET[:8].encode()  # not even a prefix of it
    for topic in sorted(topics):
        assert not [r for r in _records(kafka, topic, 2.0) if r and needle in r], topic
    files = [
        p
        for p in kafka.data_dir.rglob("*")
        if p.is_file() and not any(p.parent.name.startswith(t + "-") for t in inputs)
    ]
    assert files
    for p in [*files, kafka.log_path, kafka.out_path, *tmp_path.rglob("*")]:
        if p.is_file():
            assert needle not in p.read_bytes(), p
    # kafka-python's own debug lines dump the input records it sends and fetches, as the
    # input topic holds them; every other log line is ours and must not.
    ours = [r.getMessage() for r in caplog.records if not r.name.startswith("kafka")]
    assert any("rejected workflow message" in m for m in ours)
    assert not [m for m in ours if SECRET[:8] in m]


# ------------------------------------------------------------------------------ duplicates


def test_a_duplicate_step_message_gives_one_downstream_message(
    kafka, s3, producer, raw_producer, tiny_export, data_dir, tmp_path
):
    flow = Flow(kafka, s3, tmp_path)
    flow.put("input/tiles.tar.gz", naip_tar(data_dir, 1))
    handler = make_handler(flow, tiny_export, producer)
    _send_all(raw_producer, flow.topic_in, [flow.step("tiles.tar.gz")] * 3)
    stop, worker, group = _consume(handler, kafka, flow.topic_in)
    try:
        wait(lambda: _committed(kafka, group, flow.topic_in) == 3, 90, "three deliveries")
    finally:
        stop.set()
        worker.join(30)
    nxt = flow.read(flow.topic_out, 2, timeout=5)
    assert len(nxt) == 1
    msg_id = nxt[0]["meta_information"]["nec"]["message_id"]
    finished = [s for s in flow.read(flow.status, 8) if s["status"] == "SUCCESS"]
    assert len(finished) == 3
    assert [s["nec"]["stats"].get("duplicate_of") for s in finished] == [
        None,
        msg_id,
        msg_id,
    ]
    marker = f".nec-published/nec-compress/{msg_id}.json"
    assert json.loads(flow.get(marker))["output_key"] == "result-nec-compress/tiles.necb"

    # A new version of the input is new work: processed and published again.
    flow.put("input/tiles.tar.gz", naip_tar(data_dir, 2))
    out = handler.handle(flow.name, flow.step("tiles.tar.gz"))
    assert out.status == "finished" and out.stats["message_id"] != msg_id
    assert len(flow.read(flow.topic_out, 2, timeout=5)) == 2

    # The window left: a crash between the next message and its marker (simulated by
    # deleting the marker) publishes once more on redelivery.
    new_id = out.stats["message_id"]
    flow.s3.client().delete_object(
        Bucket=flow.bucket, Key=f".nec-published/nec-compress/{new_id}.json"
    )
    fresh = make_handler(flow, tiny_export, producer)  # a restarted wrapper: nothing in memory
    assert fresh.handle(flow.name, flow.step("tiles.tar.gz")).stats["message_id"] == new_id
    assert len(flow.read(flow.topic_out, 3, timeout=5)) == 3


def test_a_failed_marker_write_does_not_publish_twice(
    kafka, s3, producer, tiny_export, data_dir, tmp_path
):
    from nec_serve import s3 as s3_mod
    from nec_serve.errors import TransientError

    flow = Flow(kafka, s3, tmp_path)
    flow.put("input/tiles.tar.gz", naip_tar(data_dir, 1))
    handler = make_handler(flow, tiny_export, producer)
    real = s3_mod.put_json
    calls = []

    def flaky(*args, **kw):
        calls.append(args)
        if len(calls) == 1:
            raise TransientError("S3 unreachable (injected)")
        return real(*args, **kw)

    with patch.object(s3_mod, "put_json", side_effect=flaky):
        out = handler.handle(flow.name, flow.step("tiles.tar.gz"))
    assert out.status == "finished" and len(calls) == 2  # retried: the marker was written
    assert len(flow.read(flow.topic_out, 2, timeout=5)) == 1


# ------------------------------------------------------------------------------ work dirs


def test_leftover_work_directories_are_removed_but_live_ones_kept(tmp_path):
    import fcntl
    import os

    from nec_wrapper.step import clean_work_dirs

    dead = tmp_path / "nec-step-dead"
    (dead / "in").mkdir(parents=True)
    (dead / "in" / "big.tar.gz").write_bytes(b"x" * 4096)
    (dead / ".owner.lock").touch()  # its owner died: nobody holds the lock
    live = tmp_path / "nec-step-live"
    live.mkdir()
    fd = os.open(live / ".owner.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    unrelated = tmp_path / "keep-me"
    unrelated.mkdir()
    try:
        assert clean_work_dirs(tmp_path) == [dead]
    finally:
        os.close(fd)
    assert live.exists() and unrelated.exists() and not dead.exists()
    assert clean_work_dirs(tmp_path) == [live]  # once its owner is gone


def test_a_damaged_stored_config_is_replaced_on_published(kafka, s3, producer, tmp_path):
    from nec_controller.app import Controller
    from nec_controller.sources import LocalSources

    flow = Flow(kafka, s3, tmp_path)
    (flow.store.root / f"{flow.name}.json").write_text("{damaged")
    sources = LocalSources(kafka.bootstrap_servers, {"nec-compress": "http://127.0.0.1:9"})
    ctl = Controller(flow.store, sources, producer, flow.dlq, flow.status)
    try:
        assert ctl.handle(json.dumps(flow.msg).encode()) == "published"
        assert flow.store.get(flow.name) == flow.config
    finally:
        sources.close()


# ------------------------------------------------------------------ one label per fault


def _edited(flow, edit) -> bytes:
    msg = json.loads(flow.step("tiles.tar.gz"))
    edit(msg)
    return json.dumps(msg).encode()


# (what is wrong, the message, the label); each is refused before any S3 or inference work.
STEP_FAULTS = [
    ("not JSON", lambda flow: b"{not json", "invalid_message"),
    ("no file name", lambda f: _edited(f, lambda m: m["S3_bucket_desc"].pop("filename")), None),
    (
        "unsafe folder",
        lambda f: _edited(f, lambda m: m["S3_bucket_desc"].update(folder="..")),
        None,
    ),
    ("not ended", lambda f: _edited(f, lambda m: m.update(previous_component_end=False)), None),
    (
        "codebooks text",
        lambda f: _edited(f, lambda m: m["meta_information"].update(codebooks="4")),
        None,
    ),
    (
        "codebooks on NEC",
        lambda f: _edited(f, lambda m: m["meta_information"].update(codebooks=2)),
        None,
    ),
]


def test_a_step_message_fault_has_one_label_whichever_trigger(
    kafka, s3, producer, tiny_export, tmp_path
):
    """The Kafka trigger's message and the KafkaSource's CloudEvent of it fail alike."""
    import base64

    from nec_wrapper.triggers import make_http_server

    flow = Flow(kafka, s3, tmp_path)
    handler = make_handler(flow, tiny_export, producer)
    seen = []

    def spy(real):
        def call(*args):
            seen.append(real(*args))
            return seen[-1]

        return call

    handler.handle, handler.reject = spy(handler.handle), spy(handler.reject)  # HTTP's view
    server = make_http_server(handler, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def post(name: str, raw: bytes, data: str | None = None):
        event = {"specversion": "1.0", "type": "dev.knative.kafka.event", "source": "t", "id": "1"}
        event["data_base64"] = data if data is not None else base64.b64encode(raw).decode()
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=60)
        body = json.dumps(event).encode()
        conn.request("POST", f"/{name}", body, {"Content-Type": "application/cloudevents+json"})
        assert conn.getresponse().status == 200
        conn.close()
        return seen[-1]

    try:
        for what, make, label in STEP_FAULTS:
            raw = make(flow)
            by_kafka = handler.handle(flow.name, raw)
            by_http = post(flow.name, raw)
            assert by_kafka.status == by_http.status == "failed", what
            assert by_kafka.failure == by_http.failure == (label or "invalid_message"), what
            assert by_kafka.reason == by_http.reason, what
        # A fault only the HTTP trigger can see is a message fault too.
        assert post(flow.name, b"", data="%%%").failure == "invalid_message"
        # A config that is not stored: the same label on both paths.
        step = flow.step("tiles.tar.gz")
        assert handler.handle("nec-none", step).failure == "unknown_workflow"
        assert post("nec-none", step).failure == "unknown_workflow"
    finally:
        server.shutdown()
    events = flow.read(flow.status, 2 * len(STEP_FAULTS) + 3)
    # Each was refused before its step started: one CRITICAL event each, no START.
    assert [e["status"] for e in events] == ["CRITICAL"] * (2 * len(STEP_FAULTS) + 3)
