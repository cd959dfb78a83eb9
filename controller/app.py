"""The controller: listens on the platform topic and provisions each workflow's feed.

On ``published`` it stores the workflow's config (credentials apart from the rest) and
ensures the source that feeds the wrapper; on ``stopping`` it removes both. Repeating a
message changes nothing. An invalid message is dead-lettered with the reason and never
stops the loop; the offset is committed after the message was handled either way, so a
poison message cannot block the topic.
"""

from __future__ import annotations

import logging
import threading

from nec_serve.errors import InvalidInput
from nec_serve.messages import parse_json, parse_workflow, redacted

__all__ = ["Controller", "run_controller"]

log = logging.getLogger(__name__)


class Controller:
    """Applies ``system.ML`` messages to a config store and a source manager."""

    def __init__(self, store, sources, producer=None, dead_letter_topic: str = "nec.deadletter"):
        self.store = store
        self.sources = sources
        self.producer = producer
        self.dead_letter_topic = dead_letter_topic

    def handle(self, raw: bytes) -> str:
        """Apply one message; returns what was done (for logs and tests)."""
        try:
            config = parse_workflow(raw)
            if config.status == "published":
                stored = self.store.put(config)
                started = self.sources.ensure(config)
                action = "published" if (stored or started) else "unchanged"
            else:
                name = config.source_name
                removed = self.sources.remove(name, config.namespace)
                deleted = self.store.delete(name)
                action = "stopped" if (removed or deleted) else "unchanged"
            log.info("workflow %r: %s (%s)", config.name, action, config.source_name)
            return action
        except InvalidInput as err:
            self._dead_letter(raw, str(err))
            return "rejected"

    def _dead_letter(self, raw: bytes, reason: str) -> None:
        try:
            body = redacted(parse_json(raw))
        except InvalidInput:
            body = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        log.error("rejected workflow message: %s", reason)
        if self.producer is not None:
            record = {"component_name": "nec-controller", "error": reason, "message": body}
            self.producer.send(self.dead_letter_topic, value=record).get(timeout=30)


def run_controller(
    controller: Controller,
    bootstrap_servers: str,
    topic: str,
    stop: threading.Event,
    group_id: str = "nec-controller",
) -> None:
    """Consume ``topic`` until ``stop`` is set, committing after each handled message."""
    from nec_serve.kafka_io import commit_after, manual_commit_consumer

    consumer = manual_commit_consumer(bootstrap_servers, group_id, topic, max_poll_records=10)
    try:
        while not stop.is_set():
            for tp, records in consumer.poll(timeout_ms=300).items():
                for rec in records:
                    controller.handle(rec.value)
                    commit_after(consumer, tp, rec)
    finally:
        consumer.close()
