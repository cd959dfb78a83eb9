from __future__ import annotations

import json
import os
import re
import stat
from datetime import UTC, datetime, timedelta, timezone

import pytest

from nec_serve.config_store import LocalConfigStore, UnknownWorkflow
from nec_serve.errors import InvalidInput, ServerUnavailable, TransientError, is_transient
from nec_serve.messages import (
    MAX_JSON_DEPTH,
    MessageError,
    PodIdentity,
    config_name,
    dead_letter_body,
    legacy_config_name,
    parse_json,
    parse_step,
    parse_workflow,
    public_reason,
    redact_text,
    redacted,
    status_event,
)

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def workflow(**over) -> dict:
    msg = {
        "workflow_status": "published",
        "workflow_name": "wf-1",
        "Topics": {"in": "wf1.nec.in", "out": "wf1.nec.out"},
        "ML": {"ServiceName": "nec-compress", "Namespace": "nec", "component_name": "nec-compress"},
        "S3_bucket": {
            "aws_access_key_id": "AKIDEXAMPLE",
            "aws_secret_access_key": "s3cr3t-value",
            "s3-bucket-name": "eo-bucket",
            "region_name": "eu-central-1",
            "endpoint_url": "http://127.0.0.1:9000",
        },
    }
    for path, value in over.items():
        cur = msg
        keys = path.split("__")
        for k in keys[:-1]:
            cur = cur[k]
        if value is None:
            del cur[keys[-1]]
        else:
            cur[keys[-1]] = value
    return msg


def test_published_message_parses_and_hides_credentials():
    cfg = parse_workflow(json.dumps(workflow()).encode())
    assert (cfg.status, cfg.name, cfg.topic_in, cfg.topic_out) == (
        "published",
        "wf-1",
        "wf1.nec.in",
        "wf1.nec.out",
    )
    assert cfg.s3.bucket == "eo-bucket" and cfg.s3.endpoint_url == "http://127.0.0.1:9000"
    assert cfg.source_name == "nec-wf1-nec-in-5ec21aabc22d"
    assert "s3cr3t" not in repr(cfg) and "AKIDEXAMPLE" not in repr(cfg)
    assert "s3cr3t" not in json.dumps(redacted(cfg.raw))


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"workflow_status": "paused"}, "'workflow_status' must be 'published' or 'stopping'"),
        ({"workflow_name": None}, "missing field 'workflow_name'"),
        ({"Topics__in": 7}, "field 'Topics.in' must be str, got int"),
        ({"Topics__out": "bad topic!"}, "'Topics.out' is not a valid Kafka topic"),
        ({"ML__Namespace": "Not_DNS"}, "'ML.Namespace' is not a valid namespace"),
        ({"S3_bucket__s3-bucket-name": "x"}, "not a valid bucket name"),
        ({"S3_bucket__aws_secret_access_key": None}, "missing field 'S3_bucket.aws_secret"),
        ({"S3_bucket__endpoint_url": "ftp://x"}, "must be an http"),
        ({"ML": "nec"}, "field 'ML' must be an object"),
    ],
)
def test_invalid_workflow_messages_name_the_field(over, match):
    with pytest.raises(MessageError, match=match):
        parse_workflow(workflow(**over))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"workflow_status": "publ', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b"\xff\xfe", "not UTF-8 text \\(invalid byte 0xff at offset 0\\)"),
        (b"", "message is empty"),
        (b"  \n", "message is empty"),
        (None, "no value \\(a Kafka tombstone"),
        (12, "must be bytes or text, got int"),
        (b"[" * 100_000 + b"]" * 100_000, "nests 100000 levels deep, over the limit of 32"),
        ("{" * 100_000, "nests 100000 levels deep"),
        (b'{"a": ' * 33 + b"1" + b"}" * 33, "nests 33 levels deep"),
        (b'{"pad": "' + b"x" * (1 << 20) + b'"}', "over the limit of 1048576 bytes"),
    ],
)
def test_unparseable_messages_are_refused_before_parsing(raw, match):
    with pytest.raises(MessageError, match=match):
        parse_workflow(raw)


