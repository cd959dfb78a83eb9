"""Workflow messages (EO4EU-compatible), validated field by field.

Three shapes cross Kafka (DESIGN section 5):

- the platform's workflow message on ``system.ML``, read by the controller;
- the step message on a workflow's topics, read and written by the wrapper;
- the status event on ``monitoring.notify``.

Parsing never trusts a field: each check names the field and what was wrong, and the
error carries it into the ``failed`` status and the dead-letter record. Credentials live
only in :class:`S3Credentials`, whose ``repr`` hides the secret, and
:func:`redacted` strips them from anything that is logged or stored outside a Secret.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nec_serve.errors import InvalidInput

__all__ = [
    "MessageError",
    "S3Credentials",
    "WorkflowConfig",
    "StepMessage",
    "parse_json",
    "parse_workflow",
    "parse_step",
    "status_event",
    "redacted",
    "config_name",
]

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_DNS = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SECRET_FIELDS = ("aws_access_key_id", "aws_secret_access_key")


class MessageError(InvalidInput):
    """A message that cannot be acted on; the text names the field and the problem."""


def parse_json(raw: bytes | str | dict) -> dict:
    """Decode a JSON object; anything else is a :class:`MessageError`."""
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise MessageError(f"message is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise MessageError(f"message must be a JSON object, got {type(value).__name__}")
    return value


def _get(obj: dict, path: str, kind: type | tuple, *, required: bool = True) -> Any:
    cur: Any = obj
    parts = path.split(".")
    for i, key in enumerate(parts):
        if not isinstance(cur, dict):
            raise MessageError(f"field {'.'.join(parts[:i])!r} must be an object")
        if key not in cur:
            if required:
                raise MessageError(f"missing field {path!r}")
            return None
        cur = cur[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; accept it only where a boolean is asked for.
    if not isinstance(cur, kinds) or (isinstance(cur, bool) and bool not in kinds):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise MessageError(f"field {path!r} must be {names}, got {type(cur).__name__}")
    return cur


def _check(value: str, pattern: re.Pattern, path: str, what: str) -> str:
    if not pattern.match(value):
        raise MessageError(f"field {path!r} is not a valid {what}: {value!r}")
    return value


@dataclass(frozen=True)
class S3Credentials:
    """Where a workflow's objects live and how to reach them."""

    bucket: str
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    region: str = "us-east-1"
    endpoint_url: str | None = None


@dataclass(frozen=True)
class WorkflowConfig:
    """A workflow as the platform published it, validated."""

    status: str
    name: str
    topic_in: str
    topic_out: str | None
    service_name: str | None
    namespace: str | None
    component: str
    s3: S3Credentials | None
    raw: dict = field(repr=False, compare=False)

    @property
    def source_name(self) -> str:
        """Name of the KafkaSource / local subscription feeding the wrapper."""
        return config_name(self.topic_in)


def config_name(topic: str) -> str:
    """Kubernetes-safe name derived from a topic (lowercase, <= 63 chars)."""
    name = re.sub(r"[^a-z0-9-]+", "-", topic.lower()).strip("-")
    return ("nec-" + name)[:63].rstrip("-")


def parse_workflow(raw: bytes | str | dict) -> WorkflowConfig:
    """Validate a ``system.ML`` message (``published`` or ``stopping``)."""
    msg = parse_json(raw)
    status = _get(msg, "workflow_status", str)
    if status not in ("published", "stopping"):
        raise MessageError(
            f"field 'workflow_status' must be 'published' or 'stopping', got {status!r}"
        )
    name = _get(msg, "workflow_name", str)
    if not name.strip():
        raise MessageError("field 'workflow_name' is empty")
    topic_in = _check(_get(msg, "Topics.in", str), _TOPIC, "Topics.in", "Kafka topic")
    if status == "stopping":
        ns = _get(msg, "ML.Namespace", str, required=False)
        return WorkflowConfig(status, name, topic_in, None, None, ns, "", None, msg)
    topic_out = _check(_get(msg, "Topics.out", str), _TOPIC, "Topics.out", "Kafka topic")
    service = _check(
        _get(msg, "ML.ServiceName", str).lower(), _DNS, "ML.ServiceName", "service name"
    )
    namespace = _check(_get(msg, "ML.Namespace", str), _DNS, "ML.Namespace", "namespace")
    component = _get(msg, "ML.component_name", str, required=False) or service
    bucket = _check(
        _get(msg, "S3_bucket.s3-bucket-name", str),
        _BUCKET,
        "S3_bucket.s3-bucket-name",
        "bucket name",
    )
    endpoint = _get(msg, "S3_bucket.endpoint_url", str, required=False)
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise MessageError(f"field 'S3_bucket.endpoint_url' must be an http(s) URL: {endpoint!r}")
    s3 = S3Credentials(
        bucket=bucket,
        access_key_id=_get(msg, "S3_bucket.aws_access_key_id", str),
        secret_access_key=_get(msg, "S3_bucket.aws_secret_access_key", str),
        region=_get(msg, "S3_bucket.region_name", str, required=False) or "us-east-1",
        endpoint_url=endpoint,
    )
    return WorkflowConfig(status, name, topic_in, topic_out, service, namespace, component, s3, msg)


@dataclass(frozen=True)
class StepMessage:
    """A wrapper's input (or output) on a workflow topic."""

    previous_component_end: bool
    folder: str
    filename: str | None
    meta: dict

    @property
    def key(self) -> str:
        """S3 key of the input object."""
        parts = [p for p in (self.folder.strip("/"), self.filename or "") if p]
        return "/".join(parts)

    def to_dict(self) -> dict:
        """The wire form."""
        desc = {"folder": self.folder}
        if self.filename is not None:
            desc["filename"] = self.filename
        return {
            "previous_component_end": self.previous_component_end,
            "S3_bucket_desc": desc,
            "meta_information": self.meta,
        }


def parse_step(raw: bytes | str | dict) -> StepMessage:
    """Validate a workflow-topic message; unsafe S3 paths are refused."""
    msg = parse_json(raw)
    end = _get(msg, "previous_component_end", (bool, str))
    if isinstance(end, str):
        if end not in ("True", "False", "true", "false"):
            raise MessageError(f"field 'previous_component_end' must be a boolean, got {end!r}")
        end = end.lower() == "true"
    folder = _get(msg, "S3_bucket_desc.folder", str)
    filename = _get(msg, "S3_bucket_desc.filename", str, required=False)
    for path, value in (("S3_bucket_desc.folder", folder), ("S3_bucket_desc.filename", filename)):
        if value and (".." in value.split("/") or "\\" in value or "\x00" in value):
            raise MessageError(f"field {path!r} holds an unsafe path: {value!r}")
    if filename is not None and (not filename or "/" in filename):
        raise MessageError(f"field 'S3_bucket_desc.filename' is not a file name: {filename!r}")
    meta = _get(msg, "meta_information", dict, required=False) or {}
    return StepMessage(end, folder, filename, meta)


def status_event(component: str, workflow: str, status: str, description: str) -> dict:
    """A ``monitoring.notify`` event (started / finished / failed)."""
    return {
        "component_name": component,
        "workflow_name": workflow,
        "status": status,
        "description": description,
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }


def redacted(obj: Any) -> Any:
    """A copy of ``obj`` with credential fields replaced, for logs and ConfigMaps."""
    if isinstance(obj, dict):
        return {k: ("***" if k in SECRET_FIELDS else redacted(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redacted(v) for v in obj]
    return obj
