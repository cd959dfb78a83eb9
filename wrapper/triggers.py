"""The two triggers of a wrapper: HTTP (a KafkaSource's CloudEvent POST) and Kafka.

Both hand each message to the same :class:`~nec_wrapper.step.StepHandler` and acknowledge
it only when the handler says it is done with (output, next message or dead-letter
record, and status all durably written): HTTP answers 200, the consumer commits the
offset. Otherwise HTTP answers 503 (the KafkaSource redelivers) and the consumer seeks
back to the message and tries it again after a pause.

What the trigger itself cannot read (a body over the size limit, a bad Content-Length, a
CloudEvent whose data cannot be decoded) is failed and dead-lettered through the handler
and answered 200 as well: a request the wrapper will never accept is not worth
redelivering.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nec_serve.kafka_io import commit_after, manual_commit_consumer
from nec_serve.logs import log_context, trace_id
from nec_serve.messages import MAX_MESSAGE_BYTES, MessageError, config_name

__all__ = [
    "make_http_server",
    "run_consumer",
    "cloudevent_data",
    "read_event",
    "UnframedRequest",
    "session_timeout",
    "SESSION_TIMEOUT_S",
    "SESSION_TIMEOUT_BOUNDS_S",
]

log = logging.getLogger(__name__)

# A structured CloudEvent wraps the record (base64 adds a third) in a small envelope.
MAX_BODY_BYTES = 2 * MAX_MESSAGE_BYTES
_DRAIN_CHUNK = 1 << 16
#: The Kafka trigger's consumer session timeout (seconds), and the bounds it may be set within
#: (a broker with default settings refuses a session under 6 s).
SESSION_TIMEOUT_S = 30.0
SESSION_TIMEOUT_BOUNDS_S = (6.0, 300.0)


def session_timeout(text: str) -> float:
    """``--session-timeout``: seconds, within :data:`SESSION_TIMEOUT_BOUNDS_S`."""
    low, high = SESSION_TIMEOUT_BOUNDS_S
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value:g} s is not within {low:g}..{high:g} s")
    return value


def cloudevent_data(body: bytes, content_type: str) -> bytes:
    """The event data of a CloudEvent POST (binary mode: the body; structured: ``data``).

    Raises:
        MessageError: a structured event whose ``data_base64`` is not base64 text.
    """
    if content_type.startswith("application/cloudevents+json"):
        try:
            event = json.loads(body)
        except (ValueError, RecursionError):
            return body  # the handler reports the bad JSON
        if isinstance(event, dict) and "data_base64" in event:
            encoded = event["data_base64"]
            try:
                if not isinstance(encoded, str):
                    raise TypeError(type(encoded).__name__)
                return base64.b64decode(encoded, validate=True)
            except (binascii.Error, TypeError, ValueError) as err:
                raise MessageError(f"CloudEvent data_base64 is not base64 text: {err}") from None
        if isinstance(event, dict) and "data" in event:
            data = event["data"]
            if data is None:
                return b""
            return data.encode() if isinstance(data, str) else json.dumps(data).encode()
    return body


def _drain(rfile, length: int) -> None:
    while length > 0:
        chunk = rfile.read(min(length, _DRAIN_CHUNK))
        if not chunk:
            break
        length -= len(chunk)


class UnframedRequest(MessageError):
    """A POST whose Content-Length is unusable: the rest of the stream cannot be framed."""


def read_event(headers, rfile) -> tuple[bytes, MessageError | None]:
    """The event data of a POST, and what is wrong with the request (None when nothing).

    Never reads more than :data:`MAX_BODY_BYTES` into memory: a larger body is read and
    dropped so the connection stays usable, and reported. What is wrong is a message
    fault (:class:`~nec_serve.messages.MessageError`), labelled as every other one.
    """
    declared = headers.get("Content-Length")
    if declared is None:
        return b"", MessageError("request has no Content-Length")
    try:
        length = int(declared)
    except ValueError:
        return b"", UnframedRequest(f"request Content-Length {declared[:40]!r} is not a number")
    if length < 0:
        return b"", UnframedRequest(f"request Content-Length {length} is negative")
    if length > MAX_BODY_BYTES:
        _drain(rfile, length)
        return b"", MessageError(
            f"message is {length} bytes, over the limit of {MAX_BODY_BYTES} bytes"
        )
    body = rfile.read(length)
    try:
        return cloudevent_data(body, headers.get("Content-Type", "")), None
    except MessageError as err:
        return body, err


def make_http_server(handler, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """An HTTP server: ``POST /<config-name>`` runs a step; ``GET /healthz`` is liveness.

    Steps run one at a time (the graphs use every core anyway); concurrent POSTs queue.
    """
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        server_version = "nec-wrapper"

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path in ("/healthz", "/readyz"):
                self._reply(HTTPStatus.OK, {"status": "ok"})
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            name = self.path.strip("/").split("?", 1)[0]
            if not name or "/" in name:
                self._reply(HTTPStatus.NOT_FOUND, {"error": "POST /<workflow-config-name>"})
                return
            body, problem = read_event(self.headers, self.rfile)
            if isinstance(problem, UnframedRequest):
                self.close_connection = True  # the rest of the stream cannot be framed
            with log_context(message_id=trace_id(body)):  # the access log line too
                with lock:
                    if problem is not None:
                        outcome = handler.reject(name, body, problem)
                    else:
                        outcome = handler.handle(name, body)
                status = HTTPStatus.OK if outcome.done else HTTPStatus.SERVICE_UNAVAILABLE
                self._reply(
                    status,
                    {
                        "status": outcome.status,
                        "reason": outcome.reason,
                        "output_key": outcome.output_key,
                    },
                )

        def log_message(self, fmt: str, *args) -> None:
            log.info("%s %s", self.address_string(), fmt % args)

    return ThreadingHTTPServer((host, port), Handler)


def run_consumer(
    handler,
    bootstrap_servers: str,
    group_id: str,
    topics,
    stop: threading.Event,
    *,
    refresh_s: float = 2.0,
    retry_pause_s: float = 2.0,
    session_timeout_s: float = SESSION_TIMEOUT_S,
) -> None:
    """Consume workflow topics directly until ``stop`` is set; at-least-once.

    ``topics`` is a callable returning the topics to follow (the workflows in the config
    store), re-read every ``refresh_s`` so newly published workflows are picked up.
    Offsets are committed one message at a time, only after the handler is done with it.

    Wrappers sharing ``group_id`` share the topics' partitions. One that dies without
    leaving the group (killed) keeps its partitions until ``session_timeout_s`` passes
    without a heartbeat; then the others take them over from the last committed offsets.
    The consumer's client id names the process (``$HOSTNAME``: the pod), so the group's
    description tells which wrapper holds which partitions.
    """
    low, high = SESSION_TIMEOUT_BOUNDS_S
    if not low <= session_timeout_s <= high:
        raise ValueError(
            f"session timeout {session_timeout_s:g} s is not within {low:g}..{high:g} s"
        )
    session_ms = int(session_timeout_s * 1000)
    consumer = manual_commit_consumer(
        bootstrap_servers,
        group_id,
        client_id=f"nec-wrapper-{os.environ.get('HOSTNAME') or socket.gethostname()}",
        max_poll_records=1,
        max_poll_interval_ms=60 * 60 * 1000,  # a step may take long; it is not a failure
        session_timeout_ms=session_ms,
        heartbeat_interval_ms=min(3000, max(500, session_ms // 10)),
    )
    current: set[str] = set()
    next_refresh = 0.0
    try:
        while not stop.is_set():
            if time.monotonic() >= next_refresh:
                try:
                    wanted = set(topics())
                except Exception as err:  # the config store: keep the topics we have
                    log.warning("could not list workflow topics (%s); keeping %s", err, current)
                    wanted = current
                if wanted != current:
                    if wanted:
                        consumer.subscribe(sorted(wanted))
                    else:
                        consumer.unsubscribe()
                    current = wanted
                next_refresh = time.monotonic() + refresh_s
            if not current:
                stop.wait(0.2)
                continue
            for tp, records in consumer.poll(timeout_ms=500).items():
                for rec in records:
                    outcome = handler.handle(config_name(rec.topic), rec.value)
                    if outcome.done:
                        commit_after(consumer, tp, rec)
                    else:
                        log.warning(
                            "not done with %s@%d (%s); retrying", tp, rec.offset, outcome.reason
                        )
                        consumer.seek(tp, rec.offset)
                        stop.wait(retry_pause_s)
                        break
    finally:
        consumer.close()