def test_depth_counts_brackets_outside_strings_only():
    nested = {"a": "[[[[{{{{" * 100}
    for _ in range(MAX_JSON_DEPTH - 1):
        nested = {"n": nested}
    assert parse_json(json.dumps(nested))["n"]
    assert parse_json(b'{"s": "\\"[[[["}') == {"s": '"[[[['}


def test_size_limit_is_a_parameter():
    with pytest.raises(MessageError, match="over the limit of 10 bytes"):
        parse_step(b'{"previous_component_end": true}', max_bytes=10)


def test_stopping_needs_only_the_topic():
    cfg = parse_workflow(
        {"workflow_status": "stopping", "workflow_name": "wf-1", "Topics": {"in": "wf1.nec.in"}}
    )
    assert cfg.status == "stopping" and cfg.s3 is None


def test_step_messages():
    step = parse_step(
        {
            "previous_component_end": "True",
            "S3_bucket_desc": {"folder": "in/2024/", "filename": "tiles.tar.gz"},
            "meta_information": {"k": 1},
        }
    )
    assert step.previous_component_end and step.key == "in/2024/tiles.tar.gz"
    assert parse_step(step.to_dict()) == step
    for bad, match in (
        ({"previous_component_end": "maybe"}, "must be a boolean"),
        ({"S3_bucket_desc": {"folder": "../etc", "filename": "x"}}, "unsafe path"),
        ({"S3_bucket_desc": {"folder": "a", "filename": "b/c"}}, "not a file name"),
        ({"S3_bucket_desc": {"filename": "x"}}, "missing field 'S3_bucket_desc.folder'"),
    ):
        msg = {"previous_component_end": True, "S3_bucket_desc": {"folder": "f", "filename": "x"}}
        msg.update(bad)
        with pytest.raises(MessageError, match=match):
            parse_step(msg)


# EO4EU's status events (ml-uc5 build/KafkaHandler.py): component_name, workflow_name, status
# (START, INFO, DEBUG, CRITICAL, SUCCESS), description cut at 300 characters, an ISO-8601 UTC
# timestamp as datetime.isoformat() writes it, optional.namespace / optional.pod, and
# "overwrite": true only on a progress line that replaces the previous one.
EO4EU_KEYS = ["component_name", "workflow_name", "status", "description", "timestamp", "optional"]
WHEN = datetime(2025, 3, 4, 5, 6, 7, 89_000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("event", "status"),
    [("started", "START"), ("progress", "INFO"), ("finished", "SUCCESS"), ("failed", "CRITICAL")],
)
def test_status_event_has_eo4eus_exact_shape(event, status):
    origin = PodIdentity(namespace="eo4eu-ml", pod="nec-compress-00001-abc")
    ev = status_event(
        "nec-compress", "wf-1", event, "object missing", origin=origin, now=WHEN,
        nec={"message_id": "ab" * 16},
    )  # fmt: skip
    overwrite = ["overwrite"] if event == "progress" else []
    assert list(ev) == [*EO4EU_KEYS, *overwrite, "nec"]
    assert ev["component_name"] == "nec-compress" and ev["workflow_name"] == "wf-1"
    assert ev["status"] == status and ev["description"] == "object missing"
    assert ev["timestamp"] == "2025-03-04T05:06:07.089000+00:00"
    assert ev["optional"] == {"namespace": "eo4eu-ml", "pod": "nec-compress-00001-abc"}
    if overwrite:
        assert ev["overwrite"] is True
    assert ev["nec"] == {"event": event, "message_id": "ab" * 16}
    json.dumps(ev)  # what the producer serialises


