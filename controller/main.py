"""``nec-serve controller``: provision workflows from the platform topic."""

from __future__ import annotations

import argparse
import signal
import threading
from dataclasses import dataclass

from nec_controller.app import Controller, run_controller
from nec_controller.sources import FEEDS, ConsumerFeed, KubernetesSources, LocalSources
from nec_serve.config_store import KubernetesConfigStore, LocalConfigStore
from nec_serve.errors import InvalidInput
from nec_serve.kafka_io import json_producer
from nec_serve.messages import DEAD_LETTER_TOPIC, STATUS_TOPIC
from nec_serve.metrics import ControllerMetrics, add_service_flags, serve_metrics
from nec_serve.settings_flags import add_settings_flags, field_default, settings_values

__all__ = ["add_parser", "ControllerSettings"]


@dataclass(frozen=True)
class ControllerSettings:
    """Everything the controller process is configured with, checked; built once in ``run``."""

    bootstrap_servers: str
    topic: str = "system.ML"
    dead_letter_topic: str = DEAD_LETTER_TOPIC
    status_topic: str = STATUS_TOPIC
    attempts: int = 3
    backoff_s: float = 1.0
    kubernetes: bool = False
    namespace: str = "nec"
    config_dir: str | None = None
    sinks: tuple[tuple[str, str], ...] = ()  # local mode: (service, wrapper URL)
    feed: str = "kafkasource"  # how workflows reach the wrappers (sources.FEEDS)
    host: str = "127.0.0.1"  # the metrics endpoint's address
    metrics_port: int = 9091  # GET /metrics (Prometheus); 0: none

    def __post_init__(self) -> None:
        """Refuse settings that cannot work, naming the setting."""
        if not self.bootstrap_servers.strip():
            raise InvalidInput("controller: --bootstrap is empty")
        if self.attempts < 1:
            raise InvalidInput(f"controller: --attempts {self.attempts}, expected >= 1")
        if self.backoff_s < 0:
            raise InvalidInput(f"controller: --backoff {self.backoff_s}, expected >= 0")
        if not 0 <= self.metrics_port <= 65535:
            raise InvalidInput(
                f"controller: --metrics-port {self.metrics_port}, expected 1..65535 or 0 (none)"
            )
        if self.feed not in FEEDS:
            raise InvalidInput(f"controller: --feed {self.feed!r}, expected one of {FEEDS}")
        if not self.kubernetes and not self.config_dir:
            raise InvalidInput("controller: local mode needs --config-dir (or give --kubernetes)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ControllerSettings:
        """From the parsed flags; ``--sink`` values must be ``SERVICE=URL``."""
        sinks = []
        for value in args.sink:
            service, sep, url = value.partition("=")
            if not sep or not service or not url.startswith(("http://", "https://")):
                raise InvalidInput(f"controller: --sink {value!r}, expected SERVICE=http(s)://...")
            sinks.append((service, url))
        return cls(**settings_values(args, cls, _FLAGS), sinks=tuple(sinks))


#: The controller's flags not named after their setting.
_FLAGS = {"bootstrap_servers": "--bootstrap", "backoff_s": "--backoff"}
_HELP = {
    "bootstrap_servers": "Kafka bootstrap servers",
    "attempts": "tries of a Kubernetes/store call before failing",
    "backoff_s": "seconds before the first retry",
    "config_dir": "local mode: config store directory",
    "kubernetes": "Kubernetes mode: ConfigMaps, Secrets and KafkaSources",
    "namespace": "Kubernetes mode: namespace",
    "feed": "how workflows reach the wrappers: a KafkaSource each (default), or 'consumers' "
    "when the wrappers consume the topics themselves (--trigger kafka; nothing is created)",
    "host": "address of the metrics endpoint",
}


def add_parser(sub) -> None:
    """Register the ``controller`` subcommand."""
    s = sub.add_parser("controller", help="listen on system.ML and provision workflows")
    add_settings_flags(
        s,
        ControllerSettings,
        (
            "bootstrap_servers",
            "topic",
            "dead_letter_topic",
            "status_topic",
            "attempts",
            "backoff_s",
            "config_dir",
        ),
        rename=_FLAGS,
        help=_HELP,
    )
    s.add_argument(
        "--sink",
        action="append",
        default=[],
        help="local mode: SERVICE=URL of a wrapper's HTTP trigger (repeatable)",
    )
    add_settings_flags(
        s,
        ControllerSettings,
        ("kubernetes", "namespace", "feed", "host"),
        help=_HELP,
        options={"feed": {"choices": FEEDS}},
    )
    add_service_flags(s, metrics_port=field_default(ControllerSettings, "metrics_port"))
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT."""
    settings = ControllerSettings.from_args(args)
    producer = json_producer(settings.bootstrap_servers)
    if settings.kubernetes:
        store = KubernetesConfigStore(settings.namespace)
    else:
        store = LocalConfigStore(settings.config_dir)
    if settings.feed == "consumers":
        sources = ConsumerFeed()
    elif settings.kubernetes:
        sources = KubernetesSources(
            settings.bootstrap_servers.split(","), namespace=settings.namespace
        )
    else:
        sources = LocalSources(
            settings.bootstrap_servers,
            dict(settings.sinks),
            producer=producer,
            dead_letter_topic=settings.dead_letter_topic,
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    metrics = ControllerMetrics()
    try:
        server = serve_metrics(metrics.registry, settings.host, settings.metrics_port)
    except InvalidInput:
        sources.close()
        producer.close(timeout=10)
        raise
    if server is not None:
        print(
            f"controller metrics on http://{settings.host}:{settings.metrics_port}/metrics",
            flush=True,
        )
    controller = Controller(
        store,
        sources,
        producer,
        dead_letter_topic=settings.dead_letter_topic,
        status_topic=settings.status_topic,
        attempts=settings.attempts,
        backoff_s=settings.backoff_s,
        metrics=metrics,
    )
    resumed = controller.resume()
    print(f"controller resumed {len(resumed)} stored workflow(s)", flush=True)
    print(f"controller listening on {settings.topic} at {settings.bootstrap_servers}", flush=True)
    try:
        run_controller(
            controller,
            settings.bootstrap_servers,
            settings.topic,
            stop,
        )
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.shutdown()
        sources.close()
        producer.close(timeout=10)
    return 0
