"""Metrics, structured logs and EO4EU status events of the wrapper and the controller.

The services run as they do in production (``python -m nec_cli wrapper|controller``) against
the real Kafka broker and S3 server; their ``/metrics`` endpoints are scraped over HTTP and
parsed with prometheus_client's parser, and their JSON log lines are read back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from support.kafka_s3 import Flow
from support.kafka_s3 import make_handler as _handler
from support.kafka_s3 import naip_tar as _naip_tar

from nec_dev.triton import free_port
from nec_serve import logs
from nec_serve.logs import JsonFormatter, TextFormatter, bind, log_context, trace_id
from nec_serve.messages import STATUS_OF_EVENT, StepMessage
from nec_serve.metrics import (
    FAILURE_REASONS,
    OUTCOMES,
    STAGES,
    ControllerMetrics,
    WrapperMetrics,
    sample_names,
    serve_metrics,
)

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "k8s" / "monitoring" / "dashboard.json"
EO4EU_KEYS = {"component_name", "workflow_name", "status", "description", "timestamp", "optional"}


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``/metrics`` of a service, parsed: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def read_records(kafka, topic: str, expect, timeout: float = 60.0) -> list:
    """Records (key and decoded value) of ``topic`` until ``expect(records)`` holds."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=500,
        metadata_max_age_ms=1000,
    )
    out, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not expect(out):
            out.extend(SimpleNamespace(key=r.key, value=json.loads(r.value)) for r in consumer)
    finally:
        consumer.close()
    return out


