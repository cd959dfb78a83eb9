"""The local stack's real servers: an Apache Kafka broker (KRaft) and moto's S3 server.

Each server starts once per module. The Kafka jars are fetched from Maven Central on the first
run of a fresh checkout (scripts/fetch_kafka.sh, about 40 s); later runs find them cached.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid

import pytest

from nec_dev.stack.kafka import KafkaStartError, LocalKafka, ensure_kafka
from nec_dev.stack.s3 import LocalS3

MiB = 1024 * 1024

# kafka-python 3.0 loads its protocol schemas with importlib.resources' legacy API.
pytestmark = [
    pytest.mark.filterwarnings("ignore:read_text is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:open_text is deprecated:DeprecationWarning"),
]


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_jars():
    return ensure_kafka()


@pytest.fixture(scope="module")
def kafka(kafka_jars):
    broker = LocalKafka()
    try:
        broker.start(timeout=120)
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="module")
def s3():
    with LocalS3() as server:
        yield server


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _producer(kafka: LocalKafka):
    from kafka import KafkaProducer

    return KafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers,
        acks="all",
        request_timeout_ms=10_000,
        bootstrap_timeout_ms=30_000,
    )


def _consumer(kafka: LocalKafka, topic: str, group: str):
    from kafka import KafkaConsumer

    return KafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        request_timeout_ms=15_000,
        bootstrap_timeout_ms=30_000,
    )


def _poll(consumer, count: int, timeout: float = 30.0) -> list:
    """Records from ``consumer`` until ``count`` arrived (or fail after ``timeout`` s)."""
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500, max_records=count - len(records)).values():
            records.extend(batch)
    assert len(records) == count, f"got {len(records)} of {count} records in {timeout} s"
    return records


def _produce(kafka: LocalKafka, topic: str, values: list[bytes]) -> None:
    producer = _producer(kafka)
    try:
        for i, value in enumerate(values):
            producer.send(topic, key=str(i).encode(), value=value).get(timeout=30)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)


# ---- Kafka -----------------------------------------------------------------------------------


def test_kafka_jars_are_cached(kafka_jars):
    pins = (kafka_jars / "PINS").read_text().splitlines()
    assert pins[0].startswith("kafka=4.")
    jars = {p.name for p in kafka_jars.glob("*.jar")}
    assert set(pins[1:]) == jars
    assert any(j.startswith("log4j-slf4j-impl-") for j in jars)
    # A second call finds the cache complete and returns at once.
    t0 = time.monotonic()
    assert ensure_kafka() == kafka_jars
    assert time.monotonic() - t0 < 5


def test_kafka_create_produce_consume(kafka):
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    topic = _name("created")
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers, request_timeout_ms=15_000)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
        assert topic in admin.list_topics()
        cluster = admin.describe_cluster()
        assert cluster["cluster_id"] == kafka.cluster_id
        assert [b["port"] for b in cluster["brokers"]] == [kafka.port]
    finally:
        admin.close()

    values = [f"message {i}".encode() for i in range(20)]
    _produce(kafka, topic, values)
    consumer = _consumer(kafka, topic, _name("group"))
    try:
        records = _poll(consumer, len(values))
    finally:
        consumer.close()
    assert sorted(r.value for r in records) == sorted(values)
    assert {r.partition for r in records} <= {0, 1}
    for part in (0, 1):  # order holds within a partition
        offsets = [r.offset for r in records if r.partition == part]
        assert offsets == sorted(offsets)


def test_kafka_auto_creates_topics(kafka):
    topic = _name("auto")
    _produce(kafka, topic, [b"first"])
    consumer = _consumer(kafka, topic, _name("group"))
    try:
        assert [r.value for r in _poll(consumer, 1)] == [b"first"]
    finally:
        consumer.close()


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_kafka_committed_offset_survives_restart(kafka, kill):
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    topic, group = _name("restart"), _name("group")
    values = [f"job {i}".encode() for i in range(10)]
    _produce(kafka, topic, values)

    consumer = _consumer(kafka, topic, group)
    try:
        first = _poll(consumer, 4)
        assert [r.value for r in first] == values[:4]
        tp = TopicPartition(topic, 0)
        consumer.commit({tp: OffsetAndMetadata(first[-1].offset + 1, "", -1)})
        assert consumer.committed(tp) == 4
    finally:
        consumer.close()

    pid, port, cluster_id = kafka.pid, kafka.port, kafka.cluster_id
    kafka.restart(timeout=120, kill=kill)
    assert kafka.pid != pid and kafka.port == port and kafka.cluster_id == cluster_id

    consumer = _consumer(kafka, topic, group)
    try:
        rest = _poll(consumer, 6, timeout=60)
        assert [r.value for r in rest] == values[4:]
        assert rest[0].offset == 4
        assert consumer.poll(timeout_ms=500) == {}
    finally:
        consumer.close()


def test_kafka_start_failure_names_the_cause(kafka_jars):
    broker = LocalKafka(config={"num.io.threads": "not-a-number"})
    try:
        with pytest.raises(KafkaStartError, match="num.io.threads"):
            broker.start(timeout=60)
        assert broker.poll() is None and broker.pid is None
    finally:
        broker.close()
    assert not broker.work.exists()


# ---- S3 --------------------------------------------------------------------------------------


def test_s3_multipart_round_trip(s3):
    from boto3.s3.transfer import TransferConfig

    c = s3.client()
    bucket = _name("bucket")
    c.create_bucket(Bucket=bucket)
    body = os.urandom(5 * MiB) + os.urandom(MiB + 12345)  # two parts: 5 MiB and the rest

    # The multipart API step by step, as the wrapper writes large outputs.
    key = "result-compress/scene.necb"
    upload = c.create_multipart_upload(Bucket=bucket, Key=key)
    parts = []
    for number, start in enumerate(range(0, len(body), 5 * MiB), start=1):
        part = c.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=body[start : start + 5 * MiB],
        )
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
    assert len(parts) == 2
    done = c.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    assert done["ETag"].strip('"').endswith("-2")  # S3's multipart ETag: md5-of-md5s, "-N"

    got = c.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
    assert c.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(body)
    ranged = c.get_object(Bucket=bucket, Key=key, Range="bytes=5242870-5242889")["Body"].read()
    assert ranged == body[5242870:5242890]

    # boto3's managed transfer (what upload_fileobj / download_fileobj do) over the same server.
    import io

    cfg = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    c.upload_fileobj(io.BytesIO(body), bucket, "managed.bin", Config=cfg)
    out = io.BytesIO()
    c.download_fileobj(bucket, "managed.bin", out, Config=cfg)
    assert out.getvalue() == body


def test_s3_rejects_small_parts(s3):
    from botocore.exceptions import ClientError

    c = s3.client()
    bucket = _name("bucket")
    c.create_bucket(Bucket=bucket)
    upload = c.create_multipart_upload(Bucket=bucket, Key="small")
    parts = []
    for number in (1, 2):
        part = c.upload_part(
            Bucket=bucket,
            Key="small",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=b"x" * 1024,
        )
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
    with pytest.raises(ClientError) as err:
        c.complete_multipart_upload(
            Bucket=bucket,
            Key="small",
            UploadId=upload["UploadId"],
            MultipartUpload={"Parts": parts},
        )
    assert err.value.response["Error"]["Code"] == "EntityTooSmall"


def test_s3_missing_object_and_bucket(s3):
    from botocore.exceptions import ClientError

    c = s3.client()
    bucket = _name("bucket")
    c.create_bucket(Bucket=bucket)
    with pytest.raises(ClientError) as err:
        c.get_object(Bucket=bucket, Key="no/such/key.tar.gz")
    assert err.value.response["Error"]["Code"] == "NoSuchKey"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as err:
        c.head_object(Bucket=bucket, Key="no/such/key.tar.gz")
    assert err.value.response["Error"]["Code"] == "404"
    with pytest.raises(ClientError) as err:
        c.get_object(Bucket=_name("nobucket"), Key="k")
    assert err.value.response["Error"]["Code"] == "NoSuchBucket"


def test_s3_restart_loses_state(s3):
    from botocore.exceptions import ClientError

    bucket = _name("bucket")
    s3.client().create_bucket(Bucket=bucket)
    port = s3.port
    s3.restart(kill=True)
    assert s3.port == port
    with pytest.raises(ClientError) as err:
        s3.client().head_bucket(Bucket=bucket)
    assert err.value.response["Error"]["Code"] == "404"


def test_s3_unreachable_fails_fast():
    from botocore.exceptions import EndpointConnectionError

    server = LocalS3()  # never started: nothing listens on its port
    try:
        c = server.client(connect_timeout=1, read_timeout=1, max_attempts=2)
        t0 = time.monotonic()
        with pytest.raises(EndpointConnectionError):
            c.list_buckets()
        assert time.monotonic() - t0 < 10
    finally:
        server.close()
