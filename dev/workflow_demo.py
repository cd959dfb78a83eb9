"""The main job: a whole NEC workflow on the embedded local stack, as a platform runs it.

Starts a real Apache Kafka broker (KRaft), a real S3 server, the local Triton server, the
controller and two wrappers (compress, decompress; HTTP triggers fed by the controller's
KafkaSource stand-ins), each wrapper and the controller in its own process. Then fires
the workflow as EO4EU's platform does: ``published`` messages on ``system.ML``, input
objects in S3, a message on the workflow's input topic per object. It prints the status
events as they arrive on ``monitoring.notify`` and, at the end, a summary per stage, then
sends ``stopping`` and shuts everything down.

Its building blocks (:func:`local_stack`, :func:`wrapper_args`, :func:`spawn_cli`,
:func:`follow`, ...) are public: ``benchmarks/bench_pipeline.py`` runs one wrapper with them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nec_dev.stack.kafka import LocalKafka
from nec_dev.stack.s3 import LocalS3
from nec_dev.triton import LocalTritonServer, free_port
from nec_serve.kafka_io import json_producer
from nec_serve.messages import DEAD_LETTER_TOPIC, STATUS_TOPIC
from nec_serve.reports import BandsReport, StepReport, step_report_from_wire

__all__ = [
    "run_workflow_demo",
    "LocalStack",
    "local_stack",
    "workflow_message",
    "wrapper_args",
    "write_tar_gz",
    "spawn_cli",
    "wait_http",
    "stop_processes",
    "create_topics",
    "json_consumer",
    "follow",
]

BUCKET = "eo-workflow"
COMPRESS_IN, DECOMPRESS_IN, DONE = "wf-nec.compress.in", "wf-nec.decompress.in", "wf-nec.done"


# -- building blocks (also used by benchmarks/bench_pipeline.py) --------------------------


@dataclass
class LocalStack:
    """The running embedded stack: Kafka broker, S3 server and, optionally, Triton."""

    kafka: Any  # nec_dev.stack.kafka.LocalKafka
    s3: Any  # nec_dev.stack.s3.LocalS3
    triton: Any | None  # nec_dev.triton.LocalTritonServer
    start_s: float  # seconds the three took to come up

    @property
    def bootstrap(self) -> str:
        """Kafka bootstrap servers."""
        return self.kafka.bootstrap_servers

    @property
    def triton_url(self) -> str | None:
        """``grpc://host:port`` of the Triton server, or None when none runs."""
        return f"grpc://{self.triton.grpc_url}" if self.triton is not None else None

    def describe(self) -> str:
        """One line naming the endpoints."""
        triton = f", triton {self.triton_url}" if self.triton is not None else ""
        return f"kafka {self.bootstrap}, s3 {self.s3.endpoint_url}{triton}"


@contextmanager
def local_stack(repository: Path | None, work: Path) -> Iterator[LocalStack]:
    """Start a Kafka broker, an S3 server and (given a model repository) Triton.

    ``repository`` is an export's ``model_repository_local/``; Triton logs to
    ``work/tritonserver.log``. Everything is stopped, in reverse order, on leaving.
    """
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ExitStack() as stack:
        kafka = stack.enter_context(LocalKafka())
        s3 = stack.enter_context(LocalS3())
        triton = None
        if repository is not None:
            triton = stack.enter_context(
                LocalTritonServer(repository, log_path=work / "tritonserver.log")
            )
        yield LocalStack(kafka, s3, triton, time.perf_counter() - t0)


def workflow_message(
    status: str,
    service: str,
    t_in: str,
    t_out: str,
    s3,
    *,
    bucket: str = BUCKET,
    workflow: str = "wf-nec-demo",
) -> dict:
    """A platform message for ``system.ML`` (``published``/``stopping``) on ``s3`` (LocalS3)."""
    return {
        "workflow_status": status,
        "workflow_name": workflow,
        "Topics": {"in": t_in, "out": t_out},
        "ML": {"ServiceName": service, "Namespace": "nec", "component_name": service},
        "S3_bucket": {
            "aws_access_key_id": s3.access_key,
            "aws_secret_access_key": s3.secret_key,
            "s3-bucket-name": bucket,
            "region_name": s3.region,
            "endpoint_url": s3.endpoint_url,
        },
    }