def log_lines(path) -> list[dict]:
    """Every line a service wrote to its log, each one JSON object (or the test fails)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]
    for line in parsed:
        assert {"ts", "level", "logger", "message"} <= set(line), line
        assert datetime.fromisoformat(line["ts"]).utcoffset() == timedelta(0)
    return parsed


def wait_for(condition, timeout: float, what: str, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) waiting for {what}: {log.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NEC_LOG_FORMAT"}
    return {**env, "HOSTNAME": "nec-compress-7d9f-xk2p"}


# ------------------------------------------------------------------------------ the wrapper


def test_wrapper_metrics_logs_and_status_of_a_real_workflow(
    kafka, s3, producer, raw_producer, tiny_export, data_dir, tmp_path
):
    """One good message, one that is not JSON, one whose object is missing: the wrapper
    process (Kafka trigger) counts each, times each stage, logs JSON lines under each
    message's id, and reports in EO4EU's status vocabulary."""
    flow = Flow(kafka, s3, tmp_path)
    archive = _naip_tar(data_dir, 2)
    flow.put("input/tiles.tar.gz", archive)
    port, log = free_port(), tmp_path / "wrapper.log"
    work = tmp_path / "work"
    work.mkdir()
    good = flow.step("tiles.tar.gz")
    garbage = b'{"note": "not json'
    missing = flow.step("absent.tar.gz")
    for raw in (good, garbage, missing):
        raw_producer.send(flow.topic_in, value=raw).get(10)
    cmd = [
        sys.executable, "-m", "nec_cli", "wrapper", "--mode", "compress",
        "--model-dir", str(tiny_export), "--bootstrap", kafka.bootstrap_servers,
        "--trigger", "kafka", "--config-dir", str(flow.store.root), "--bands", "1,2,3",
        "--status-topic", flow.status, "--dead-letter-topic", flow.dlq,
        "--group", f"g-{_uid()}", "--work-dir", str(work), "--metrics-port", str(port),
    ]  # fmt: skip
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=_env())
    try:

        def handled():
            try:
                got = scrape(port)
            except OSError:
                return None
            total = sum(
                value(got, "nec_wrapper_messages_total", step="compress", outcome=o) or 0
                for o in OUTCOMES
            )
            return got if total >= 3 else None

        samples = wait_for(handled, 120, "three messages handled", proc, log)
        statuses = read_records(
            kafka, flow.status, lambda r: sum(x.value["status"] != "INFO" for x in r) >= 5
        )
    finally:
        proc.terminate()
        proc.wait(20)

    # Counted by outcome and by failure class, each exactly once.
    def m(name, **labels):
        return value(samples, name, step="compress", **labels)

    assert {o: m("nec_wrapper_messages_total", outcome=o) for o in OUTCOMES} == {
        "finished": 1,
        "duplicate": 0,
        "failed": 2,
        "retry": 0,
    }
    assert {r: m("nec_wrapper_messages_failed_total", reason=r) for r in FAILURE_REASONS} == {
        "invalid_message": 1,
        "unknown_workflow": 0,
        "input_error": 1,
        "transient_exhausted": 0,
        "internal": 0,
    }
    assert m("nec_wrapper_dead_lettered_total") == 2
    assert len(flow.read(flow.dlq, 2)) == 2
    # Bytes are those of the objects read and written.
    output = flow.get("result-nec-compress/tiles.necb")
    assert m("nec_wrapper_input_bytes_total") == len(archive)
    assert m("nec_wrapper_output_bytes_total") == len(output)
    assert m("nec_wrapper_tiles_total") == 2 * 2 * 3
    # Every stage of the one processed message was observed once, in its own histogram.
    for stage in STAGES:
        assert m("nec_wrapper_stage_seconds_count", stage=stage) == 1, stage
        assert m("nec_wrapper_stage_seconds_bucket", stage=stage, le="+Inf") == 1, stage
        assert m("nec_wrapper_stage_seconds_sum", stage=stage) >= 0, stage
    assert m("nec_wrapper_stage_seconds_sum", stage="inference") > 0
    assert m("nec_wrapper_tiles_in_flight") == 0  # all returned
    assert m("nec_wrapper_retries_total", what="step") == 0

    # EO4EU's status vocabulary, with the stats and the whole reason under "nec".
    by_event = {}
    for rec in statuses:
        assert rec.key == b"key"
        assert EO4EU_KEYS <= set(rec.value) <= EO4EU_KEYS | {"overwrite", "nec"}
        assert rec.value["optional"] == {"namespace": "", "pod": "nec-compress-7d9f-xk2p"}
        assert rec.value["status"] == STATUS_OF_EVENT[rec.value["nec"]["event"]]
        assert len(rec.value["description"]) <= 300
        by_event.setdefault(rec.value["status"], []).append(rec.value)
    assert len(by_event["START"]) == 2 and len(by_event["SUCCESS"]) == 1
    assert len(by_event["CRITICAL"]) == 2 and len(by_event["INFO"]) == 2  # read, coded
    assert all(v["overwrite"] is True for v in by_event["INFO"])
    success = by_event["SUCCESS"][0]
    stats = success["nec"]["stats"]
    assert stats["bytes_out"] == len(output) and stats["output_key"].endswith("tiles.necb")
    assert m("nec_wrapper_bits_per_pixel_count") == 1
    assert m("nec_wrapper_bits_per_pixel_sum") == pytest.approx(stats["bits_per_pixel"])
    for stage in STAGES:
        assert m("nec_wrapper_stage_seconds_sum", stage=stage) == pytest.approx(
            stats[f"{stage}_s"], abs=1e-9
        )
    failures = {v["nec"]["failure"] for v in by_event["CRITICAL"]}
    assert failures == {"invalid_message", "input_error"}

    # JSON log lines: each message under its own id, the same on every line of it.
    lines = log_lines(log)
    good_id = trace_id(good)
    assert success["nec"]["message_id"] == good_id
    mine = [x for x in lines if x.get("message_id") == good_id]
    assert len(mine) >= 3  # received, published, done
    assert {x.get("input_key") for x in mine} >= {"input/tiles.tar.gz"}
    assert {x["workflow"] for x in mine if "workflow" in x} == {flow.config.name}
    assert all(x["step"] == "compress" for x in mine)
    assert any("published result-nec-compress/tiles.necb" in x["message"] for x in mine)
    bad_id = hashlib.sha256(garbage).hexdigest()[:32]
    assert any(x.get("message_id") == bad_id and x["level"] == "ERROR" for x in lines)
    assert trace_id(missing) != good_id
    text = log.read_text()
    assert flow.s3.secret_key not in text and flow.s3.access_key not in text


def test_wrapper_decompress_counts_its_stages(kafka, s3, producer, tiny_export, data_dir, tmp_path):
    """Decompression reports entropy decoding and the graph as stages of their own."""
    flow = Flow(kafka, s3, tmp_path)
    flow.put("input/tiles.tar.gz", _naip_tar(data_dir, 1))
    out = _handler(flow, tiny_export, producer).handle(flow.name, flow.step("tiles.tar.gz"))
    assert out.status == "finished", out.reason
    dflow = Flow(kafka, s3, tmp_path, component="nec-decompress")
    dflow.put(out.output_key, flow.get(out.output_key))
    dec = _handler(dflow, tiny_export, producer, mode="decompress")
    server = serve_metrics(dec.metrics.registry, "127.0.0.1", free_port())
    try:
        nxt = StepMessage(True, "result-nec-compress", "tiles.necb", {"nec": out.stats})
        dout = dec.handle(dflow.name, json.dumps(nxt.to_dict()).encode())
        assert dout.status == "finished", dout.reason
        samples = scrape(server.server_port)
    finally:
        server.shutdown()
    got = {
        stage: value(samples, "nec_wrapper_stage_seconds_count", step="decompress", stage=stage)
        for stage in STAGES
    }
    ran = {"s3_get", "coding", "inference", "s3_put", "kafka"}
    assert got == {stage: (1 if stage in ran else 0) for stage in STAGES}
    written = len(dflow.get(dout.output_key))
    assert value(samples, "nec_wrapper_output_bytes_total", step="decompress") == written
    assert value(samples, "nec_wrapper_bits_per_pixel_count", step="decompress") == 0
    # The decompress step logs the message under the id the compress step gave it.
    assert trace_id(json.dumps(nxt.to_dict())) == out.stats["message_id"]


@pytest.fixture
def json_log():
    """The root logger writing JSON lines to a buffer, as a service does; restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    logs.configure_logging("json", logging.INFO, stream=buf)
    yield buf
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def test_a_failure_quoting_credentials_reaches_no_log_status_or_dead_letter(
    kafka, s3, producer, tiny_export, data_dir, tmp_path, json_log
):
    """An error whose text holds the workflow's keys (as a client library's might)."""
    flow = Flow(kafka, s3, tmp_path)
    flow.put("input/tiles.tar.gz", _naip_tar(data_dir, 1))
    handler = _handler(flow, tiny_export, producer)
    leak = f"refused {s3.access_key} / {s3.secret_key} at {s3.endpoint_url}"
    with patch("nec_serve.s3.download", side_effect=RuntimeError(leak)):
        out = handler.handle(flow.name, flow.step("tiles.tar.gz"))
    assert out.status == "failed" and out.failure == "internal"
    assert "refused *** / ***" in out.reason
    lines = [json.loads(x) for x in json_log.getvalue().splitlines()]
    lines = [x for x in lines if x["logger"].startswith("nec_")]  # not kafka-python's
    failed = [x for x in lines if x["level"] == "ERROR"]
    assert failed and "refused *** / ***" in failed[0]["message"]
    assert {x["message_id"] for x in lines} == {trace_id(flow.step("tiles.tar.gz"))}
    written = json_log.getvalue() + json.dumps(flow.read(flow.dlq, 1) + flow.read(flow.status, 2))
    assert s3.secret_key not in written and s3.access_key not in written
    assert "refused ***" in written  # the records were read, and scrubbed


