"""The two triggers of a wrapper: HTTP (a KafkaSource's CloudEvent POST) and Kafka.

Both hand each message to the same :class:`~nec_wrapper.step.StepHandler` and acknowledge
it only when the handler says it is done with (output, next message or dead-letter
record, and status all durably written): HTTP answers 200, the consumer commits the
offset. Otherwise HTTP answers 503 (the KafkaSource redelivers) and the consumer seeks
back to the message and tries it again after a pause.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nec_serve.messages import config_name

__all__ = ["make_http_server", "run_consumer", "cloudevent_data"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20


def cloudevent_data(body: bytes, content_type: str) -> bytes:
    """The event data of a CloudEvent POST (binary mode: the body; structured: ``data``)."""
    if content_type.startswith("application/cloudevents+json"):
        try:
            event = json.loads(body)
        except ValueError:
            return body  # the handler reports the bad JSON
        if isinstance(event, dict) and "data_base64" in event:
            import base64

            return base64.b64decode(event["data_base64"])
        if isinstance(event, dict) and "data" in event:
            data = event["data"]
            return data.encode() if isinstance(data, str) else json.dumps(data).encode()
    return body


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
            length = int(self.headers.get("Content-Length") or 0)
            if not name or "/" in name:
                self._reply(HTTPStatus.NOT_FOUND, {"error": "POST /<workflow-config-name>"})
                return
            if length > MAX_BODY_BYTES:
                self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "message too large"})
                return
            body = cloudevent_data(self.rfile.read(length), self.headers.get("Content-Type", ""))
            with lock:
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
) -> None:
    """Consume workflow topics directly until ``stop`` is set; at-least-once.

    ``topics`` is a callable returning the topics to follow (the workflows in the config
    store), re-read every ``refresh_s`` so newly published workflows are picked up.
    Offsets are committed one message at a time, only after the handler is done with it.
    """
    from nec_serve.kafka_io import commit_after, manual_commit_consumer

    consumer = manual_commit_consumer(
        bootstrap_servers,
        group_id,
        max_poll_records=1,
        max_poll_interval_ms=60 * 60 * 1000,  # a step may take long; it is not a failure
        session_timeout_ms=30_000,
    )
    current: set[str] = set()
    next_refresh = 0.0
    try:
        while not stop.is_set():
            if time.monotonic() >= next_refresh:
                wanted = set(topics())
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
