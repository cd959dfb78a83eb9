"""The controller: listens on the platform topic and provisions each workflow's feed.

On ``published`` it stores the workflow's config (credentials apart from the rest) and
ensures the source that feeds the wrapper; on ``stopping`` it removes both, under the
current name and under the name earlier releases used. Repeating a message changes
nothing.

No message can stop the loop. Whatever one message raises ends as a ``failed`` status on
the status topic and a dead-letter record (credentials never included), after which its
offset is committed. Only failures that retrying can fix (the Kubernetes API or the config
store unreachable, a conflict) are retried, a bounded number of times with backoff; a
message whose failure could not even be reported (the broker down) is not committed and
comes back.

Every message is logged under its id (:func:`nec_serve.logs.trace_id`) with its workflow,
its credentials scrubbed from every line, and counted in the controller's
:class:`~nec_serve.metrics.ControllerMetrics` (workflows published / stopped / unchanged,
rejected messages by failure class, retries, workflows in the store). A rejected message
gets a ``CRITICAL`` status in EO4EU's vocabulary (:func:`nec_serve.messages.status_event`).
"""

from __future__ import annotations

import logging
import threading

from nec_serve.errors import InvalidInput
from nec_serve.kafka_io import commit_after, manual_commit_consumer
from nec_serve.logs import bind, current_message_id, log_context, trace_id
from nec_serve.messages import (
    DEAD_LETTER_TOPIC,
    STATUS_KEY,
    STATUS_TOPIC,
    MessageError,
    PodIdentity,
    WorkflowConfig,
    dead_letter_body,
    legacy_config_name,
    parse_workflow,
    public_reason,
    scrub_values,
    status_event,
)
from nec_serve.metrics import ControllerMetrics, failure_class
from nec_serve.retry import GaveUp, retrying

__all__ = ["Controller", "run_controller", "COMPONENT"]

log = logging.getLogger(__name__)

COMPONENT = "nec-controller"
RETRY = "retry"  # handle()'s answer for a message to deliver again


