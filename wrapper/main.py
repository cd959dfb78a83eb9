"""``nec-serve wrapper``: run a workflow step behind HTTP (KafkaSource) or Kafka."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from nec_serve.config_store import KubernetesConfigStore, LocalConfigStore
from nec_serve.contract import decode_outputs
from nec_serve.errors import InvalidInput
from nec_serve.imagery import InputLimits, parse_bands
from nec_serve.kafka_io import json_producer
from nec_serve.metrics import add_service_flags, serve_metrics
from nec_serve.settings_flags import add_settings_flags, field_default, settings_values
from nec_wrapper.step import MODES, TRIGGERS, StepHandler, WrapperSettings
from nec_wrapper.triggers import (
    SESSION_TIMEOUT_BOUNDS_S,
    make_http_server,
    run_consumer,
    session_timeout,
)

__all__ = ["add_parser", "settings_from_args"]

log = logging.getLogger(__name__)


#: The wrapper's flags not named after their setting.
_FLAGS = {
    "bootstrap_servers": "--bootstrap",
    "backoff_s": "--backoff",
    "session_timeout_s": "--session-timeout",
}
_HELP = {
    "model_dir": "directory written by export",
    "bootstrap_servers": "Kafka bootstrap servers",
    "host": "address of the HTTP trigger and the metrics endpoint",
    "port": "HTTP trigger port",
    "config_dir": "local config store (local mode)",
    "namespace": "read configs from ConfigMaps/Secrets (Kubernetes mode)",
    "server": "Triton URL (grpc://host:port); default: in-process",
    "output": "what decompress writes (default: the export's family's default output)",
    "group": "consumer group (kafka trigger; default nec-wrapper-MODE)",
    "service": "kafka trigger: consume only the workflows whose ML.ServiceName is this "
    "(default: every stored workflow)",
    "session_timeout_s": "seconds without a heartbeat before the group gives a dead wrapper's "
    "partitions to the others (kafka trigger; %g..%g)" % SESSION_TIMEOUT_BOUNDS_S,
    "max_input_bytes": "largest input object to download",
    "max_message_bytes": "largest workflow message accepted",
    "work_dir": "where steps unpack their inputs (default: the tmp dir)",
}
_CHOICES = {"mode": {"choices": MODES}, "trigger": {"choices": TRIGGERS}}
_LIMITS_HELP = {
    "max_pixels": "pixels (height x width) one image may declare",
    "max_bands": "bands one image may declare",
    "max_image_bytes": "decoded bytes one image may declare",
    "max_decoded_bytes": "decoded bytes all images of one input may declare",
    "max_tiles": "tiles one container may hold",
}


def add_parser(sub) -> None:
    """Register the ``wrapper`` subcommand (its flags are :class:`WrapperSettings` fields)."""
    s = sub.add_parser("wrapper", help="run the workflow step (compress or decompress)")

    def flags(*names: str, **options) -> None:
        add_settings_flags(s, WrapperSettings, names, rename=_FLAGS, help=_HELP, options=options)

    flags("mode", "model_dir", "bootstrap_servers", "trigger", "host", "port", **_CHOICES)
    add_service_flags(s, metrics_port=field_default(WrapperSettings, "metrics_port"))
    flags("config_dir", "namespace", "server")
    s.add_argument("--bands", help="1-based bands to read, e.g. 1,2,3")
    flags(
        "output",
        "status_topic",
        "dead_letter_topic",
        "group",
        "service",
        "session_timeout_s",
        "attempts",
        "backoff_s",
        "batch_size",
        "max_input_bytes",
        output={"choices": tuple(decode_outputs())},
        session_timeout_s={"type": session_timeout},
    )
    add_settings_flags(s, InputLimits, help=_LIMITS_HELP)
    flags("max_message_bytes", "work_dir", work_dir={"default": None})
    s.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> WrapperSettings:
    """The wrapper's one settings object, from the parsed flags (checked there)."""
    if not args.namespace and not args.config_dir:
        raise InvalidInput("wrapper: give --config-dir (local) or --namespace (Kubernetes)")
    bands = parse_bands(args.bands)
    values = settings_values(args, WrapperSettings, _FLAGS)
    values["bands"] = tuple(bands) if bands else None  # the flag is text: "1,2,3"
    return WrapperSettings(**values, limits=InputLimits(**settings_values(args, InputLimits)))


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
