"""Prometheus metrics of the wrapper and the controller (``prometheus_client``).

Each process builds its metrics on a :class:`~prometheus_client.CollectorRegistry` of its
own, never the library's global one, so that tests can run several wrappers in one process
and a registry holds exactly one service's metrics. :func:`serve_metrics` exposes a
registry on ``GET /metrics`` (the wrapper's ``--metrics-port``, 9090 by default, the
controller's 9091; 0 turns it off).

Label values are bounded sets, never free text: a step (``compress``/``decompress``), an
outcome of :data:`OUTCOMES`, a failure class of :data:`FAILURE_REASONS`, a stage of
:data:`STAGES`, what was retried (:data:`RETRIED`). Every combination is created at zero up
front, so a rate or a ratio has a series to work on before the first message.

Stage seconds are the ones the step's report holds (:class:`~nec_serve.reports.StepReport`,
published as ``meta_information.nec``), observed field by field once a message is processed
(:meth:`WrapperMetrics.observe_step`): nothing is timed twice, and a report missing a stage
fails loudly.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from nec_serve.errors import InvalidInput, NecError, is_transient
from nec_serve.reports import StepReport
from nec_serve.retry import GaveUp

__all__ = [
    "OUTCOMES",
    "FAILURE_REASONS",
    "STAGES",
    "RETRIED",
    "WORKFLOW_ACTIONS",
    "WrapperMetrics",
    "ControllerMetrics",
    "serve_metrics",
    "failure_class",
    "add_service_flags",
    "sample_names",
]

#: What became of a message in the wrapper (``nec_wrapper_messages_total{outcome}``):
#: processed, found already published, failed (dead-lettered), or left for redelivery.
OUTCOMES = ("finished", "duplicate", "failed", "retry")
#: Why a message failed (``nec_wrapper_messages_failed_total{reason}``,
#: ``nec_controller_messages_rejected_total{reason}``).
FAILURE_REASONS = (
    "invalid_message",  # unparseable, a field missing or wrong, refused by the trigger
    "unknown_workflow",  # no config under the name the message came for
    "input_error",  # the input object (missing, corrupt, over a limit) or what it asks for
    "transient_exhausted",  # S3, Triton, Kafka or the config store still failing after retries
    "internal",  # an error no code path expects (a bug)
)
#: A step's stages (``nec_wrapper_stage_seconds{stage}``); a decompress step has no
#: ``read`` or ``preprocess`` (:meth:`~nec_serve.reports.StepReport.stage_seconds`).
STAGES = ("s3_get", "read", "preprocess", "inference", "coding", "s3_put", "kafka")
#: What the wrapper retries (``nec_wrapper_retries_total{what}``): reading the workflow's
#: config, and the whole step on a transient S3 / Triton / Kafka failure.
RETRIED = ("config", "step")
#: What a controller message did (``nec_controller_workflows_total{action}``).
WORKFLOW_ACTIONS = ("published", "stopped", "unchanged")

_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
)  # fmt: skip
_BPP_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


class WrapperMetrics:
    """The wrapper's metrics (prefix ``nec_wrapper_``) for one step, on ``registry``.

    Args:
        step: the wrapper's mode (``compress`` or ``decompress``), the ``step`` label.
        registry: where to register; a new one by default.
    """

    def __init__(self, step: str, registry: CollectorRegistry | None = None):
        self.step = step
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "nec_wrapper_messages",
            "Messages handled, by outcome",
            ["step", "outcome"],
            registry=r,
        )
        self.failed = Counter(
            "nec_wrapper_messages_failed",
            "Messages failed and dead-lettered, by failure class",
            ["step", "reason"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "nec_wrapper_stage_seconds",
            "Seconds one message spent in each stage of the step",
            ["step", "stage"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.input_bytes = Counter(
            "nec_wrapper_input_bytes", "Bytes of input objects read from S3", ["step"], registry=r
        )
        self.output_bytes = Counter(
            "nec_wrapper_output_bytes",
            "Bytes of output objects written to S3",
            ["step"],
            registry=r,
        )
        self.tiles = Counter("nec_wrapper_tiles", "Tiles coded or decoded", ["step"], registry=r)
        self.bits_per_pixel = Histogram(
            "nec_wrapper_bits_per_pixel",
            "Container bits per source pixel of each compressed input",
            ["step"],
            buckets=_BPP_BUCKETS,
            registry=r,
        )
        self.tiles_in_flight = Gauge(
            "nec_wrapper_tiles_in_flight",
            "Tiles handed to the inference engine and not yet returned",
            ["step"],
            registry=r,
        )
        self.retries = Counter(
            "nec_wrapper_retries", "Retries after transient failures", ["step", "what"], registry=r
        )
        self.dead_lettered = Counter(
            "nec_wrapper_dead_lettered",
            "Records written to the dead-letter topic",
            ["step"],
            registry=r,
        )
        for outcome in OUTCOMES:
            self.messages.labels(step, outcome)
        for reason in FAILURE_REASONS:
            self.failed.labels(step, reason)
        for stage in STAGES:
            self.stage_seconds.labels(step, stage)
        for what in RETRIED:
            self.retries.labels(step, what)
        for metric in (
            self.input_bytes,
            self.output_bytes,
            self.tiles,
            self.bits_per_pixel,
            self.tiles_in_flight,
            self.dead_lettered,
        ):
            metric.labels(step)

    def outcome(self, outcome: str, reason: str | None = None) -> None:
        """Count one message's outcome (and, for ``failed``, its failure class)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.messages.labels(self.step, outcome).inc()
        if outcome == "failed":
            if reason not in FAILURE_REASONS:
                raise ValueError(f"unknown failure class {reason!r}")
            self.failed.labels(self.step, reason).inc()

    def retried(self, what: str) -> None:
        """Count one retry of ``what`` (:data:`RETRIED`)."""
        self.retries.labels(self.step, what).inc()

    def observe_step(self, report: StepReport) -> None:
        """Record a processed message from its report: stage seconds, bytes, tiles, bpp.

        Raises:
            ValueError: the report misses a stage's seconds (``kafka_s`` not yet known) or
                names a stage not in :data:`STAGES`; nothing is recorded then.
        """
        stages = report.stage_seconds()
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"step report has stages {sorted(unknown)} not in {STAGES}")
        for stage, seconds in stages.items():
            self.stage_seconds.labels(self.step, stage).observe(max(seconds, 0.0))
        self.input_bytes.labels(self.step).inc(report.bytes_in)
        self.output_bytes.labels(self.step).inc(report.bytes_out)
        self.tiles.labels(self.step).inc(report.result.tiles)
        if report.bits_per_pixel is not None:
            self.bits_per_pixel.labels(self.step).observe(report.bits_per_pixel)

    @contextmanager
    def in_flight(self, tiles: int) -> Iterator[None]:
        """``tiles`` count as in flight inside the block."""
        gauge = self.tiles_in_flight.labels(self.step)
        gauge.inc(tiles)
        try:
            yield
        finally:
            gauge.dec(tiles)