# ------------------------------------------------------------------------------ the controller


def test_controller_metrics_logs_and_status(kafka, s3, producer, raw_producer, tmp_path):
    flow = Flow(kafka, s3, tmp_path)
    flow.store.delete(flow.name)  # the controller stores it
    topic, port, log = f"system.ML.{_uid()}", free_port(), tmp_path / "controller.log"
    cmd = [
        sys.executable, "-m", "nec_cli", "controller", "--bootstrap", kafka.bootstrap_servers,
        "--topic", topic, "--config-dir", str(flow.store.root),
        "--sink", "nec-compress=http://127.0.0.1:9", "--status-topic", flow.status,
        "--dead-letter-topic", flow.dlq, "--host", "127.0.0.1", "--metrics-port", str(port),
    ]  # fmt: skip
    published = json.dumps(flow.msg).encode()
    stopping = json.dumps(dict(flow.msg, workflow_status="stopping")).encode()
    garbage = b'{"workflow_status": "published", "S3_bucket": {"aws_secret_access_key": "x'
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=_env())
    try:
        wait_for(lambda: _up(port), 60, "the metrics endpoint", proc, log)
        raw_producer.send(topic, value=published).get(10)
        wait_for(
            lambda: value(scrape(port), "nec_controller_active_workflows") == 1,
            60,
            "the workflow to be counted",
            proc,
            log,
        )
        assert flow.store.names() == [flow.name]
        for raw in (published, garbage, stopping):
            raw_producer.send(topic, value=raw).get(10)

        def handled():
            got = scrape(port)
            done = sum(
                value(got, "nec_controller_workflows_total", action=a) or 0
                for a in ("published", "stopped", "unchanged")
            )
            return got if done >= 3 else None

        samples = wait_for(handled, 60, "four messages handled", proc, log)
    finally:
        proc.terminate()
        proc.wait(20)
    for action, count in (("published", 1), ("unchanged", 1), ("stopped", 1)):
        assert value(samples, "nec_controller_workflows_total", action=action) == count
    rejected = {
        r: value(samples, "nec_controller_messages_rejected_total", reason=r)
        for r in FAILURE_REASONS
    }
    assert rejected == {r: (1 if r == "invalid_message" else 0) for r in FAILURE_REASONS}
    assert value(samples, "nec_controller_active_workflows") == 0
    (status,) = read_records(kafka, flow.status, lambda r: len(r) >= 1)
    assert status.key == b"key" and set(status.value) == EO4EU_KEYS | {"nec"}
    assert status.value["status"] == "CRITICAL" and status.value["component_name"] == (
        "nec-controller"
    )
    assert status.value["nec"]["failure"] == "invalid_message"
    assert status.value["nec"]["message_id"] == hashlib.sha256(garbage).hexdigest()[:32]

    lines = log_lines(log)
    pub = [x for x in lines if x.get("message_id") == trace_id(published)]
    assert any("published" in x["message"] for x in pub)
    assert {x.get("workflow") for x in pub} >= {flow.config.name}
    assert all(x.get("component") == "nec-controller" for x in pub)
    text = log.read_text()
    assert flow.s3.secret_key not in text and flow.s3.access_key not in text


