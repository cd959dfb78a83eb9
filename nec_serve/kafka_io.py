"""Kafka helpers shared by the controller and the wrapper (kafka-python)."""

from __future__ import annotations

import json

__all__ = ["json_producer"]


def json_producer(bootstrap_servers: str, timeout_s: float = 15.0):
    """A durable JSON producer: acks from all in-sync replicas, bounded blocking.

    Callers wait on ``send(...).get(timeout)`` so that a message counts as written only
    once the broker acknowledged it.
    """
    from kafka import KafkaProducer

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
