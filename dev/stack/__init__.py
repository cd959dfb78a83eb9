"""The local embedded stack (DESIGN section 8): real servers started by the project's own code.

- :class:`LocalKafka` (:mod:`nec_dev.stack.kafka`): an Apache Kafka broker and KRaft
  controller in one JVM, from Kafka's release jars on Maven Central, which
  :func:`ensure_kafka` fetches once with ``scripts/fetch_kafka.sh``.
- :class:`LocalS3` (:mod:`nec_dev.stack.s3`): moto's S3 server in a child process.

Each runs in its own process session on free loopback ports and is a context manager with
``start``, ``stop``, ``kill`` and ``restart``. The names are imported lazily, on first use, so
importing this package costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "KafkaStartError",
    "LocalKafka",
    "LocalS3",
    "S3StartError",
    "ensure_kafka",
]

_WHERE = {
    "KafkaStartError": "kafka",
    "LocalKafka": "kafka",
    "ensure_kafka": "kafka",
    "LocalS3": "s3",
    "S3StartError": "s3",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