def _up(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


# ------------------------------------------------------------------------------ units


def test_metrics_are_per_registry_and_bounded():
    a, b = WrapperMetrics("compress"), WrapperMetrics("compress")
    a.outcome("failed", "input_error")
    assert (
        a.registry.get_sample_value(
            "nec_wrapper_messages_failed_total", {"step": "compress", "reason": "input_error"}
        )
        == 1
    )
    assert (
        b.registry.get_sample_value(
            "nec_wrapper_messages_failed_total", {"step": "compress", "reason": "input_error"}
        )
        == 0
    )
    with pytest.raises(ValueError, match="unknown failure class 'S3 down'"):
        a.outcome("failed", "S3 down")
    with pytest.raises(ValueError, match="unknown outcome"):
        a.outcome("lost")
    with a.in_flight(8):
        assert a.registry.get_sample_value("nec_wrapper_tiles_in_flight", {"step": "compress"}) == 8
    assert a.registry.get_sample_value("nec_wrapper_tiles_in_flight", {"step": "compress"}) == 0


def test_metrics_port_zero_serves_nothing_and_a_taken_port_is_named():
    registry = CollectorRegistry()
    assert serve_metrics(registry, "127.0.0.1", 0) is None
    server = serve_metrics(registry, "127.0.0.1", free_port())
    try:
        from nec_serve.errors import InvalidInput

        with pytest.raises(InvalidInput, match=f"127.0.0.1:{server.server_port} \\(in use\\)"):
            serve_metrics(registry, "127.0.0.1", server.server_port)
    finally:
        server.shutdown()


def test_json_lines_carry_the_context_and_no_credentials():
    record_log = logging.getLogger("nec_test.observability")
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(logs._ContextFilter())
    record_log.addHandler(handler)
    record_log.setLevel(logging.INFO)
    record_log.propagate = False
    try:
        with log_context(message_id="ab" * 16, component="nec-compress"):
            bind(workflow="wf-1", secrets=("AKIDLEAKED", "s3cr3t-LEAKED"))
            record_log.info("key AKIDLEAKED, secret s3cr3t-LEAKED")
            record_log.warning("config {'aws_secret_access_key': 'plain'} token=abc123")
            try:
                raise RuntimeError("boom s3cr3t-LEAKED")
            except RuntimeError:
                record_log.exception("failed")
        record_log.info("outside")
    finally:
        record_log.removeHandler(handler)
        record_log.propagate = True
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["message_id"] for x in lines[:3]] == ["ab" * 16] * 3
    assert lines[0]["workflow"] == "wf-1" and lines[0]["component"] == "nec-compress"
    assert lines[0]["message"] == "key ***, secret ***"
    assert "plain" not in lines[1]["message"] and "abc123" not in lines[1]["message"]
    assert "RuntimeError: boom ***" in lines[2]["exception"]
    assert "message_id" not in lines[3] and "secrets" not in buf.getvalue()
    assert "LEAKED" not in buf.getvalue()