class Controller:
    """Applies ``system.ML`` messages to a config store and a source manager.

    ``metrics`` (a :class:`~nec_serve.metrics.ControllerMetrics`) counts what it does; by
    default it gets one on a registry of its own.
    """

    def __init__(
        self,
        store,
        sources,
        producer=None,
        dead_letter_topic: str = DEAD_LETTER_TOPIC,
        status_topic: str = STATUS_TOPIC,
        attempts: int = 3,
        backoff_s: float = 1.0,
        metrics: ControllerMetrics | None = None,
        origin: PodIdentity | None = None,
    ):
        if attempts < 1:
            raise InvalidInput(f"invalid controller attempts {attempts}, expected >= 1")
        self.store = store
        self.sources = sources
        self.producer = producer
        self.dead_letter_topic = dead_letter_topic
        self.status_topic = status_topic
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.metrics = metrics or ControllerMetrics()
        self.origin = origin or PodIdentity.from_environment()

    def handle(self, raw: bytes | None) -> str:
        """Apply one message; never raises.

        Returns what was done: ``published``, ``stopped`` or ``unchanged``; ``rejected``
        when the message failed and was dead-lettered; :data:`RETRY` when not even the
        failure could be written (the caller must not commit).
        """
        with log_context(message_id=trace_id(raw), component=COMPONENT):
            log.info("workflow message received (%d bytes)", len(raw or b""))
            try:
                config = parse_workflow(raw)
            except Exception as err:  # the consumer boundary: any message, any error
                return self._give_up(raw, None, public_reason(err), failure_class(err))
            creds = config.s3
            secrets = (creds.access_key_id, creds.secret_access_key) if creds else ()
            bind(workflow=config.name, secrets=secrets)
            try:
                action = retrying(
                    lambda: self._apply(config),
                    self.attempts,
                    self.backoff_s,
                    "apply",
                    on_retry=lambda _err: self.metrics.retries.inc(),
                )
            except GaveUp as err:
                return self._give_up(raw, config, err.reason, failure_class(err))
            log.info("workflow %r: %s (%s)", config.name, action, config.source_name)
            self.metrics.workflows.labels(action).inc()
            self._count_active()
            return action

    def _count_active(self) -> None:
        try:
            self.metrics.active.set(len(self.store.names()))
        except Exception as err:  # a gauge is not worth failing a message for
            log.warning("could not count the stored workflows: %s", err)

    def _apply(self, config: WorkflowConfig) -> str:
        name = config.source_name
        if config.status == "published":
            # Everything that can refuse the workflow runs before anything is stored.
            self.sources.validate(config)
            try:
                existing = self.store.get(name)
            except (InvalidInput, ValueError):  # none, or a damaged entry that put() replaces
                existing = None
            if existing is not None and existing.topic_in != config.topic_in:
                raise MessageError(
                    f"workflow name {name!r} of topic {config.topic_in!r} is taken by topic "
                    f"{existing.topic_in!r}; rename one of the topics"
                )
            try:
                stored = self.store.put(config)
                started = self.sources.ensure(config)
            except Exception:
                self._restore(name, existing)  # a refused message changes nothing stored
                raise
            return "published" if (stored or started) else "unchanged"
        changed = False
        for old in self._names(config):
            changed |= self.sources.remove(old, config.namespace, topic=config.topic_in)
            changed |= self.store.delete(old)
        return "stopped" if changed else "unchanged"

    def _restore(self, name: str, existing: WorkflowConfig | None) -> None:
        """Put back what was stored under ``name`` before a message that failed to apply.

        The workflow's previous config and credentials (Secret) for a re-publish, nothing
        for a new workflow. A failure here is logged: the message's own error is the one
        that is reported, and its retry restores again.
        """
        try:
            if existing is None:
                self.store.delete(name)
            else:
                self.store.put(existing)
        except Exception as err:
            log.error("could not restore the stored config of %s: %s", name, public_reason(err))

    def resume(self) -> dict[str, str]:
        """Ensure the feed of every stored workflow; call once when the controller starts.

        A restarted controller finds its workflows in the store, but a local feed died
        with the process that ran it, and a KafkaSource may have been removed meanwhile:
        without this, their messages would queue until each workflow is published again.
        Returns ``{config name: "started" | "running" | "failed: <reason>"}``; a workflow
        that cannot be resumed is logged and left stored, and the others still resume.
        """
        done: dict[str, str] = {}
        try:
            names = self.store.names()
        except Exception as err:
            log.error("could not list the stored workflows: %s", public_reason(err))
            return done
        for name in names:
            try:
                config = self.store.get(name)
                self.sources.validate(config)
                done[name] = "started" if self.sources.ensure(config) else "running"
            except Exception as err:
                done[name] = f"failed: {public_reason(err)}"
                log.error("could not resume the feed of workflow %s: %s", name, done[name])
        self._count_active()
        log.info("resumed %d stored workflow(s): %s", len(done), done)
        return done

    def _names(self, config: WorkflowConfig) -> list[str]:
        """The current name, and the earlier release's if it holds this workflow's topic."""
        names = [config.source_name]
        legacy = legacy_config_name(config.topic_in)
        if legacy != names[0]:
            try:
                if self.store.get(legacy).topic_in == config.topic_in:
                    names.append(legacy)
            except InvalidInput:  # not stored, or not readable: not this workflow's
                if self.sources.owns(legacy, config.namespace, config.topic_in):
                    names.append(legacy)
        return names

    def _give_up(self, raw, config: WorkflowConfig | None, reason: str, failure: str) -> str:
        """Dead-letter ``raw`` and emit ``failed``; the message is then done with."""
        s3 = config.s3 if config else None
        secrets = (s3.access_key_id, s3.secret_access_key) if s3 else ()
        workflow = config.name if config else "unknown"
        reason = scrub_values(reason, secrets)  # an error's text may quote a key it was given
        log.error("rejected workflow message (%s, %s): %s", workflow, failure, reason)
        if self.producer is None:
            self.metrics.rejected.labels(failure).inc()
            return "rejected"
        record = {
            "component_name": COMPONENT,
            "workflow_name": workflow,
            "error": reason,
            **dead_letter_body(raw, secrets),
        }
        try:
            self.producer.send(self.dead_letter_topic, value=record).get(timeout=30)
            event = status_event(
                COMPONENT,
                workflow,
                "failed",
                reason,
                origin=self.origin,
                nec={"message_id": current_message_id(), "reason": reason, "failure": failure},
            )
            self.producer.send(self.status_topic, value=event, key=STATUS_KEY).get(timeout=30)
        except Exception as err:  # the broker: nothing durable was written
            log.error("could not dead-letter the message (%s); it will come back", err)
            return RETRY
        self.metrics.rejected.labels(failure).inc()
        return "rejected"


def run_controller(
    controller: Controller,
    bootstrap_servers: str,
    topic: str,
    stop: threading.Event,
    group_id: str = "nec-controller",
    retry_pause_s: float = 2.0,
) -> None:
    """Consume ``topic`` until ``stop`` is set, committing after each handled message."""
    consumer = manual_commit_consumer(bootstrap_servers, group_id, topic, max_poll_records=10)
    try:
        while not stop.is_set():
            for tp, records in consumer.poll(timeout_ms=300).items():
                for rec in records:
                    if controller.handle(rec.value) == RETRY:
                        consumer.seek(tp, rec.offset)
                        stop.wait(retry_pause_s)
                        break
                    commit_after(consumer, tp, rec)
    finally:
        consumer.close()