def test_status_event_cuts_the_description_and_writes_utc():
    ev = status_event("c", "w", "failed", "x" * 299 + "yz" + "tail" * 100)
    assert ev["description"] == "x" * 299 + "y" and len(ev["description"]) == 300
    stamp = datetime.fromisoformat(ev["timestamp"])
    assert stamp.utcoffset() == timedelta(0) and ev["timestamp"].endswith("+00:00")
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60
    local = datetime(2025, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert status_event("c", "w", "started", "d", now=local)["timestamp"] == (
        "2025-01-01T10:00:00+00:00"
    )
    assert ev["optional"] == {"namespace": "", "pod": "Unknown"}  # outside a pod
    assert "overwrite" not in ev
    with pytest.raises(ValueError, match="unknown status event 'done'"):
        status_event("c", "w", "done", "d")


def test_pod_identity_reads_the_service_account_mount_and_hostname(tmp_path):
    ns = tmp_path / "namespace"
    ns.write_text("eo4eu-ml\n")
    got = PodIdentity.from_environment({"HOSTNAME": "pod-1"}, namespace_file=ns)
    assert got == PodIdentity("eo4eu-ml", "pod-1")
    missing = PodIdentity.from_environment({}, namespace_file=tmp_path / "absent")
    assert missing == PodIdentity("", "Unknown")


LONG = "eo4eu.workflow." + "x" * 60


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("wf1.nec.in", "WF1.nec.in"),  # case
        ("wf1.nec.in", "wf1-nec-in"),  # separators
        ("wf1.nec.in", "wf1_nec_in"),
        ("wf1..in", "wf1.in"),  # runs of separators
        (LONG + "-a", LONG + "-b"),  # after the first 60 characters
        ("a" * 249, "a" * 248 + "b"),  # the longest topics Kafka allows
        ("---", "___"),  # nothing readable at all
    ],
)
def test_config_names_are_distinct_and_kubernetes_safe(a, b):
    assert legacy_config_name(a) == legacy_config_name(b)  # what earlier releases merged
    names = config_name(a), config_name(b)
    assert names[0] != names[1]
    for name in names:
        assert len(name) <= 63 and DNS_1123_LABEL.match(name), name
    assert config_name(a) == names[0]  # deterministic


def test_config_names_are_stable_across_releases():
    # Objects in running clusters carry these names: a change here orphans them.
    assert config_name("wf1.nec.in") == "nec-wf1-nec-in-5ec21aabc22d"
    assert config_name("Workflow_ABC." + "x" * 80) == (
        "nec-workflow-abc-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-086af97343db"
    )
    assert config_name("---") == "nec-cb3f91d54eee"


def test_config_names_of_many_topics_do_not_collide():
    topics = [f"{p}{i}{s}" for i in range(2000) for p in ("wf", "WF") for s in (".in", "-in")]
    assert len({config_name(t) for t in topics}) == len(topics)


SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYSECRETKEY"


@pytest.mark.parametrize(
    "raw",
    [
        # cut inside the secret value, after it, inside the key's neighbourhood
        json.dumps(workflow(S3_bucket__aws_secret_access_key=SECRET))[:-120],
        json.dumps(workflow(S3_bucket__aws_secret_access_key=SECRET))[:-1],
        '{"S3_bucket": {"aws_secret_access_key": "' + SECRET[:20],
        '{"S3_bucket": {"aws_secret_access_key" :\n "' + SECRET + '"',
        "aws_secret_access_key=" + SECRET + "&x=1",
        "{'Password': '" + SECRET + "', ",
        '{"api_token": "' + SECRET + '\\" still the value", "next": ',
    ],
)
def test_dead_letter_body_of_unparseable_text_holds_no_credential(raw):
    body = dead_letter_body(raw.encode())
    assert SECRET[:12] not in json.dumps(body), body
    assert body["message_bytes"] == len(raw.encode()) and len(body["message_sha256"]) == 64


def test_dead_letter_body_keeps_no_fragment_of_a_secret_under_an_innocent_key():
    # A credential under a key no pattern knows, the message cut at every position
    # inside it: no 4-character piece of it may survive.
    msg = json.dumps({"note": SECRET, "S3_bucket_desc": {"folder": "in"}})
    start = msg.index(SECRET)
    pieces = {SECRET[i : i + 4] for i in range(len(SECRET) - 3)}
    for cut in range(start, start + len(SECRET) + 1):
        body = dead_letter_body(msg[:cut].encode())
        text = json.dumps(body)
        assert not [p for p in pieces if p in text], (cut, body)
        assert set(body) == {"message_sha256", "message_bytes", "message_error"}
        assert body["message_error"].startswith("message is not valid JSON")


