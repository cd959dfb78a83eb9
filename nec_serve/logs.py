"""Structured logs of the services: one JSON object per line, with the message's context.

The wrapper and the controller log JSON lines (``--log-format json``, their default): ``ts``
(ISO-8601, UTC), ``level``, ``logger``, ``message`` and, when known, ``component``,
``workflow``, ``input_key``, ``message_id`` and ``step``, plus ``exception`` for a traceback.
The context comes from :func:`log_context` (a context variable, so each thread and each
message has its own): a handler opens one per message and :func:`bind` adds what it learns
(the workflow once its config is read, the input key once the message is parsed).

Nothing a formatter writes holds a credential: the message and the traceback go through
:func:`nec_serve.messages.redact_text` (``key: value`` pairs that look like credentials), and
the credential values a context names with ``secrets=`` (a workflow's S3 keys) are replaced
wherever they appear. The text format (``--log-format text``) is redacted the same way.

:func:`trace_id` gives every message one id, the same wherever it is computed: the id a nec
step gave a message it published (``meta_information.nec.message_id``), else a digest of
the message's JSON (canonical, so a CloudEvent envelope that re-serialises the data keeps
it), else a digest of its bytes. The controller's local KafkaSource, the wrappers and Triton
(the inference request id) all log a message under that id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Any

from nec_serve.errors import InvalidInput
from nec_serve.messages import MessageError, parse_json, redact_text, scrub_values

__all__ = [
    "CONTEXT_FIELDS",
    "LOG_FORMATS",
    "JsonFormatter",
    "TextFormatter",
    "log_context",
    "bind",
    "current",
    "current_message_id",
    "trace_id",
    "configure_logging",
]

#: The context fields a log line carries when they are known, in this order.
CONTEXT_FIELDS = ("component", "workflow", "step", "input_key", "message_id")
#: What ``--log-format`` accepts.
LOG_FORMATS = ("json", "text")

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_CONTEXT: ContextVar[Mapping[str, Any]] = ContextVar("nec_log_context", default=_EMPTY)
_SECRETS = "secrets"  # context key of credential values to scrub; never written out
_ID = re.compile(r"^[0-9a-f]{32}$")


def current() -> Mapping[str, Any]:
    """The log context of the running thread (or task): read-only."""
    return _CONTEXT.get()


def current_message_id() -> str | None:
    """The id of the message being handled here, if any (see :func:`trace_id`)."""
    value = _CONTEXT.get().get("message_id")
    return value if isinstance(value, str) else None


def _merged(fields: Mapping[str, Any]) -> Mapping[str, Any]:
    cur = dict(_CONTEXT.get())
    for key, value in fields.items():
        if value is None:
            continue
        if key == _SECRETS:
            value = tuple(cur.get(_SECRETS, ())) + tuple(v for v in value if isinstance(v, str))
        cur[key] = value
    return MappingProxyType(cur)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Log lines inside carry ``fields`` (None values are left out); restored on leaving.

    ``secrets=(value, ...)`` names credential values that no line may show.
    """
    token = _CONTEXT.set(_merged(fields))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def bind(**fields: Any) -> None:
    """Add ``fields`` to the current context, until the enclosing :func:`log_context` ends."""
    _CONTEXT.set(_merged(fields))


def trace_id(raw: bytes | str | dict | None) -> str:
    """The id a message is logged under wherever it goes (32 hex digits).

    ``meta_information.nec.message_id`` when the message carries a well-formed one (a nec
    step's output), else SHA-256 of the canonical JSON (sorted keys, no spaces) of a message
    that parses, else SHA-256 of its bytes. Identical messages share an id: a redelivery is
    the same message.
    """
    try:
        msg = parse_json(raw)
    except MessageError:
        if raw is None:
            data = b""
        elif isinstance(raw, str):
            data = raw.encode("utf-8", "surrogatepass")
        elif isinstance(raw, (bytes, bytearray, memoryview)):
            data = bytes(raw)
        else:
            data = repr(raw).encode()
        return hashlib.sha256(data).hexdigest()[:32]
    meta = msg.get("meta_information")
    nec = meta.get("nec") if isinstance(meta, dict) else None
    given = nec.get("message_id") if isinstance(nec, dict) else None
    if isinstance(given, str) and _ID.match(given):
        return given
    canonical = json.dumps(msg, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    return scrub_values(redact_text(text), secrets)


class _ContextFilter(logging.Filter):
    """Copies the thread's log context onto each record, once, where it is emitted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "nec_context"):
            record.nec_context = _CONTEXT.get()
        return True


def _context_of(record: logging.LogRecord) -> Mapping[str, Any]:
    ctx = getattr(record, "nec_context", None)
    return ctx if ctx is not None else _CONTEXT.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``message``, the context."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON, credentials redacted."""
        ctx = _context_of(record)
        secrets = tuple(ctx.get(_SECRETS, ()))
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": _scrub(record.getMessage(), secrets),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None) or ctx.get(key)
            if value is not None:
                line[key] = _scrub(str(value), secrets)
        if record.exc_info:
            line["exception"] = _scrub(self.formatException(record.exc_info), secrets)
        elif record.exc_text:
            line["exception"] = _scrub(record.exc_text, secrets)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message [context]``, credentials redacted as in :class:`JsonFormatter`."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The record as text, with the known context fields appended."""
        ctx = _context_of(record)
        text = super().format(record)
        extra = " ".join(f"{k}={ctx[k]}" for k in CONTEXT_FIELDS if ctx.get(k) is not None)
        return _scrub(f"{text} [{extra}]" if extra else text, tuple(ctx.get(_SECRETS, ())))


def configure_logging(
    fmt: str = "text", level: int = logging.WARNING, stream: IO[str] | None = None
) -> logging.Handler:
    """Route the root logger to ``stream`` (stderr) in ``fmt``; returns the handler.

    Replaces the root logger's handlers, so calling it again changes the format.
    """
    if fmt not in LOG_FORMATS:
        raise InvalidInput(f"invalid log format {fmt!r}: one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
