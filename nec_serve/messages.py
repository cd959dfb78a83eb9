"""Workflow messages (EO4EU-compatible), validated field by field.

Three shapes cross Kafka (DESIGN section 5):

- the platform's workflow message on ``system.ML``, read by the controller;
- the step message on a workflow's topics, read and written by the wrapper;
- the status event on ``monitoring.notify``, in EO4EU's vocabulary (``START``, ``INFO``,
  ``SUCCESS``, ``CRITICAL``; :func:`status_event`).

Parsing never trusts a field: each check names the field and what was wrong, and the
error carries it into the ``failed`` status and the dead-letter record. Credentials live
only in :class:`S3Credentials`, whose ``repr`` hides the secret, and
:func:`redacted` strips them from anything that is logged or stored outside a Secret.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from nec_serve.errors import InvalidInput, NecError

__all__ = [
    "MessageError",
    "S3Credentials",
    "WorkflowConfig",
    "StepMessage",
    "parse_json",
    "parse_workflow",
    "parse_step",
    "parse_step_request",
    "RateKnob",
    "StepRequest",
    "STATUS_TOPIC",
    "DEAD_LETTER_TOPIC",
    "status_event",
    "STATUS_OF_EVENT",
    "STATUS_KEY",
    "MAX_DESCRIPTION_CHARS",
    "PodIdentity",
    "redacted",
    "redact_text",
    "scrub_values",
    "dead_letter_body",
    "public_reason",
    "config_name",
    "legacy_config_name",
    "MAX_MESSAGE_BYTES",
    "MAX_JSON_DEPTH",
]

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_DNS = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SECRET_FIELDS = ("aws_access_key_id", "aws_secret_access_key")
#: The Kafka key of every status event, as EO4EU's wrappers send it.
STATUS_KEY = "key"
#: Largest message any consumer parses (Kafka's default record limit is 1 MiB too).
MAX_MESSAGE_BYTES = 1 << 20
#: Deepest nesting of objects and arrays accepted; the platform's messages nest 3 levels.
MAX_JSON_DEPTH = 32
# Keys whose values are credentials, wherever they appear (parsed or in raw text).
_SECRET_KEY = re.compile(
    r"secret|passw(?:or)?d|token|credential|private[_-]?key|access[_-]?key|api[_-]?key|"
    r"session[_-]?key|authori[sz]ation|signature",
    re.IGNORECASE,
)
# A key (quoted or bare) that looks like a credential, then its value up to the end of the
# string, or to the end of the text when the message was cut inside it.
_RAW_SECRET = re.compile(
    r"""(?P<key>["']?[A-Za-z0-9_.-]*(?:"""
    + _SECRET_KEY.pattern
    + r""")[A-Za-z0-9_.-]*["']?\s*[:=]\s*)(?P<value>"(?:[^"\\]|\\.)*"?|'[^']*'?|[^\s,;&}\]]*)""",
    re.IGNORECASE,
)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
# An absolute local path (not the path part of a URL such as s3://bucket/key).
_LOCAL_PATH = re.compile(r"(?<![\w:/.~-])/(?:[\w.@+-]+/)+[\w.@+-]*")


#: The topic of the steps' and the controller's status events.
STATUS_TOPIC = "monitoring.notify"
#: The topic that messages which cannot be processed are dead-lettered to.
DEAD_LETTER_TOPIC = "nec.deadletter"


class MessageError(InvalidInput):
    """A message that cannot be acted on; the text names the field and the problem."""

    failure = "invalid_message"


def _text(raw: bytes | str | None, max_bytes: int) -> str:
    """The message as text, refusing what no parser should see: null, too big, not UTF-8."""
    if raw is None:
        raise MessageError("message has no value (a Kafka tombstone or an empty record)")
    if isinstance(raw, str):
        size = len(raw.encode("utf-8", errors="surrogatepass"))
    elif isinstance(raw, (bytes, bytearray, memoryview)):
        size = len(raw)
    else:
        raise MessageError(f"message must be bytes or text, got {type(raw).__name__}")
    if size > max_bytes:
        raise MessageError(f"message is {size} bytes, over the limit of {max_bytes} bytes")
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise MessageError(
                f"message is not UTF-8 text (invalid byte 0x{bytes(raw)[err.start]:02x} at "
                f"offset {err.start})"
            ) from None
    if not text.strip():
        raise MessageError("message is empty")
    return text


def json_depth(text: str) -> int:
    """Deepest nesting of ``[`` and ``{`` in ``text``, outside strings; no recursion."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    steps = (1 if c in "[{" else -1 for c in brackets)
    return max(itertools.accumulate(steps), default=0)


def parse_json(
    raw: bytes | str | dict | None,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> dict:
    """Decode a JSON object; anything else is a :class:`MessageError` naming the problem.

    Null values (Kafka tombstones), records over ``max_bytes``, bytes that are not UTF-8 and
    documents nested deeper than ``max_depth`` are refused before the JSON parser runs, so
    no record can exhaust the stack or the memory of a consumer.
    """
    if isinstance(raw, dict):
        return raw
    text = _text(raw, max_bytes)
    depth = json_depth(text)
    if depth > max_depth:
        raise MessageError(
            f"message nests {depth} levels deep, over the limit of {max_depth} levels"
        )
    try:
        value = json.loads(text)
    except RecursionError:  # WAR: unreachable after the depth check; kept as a backstop
        raise MessageError("message nests too deeply to parse") from None
    except ValueError as err:
        raise MessageError(f"message is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise MessageError(f"message must be a JSON object, got {type(value).__name__}")
    # Only a \u escape can spell an unpaired surrogate in text that came as UTF-8 bytes.
    if "\\u" in text or isinstance(raw, str):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise MessageError(
                "message holds a \\u escape of an unpaired surrogate: not valid Unicode text"
            ) from None
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
    """The workflow's name for its config, Secret and KafkaSource, derived from its topic.

    ``nec-<readable part>-<12 hex digits of SHA-256(topic)>``: a DNS-1123 label of at most
    63 characters. The readable part (lowercase, runs of other characters as ``-``, cut
    to 46 characters) is for people; the digest of the full topic keeps names of
    different topics apart, whatever they differ in (case, ``.`` vs ``-``, characters past
    the cut). The scheme is part of the deployment contract: changing it orphans objects.
    """
    digest = hashlib.sha256(topic.encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", topic.lower()).strip("-")[:46].rstrip("-")
    return f"nec-{slug}-{digest}" if slug else f"nec-{digest}"


def legacy_config_name(topic: str) -> str:
    """The name earlier releases derived (not injective); found and removed on ``stopping``."""
    name = re.sub(r"[^a-z0-9-]+", "-", topic.lower()).strip("-")
    return ("nec-" + name)[:63].rstrip("-")


def parse_workflow(
    raw: bytes | str | dict | None, *, max_bytes: int = MAX_MESSAGE_BYTES
) -> WorkflowConfig:
    """Validate a ``system.ML`` message (``published`` or ``stopping``)."""
    msg = parse_json(raw, max_bytes=max_bytes)
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


def parse_step(
    raw: bytes | str | dict | None, *, max_bytes: int = MAX_MESSAGE_BYTES
) -> StepMessage:
    """Validate a workflow-topic message; unsafe S3 paths are refused."""
    msg = parse_json(raw, max_bytes=max_bytes)
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


@dataclass(frozen=True)
class StepRequest(StepMessage):
    """A step message validated for the step that runs it, before any work is done."""

    rate: int | None = None  # the rate asked for (compress of a family with a rate knob)


class RateKnob(NamedTuple):
    """A family's rate knob as a step reads it: its ``meta_information`` key and its check."""

    name: str
    check: Callable[[int], int]


def parse_step_request(
    raw: StepMessage | bytes | str | dict | None,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    rates: Sequence[RateKnob] = (),
) -> StepRequest:
    """The one validation of a step's input message: every fault is a :class:`MessageError`.

    Beyond :func:`parse_step`, a step needs a file name and an ended previous component;
    Each of ``rates`` (given by a step that codes) checks ``meta_information.<knob>``
    (e.g. ``codebooks``), when the message has it, against the export, and a value it
    cannot code is a :class:`MessageError`. Fields of no knob in ``rates`` are not read.
    ``raw`` may be a message that :func:`parse_step` already read.
    """
    step = raw if isinstance(raw, StepMessage) else parse_step(raw, max_bytes=max_bytes)
    if not step.filename:
        raise MessageError("field 'S3_bucket_desc.filename' is required by this step")
    if not step.previous_component_end:
        raise MessageError("previous component did not end (previous_component_end false)")
    fields = (step.previous_component_end, step.folder, step.filename, step.meta)
    for knob in rates:
        value = step.meta.get(knob.name)
        if value is None:
            continue
        what = f"field 'meta_information.{knob.name}'"
        if isinstance(value, bool) or not isinstance(value, int):
            raise MessageError(f"{what} must be an integer, got {value!r}")
        try:
            return StepRequest(*fields, rate=knob.check(value))
        except InvalidInput as err:
            raise MessageError(f"{what}: {err}") from None
    return StepRequest(*fields)


#: The EO4EU status of each event of a step (``status`` on ``monitoring.notify``).
STATUS_OF_EVENT = {
    "started": "START",
    "progress": "INFO",
    "debug": "DEBUG",
    "finished": "SUCCESS",
    "failed": "CRITICAL",
}
#: EO4EU's wrappers cut a status description to this many characters.
MAX_DESCRIPTION_CHARS = 300
#: Where Kubernetes mounts the pod's namespace (the ServiceAccount volume).
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class PodIdentity:
    """Where a status event comes from: ``optional.namespace`` and ``optional.pod``."""

    namespace: str = ""
    pod: str = "Unknown"

    @classmethod
    def from_environment(
        cls, environ: dict | None = None, namespace_file: Path = NAMESPACE_FILE
    ) -> PodIdentity:
        """Namespace and pod as EO4EU's wrappers find them; read once, when a service starts.

        The namespace from the ServiceAccount mount ('' outside a pod), the pod from
        ``$HOSTNAME`` ('Unknown' when unset).
        """
        environ = os.environ if environ is None else environ
        try:
            namespace = namespace_file.read_text().strip()
        except OSError:
            namespace = ""
        return cls(namespace, environ.get("HOSTNAME") or "Unknown")


def status_event(
    component: str,
    workflow: str,
    event: str,
    description: str,
    *,
    origin: PodIdentity | None = None,
    nec: dict | None = None,
    now: datetime | None = None,
) -> dict:
    """A ``monitoring.notify`` event in EO4EU's vocabulary (sent with the Kafka key ``key``).

    ``event`` is one of :data:`STATUS_OF_EVENT` (``started`` -> ``START``, ``progress`` ->
    ``INFO`` with ``"overwrite": true``, as the line replaces the previous progress line,
    ``finished`` -> ``SUCCESS``, ``failed`` -> ``CRITICAL``). ``description`` is cut to
    :data:`MAX_DESCRIPTION_CHARS`; the timestamp is ISO-8601 UTC (``+00:00``) as Python's
    ``isoformat`` writes it, as EO4EU's ``KafkaHandler`` does. What EO4EU has no field for
    (the event, the message id, the step's stats, the whole reason) goes in ``nec``.
    """
    if event not in STATUS_OF_EVENT:
        raise ValueError(f"unknown status event {event!r}, expected one of {list(STATUS_OF_EVENT)}")
    origin = origin or PodIdentity()
    when = now or datetime.now(UTC)
    value = {
        "component_name": component,
        "workflow_name": workflow,
        "status": STATUS_OF_EVENT[event],
        "description": description[:MAX_DESCRIPTION_CHARS],
        "timestamp": when.astimezone(UTC).isoformat(),
        "optional": {"namespace": origin.namespace, "pod": origin.pod},
    }
    if event == "progress":
        value["overwrite"] = True
    value["nec"] = {"event": event, **(nec or {})}
    return value


def _is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and (key in SECRET_FIELDS or bool(_SECRET_KEY.search(key)))


def redacted(obj: Any) -> Any:
    """A copy of ``obj`` with credential-like fields replaced, for logs and ConfigMaps.

    A field is a credential when its key is one of the platform's (``aws_access_key_id``,
    ``aws_secret_access_key``) or looks like one (``secret``, ``password``, ``token``,
    ``access_key``, ... in any case), at any depth.
    """
    if isinstance(obj, dict):
        return {k: ("***" if _is_secret_key(k) else redacted(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redacted(v) for v in obj]
    return obj


def redact_text(text: str) -> str:
    """``text`` with the value of every credential-like ``key: value`` or ``key=value`` hidden.

    For raw text that is not (or not entirely) JSON: a truncated message, a log line. A
    value cut off by the end of the text is hidden up to the end.
    """
    return _RAW_SECRET.sub(lambda m: m.group("key") + '"***"', text)


def scrub_values(text: str, values: tuple[str, ...] | list[str]) -> str:
    """``text`` with every occurrence of the credential ``values`` replaced by ``***``.

    ``values`` are known credentials (a workflow's keys), wherever they appear; values
    shorter than 4 characters are left alone (they would scrub ordinary words).
    """
    for value in values:
        if isinstance(value, str) and len(value) >= 4 and value in text:
            text = text.replace(value, "***")
    return text


def dead_letter_body(raw: bytes | str | dict | None, secrets: tuple[str, ...] = ()) -> dict:
    """The fields a dead-letter record may hold about a rejected message: no credential.

    A JSON object is kept as ``message``, with credential fields redacted. Anything else
    (cut short, not UTF-8, not JSON) is identified by ``message_sha256`` and
    ``message_bytes`` and described by ``message_error`` (why it does not parse, which
    quotes none of its text); none of its content is kept: a message cut inside a
    credential under an innocent key would otherwise leave a prefix of that credential.
    ``secrets`` are known credential values (the workflow's), scrubbed from whatever is
    kept in case they appear under an innocent key.
    """
    try:
        fields: dict = {"message": redacted(parse_json(raw))}
    except MessageError as err:
        if raw is None:
            return {"message": None}
        if not isinstance(raw, str | bytes | bytearray | memoryview):
            return {"message_type": type(raw).__name__}
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
        return {
            "message_sha256": hashlib.sha256(data).hexdigest(),
            "message_bytes": len(data),
            "message_error": err.message,
        }
    kept = json.dumps(fields)
    for value in secrets:
        escaped = json.dumps(value)[1:-1] if value else ""
        if escaped and escaped in kept:
            kept = kept.replace(escaped, "***")
            fields = json.loads(kept)
    return fields


def public_reason(err: BaseException) -> str:
    """The text of ``err`` as a platform user may read it in a status or a dead letter.

    A project error keeps its message; anything else is named by its type, as an internal
    error. Either way credential-like values are cut and local paths are replaced by
    ``<path>``: a reason names the input object, never the host's files.
    """
    if isinstance(err, NecError):
        text = err.message
    else:
        text = f"internal error ({type(err).__name__}): {err}"
    return _LOCAL_PATH.sub("<path>", redact_text(text))[:2000]
