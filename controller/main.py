"""``nec-serve controller``: provision workflows from the platform topic."""

from __future__ import annotations

import argparse
import signal
import threading

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    """Register the ``controller`` subcommand."""
    s = sub.add_parser("controller", help="listen on system.ML and provision workflows")
    s.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    s.add_argument("--topic", default="system.ML")
    s.add_argument("--dead-letter-topic", default="nec.deadletter")
    s.add_argument("--status-topic", default="monitoring.notify")
    s.add_argument(
        "--attempts", type=int, default=3, help="tries of a Kubernetes/store call before failing"
    )
    s.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry")
    s.add_argument("--config-dir", help="local mode: config store directory")
    s.add_argument(
        "--sink",
        action="append",
        default=[],
        help="local mode: SERVICE=URL of a wrapper's HTTP trigger (repeatable)",
    )
    s.add_argument(
        "--kubernetes",
        action="store_true",
        help="Kubernetes mode: ConfigMaps, Secrets and KafkaSources",
    )
    s.add_argument("--namespace", default="nec", help="Kubernetes mode: namespace")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT."""
    from nec_controller.app import Controller, run_controller
    from nec_serve.kafka_io import json_producer

    producer = json_producer(args.bootstrap)
    if args.kubernetes:
        from nec_controller.sources import KubernetesSources
        from nec_serve.config_store import KubernetesConfigStore

        store = KubernetesConfigStore(args.namespace)
        sources = KubernetesSources(args.bootstrap.split(","), namespace=args.namespace)
    else:
        from nec_controller.sources import LocalSources
        from nec_serve.config_store import LocalConfigStore

        if not args.config_dir:
            raise SystemExit("controller: local mode needs --config-dir")
        sinks = dict(s.split("=", 1) for s in args.sink)
        store = LocalConfigStore(args.config_dir)
        sources = LocalSources(
            args.bootstrap, sinks, producer=producer, dead_letter_topic=args.dead_letter_topic
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"controller listening on {args.topic} at {args.bootstrap}", flush=True)
    try:
        run_controller(
            Controller(
                store,
                sources,
                producer,
                dead_letter_topic=args.dead_letter_topic,
                status_topic=args.status_topic,
                attempts=args.attempts,
                backoff_s=args.backoff,
            ),
            args.bootstrap,
            args.topic,
            stop,
        )
    except KeyboardInterrupt:
        pass
    finally:
        sources.close()
        producer.close(timeout=10)
    return 0
