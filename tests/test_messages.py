from __future__ import annotations

import json
import os
import stat

import pytest

from nec_serve.config_store import LocalConfigStore, UnknownWorkflow
from nec_serve.messages import (
    MessageError,
    config_name,
    parse_step,
    parse_workflow,
    redacted,
    status_event,
)


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
    assert cfg.source_name == "nec-wf1-nec-in"
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


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_non_object_messages(raw):
    with pytest.raises(MessageError, match="JSON"):
        parse_workflow(raw)


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


def test_status_event_shape():
    ev = status_event("nec-compress", "wf-1", "failed", "object missing")
    assert set(ev) == {"component_name", "workflow_name", "status", "description", "timestamp"}
    assert ev["timestamp"].endswith("+00:00")


def test_config_name_is_kubernetes_safe():
    name = config_name("Workflow_ABC." + "x" * 80)
    assert len(name) <= 63 and name == name.lower() and not name.endswith("-")


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
    assert cm["metadata"]["name"] == secret["metadata"]["name"] == "nec-wf1-nec-in"