def wrapper_args(
    mode: str,
    export_dir: Path,
    bootstrap: str,
    config_dir: Path,
    work_dir: str | Path,
    *,
    trigger: str = "http",
    port: int | None = None,
    server: str | None = None,
    bands: str | None = None,
    batch_size: int | None = None,
    group: str | None = None,
    output: str | None = None,
    metrics_port: int = 0,
) -> list[str]:
    """``nec-serve wrapper`` arguments; ``server`` None runs the graphs in-process.

    ``metrics_port`` 0 (the default here) serves no metrics, so that several wrappers can
    share a host; the wrapper's own default is 9090.
    """
    args = ["wrapper", "--mode", mode, "--model-dir", str(export_dir), "--bootstrap", bootstrap]
    args += ["--trigger", trigger]
    if port is not None:
        args += ["--port", str(port)]
    args += ["--metrics-port", str(metrics_port)]
    args += ["--config-dir", str(config_dir)]
    if server:
        args += ["--server", server]
    args += ["--work-dir", str(work_dir)]
    if group:
        args += ["--group", group]
    if bands:
        args += ["--bands", bands]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    if output:
        args += ["--output", output]
    return args


def write_tar_gz(dest: Path, members: Iterable[tuple[str, Path]]) -> Path:
    """Write ``(arcname, file)`` members into the ``.tar.gz`` ``dest``; returns ``dest``."""
    with tarfile.open(dest, "w:gz") as tf:
        for arcname, path in members:
            tf.add(path, arcname=arcname)
    return dest


def spawn_cli(args: list[str], log: Path) -> subprocess.Popen:
    """Run ``python -m nec_cli *args`` with its output in ``log``."""
    f = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "nec_cli", *args], stdout=f, stderr=subprocess.STDOUT
    )


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until ``url``/healthz answers; raise with the log's tail if ``proc`` exits."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"process exited while starting; log {log}:\n{log.read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} not up after {timeout} s; log {log}")