def test_text_format_redacts_too():
    record = logging.LogRecord("x", logging.INFO, "f", 1, "password=hunter22 ok", None, None)
    with log_context(message_id="cd" * 16):
        text = TextFormatter().format(record)
    assert "hunter22" not in text and text.endswith(f"[message_id={'cd' * 16}]")


def test_trace_id_follows_a_message_through_the_steps():
    step = {"previous_component_end": True, "S3_bucket_desc": {"folder": "a", "filename": "b"}}
    compact = json.dumps(step, separators=(",", ":")).encode()
    spaced = json.dumps(step, indent=2).encode()
    assert trace_id(compact) == trace_id(spaced) == trace_id(step)  # re-serialised: same id
    assert trace_id(dict(step, meta_information={"nec": {"message_id": "ef" * 16}})) == "ef" * 16
    forged = dict(step, meta_information={"nec": {"message_id": "not-an-id"}})
    assert trace_id(forged) != "not-an-id" and len(trace_id(forged)) == 32
    assert trace_id(b"\xff\xfe") == hashlib.sha256(b"\xff\xfe").hexdigest()[:32]
    assert trace_id(None) == hashlib.sha256(b"").hexdigest()[:32]


def test_cli_log_format_defaults(monkeypatch):
    from nec_cli.main import build_parser, setup_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    wrapper = ["wrapper", "--mode", "compress", "--model-dir", "m", "--bootstrap", "k:9092"]
    try:
        cases = [
            (wrapper, {}, JsonFormatter, logging.INFO),
            ([*wrapper, "--log-format", "text"], {}, TextFormatter, logging.INFO),
            (["controller", "--bootstrap", "k"], {}, JsonFormatter, logging.INFO),
            (["inspect", "x.necb"], {}, TextFormatter, logging.WARNING),
            (["inspect", "x.necb"], {"NEC_LOG_FORMAT": "json"}, JsonFormatter, logging.WARNING),
            (wrapper, {"NEC_LOG_FORMAT": "text"}, TextFormatter, logging.INFO),
        ]
        for argv, env, formatter, level in cases:
            setup_logging(build_parser().parse_args(argv), env)
            (handler,) = root.handlers
            assert type(handler.formatter) is formatter, argv
            assert root.level == level, argv
        from nec_serve.errors import InvalidInput

        with pytest.raises(InvalidInput, match="invalid log format 'xml'"):
            setup_logging(build_parser().parse_args(wrapper), {"NEC_LOG_FORMAT": "xml"})
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


def _demo_step(mode, result, key, out_key, rate=None, kafka=0.01):
    from nec_serve.reports import StepReport

    return StepReport(
        mode, result, "ab" * 16, key, out_key, 100, 50, 0.01, 0.2, 0.02, 300.0, rate, kafka
    )


