"""``nec-serve wrapper``: run a workflow step behind HTTP (KafkaSource) or Kafka."""

from __future__ import annotations

import argparse
import logging
import signal
import tempfile
import threading
from dataclasses import fields
from pathlib import Path

from nec_serve.config_store import KubernetesConfigStore, LocalConfigStore
from nec_serve.contract import decode_outputs
from nec_serve.errors import InvalidInput
from nec_serve.imagery import InputLimits, parse_bands
from nec_serve.kafka_io import json_producer
from nec_serve.metrics import add_service_flags, serve_metrics
from nec_serve.settings_flags import add_field_flag, field_default
from nec_wrapper.step import StepHandler, WrapperSettings
from nec_wrapper.triggers import (
    SESSION_TIMEOUT_BOUNDS_S,
    make_http_server,
    run_consumer,
    session_timeout,
)

__all__ = ["add_parser", "settings_from_args"]

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    """Register the ``wrapper`` subcommand."""
    s = sub.add_parser("wrapper", help="run the workflow step (compress or decompress)")
    s.add_argument("--mode", choices=("compress", "decompress"), required=True)
    s.add_argument("--model-dir", required=True, help="directory written by export")
    s.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    s.add_argument("--trigger", choices=("http", "kafka"), default="http")
    s.add_argument(
        "--host", default="127.0.0.1", help="address of the HTTP trigger and the metrics endpoint"
    )
    s.add_argument("--port", type=int, default=8080, help="HTTP trigger port")
    add_service_flags(s, metrics_port=9090)
    s.add_argument("--config-dir", help="local config store (local mode)")
    s.add_argument("--namespace", help="read configs from ConfigMaps/Secrets (Kubernetes mode)")
    s.add_argument("--server", help="Triton URL (grpc://host:port); default: in-process")
    s.add_argument("--bands", help="1-based bands to read, e.g. 1,2,3")
    s.add_argument(
        "--output",
        choices=tuple(decode_outputs()),
        default=None,
        help="what decompress writes (default: bands for an RVQ export, else embeddings)",
    )
    add_field_flag(s, "--status-topic", WrapperSettings, "status_topic")
    add_field_flag(s, "--dead-letter-topic", WrapperSettings, "dead_letter_topic")
    s.add_argument(
        "--group", default=None, help="consumer group (kafka trigger; default nec-wrapper-MODE)"
    )
    s.add_argument(
        "--service",
        default=None,
        help="kafka trigger: consume only the workflows whose ML.ServiceName is this "
        "(default: every stored workflow)",
    )
    s.add_argument(
        "--session-timeout",
        type=session_timeout,
        default=field_default(WrapperSettings, "session_timeout_s"),
        help="seconds without a heartbeat before the group gives a dead wrapper's partitions "
        "to the others (kafka trigger; %g..%g)" % SESSION_TIMEOUT_BOUNDS_S,
    )
    add_field_flag(s, "--attempts", WrapperSettings, "attempts", type=int)
    add_field_flag(s, "--backoff", WrapperSettings, "backoff_s", type=float)
    add_field_flag(s, "--batch-size", WrapperSettings, "batch_size", type=int)
    add_field_flag(
        s,
        "--max-input-bytes",
        WrapperSettings,
        "max_input_bytes",
        type=int,
        help="largest input object to download",
    )
    limits = InputLimits()
    for name, help_text in (
        ("max_pixels", "pixels (height x width) one image may declare"),
        ("max_bands", "bands one image may declare"),
        ("max_image_bytes", "decoded bytes one image may declare"),
        ("max_decoded_bytes", "decoded bytes all images of one input may declare"),
        ("max_tiles", "tiles one container may hold"),
    ):
        flag = "--" + name.replace("_", "-")
        s.add_argument(flag, type=int, default=getattr(limits, name), help=help_text)
    s.add_argument(
        "--max-message-bytes",
        type=int,
        default=field_default(WrapperSettings, "max_message_bytes"),
        help="largest workflow message accepted",
    )
    s.add_argument(
        "--work-dir", default=None, help="where steps unpack their inputs (default: the tmp dir)"
    )
    s.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> WrapperSettings:
    """The wrapper's one settings object, from the parsed flags (checked there)."""
    if not args.namespace and not args.config_dir:
        raise InvalidInput("wrapper: give --config-dir (local) or --namespace (Kubernetes)")
    bands = parse_bands(args.bands)
    return WrapperSettings(
        mode=args.mode,
        model_dir=Path(args.model_dir),
        bootstrap_servers=args.bootstrap,
        server=args.server,
        status_topic=args.status_topic,
        dead_letter_topic=args.dead_letter_topic,
        work_dir=Path(args.work_dir or tempfile.gettempdir()),
        max_input_bytes=args.max_input_bytes,
        batch_size=args.batch_size,
        attempts=args.attempts,
        backoff_s=args.backoff,
        bands=tuple(bands) if bands else None,
        output=args.output,
        limits=InputLimits(**{f.name: getattr(args, f.name) for f in fields(InputLimits)}),
        max_message_bytes=args.max_message_bytes,
        trigger=args.trigger,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        group=args.group or "",
        session_timeout_s=args.session_timeout,
        service=args.service,
        config_dir=Path(args.config_dir) if args.config_dir else None,
        namespace=args.namespace,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT."""
    settings = settings_from_args(args)
    store = (
        KubernetesConfigStore(settings.namespace)
        if settings.namespace
        else LocalConfigStore(settings.config_dir)
    )
    producer = json_producer(settings.bootstrap_servers)
    handler = StepHandler(settings, store, producer)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    metrics = None
    try:
        if settings.trigger == "http":
            server = make_http_server(handler, settings.host, settings.port)
            metrics = _serve_metrics(handler, settings)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            print(
                f"wrapper ({settings.mode}) listening on "
                f"http://{settings.host}:{server.server_port}",
                flush=True,
            )
            while not stop.wait(0.5):
                pass
            server.shutdown()
        else:

            def topics():
                return workflow_topics(store, settings.service)

            metrics = _serve_metrics(handler, settings)
            print(
                f"wrapper ({settings.mode}) consuming from {settings.bootstrap_servers}", flush=True
            )
            run_consumer(
                handler,
                settings.bootstrap_servers,
                settings.group,
                topics,
                stop,
                session_timeout_s=settings.session_timeout_s,
            )
    except KeyboardInterrupt:
        pass
    finally:
        if metrics is not None:
            metrics.shutdown()
        producer.close(timeout=10)
    return 0


def workflow_topics(store, service: str | None = None) -> list[str]:
    """Input topics of the stored workflows (of ``service`` only, when given)."""
    found = []
    for name in store.names():
        try:
            config = store.get(name)
        except Exception as err:  # one damaged config must not hide the others
            log.warning("skipping workflow config %s: %s", name, err)
            continue
        if service is None or config.service_name == service:
            found.append(config.topic_in)
    return found


def _serve_metrics(handler: StepHandler, settings: WrapperSettings):
    """The handler's metrics on ``--host``:``--metrics-port`` (None when the port is 0)."""
    server = serve_metrics(handler.metrics.registry, settings.host, settings.metrics_port)
    if server is not None:
        print(
            f"wrapper ({settings.mode}) metrics on "
            f"http://{settings.host}:{settings.metrics_port}/metrics",
            flush=True,
        )
    return server