def test_dead_letter_body_of_json_redacts_by_key_pattern_and_known_values():
    msg = workflow()
    msg["meta_information"] = {"Token": SECRET, "note": "key is " + SECRET, "tokens_per_tile": 3}
    body = dead_letter_body(json.dumps(msg).encode(), secrets=(SECRET,))
    text = json.dumps(body)
    assert SECRET not in text and "s3cr3t-value" not in text and "AKIDEXAMPLE" not in text
    assert body["message"]["workflow_name"] == "wf-1"  # the rest is kept for diagnosis
    assert body["message"]["S3_bucket"]["s3-bucket-name"] == "eo-bucket"


def test_dead_letter_body_of_odd_values():
    raw = '{"aws_secret_\\u0061ccess_key": "' + SECRET  # a key spelt with an escape
    body = dead_letter_body(raw.encode())
    assert SECRET[:4] not in json.dumps(body) and "message_preview" not in body
    assert dead_letter_body(None) == {"message": None}
    assert dead_letter_body(12) == {"message_type": "int"}
    assert dead_letter_body(b"\xff" + SECRET.encode())["message_bytes"] == len(SECRET) + 1


def test_redact_text_keeps_what_is_not_a_credential():
    text = '{"workflow_name": "wf-1", "secret_key": "abc", "region_name": "eu"}'
    assert (
        redact_text(text) == '{"workflow_name": "wf-1", "secret_key": "***", "region_name": "eu"}'
    )


def test_public_reason_names_no_local_path_or_credential():
    err = OSError("cannot open /tmp/nec-step-1a2b/in/x.tif (token=abc) for s3://b/in/x.tif")
    reason = public_reason(err)
    assert "/tmp" not in reason and "abc" not in reason and "s3://b/in/x.tif" in reason
    assert reason.startswith("internal error (OSError)")
    assert public_reason(InvalidInput("s3://b/k: is empty")) == "s3://b/k: is empty"


def test_transient_errors_are_told_apart():
    class ApiError(Exception):
        def __init__(self, status):
            self.status = status

    for err in (TransientError("x"), ServerUnavailable("x"), ConnectionError(), ApiError(503)):
        assert is_transient(err), err
    for status in (0, 409, 429, 500):
        assert is_transient(ApiError(status))
    for err in (InvalidInput("x"), ValueError(), KeyError("k"), ApiError(404), ApiError(422)):
        assert not is_transient(err), err


def test_local_store_keeps_credentials_apart_and_is_idempotent(tmp_path):
    store = LocalConfigStore(tmp_path)
    cfg = parse_workflow(workflow())
    assert store.put(cfg) is True
    assert store.put(cfg) is False  # same message again: nothing changes
    public = (tmp_path / f"{cfg.source_name}.json").read_text()
    secret = tmp_path / f"{cfg.source_name}.secret.json"
    assert "s3cr3t" not in public and "AKIDEXAMPLE" not in public
    assert "s3cr3t" in secret.read_text()
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert store.get(cfg.source_name) == cfg
    assert store.names() == [cfg.source_name]
    assert store.delete(cfg.source_name) is True and store.delete(cfg.source_name) is False
    with pytest.raises(UnknownWorkflow, match="is the workflow published"):
        store.get(cfg.source_name)
    with pytest.raises(UnknownWorkflow, match="invalid workflow config name"):
        store.get("../etc/passwd")


def test_kubernetes_objects_put_credentials_only_in_the_secret():
    from nec_serve.config_store import KubernetesConfigStore

    cm, secret = KubernetesConfigStore.objects(parse_workflow(workflow()), "nec")
    assert "s3cr3t" not in json.dumps(cm)
    assert secret["stringData"] == {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
    }
    assert cm["metadata"]["name"] == secret["metadata"]["name"] == "nec-wf1-nec-in-5ec21aabc22d"