def test_the_demo_reads_eo4eu_status_events(capsys, tmp_path):
    """dev/workflow_demo.py's watcher: SUCCESS stats from "nec", CRITICAL reasons, RVQ n/a."""
    from nec_dev.workflow_demo import _summary, _watch
    from nec_serve.messages import status_event
    from nec_serve.reports import (
        ArrayReport,
        BandsReport,
        CompressReport,
        CompressSeconds,
        DecodeSeconds,
        Rate,
    )

    coded = CompressReport(1, 4, 3000, 200, 0.5, 15.0, 0.1, 0.0, CompressSeconds(0, 0, 0.1, 0))
    stats = _demo_step(
        "compress", coded, "input/a.tif", "result-nec-compress/a.necb", Rate("codebooks", 4)
    ).to_wire()
    bands = BandsReport("bands", 4, 1, Rate("codebooks", 4), DecodeSeconds(0.3, 0.1, 0.2))
    done = _demo_step(
        "decompress", bands, "result-nec-compress/a.necb", "r/a.tif", kafka=None
    ).to_wire()
    records = [
        ("monitoring.notify", status_event("nec-compress", "wf", "started", "compress a")),
        ("monitoring.notify", status_event("nec-compress", "wf", "progress", "read 1 bytes")),
        (
            "monitoring.notify",
            status_event("nec-compress", "wf", "finished", "done", nec={"stats": stats}),
        ),
        ("wf.done", {"meta_information": {"nec": done}}),
        (
            "monitoring.notify",
            status_event("nec-compress", "wf", "failed", "x" * 300, nec={"reason": "x" * 400}),
        ),
    ]
    consumer = [SimpleNamespace(topic=t, value=json.dumps(v).encode()) for t, v in records]
    results = _watch(consumer, 2, 5)
    assert results[0]["status"] == "done" and results[0]["compress"] == stats
    assert results[1] == {"status": "failed", "reason": "x" * 400}
    nec_coded = dataclasses.replace(coded, embedding_rmse=0.27)
    array = ArrayReport("embeddings", 4, DecodeSeconds(0.3, 0.1, 0.2))
    nec_row = {
        "status": "done",
        "compress": _demo_step("compress", nec_coded, "input/b.tif", "r/b.necb").to_wire(),
        "decompress": _demo_step("decompress", array, "r/b.necb", "r/b.npy", kafka=None).to_wire(),
    }
    _summary([results[0], nec_row], 1.0, tmp_path)
    rvq, nec = (r.split(" | ") for r in capsys.readouterr().out.splitlines()[-2:])
    assert rvq[7] == "n/a" and nec[7] == "0.27"  # the emb RMSE column
    assert rvq[0] == "input/a.tif" and rvq[12] == "0.01" and rvq[13] == "0.3"  # Kafka, decode s


# ------------------------------------------------------------------------------ dashboard


def test_dashboard_queries_only_metrics_the_services_register():
    """Every nec_ metric a panel queries is one the wrapper or the controller exposes."""
    import re

    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    exposed = sample_names(WrapperMetrics("compress").registry) | sample_names(
        ControllerMetrics().registry
    )
    queried: set[str] = set()
    exprs = []
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            exprs.append(target["expr"])
            queried |= set(re.findall(r"\b(nec_[a-z_]+)\b", target["expr"]))
    assert queried, "no panel queries a nec_ metric"
    assert queried <= exposed, sorted(queried - exposed)
    # The families the dashboard is meant to show are all there.
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in queried}
    for name in (
        "nec_wrapper_messages",
        "nec_wrapper_messages_failed",
        "nec_wrapper_stage_seconds",
        "nec_wrapper_input_bytes",
        "nec_wrapper_output_bytes",
        "nec_wrapper_dead_lettered",
        "nec_wrapper_tiles_in_flight",
        "nec_controller_workflows",
        "nec_controller_messages_rejected",
    ):
        assert name in families, name
    text = " ".join(exprs)
    for name in (
        "nv_inference_request_success",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_gpu_utilization",
        "kafka_consumergroup_lag",
        "keda_scaler_metrics_value",
        "histogram_quantile",
    ):
        assert name in text, name
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_tiles_are_in_flight_while_the_engine_runs():
    from nec_wrapper.step import _Metered

    metrics = WrapperMetrics("decompress")
    gauge = {"step": "decompress"}
    seen = []

    class Engine:
        def decode(self, role, symbols):
            seen.append(metrics.registry.get_sample_value("nec_wrapper_tiles_in_flight", gauge))
            raise RuntimeError("the server went away")

    with pytest.raises(RuntimeError):
        _Metered(Engine(), metrics).decode(None, np.zeros((5, 2, 3), np.int32))
    assert seen == [5]
    assert metrics.registry.get_sample_value("nec_wrapper_tiles_in_flight", gauge) == 0
