"""Kafka helpers shared by the controller and the wrapper (kafka-python)."""

from __future__ import annotations

import json
import logging

__all__ = ["json_producer", "manual_commit_consumer", "commit_after"]

log = logging.getLogger(__name__)


def json_producer(bootstrap_servers: str, timeout_s: float = 15.0):
    """A durable JSON producer: acks from all in-sync replicas, bounded blocking.

    Callers wait on ``send(...).get(timeout)`` so that a message counts as written only
    once the broker acknowledged it.
    """
    from kafka import KafkaProducer  # optional (workflow extra): the core imports without it

    ms = int(timeout_s * 1000)
    return KafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        retries=5,
        max_block_ms=ms,
        request_timeout_ms=ms,
        value_serializer=lambda v: json.dumps(v).encode(),
        key_serializer=lambda k: k.encode() if isinstance(k, str) else k,
    )


def manual_commit_consumer(bootstrap_servers: str, group_id: str, *topics: str, **kwargs):
    """A consumer for at-least-once processing: no auto-commit, from the earliest offset.

    Offsets move only through :func:`commit_after`, once a message is done with. Metadata
    is refreshed every few seconds so topics created after subscribing are seen quickly.
    ``kwargs`` (``max_poll_records``, ``max_poll_interval_ms``, ...) go to KafkaConsumer.
    """
    from kafka import KafkaConsumer  # optional (workflow extra): the core imports without it

    return KafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        metadata_max_age_ms=3000,
        **kwargs,
    )


def commit_after(consumer, tp, record) -> bool:
    """Commit the offset after ``record``: it will not be delivered to this group again.

    A commit the broker refuses (a rebalance moved the partition, the broker is away) is
    logged and reported as False, not raised: the record is then delivered again, which
    processing is safe against, and the consumer goes on.
    """
    from kafka import OffsetAndMetadata  # optional (workflow extra), as above
    from kafka.errors import KafkaError  # optional (workflow extra), as above

    try:
        consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "", -1)})
    except KafkaError as err:
        log.warning(
            "could not commit %s@%d (%s); it will be delivered again", tp, record.offset, err
        )
        return False
    return True
