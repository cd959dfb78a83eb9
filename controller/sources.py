"""What feeds a wrapper: a Knative ``KafkaSource`` on Kubernetes, or its local stand-in.

Both are keyed by the workflow's config name (derived from its input topic) and created
idempotently: ensuring a source that exists with the same spec changes nothing, and
removing one that does not exist is fine. ``remove`` given a topic deletes a source only
if it reads that topic, so a name shared by two workflows under an earlier release's
naming is never removed for the wrong one.
"""

from __future__ import annotations

import http.client
import logging
import threading
import urllib.error
import urllib.request

from nec_serve.kafka_io import commit_after, manual_commit_consumer
from nec_serve.logs import log_context, trace_id
from nec_serve.messages import DEAD_LETTER_TOPIC, MessageError, WorkflowConfig, dead_letter_body

__all__ = [
    "kafka_source",
    "KubernetesSources",
    "LocalSources",
    "LocalKafkaSource",
    "ConsumerFeed",
    "FEEDS",
]

#: How workflows reach the wrappers: a KafkaSource per workflow (Knative, or the local
#: stand-in), or the wrappers consume the input topics themselves (``--trigger kafka``).
FEEDS = ("kafkasource", "consumers")

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "sources.knative.dev", "v1beta1", "kafkasources"


def kafka_source(config: WorkflowConfig, bootstrap_servers: list[str]) -> dict:
    """The KafkaSource for a workflow: its input topic into the wrapper's Knative Service.

    The sink URI path is the config name, which the wrapper uses to find the config (the
    EO4EU convention); the consumer group is per workflow, so redelivery resumes there.
    """
    name = config.source_name
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "KafkaSource",
        "metadata": {
            "name": name,
            "namespace": config.namespace,
            "labels": {"app.kubernetes.io/managed-by": "nec-controller", "nec/workflow": name},
        },
        "spec": {
            "bootstrapServers": list(bootstrap_servers),
            "topics": [config.topic_in],
            "consumerGroup": name,
            "initialOffset": "earliest",
            "consumers": 1,
            # A step answers only when done (at-least-once); the default 10-minute request
            # timeout would redeliver long steps while they still run.
            "delivery": {
                "retry": 5,
                "backoffPolicy": "exponential",
                "backoffDelay": "PT2S",
                "timeout": "PT1H",
            },
            "sink": {
                "ref": {
                    "apiVersion": "serving.knative.dev/v1",
                    "kind": "Service",
                    "name": config.service_name,
                    "namespace": config.namespace,
                },
                "uri": f"/{name}",
            },
        },
    }


class KubernetesSources:
    """Creates and deletes KafkaSource objects through the Kubernetes API."""

    def __init__(self, bootstrap_servers: list[str], custom_api=None, namespace: str = "nec"):
        if custom_api is None:
            from kubernetes import client, config  # heavy; Kubernetes mode only

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            custom_api = client.CustomObjectsApi()
        self.api = custom_api
        self.bootstrap = bootstrap_servers
        self.namespace = namespace

    def validate(self, config: WorkflowConfig) -> None:
        """Nothing to check before creating: the API server validates the object."""

    def _get(self, name: str, namespace: str | None) -> dict | None:
        from kubernetes.client.exceptions import ApiException  # heavy; Kubernetes mode only

        try:
            return self.api.get_namespaced_custom_object(
                GROUP, VERSION, namespace or self.namespace, PLURAL, name
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def owns(self, name: str, namespace: str | None, topic: str) -> bool:
        """Whether a source ``name`` exists and reads ``topic``."""
        current = self._get(name, namespace)
        return current is not None and topic in (current.get("spec") or {}).get("topics", [])

    def ensure(self, config: WorkflowConfig) -> bool:
        """Create the source, or replace it if its spec differs; True if anything changed."""
        from kubernetes.client.exceptions import ApiException  # heavy; Kubernetes mode only

        body = kafka_source(config, self.bootstrap)
        ns, name = config.namespace, config.source_name
        try:
            current = self.api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as err:
            if err.status != 404:
                raise
            self.api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
            return True
        if current.get("spec") == body["spec"]:
            return False
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        self.api.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, body)
        return True

    def remove(self, name: str, namespace: str | None, topic: str | None = None) -> bool:
        """Delete the source (only if it reads ``topic``, when given); False if none was."""
        from kubernetes.client.exceptions import ApiException  # heavy; Kubernetes mode only

        if topic is not None and not self.owns(name, namespace, topic):
            return False
        try:
            self.api.delete_namespaced_custom_object(
                GROUP, VERSION, namespace or self.namespace, PLURAL, name
            )
            return True
        except ApiException as err:
            if err.status == 404:
                return False
            raise

    def close(self) -> None:
        """Nothing to release."""


