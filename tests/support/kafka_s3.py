"""A workflow on the real local Kafka broker and S3 server, and what its tests share."""

from __future__ import annotations

import io
import json
import tarfile
import time
import uuid

import numpy as np

from nec_serve.config_store import LocalConfigStore
from nec_serve.imagery import read_raster
from nec_serve.messages import config_name, parse_workflow

NAIP = "naip/m_4709963_se_14_1_20180716.tif"


def uid() -> str:
    return uuid.uuid4().hex[:8]


class Flow:
    """One workflow's topics, bucket and stored config."""

    def __init__(self, kafka, s3, tmp_path, component="nec-compress"):
        u = uid()
        self.topic_in, self.topic_out = f"wf{u}.in", f"wf{u}.out"
        self.status, self.dlq = f"status{u}", f"dlq{u}"
        self.bucket = f"bucket-{u}"
        self.kafka, self.s3 = kafka, s3
        s3.client().create_bucket(Bucket=self.bucket)
        self.msg = {
            "workflow_status": "published",
            "workflow_name": f"wf-{u}",
            "Topics": {"in": self.topic_in, "out": self.topic_out},
            "ML": {"ServiceName": component, "Namespace": "nec", "component_name": component},
            "S3_bucket": {
                "aws_access_key_id": s3.access_key,
                "aws_secret_access_key": s3.secret_key,
                "s3-bucket-name": self.bucket,
                "region_name": s3.region,
                "endpoint_url": s3.endpoint_url,
            },
        }
        self.store = LocalConfigStore(tmp_path / f"store-{u}")
        self.config = parse_workflow(self.msg)
        self.store.put(self.config)
        self.name = config_name(self.topic_in)

    def put(self, key: str, data: bytes) -> None:
        self.s3.client().put_object(Bucket=self.bucket, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return self.s3.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def step(self, filename: str, folder: str = "input") -> bytes:
        return json.dumps(
            {
                "previous_component_end": True,
                "S3_bucket_desc": {"folder": folder, "filename": filename},
                "meta_information": {"run": "test"},
            }
        ).encode()

    def read(self, topic: str, expect: int, timeout: float = 15.0) -> list[dict]:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=self.kafka.bootstrap_servers,
            auto_offset_reset="earliest",
            consumer_timeout_ms=500,
            metadata_max_age_ms=1000,
        )
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline and len(out) < expect:
            out.extend(json.loads(r.value) for r in consumer)
        # A short grace period catches messages beyond the expected count (duplicates).
        out.extend(json.loads(r.value) for r in consumer)
        consumer.close()
        return out


def make_handler(flow, tiny_export, producer, mode="compress", **kw):
    from nec_wrapper.step import StepHandler, WrapperSettings

    engine = kw.pop("engine", None)
    settings = WrapperSettings(
        mode=mode,
        model_dir=tiny_export,
        bootstrap_servers=flow.kafka.bootstrap_servers,
        status_topic=flow.status,
        dead_letter_topic=flow.dlq,
        backoff_s=0.1,
        bands=kw.pop("bands", (1, 2, 3)) if mode == "compress" else None,
        **kw,
    )
    return StepHandler(settings, flow.store, producer, engine=engine)


def naip_tar(data_dir, n=2) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for i in range(n):
            arr = read_raster(data_dir / NAIP, [1, 2, 3])[:, 64 * i : 64 * i + 64, :96]
            payload = io.BytesIO()
            np.save(payload, arr)
            info = tarfile.TarInfo(f"tiles/t{i}.npy")
            info.size = payload.getbuffer().nbytes
            payload.seek(0)
            tf.addfile(info, payload)
    return buf.getvalue()


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