class ControllerMetrics:
    """The controller's metrics (prefix ``nec_controller_``), on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.workflows = Counter(
            "nec_controller_workflows",
            "Workflow messages applied, by what they did",
            ["action"],
            registry=r,
        )
        self.rejected = Counter(
            "nec_controller_messages_rejected",
            "Workflow messages failed and dead-lettered, by failure class",
            ["reason"],
            registry=r,
        )
        self.active = Gauge(
            "nec_controller_active_workflows",
            "Workflow configs in the store, as of the last message",
            registry=r,
        )
        self.retries = Counter(
            "nec_controller_retries",
            "Retries of Kubernetes API or config store calls",
            registry=r,
        )
        for action in WORKFLOW_ACTIONS:
            self.workflows.labels(action)
        for reason in FAILURE_REASONS:
            self.rejected.labels(reason)


def serve_metrics(registry: CollectorRegistry, host: str, port: int):
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread.

    Returns the server (``shutdown()`` stops it), or None when ``port`` is 0 (off).

    Raises:
        InvalidInput: the address cannot be bound (naming it, and how to choose another).
    """
    if port == 0:
        return None
    if not 0 < port <= 65535:
        raise InvalidInput(f"invalid metrics port {port}: 1..65535, or 0 for none")
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        hint = "in use" if err.errno == errno.EADDRINUSE else err.strerror or str(err)
        raise InvalidInput(
            f"cannot serve metrics on {host}:{port} ({hint}): choose another --metrics-port, "
            "or 0 to serve none"
        ) from err
    return server


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name ``registry`` exposes (``*_total``, ``*_bucket``, ...)."""
    return {s.name for family in registry.collect() for s in family.samples}


def failure_class(err: BaseException) -> str:
    """The failure class (:data:`FAILURE_REASONS`) of what failed a message.

    A :class:`~nec_serve.retry.GaveUp` is judged by the error it ended with. A project
    error carries its class (``NecError.failure``); of the others, those that retrying may
    fix (:func:`nec_serve.errors.is_transient`) are ``transient_exhausted``, the rest
    ``internal``.
    """
    cause = err.__cause__ if isinstance(err, GaveUp) and err.__cause__ is not None else err
    if isinstance(cause, NecError):
        return cause.failure
    if is_transient(cause):
        return "transient_exhausted"
    return "internal"


def add_service_flags(parser, metrics_port: int) -> None:
    """``--metrics-port`` (default ``metrics_port``) and ``--log-format`` of a service command."""
    from nec_serve.logs import LOG_FORMATS

    parser.add_argument(
        "--metrics-port",
        type=int,
        default=metrics_port,
        help="Prometheus metrics on http://HOST:PORT/metrics; 0 serves none",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="log lines as JSON objects or text (default: $NEC_LOG_FORMAT, else json)",
    )
