"""The main job: a whole NEC workflow on the embedded local stack, as a platform runs it.

Starts a real Apache Kafka broker (KRaft), a real S3 server, the local Triton server, the
controller and two wrappers (compress, decompress; HTTP triggers fed by the controller's
KafkaSource stand-ins), each wrapper and the controller in its own process. Then fires
the workflow as EO4EU's platform does: ``published`` messages on ``system.ML``, input
objects in S3, a message on the workflow's input topic per object. It prints the status
events as they arrive on ``monitoring.notify`` and, at the end, a summary per stage, then
sends ``stopping`` and shuts everything down.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

__all__ = ["run_workflow_demo"]

BUCKET = "eo-workflow"
COMPRESS_IN, DECOMPRESS_IN, DONE = "wf-nec.compress.in", "wf-nec.decompress.in", "wf-nec.done"


def _workflow_msg(status: str, service: str, t_in: str, t_out: str, s3) -> dict:
    return {
        "workflow_status": status,
        "workflow_name": "wf-nec-demo",
        "Topics": {"in": t_in, "out": t_out},
        "ML": {"ServiceName": service, "Namespace": "nec", "component_name": service},
        "S3_bucket": {
            "aws_access_key_id": s3.access_key,
            "aws_secret_access_key": s3.secret_key,
            "s3-bucket-name": BUCKET,
            "region_name": s3.region,
            "endpoint_url": s3.endpoint_url,
        },
    }


def _inputs(data: Path, tmp: Path) -> list[tuple[str, Path]]:
    """The objects the platform drops in S3: a .tar.gz of NAIP scenes and a Landsat GeoTIFF."""
    naip = tmp / "naip_2010_2018.tar.gz"
    with tarfile.open(naip, "w:gz") as tf:
        for scene in sorted((data / "naip").glob("*.tif"))[1:]:
            tf.add(scene, arcname=f"naip/{scene.name}")
    return [("naip_2010_2018.tar.gz", naip), ("2015.tif", data / "landsat" / "2015.tif")]


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    f = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "nec_serve.cli", *args], stdout=f, stderr=subprocess.STDOUT
    )


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
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


def run_workflow_demo(export_dir: Path, data: Path, work: Path, timeout_s: float = 900) -> int:
    """Run the workflow demo; returns the exit status."""
    from kafka import KafkaConsumer

    from nec_serve.kafka_io import json_producer
    from nec_serve.serving.local import LocalTritonServer, free_port
    from nec_serve.stack.kafka import LocalKafka
    from nec_serve.stack.s3 import LocalS3

    work.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    t_start = time.perf_counter()
    with (
        LocalKafka() as kafka,
        LocalS3() as s3,
        LocalTritonServer(
            export_dir / "model_repository_local", log_path=work / "tritonserver.log"
        ) as triton,
        tempfile.TemporaryDirectory() as tmp,
    ):
        boot = kafka.bootstrap_servers
        print(
            f"[stack] kafka {boot}, s3 {s3.endpoint_url}, triton grpc://{triton.grpc_url} "
            f"({time.perf_counter() - t_start:.1f} s)"
        )
        store = Path(tmp) / "configs"
        ports = {"nec-compress": free_port(), "nec-decompress": free_port()}
        try:
            for mode, service in (("compress", "nec-compress"), ("decompress", "nec-decompress")):
                args = [
                    "wrapper",
                    "--mode",
                    mode,
                    "--model-dir",
                    str(export_dir),
                    "--bootstrap",
                    boot,
                    "--trigger",
                    "http",
                    "--port",
                    str(ports[service]),
                    "--config-dir",
                    str(store),
                    "--server",
                    f"grpc://{triton.grpc_url}",
                    "--work-dir",
                    tmp,
                ]
                if mode == "compress":
                    args += ["--bands", "1,2,3", "--batch-size", "8"]
                procs.append(_spawn(args, work / f"{service}.log"))
                _wait_http(f"http://127.0.0.1:{ports[service]}", procs[-1], work / f"{service}.log")
            sinks = [f"--sink={s}=http://127.0.0.1:{p}" for s, p in ports.items()]
            procs.append(
                _spawn(
                    ["controller", "--bootstrap", boot, "--config-dir", str(store), *sinks],
                    work / "controller.log",
                )
            )
            print(f"[stack] controller and wrappers up ({time.perf_counter() - t_start:.1f} s)")

            client = s3.client()
            client.create_bucket(Bucket=BUCKET)
            inputs = _inputs(data, Path(tmp))
            for name, path in inputs:
                client.upload_file(str(path), BUCKET, f"input/{name}")
                print(f"[s3] put s3://{BUCKET}/input/{name} ({path.stat().st_size} bytes)")

            _create_topics(
                boot,
                [
                    "system.ML",
                    "monitoring.notify",
                    "nec.deadletter",
                    COMPRESS_IN,
                    DECOMPRESS_IN,
                    DONE,
                ],
            )
            watch = KafkaConsumer(
                "monitoring.notify",
                DONE,
                "nec.deadletter",
                bootstrap_servers=boot,
                auto_offset_reset="earliest",
                consumer_timeout_ms=1000,
            )
            producer = json_producer(boot)
            producer.send(
                "system.ML",
                _workflow_msg("published", "nec-compress", COMPRESS_IN, DECOMPRESS_IN, s3),
            ).get(30)
            producer.send(
                "system.ML", _workflow_msg("published", "nec-decompress", DECOMPRESS_IN, DONE, s3)
            ).get(30)
            time.sleep(1.0)  # the controller starts the sources
            for name, _ in inputs:
                producer.send(
                    COMPRESS_IN,
                    {
                        "previous_component_end": True,
                        "S3_bucket_desc": {"folder": "input", "filename": name},
                        "meta_information": {"source": "nec-serve workflow demo"},
                    },
                ).get(30)
            print(f"[kafka] workflow published and {len(inputs)} step messages sent")

            results = _watch(watch, len(inputs), timeout_s)
            for service in ("nec-compress", "nec-decompress"):
                producer.send(
                    "system.ML",
                    _workflow_msg(
                        "stopping",
                        service,
                        COMPRESS_IN if service == "nec-compress" else DECOMPRESS_IN,
                        "",
                        s3,
                    ),
                ).get(30)
            producer.close()
            watch.close()
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
    _summary(results, time.perf_counter() - t_start, work)
    failed = [r for r in results if r.get("status") == "failed"]
    return 1 if failed or len([r for r in results if r["status"] == "done"]) < len(inputs) else 0


def _create_topics(bootstrap: str, topics: list[str]) -> None:
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


def _watch(consumer, expected: int, timeout_s: float) -> list[dict]:
    finished: dict[str, list[dict]] = {}
    results = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(results) < expected:
        for rec in consumer:
            value = json.loads(rec.value)
            if rec.topic == "monitoring.notify":
                desc = value["description"]
                short = desc if len(desc) < 100 else desc[:97] + "..."
                print(f"[monitoring.notify] {value['component_name']}: {value['status']} {short}")
                if value["status"] == "finished":
                    finished.setdefault(value["component_name"], []).append(json.loads(desc))
                if value["status"] == "failed":
                    results.append({"status": "failed", "reason": desc})
            elif rec.topic == "nec.deadletter":
                print(f"[nec.deadletter] {value.get('error')}")
            else:
                nec = value["meta_information"]["nec"]
                compress = next(
                    (
                        f
                        for f in finished.get("nec-compress", [])
                        if f["output_key"].endswith(nec["input_key"].rsplit("/", 1)[-1])
                    ),
                    {},
                )
                print(f"[{rec.topic}] s3://{BUCKET}/{nec['output_key']}")
                results.append({"status": "done", "compress": compress, "decompress": nec})
            if len(results) >= expected:
                break
    return results


def _summary(results: list[dict], seconds: float, work: Path) -> None:
    print(f"\nworkflow finished in {seconds:.1f} s")
    cols = (
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
    print(" | ".join(cols))
    for r in results:
        if r["status"] != "done":
            print(f"FAILED: {r.get('reason')}")
            continue
        c, d = r["compress"], r["decompress"]
        print(
            " | ".join(
                str(v)
                for v in (
                    c.get("input_key"),
                    c.get("tiles"),
                    c.get("bytes_in"),
                    c.get("bytes_out"),
                    c.get("bits_per_pixel"),
                    c.get("compression_ratio"),
                    c.get("payload_over_entropy_bound_pct"),
                    c.get("embedding_rmse"),
                    c.get("s3_get_s"),
                    c.get("inference_s"),
                    c.get("coding_s"),
                    c.get("s3_put_s"),
                    c.get("kafka_s"),
                    d.get("decode_s"),
                    max(c.get("max_rss_mb", 0), d.get("max_rss_mb", 0)),
                )
            )
        )
    (work / "workflow_summary.json").write_text(json.dumps(results, indent=1))