def stop_processes(procs: Sequence[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM every process, then wait for each (SIGKILL after ``timeout``)."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def create_topics(bootstrap: str, topics: list[str]) -> None:
    """Create the workflow's topics up front, as the platform does."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(t, 1, 1) for t in topics])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


def json_consumer(bootstrap: str, *topics: str):
    """A consumer of ``topics`` from the earliest offset, for :func:`follow`."""
    from kafka import KafkaConsumer

    return KafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=1000,
    )


def follow(
    consumer,
    on_record: Callable[[str, dict], bool],
    timeout_s: float,
    procs: Sequence[tuple[subprocess.Popen, Path]] = (),
) -> bool:
    """Hand each record (topic, decoded JSON) to ``on_record`` until it returns True.

    Returns False when ``timeout_s`` passed first. Between bursts of records, raises if
    one of ``procs`` (process, log) has exited, with the tail of its log.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for rec in consumer:
            if on_record(rec.topic, json.loads(rec.value)):
                return True
        for proc, log in procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"process exited with status {proc.returncode}; log {log}:\n"
                    f"{log.read_text(errors='replace')[-2000:]}"
                )
    return False


# -- the demo --------------------------------------------------------------------------


def _inputs(data: Path, tmp: Path) -> list[tuple[str, Path]]:
    """The objects the platform drops in S3: a .tar.gz of NAIP scenes and a Landsat GeoTIFF."""
    naip = write_tar_gz(
        tmp / "naip_2010_2018.tar.gz",
        ((f"naip/{scene.name}", scene) for scene in sorted((data / "naip").glob("*.tif"))[1:]),
    )
    return [("naip_2010_2018.tar.gz", naip), ("2015.tif", data / "landsat" / "2015.tif")]


def run_workflow_demo(
    export_dir: Path,
    data: Path,
    work: Path,
    timeout_s: float = 900,
    *,
    inputs: Callable[[Path, Path], list[tuple[str, Path]]] | None = None,
    bands: str | None = "1,2,3",
    output: str = "embeddings",
    meta: dict | None = None,
) -> int:
    """Run the workflow demo; returns the exit status.

    ``inputs(data, tmp)`` makes the objects dropped in S3 (default: NAIP scenes in a
    ``.tar.gz`` and a Landsat GeoTIFF), ``bands`` is what the compress step reads of them,
    ``output`` what the decompress step writes (``classes``: scores and per-tile labels;
    ``bands``: GeoTIFFs), ``meta`` goes into each step message's ``meta_information``
    (e.g. ``{"codebooks": 4}``, the RVQ family's rate).
    """
    make_inputs = inputs or _inputs
    work.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    t_start = time.perf_counter()
    with (
        local_stack(export_dir / "model_repository_local", work) as stack,
        tempfile.TemporaryDirectory() as tmp,
    ):
        print(f"[stack] {stack.describe()} ({time.perf_counter() - t_start:.1f} s)")
        try:
            metrics = _start_services(procs, stack, export_dir, Path(tmp), work, bands, output)
            print(f"[stack] controller and wrappers up ({time.perf_counter() - t_start:.1f} s)")
            print(
                "[stack] metrics: "
                + ", ".join(f"{s} http://127.0.0.1:{p}/metrics" for s, p in metrics.items())
                + f"; JSON logs in {work}/*.log"
            )
            client = stack.s3.client()
            client.create_bucket(Bucket=BUCKET)
            objects = make_inputs(data, Path(tmp))
            for name, path in objects:
                client.upload_file(str(path), BUCKET, f"input/{name}")
                print(f"[s3] put s3://{BUCKET}/input/{name} ({path.stat().st_size} bytes)")
            watch, producer = _send_workflow(stack, [name for name, _ in objects], meta)
            results = _watch(watch, len(objects), timeout_s)
            time.sleep(1.0)  # a wrapper counts a message once its status is out, just after
            _print_metrics(metrics)
            if output == "classes":
                _print_labels(client, results)
            _stop_workflows(producer, stack.s3)
            producer.close()
            watch.close()
        finally:
            stop_processes(procs)
    _summary(results, time.perf_counter() - t_start, work)
    failed = [r for r in results if r.get("status") == "failed"]
    return 1 if failed or len([r for r in results if r["status"] == "done"]) < len(objects) else 0


def _start_services(
    procs: list[subprocess.Popen],
    stack,
    export_dir: Path,
    tmp: Path,
    work: Path,
    bands: str | None,
    output: str,
) -> dict[str, int]:
    """Start both wrappers (HTTP trigger) and the controller, adding them to ``procs``.

    Returns each service's metrics port.
    """
    store = tmp / "configs"
    ports = {"nec-compress": free_port(), "nec-decompress": free_port()}
    metrics = {"nec-compress": free_port(), "nec-decompress": free_port()}
    metrics["nec-controller"] = free_port()
    for mode, service in (("compress", "nec-compress"), ("decompress", "nec-decompress")):
        compress = mode == "compress"
        args = wrapper_args(
            mode,
            export_dir,
            stack.bootstrap,
            store,
            tmp,
            trigger="http",
            port=ports[service],
            server=stack.triton_url,
            bands=bands if compress else None,
            batch_size=8 if compress else None,
            output=None if compress else output,
            metrics_port=metrics[service],
        )
        procs.append(spawn_cli(args, work / f"{service}.log"))
        wait_http(f"http://127.0.0.1:{ports[service]}", procs[-1], work / f"{service}.log")
    sinks = [f"--sink={s}=http://127.0.0.1:{p}" for s, p in ports.items()]
    controller = ["controller", "--bootstrap", stack.bootstrap, "--config-dir", str(store)]
    controller += ["--metrics-port", str(metrics["nec-controller"]), *sinks]
    procs.append(spawn_cli(controller, work / "controller.log"))
    return metrics


def _send_workflow(stack, names: Sequence[str], meta: dict | None):
    """Publish both steps' workflow, then one compress step message per input object.

    Returns the consumer of statuses and results, and the producer (both to be closed).
    """
    boot, s3 = stack.bootstrap, stack.s3
    topics = ["system.ML", STATUS_TOPIC, DEAD_LETTER_TOPIC, COMPRESS_IN, DECOMPRESS_IN, DONE]
    create_topics(boot, topics)
    watch = json_consumer(boot, STATUS_TOPIC, DONE, DEAD_LETTER_TOPIC)
    producer = json_producer(boot)
    for service, topic_in, topic_out in (
        ("nec-compress", COMPRESS_IN, DECOMPRESS_IN),
        ("nec-decompress", DECOMPRESS_IN, DONE),
    ):
        message = workflow_message("published", service, topic_in, topic_out, s3)
        producer.send("system.ML", message).get(30)
    time.sleep(1.0)  # the controller starts the sources
    for name in names:
        producer.send(
            COMPRESS_IN,
            {
                "previous_component_end": True,
                "S3_bucket_desc": {"folder": "input", "filename": name},
                "meta_information": {"source": "nec-serve workflow demo", **(meta or {})},
            },
        ).get(30)
    print(f"[kafka] workflow published and {len(names)} step messages sent")
    return watch, producer


def _stop_workflows(producer, s3) -> None:
    """Tell the controller both steps' workflows are stopping."""
    for service, topic_in in (("nec-compress", COMPRESS_IN), ("nec-decompress", DECOMPRESS_IN)):
        producer.send("system.ML", workflow_message("stopping", service, topic_in, "", s3)).get(30)


def _print_labels(client, results: list[dict]) -> None:
    """What the decompress step labelled: the ``.classes.json`` it put beside its output."""
    for r in results:
        if r["status"] != "done":
            continue
        key = StepReport.from_wire(r["decompress"]).output_key
        key = key[: -len(".npy")] + ".classes.json" if key.endswith(".npy") else key
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        tiles = json.loads(body)["tiles"]
        counts = Counter(t["class"] for t in tiles).most_common()
        print(
            f"[s3] {key}: {len(tiles)} tiles labelled: " + ", ".join(f"{c} {n}" for c, n in counts)
        )


def _print_metrics(ports: dict[str, int]) -> None:
    """One line per service from its ``/metrics``: messages by outcome, rejected, bytes."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    for service, port in ports.items():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError as err:
            print(f"[metrics] {service}: not reachable ({err})")
            continue
        counts: Counter = Counter()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "nec_wrapper_messages_total" and s.value:
                    counts[s.labels["outcome"]] += s.value
                elif s.name == "nec_controller_workflows_total" and s.value:
                    counts[s.labels["action"]] += s.value
                elif s.name in ("nec_wrapper_input_bytes_total", "nec_wrapper_output_bytes_total"):
                    counts[s.name.split("_")[2] + " bytes"] += s.value
                elif s.name == "nec_controller_messages_rejected_total" and s.value:
                    counts["rejected"] += s.value
        print(f"[metrics] {service}: " + ", ".join(f"{k} {v:.0f}" for k, v in counts.items()))


def _watch(consumer, expected: int, timeout_s: float) -> list[dict]:
    finished: dict[str, list[dict]] = {}
    results: list[dict] = []

    def on_record(topic: str, value: dict) -> bool:
        if topic == STATUS_TOPIC:
            # EO4EU's status shape: START / INFO (progress, overwrite) / SUCCESS / CRITICAL,
            # a description of at most 300 characters; the step's stats and the whole reason
            # are under "nec".
            desc = value["description"]
            nec = value.get("nec") or {}
            short = desc if len(desc) < 100 else desc[:97] + "..."
            print(f"[{STATUS_TOPIC}] {value['component_name']}: {value['status']} {short}")
            if value["status"] == "SUCCESS" and "stats" in nec:
                finished.setdefault(value["component_name"], []).append(nec["stats"])
            if value["status"] == "CRITICAL":
                results.append({"status": "failed", "reason": nec.get("reason", desc)})
        elif topic == DEAD_LETTER_TOPIC:
            print(f"[{DEAD_LETTER_TOPIC}] {value.get('error')}")
        else:
            nec = value["meta_information"]["nec"]
            done = StepReport.from_wire(nec)
            name = done.input_key.rsplit("/", 1)[-1]
            compress = next(
                (
                    f
                    for f in finished.get("nec-compress", [])
                    if step_report_from_wire(f).output_key.endswith(name)
                ),
                {},
            )
            print(f"[{topic}] s3://{BUCKET}/{done.output_key}")
            results.append({"status": "done", "compress": compress, "decompress": nec})
        return len(results) >= expected

    if expected > 0:
        follow(consumer, on_record, timeout_s)
    return results


def _rmse(compress: StepReport, decompress: StepReport):
    """The embedding RMSE of a NEC step; "n/a" for RVQ.

    RVQ codes codebook indexes: no continuous latent is rounded (its error is measured on
    the bands instead).
    """
    rvq = compress.rate is not None or isinstance(decompress.result, BandsReport)
    return "n/a" if rvq else compress.result.embedding_rmse


_SUMMARY_COLUMNS = (
    "input",
    "tiles",
    "bytes in",
    "container B",
    "bpp",
    "ratio",
    "% over bound",
    "emb RMSE",
    "S3 get s",
    "infer s",
    "code s",
    "S3 put s",
    "Kafka s",
    "decode s",
    "peak RSS MB",
)


def _summary_cells(c: StepReport | None, d: StepReport) -> tuple:
    """One input's cells of :data:`_SUMMARY_COLUMNS`; None where ``c`` is unknown."""
    d_cells = (d.result.seconds.decode,)
    if c is None:
        return (None,) * (len(_SUMMARY_COLUMNS) - 2) + (*d_cells, d.max_rss_mb)
    r = c.result
    return (
        c.input_key,
        r.tiles,
        c.bytes_in,
        c.bytes_out,
        r.bits_per_pixel,
        r.compression_ratio,
        r.payload_over_entropy_bound_pct,
        _rmse(c, d),
        c.s3_get_s,
        r.seconds.inference,
        r.seconds.coding,
        c.s3_put_s,
        c.kafka_s,
        *d_cells,
        max(c.max_rss_mb, d.max_rss_mb),
    )


def _summary(results: list[dict], seconds: float, work: Path) -> None:
    print(f"\nworkflow finished in {seconds:.1f} s")
    print(" | ".join(_SUMMARY_COLUMNS))
    for r in results:
        if r["status"] != "done":
            print(f"FAILED: {r.get('reason')}")
            continue
        c = step_report_from_wire(r["compress"]) if r["compress"] else None
        c = c if isinstance(c, StepReport) else None  # not seen, or a duplicate's
        d = StepReport.from_wire(r["decompress"])
        print(" | ".join(str(v) for v in _summary_cells(c, d)))
    (work / "workflow_summary.json").write_text(json.dumps(results, indent=1))