class LocalKafkaSource(threading.Thread):
    """A KafkaSource stand-in: consume a topic, POST each message to a sink as a CloudEvent.

    Like Knative's, it commits an offset only after the sink answered 2xx, and redelivers
    with exponential backoff on any other answer or a failed connection, ``retries`` times
    (the KafkaSource's ``delivery.retry``). Then, as Knative does with a dead-letter sink,
    it writes a dead-letter record (no credential in it) and moves on, so one message never
    holds its partition for good; if even that write fails, the message stays and is tried
    again. Nothing one record holds (no value, any bytes) and nothing the sink answers stops
    the thread. What it logs about a record carries the record's id
    (:func:`nec_serve.logs.trace_id`), the id the wrapper logs the same message under.
    """

    def __init__(
        self,
        name: str,
        topic: str,
        sink_url: str,
        bootstrap_servers: str,
        timeout_s: float = 3600.0,
        backoff_s: float = 1.0,
        retries: int = 5,
        producer=None,
        dead_letter_topic: str = DEAD_LETTER_TOPIC,
    ):
        super().__init__(name=f"kafkasource-{name}", daemon=True)
        self.source_name = name
        self.topic = topic
        self.sink_url = sink_url.rstrip("/") + f"/{name}"
        self.bootstrap = bootstrap_servers
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.retries = retries
        self.producer = producer
        self.dead_letter_topic = dead_letter_topic
        self.stopping = threading.Event()
        self.delivered = 0
        self.dead_lettered = 0

    def _post(self, rec) -> str:
        """POST one record; returns "" on 2xx, else what went wrong."""
        req = urllib.request.Request(
            self.sink_url,
            data=rec.value or b"",
            method="POST",
            headers={
                "Content-Type": "application/json",
                "ce-specversion": "1.0",
                "ce-id": f"partition:{rec.partition}/offset:{rec.offset}",
                "ce-source": f"/kafkasources/{self.source_name}#{self.topic}",
                "ce-type": "dev.knative.kafka.event",
                "ce-subject": f"partition:{rec.partition}#{rec.offset}",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return "" if 200 <= resp.status < 300 else f"sink answered {resp.status}"
        except urllib.error.HTTPError as err:
            return f"sink answered {err.code}"
        except (OSError, http.client.HTTPException, ValueError) as err:
            return f"sink unreachable: {err}"

    def _dead_letter(self, rec, reason: str) -> bool:
        if self.producer is None:
            log.error(
                "source %s: dropping %s@%d: %s", self.source_name, rec.topic, rec.offset, reason
            )
            return True
        record = {
            "component_name": f"kafkasource/{self.source_name}",
            "topic": rec.topic,
            "partition": rec.partition,
            "offset": rec.offset,
            "error": reason,
            **dead_letter_body(rec.value),
        }
        try:
            self.producer.send(self.dead_letter_topic, value=record).get(timeout=30)
        except Exception as err:  # the broker: keep the message and try again later
            log.error("source %s: could not dead-letter (%s)", self.source_name, err)
            return False
        return True

    def _deliver(self, rec) -> bool:
        """Deliver one record with bounded retries; True once it may be committed."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            reason = self._post(rec)
            if not reason:
                self.delivered += 1
                log.info("source %s: delivered %s@%d", self.source_name, rec.topic, rec.offset)
                return True
            log.warning("source %s: %s (attempt %d)", self.source_name, reason, attempt + 1)
            if self.stopping.wait(delay):
                return False
            delay *= 2
        reason = f"not accepted by {self.sink_url} after {self.retries + 1} attempts: {reason}"
        if self._dead_letter(rec, reason):
            self.dead_lettered += 1
            return True
        return False

    def run(self) -> None:
        """Deliver until stopped."""
        consumer = manual_commit_consumer(
            self.bootstrap,
            self.source_name,
            self.topic,
            max_poll_records=1,
            max_poll_interval_ms=int(self.timeout_s * 1000) + 60_000,
        )
        try:
            while not self.stopping.is_set():
                for tp, records in consumer.poll(timeout_ms=300).items():
                    for rec in records:
                        with log_context(
                            message_id=trace_id(rec.value),
                            component=f"kafkasource/{self.source_name}",
                        ):
                            delivered = self._deliver(rec)
                        if delivered:
                            commit_after(consumer, tp, rec)
                        else:
                            consumer.seek(tp, rec.offset)
                            break
        finally:
            consumer.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop consuming and wait for the thread."""
        self.stopping.set()
        self.join(timeout)


class LocalSources:
    """Runs one :class:`LocalKafkaSource` per workflow; sinks are looked up by service name."""

    def __init__(self, bootstrap_servers: str, sinks: dict[str, str], **source_kw):
        self.bootstrap = bootstrap_servers
        self.sinks = dict(sinks)
        self.source_kw = source_kw  # retries, backoff_s, producer, dead_letter_topic, ...
        self.running: dict[str, LocalKafkaSource] = {}
        self._lock = threading.Lock()

    def validate(self, config: WorkflowConfig) -> None:
        """Refuse a workflow whose service has no local sink."""
        if config.service_name not in self.sinks:
            raise MessageError(
                f"no local sink for service {config.service_name!r}; known: {sorted(self.sinks)}"
            )

    def owns(self, name: str, namespace: str | None, topic: str) -> bool:
        """Whether a source ``name`` runs and reads ``topic``."""
        src = self.running.get(name)
        return src is not None and src.topic == topic

    def ensure(self, config: WorkflowConfig) -> bool:
        """Start the source for ``config`` unless one runs with the same topic and sink."""
        self.validate(config)
        sink = self.sinks[config.service_name]
        with self._lock:
            cur = self.running.get(config.source_name)
            if (
                cur
                and cur.is_alive()
                and cur.topic == config.topic_in
                and cur.sink_url.startswith(sink)
            ):
                return False
            if cur:
                cur.stop()
            src = LocalKafkaSource(
                config.source_name, config.topic_in, sink, self.bootstrap, **self.source_kw
            )
            src.start()
            self.running[config.source_name] = src
            return True

    def remove(self, name: str, namespace: str | None = None, topic: str | None = None) -> bool:
        """Stop the source (only if it reads ``topic``, when given); False if none was."""
        with self._lock:
            if topic is not None and not self.owns(name, namespace, topic):
                return False
            src = self.running.pop(name, None)
        if src is None:
            return False
        src.stop()
        return True

    def close(self) -> None:
        """Stop every source."""
        for name in list(self.running):
            self.remove(name)


class ConsumerFeed:
    """The feed when the wrappers consume the workflow topics themselves (``--feed consumers``).

    The wrappers (``--trigger kafka``, one consumer group per step, scaled on its lag) find
    the workflows in the config store; there is nothing to create per workflow, and creating
    a KafkaSource as well would deliver every message twice.
    """

    def validate(self, config: WorkflowConfig) -> None:
        """Any workflow is fine: the wrappers pick it up from the store."""

    def owns(self, name: str, namespace: str | None, topic: str) -> bool:
        """No source is ever created."""
        return False

    def ensure(self, config: WorkflowConfig) -> bool:
        """Nothing to start: False (unchanged)."""
        return False

    def remove(self, name: str, namespace: str | None = None, topic: str | None = None) -> bool:
        """Nothing to stop: False."""
        return False

    def close(self) -> None:
        """Nothing to release."""
