"""One workflow step: the handler behind both triggers (HTTP from a KafkaSource, Kafka).

``StepHandler.handle(config_name, raw)`` does everything for one message and reports
whether the message is done with (``Outcome.done``): it parses and validates the message,
finds the workflow's config, downloads the input, runs the graph through the inference
engine in batches, entropy-codes (or decodes) locally, uploads the result under a
deterministic key, sends the next message and emits status events. Transient failures
(S3, the inference server or the config store unreachable) are retried with backoff a
bounded number of times; whatever still fails, every invalid message and any unexpected
error get a ``failed`` status with a reason naming the input object (never a local path
or a credential) and a dead-letter record, after which the message is done with so it
never blocks its partition. A message is only "done" once its output object, its next
message (or its dead-letter record) and its status are durably written: the trigger
acknowledges it (Kafka commit, HTTP 2xx) only then.

Each next-step message carries a deterministic id (the workflow and its topics, the input
object with its version and ETag, component, step: :func:`message_id`); once it is
published, a marker object ``.nec-published/<component>/<id>.json`` in the workflow's
bucket records it, and a redelivered message whose marker exists is not
processed or published again. The marker is written right after the broker acknowledged
the next message, so the one window left for a duplicate is a crash between the two.

Each step works in its own directory under the work dir, locked while in use; directories
of steps whose process died (killed mid-step) are removed when the next handler starts and
before each step.

Status events use EO4EU's vocabulary (:func:`nec_serve.messages.status_event`): ``START``
when a message is taken on, ``INFO`` progress lines (``"overwrite": true``) after the
download and after the coding, ``SUCCESS`` or ``CRITICAL``. Every message is counted in the
handler's :class:`~nec_serve.metrics.WrapperMetrics` (by outcome, failures by class, stage
seconds from the step's report, bytes, tiles in flight, retries, dead letters), and logged
under its id (:func:`nec_serve.logs.trace_id`) with its workflow and input key, the
workflow's credentials scrubbed from every line.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import resource
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from nec_serve import s3
from nec_serve.bundle import ModelBundle
from nec_serve.config_store import ConfigStore
from nec_serve.contract import decode_outputs, rate_knobs
from nec_serve.engines import make_engine
from nec_serve.errors import InvalidInput, NecError, TransientError
from nec_serve.imagery import InputLimits, iter_inputs
from nec_serve.logs import bind, current, current_message_id, log_context, trace_id
from nec_serve.messages import (
    DEAD_LETTER_TOPIC,
    MAX_MESSAGE_BYTES,
    STATUS_KEY,
    STATUS_TOPIC,
    PodIdentity,
    RateKnob,
    StepMessage,
    StepRequest,
    WorkflowConfig,
    dead_letter_body,
    parse_step,
    parse_step_request,
    public_reason,
    scrub_values,
    status_event,
)
from nec_serve.metrics import WrapperMetrics, failure_class
from nec_serve.pipeline import (
    coding_levels,
    compress,
    default_output,
    output_writer,
)
from nec_serve.reports import (
    CompressReport,
    DecodeReport,
    DuplicateReport,
    Rate,
    StageTimer,
    StepReport,
)
from nec_serve.retry import GaveUp, retrying
from nec_wrapper.triggers import SESSION_TIMEOUT_S

__all__ = [
    "WrapperSettings",
    "MODES",
    "TRIGGERS",
    "Outcome",
    "StepHandler",
    "output_name",
    "message_id",
    "clean_work_dirs",
    "MARKER_PREFIX",
]

log = logging.getLogger(__name__)

_INPUT_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tiff", ".tif", ".npy", ".necb")
#: Where published next-step messages are recorded, per component, in the workflow bucket.
MARKER_PREFIX = ".nec-published"
_WORK_PREFIX = "nec-step-"
_OWNER_LOCK = ".owner.lock"
# A work directory younger than this without its lock file may be one being created.
_UNLOCKED_GRACE_S = 60.0
_SENT_MEMORY = 1024


#: A wrapper's steps, and how it is reached.
MODES = ("compress", "decompress")
TRIGGERS = ("http", "kafka")


@dataclass(frozen=True)
class WrapperSettings:
    """Everything a wrapper process is configured with (built once in ``main``)."""

    mode: str  # "compress" or "decompress"
    model_dir: Path
    bootstrap_servers: str
    server: str | None = None  # grpc://host:port; None runs the graphs in-process
    status_topic: str = STATUS_TOPIC
    dead_letter_topic: str = DEAD_LETTER_TOPIC
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    max_input_bytes: int = 4 << 30
    batch_size: int = 8
    attempts: int = 3
    backoff_s: float = 1.0
    bands: tuple[int, ...] | None = None
    output: str | None = None  # None: the export's default (pipeline.default_output)
    s3_timeout_s: float = 30.0
    limits: InputLimits = field(default_factory=InputLimits)
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # How the process is reached and where it finds configs (used by main, not the handler).
    trigger: str = "http"  # "http" (a KafkaSource's POSTs) or "kafka" (consume directly)
    host: str = "127.0.0.1"  # the HTTP trigger's and the metrics endpoint's address
    port: int = 8080
    metrics_port: int = 9090  # GET /metrics (Prometheus); 0: none
    group: str = ""  # the consumer group; "" gives nec-wrapper-<mode>
    session_timeout_s: float = SESSION_TIMEOUT_S  # kafka trigger: the group's session timeout
    service: str | None = None  # kafka trigger: only workflows whose ML.ServiceName is this
    config_dir: Path | None = None  # local config store
    namespace: str | None = None  # Kubernetes config store (ConfigMaps and Secrets)

    def __post_init__(self) -> None:
        """Refuse settings that cannot work, naming the setting."""
        for name in ("model_dir", "work_dir", "config_dir"):  # flags give them as text
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.mode not in MODES:
            raise InvalidInput(f"invalid wrapper mode {self.mode!r}: compress or decompress")
        if self.attempts < 1 or self.batch_size < 1:
            raise InvalidInput("attempts and batch size must be >= 1")
        if self.max_message_bytes < 1 or self.max_input_bytes < 1:
            raise InvalidInput("max message bytes and max input bytes must be >= 1")
        if self.trigger not in TRIGGERS:
            raise InvalidInput(f"invalid wrapper trigger {self.trigger!r}: http or kafka")
        if not 0 <= self.port <= 65535:
            raise InvalidInput(f"invalid wrapper port {self.port}")
        if not 0 <= self.metrics_port <= 65535:
            raise InvalidInput(f"invalid wrapper metrics port {self.metrics_port}: 0 turns it off")
        if not self.group:
            object.__setattr__(self, "group", f"nec-wrapper-{self.mode}")


@dataclass
class Outcome:
    """What happened to one message."""

    done: bool  # safe to acknowledge (commit / 2xx)
    status: str  # finished | failed | retry
    reason: str = ""
    output_key: str | None = None
    report: StepReport | DuplicateReport | None = None  # finished: what was done
    failure: str = ""  # failed: its class (nec_serve.metrics.FAILURE_REASONS)

    @property
    def stats(self) -> dict:
        """The report's wire form (``nec.stats`` of the ``SUCCESS`` status); {} for none."""
        return {} if self.report is None else self.report.to_wire()

    @property
    def outcome(self) -> str:
        """The ``outcome`` label it is counted under: finished, duplicate, failed or retry."""
        duplicate = self.status == "finished" and self.reason == "duplicate"
        return "duplicate" if duplicate else self.status


def output_name(key: str, mode: str, output: str = "embeddings", rate: int | None = None) -> str:
    """Deterministic output file name for an input key.

    ``.necb`` for compress (``.c<N>.necb`` when the message asks for rate ``N``, e.g. ``N``
    codebooks, so that requests at different rates never overwrite each other); for
    decompress ``.tif`` when the output is bands (a container of several images gives
    ``.tar`` instead, see :func:`nec_serve.pipeline.write_bands`), else ``.npy``.
    """
    name = key.rsplit("/", 1)[-1]
    for suffix in _INPUT_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if mode == "compress":
        return f"{name}.necb" if rate is None else f"{name}.c{rate}.necb"
    return name + output_writer(output).suffix


def message_id(
    workflow: WorkflowConfig, key: str, etag: str, step: str, version_id: str | None = None
) -> str:
    """Deterministic id of the next-step message made from one input object version.

    It names one delivery: the workflow (its name and its input and output topics), the
    step and its rate, the component, and the input object (bucket, key, version id and
    ETag). Two workflows that share a bucket, a component and an input object get
    different ids, so the duplicate marker of one never stops the other's message.
    """
    parts = (
        "nec-step-v2",
        workflow.name,
        workflow.topic_in,
        workflow.topic_out or "",
        workflow.s3.bucket,
        key,
        version_id or "",
        etag,
        workflow.component,
        step,
    )
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def clean_work_dirs(root: Path) -> list[Path]:
    """Remove step directories under ``root`` whose process is gone; returns them.

    A live step holds an exclusive ``flock`` on its directory's lock file; the kernel
    drops it when the process dies, however it dies, so a lock that can be taken marks a
    leftover. Directories of other processes' live steps are never touched.
    """
    removed = []
    for work in Path(root).glob(_WORK_PREFIX + "*"):
        if work.is_symlink() or not work.is_dir():
            continue
        try:
            fd = os.open(work / _OWNER_LOCK, os.O_RDWR)
        except FileNotFoundError:
            try:
                young = time.time() - work.stat().st_mtime < _UNLOCKED_GRACE_S
            except FileNotFoundError:
                continue
            if not young:
                shutil.rmtree(work, ignore_errors=True)
                removed.append(work)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live step owns it
        try:
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
        finally:
            os.close(fd)
    if removed:
        log.warning("removed %d work directories left by dead steps", len(removed))
    return removed


class _WorkDir:
    """A step's own directory, locked while the step runs, removed afterwards."""

    def __init__(self, root: Path):
        self.path = Path(tempfile.mkdtemp(prefix=_WORK_PREFIX, dir=root))
        self._fd = os.open(self.path / _OWNER_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            os.close(self._fd)


class _Metered:
    """An engine whose calls count their tiles as in flight (``nec_wrapper_tiles_in_flight``)."""

    def __init__(self, engine, metrics: WrapperMetrics):
        self.engine = engine
        self.metrics = metrics

    def encode(self, images):
        with self.metrics.in_flight(len(images)):
            return self.engine.encode(images)

    def decode(self, role, symbols):
        with self.metrics.in_flight(len(symbols)):
            return self.engine.decode(role, symbols)


class StepHandler:
    """Processes workflow-step messages; shared by the HTTP and Kafka triggers.

    ``metrics`` (a :class:`~nec_serve.metrics.WrapperMetrics`) counts what it does; by
    default it gets one on a registry of its own.
    """

    def __init__(
        self,
        settings: WrapperSettings,
        store: ConfigStore,
        producer,
        engine=None,
        metrics: WrapperMetrics | None = None,
    ):
        self.settings = settings
        self.store = store
        self.producer = producer
        self.metrics = metrics or WrapperMetrics(settings.mode)
        self.origin = PodIdentity.from_environment()
        self.bundle = ModelBundle.load(settings.model_dir)
        self.output = settings.output or default_output(self.bundle)
        role = decode_outputs().get(self.output)
        if settings.mode == "decompress" and role and role not in self.bundle.manifest.graphs:
            raise InvalidInput(
                f"--output {self.output} needs the {role} graph; the export at "
                f"{settings.model_dir} has none"
            )
        self.engine = engine or make_engine(self.bundle, settings.server)
        self._metered = _Metered(self.engine, self.metrics)
        self._sent: OrderedDict[str, None] = OrderedDict()  # ids published by this process
        if Path(settings.work_dir).is_dir():
            clean_work_dirs(settings.work_dir)

    # -- the entry points ----------------------------------------------------------

    def handle(self, config_name: str, raw: bytes | None) -> Outcome:
        """Process one message end to end; never raises, whatever the message holds."""
        with self._message(config_name, raw):
            log.info("message received for %s (%d bytes)", config_name, len(raw or b""))
            try:
                out = self._handle(config_name, raw)
            except Exception as err:  # the consumer boundary: a bug must not stall the topic
                log.exception("unexpected error handling a message for %s", config_name)
                out = self._reject(config_name, raw, public_reason(err), "internal")
            self._count(out)
            return out

    def reject(self, config_name: str, raw: bytes | None, err: NecError) -> Outcome:
        """Fail a message that cannot even be handled (the trigger's own checks)."""
        with self._message(config_name, raw):
            out = self._reject(config_name, raw, public_reason(err), failure_class(err))
            self._count(out)
            return out

    def _message(self, config_name: str, raw: bytes | None):
        """The log context of one message: its id and this step (the workflow once known)."""
        return log_context(
            message_id=trace_id(raw), step=self.settings.mode, component="nec-" + self.settings.mode
        )

    def _count(self, out: Outcome) -> None:
        self.metrics.outcome(out.outcome, out.failure or "internal")

    def _reject(self, config_name: str, raw, reason: str, failure: str) -> Outcome:
        try:
            workflow = self.store.get(config_name)
        except Exception:  # unknown or unreadable: fail it under its config name
            workflow = None
        component = workflow.component if workflow else "nec-" + self.settings.mode
        return self._give_up(config_name, raw, workflow, component, reason, 1, failure)

    def _retrying(self, what: str, fn, kind: str):
        """``fn()`` with the settings' bounded retries (:func:`nec_serve.retry.retrying`).

        Each retry is counted under ``kind`` (:data:`nec_serve.metrics.RETRIED`).
        """
        return retrying(
            fn,
            self.settings.attempts,
            self.settings.backoff_s,
            what,
            on_retry=lambda _err: self.metrics.retried(kind),
        )

    def _handle(self, config_name: str, raw: bytes | None) -> Outcome:
        workflow: WorkflowConfig | None = None
        component = "nec-" + self.settings.mode
        try:
            workflow = self._retrying("config", lambda: self.store.get(config_name), "config")
            component = workflow.component
            creds = workflow.s3
            secrets = (creds.access_key_id, creds.secret_access_key) if creds else ()
            bind(workflow=workflow.name, component=component, secrets=secrets)
            step = parse_step(raw, max_bytes=self.settings.max_message_bytes)
            bind(input_key=step.key or None)
            step = parse_step_request(step, rates=self._rate_knobs())
        except GaveUp as err:
            return self._give_up(
                config_name, raw, workflow, component, err.reason, err.attempts, failure_class(err)
            )
        except Exception as err:
            reason = public_reason(err)
            return self._give_up(
                config_name, raw, workflow, component, reason, 1, failure_class(err)
            )

        t0 = time.perf_counter()
        mode = self.settings.mode
        self._status(component, workflow.name, "started", f"{mode} {step.key}", input_key=step.key)
        if Path(self.settings.work_dir).is_dir():
            clean_work_dirs(self.settings.work_dir)
        try:
            out = self._retrying(step.key, lambda: self._run(workflow, step), "step")
        except GaveUp as err:
            return self._give_up(
                config_name, raw, workflow, component, err.reason, err.attempts, failure_class(err)
            )
        if isinstance(out.report, StepReport):
            self.metrics.observe_step(out.report)
        log.info(
            "%s %s -> %s (%s) in %.2f s",
            mode,
            step.key,
            out.output_key,
            out.reason or "done",
            time.perf_counter() - t0,
        )
        self._status(
            component,
            workflow.name,
            "finished",
            _finished_text(mode, step.key, out),
            input_key=step.key,
            output_key=out.output_key,
            stats=out.stats,
        )
        return out

    # -- the work ------------------------------------------------------------------

    def _rate_knobs(self) -> list[RateKnob]:
        """The rate knobs a compress message may set: every family's, checked by the export.

        A knob of another family is refused by :func:`coding_levels`, naming the family.
        """
        if self.settings.mode != "compress":
            return []
        check = partial(coding_levels, self.bundle)
        return [RateKnob(name, check) for name in rate_knobs()]

    def _run(self, workflow: WorkflowConfig, step: StepRequest) -> Outcome:
        client = s3.make_client(workflow.s3, timeout_s=self.settings.s3_timeout_s)
        rate = step.rate
        out_name = output_name(step.key, self.settings.mode, self.output, rate)
        out_key = f"result-{workflow.component}/{out_name}"
        _, etag, version = s3.describe(client, workflow.s3.bucket, step.key)
        what = self.settings.mode + ("" if rate is None else f":c{rate}")
        msg_id = message_id(workflow, step.key, etag, what, version)
        marker = f"{MARKER_PREFIX}/{workflow.component}/{msg_id}.json"
        done_key = self._published_output(client, workflow.s3.bucket, marker, out_key)
        if done_key:
            log.info("%s: already published as %s; not sent again", step.key, msg_id)
            report = DuplicateReport(step.key, done_key, msg_id)
            return Outcome(True, "finished", "duplicate", output_key=done_key, report=report)
        timer = StageTimer()
        with _WorkDir(self.settings.work_dir) as work:
            report = self._process(client, workflow, step, work / out_name, etag, msg_id, timer)
            self._publish(client, workflow, step, report, marker, etag, timer)
        report = report.with_kafka(timer.seconds("kafka"))
        return Outcome(True, "finished", output_key=report.output_key, report=report)

    def _process(self, client, workflow, step, dest, etag, msg_id, timer) -> StepReport:
        """Download the input, compress or decode it into ``dest``'s folder, upload that.

        Returns the step's report as the next-step message carries it (no kafka seconds).
        """
        bucket, mode = workflow.s3.bucket, self.settings.mode
        label = f"s3://{bucket}/{step.key}"
        src = dest.parent / "in" / step.filename  # the name tiles are recorded under
        src.parent.mkdir()
        with timer.stage("s3_get"):
            n_in = s3.download(
                client, bucket, step.key, src, self.settings.max_input_bytes, etag=etag
            )
        with timer.stage("process"):  # from the download's end, its progress event included
            self._progress(workflow, f"{mode} {step.key}: read {n_in} bytes")
            result, rate, dest = self._produce(src, dest, label, step.rate)
        out_key = f"result-{workflow.component}/{dest.name}"
        with timer.stage("s3_put"):
            self._progress(
                workflow,
                f"{mode} {step.key}: {result.tiles} tiles done in "
                f"{timer.seconds('process'):.1f} s; writing {out_key}",
            )
            _upload(client, bucket, dest, out_key)
        return StepReport(
            mode=mode,
            result=result,
            rate=rate,
            message_id=msg_id,
            input_key=step.key,
            output_key=out_key,
            bytes_in=n_in,
            bytes_out=dest.stat().st_size,
            s3_get_s=timer.seconds("s3_get"),
            process_s=timer.seconds("process"),
            s3_put_s=timer.seconds("s3_put"),
            max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        )

    def _produce(
        self, src: Path, dest: Path, label: str, rate: int | None
    ) -> tuple[CompressReport | DecodeReport, Rate | None, Path]:
        """Compress or decode ``src`` into ``dest``: the report, the rate asked, the file.

        The file is ``dest`` but where the output writer chose another name (bands of
        several images: a tar, not a GeoTIFF). Errors name the input object.
        """
        try:
            if self.settings.mode == "compress":
                knob = self.bundle.manifest.family_spec.rate
                asked = None if rate is None else Rate(knob, rate)
                return self._compress(src, dest, label, rate), asked, dest
            result = self._decompress(src, dest, label)
            return result, None, Path(result.path)
        except NecError as err:  # name the input object in every reason
            if label in err.message:
                raise
            raise type(err)(f"{label}: {err.message}") from err

    def _publish(self, client, workflow, step, report: StepReport, marker, etag, timer) -> None:
        """Send the next-step message carrying ``report`` once, then record it under ``marker``.

        Both are timed as stage ``kafka``.
        """
        msg_id, out_key = report.message_id, report.output_key
        out_name = out_key.rsplit("/", 1)[-1]
        nxt = StepMessage(
            True, f"result-{workflow.component}", out_name, {**step.meta, "nec": report.to_wire()}
        )
        with timer.stage("kafka"):
            if msg_id not in self._sent:  # sent in an earlier attempt whose marker failed
                self._send(workflow.topic_out, nxt.to_dict(), key=out_key)
                self._remember(msg_id)
                log.info("published %s on %s as message %s", out_key, workflow.topic_out, msg_id)
            s3.put_json(
                client,
                workflow.s3.bucket,
                marker,
                {"message_id": msg_id, "input_key": step.key, "etag": etag, "output_key": out_key},
            )

    @staticmethod
    def _published_output(client, bucket: str, marker: str, out_key: str) -> str | None:
        """The output key of an already published message (its marker and output exist).

        The marker names the output it published (bands of several images go to a
        ``.tar``, not the ``.tif`` the input's name gives); a marker that names none in
        this component's result folder stands for ``out_key``.
        """
        record = s3.get_json(client, bucket, marker)
        if record is None:
            return None
        key = record.get("output_key")
        if not isinstance(key, str) or key.rsplit("/", 1)[0] != out_key.rsplit("/", 1)[0]:
            key = out_key
        return key if s3.exists(client, bucket, key) else None

    def _remember(self, msg_id: str) -> None:
        self._sent[msg_id] = None
        while len(self._sent) > _SENT_MEMORY:
            self._sent.popitem(last=False)

    def _compress(self, src: Path, dest: Path, label: str, rate: int | None) -> CompressReport:
        bands = list(self.settings.bands) if self.settings.bands else None
        with dest.open("wb") as f:
            stats = compress(
                iter_inputs(src, bands, limits=self.settings.limits, label=label),
                self.bundle,
                self._metered,
                f,
                bands=bands,
                batch_size=self.settings.batch_size,
                rate=rate,
            )
        return stats.report()

    def _decompress(self, src: Path, dest: Path, label: str) -> DecodeReport:
        return output_writer(self.output).write(
            src,
            dest,
            self.bundle,
            self._metered,
            self.output,
            batch_size=self.settings.batch_size,
            limits=self.settings.limits,
            label=label,
        )

    # -- Kafka side effects ----------------------------------------------------------

    def _send(self, topic: str, value: dict, key: str | None = None) -> None:
        try:
            self.producer.send(topic, value=value, key=key).get(timeout=30)
        except Exception as err:  # kafka-python raises KafkaError subclasses and timeouts
            raise TransientError(f"could not write to Kafka topic {topic!r}: {err}") from err

    def _status(self, component: str, workflow: str, event: str, description: str, **nec) -> None:
        """Send a status event (:func:`~nec_serve.messages.status_event`) about this message.

        ``nec`` gets the message id, the step and the input key (as far as known) besides
        the fields given.
        """
        known = {
            "message_id": current_message_id(),
            "step": self.settings.mode,
            "input_key": current().get("input_key"),
            **nec,
        }
        value = status_event(
            component,
            workflow,
            event,
            description,
            origin=self.origin,
            nec={k: v for k, v in known.items() if v is not None},
        )
        self._send(self.settings.status_topic, value, key=STATUS_KEY)

    def _progress(self, workflow: WorkflowConfig, description: str) -> None:
        """A progress line (``INFO``, replacing the previous one); never fails the step."""
        try:
            self._status(workflow.component, workflow.name, "progress", description)
        except TransientError as err:
            log.warning("progress status not sent: %s", err)

    def _give_up(self, config_name, raw, workflow, component, reason, attempts, failure) -> Outcome:
        """Dead-letter ``raw`` and emit ``failed``; the message is then done with."""
        name = workflow.name if workflow else config_name
        secrets = (workflow.s3.access_key_id, workflow.s3.secret_access_key) if workflow else ()
        reason = scrub_values(reason, secrets)  # an error's text may quote a key it was given
        log.error("step failed (%s) for %s: %s", failure, name, reason)
        record = {
            "component_name": component,
            "workflow_name": name,
            "config": config_name,
            "error": reason,
            "attempts": attempts,
            **dead_letter_body(raw, secrets),
        }
        try:
            self._send(self.settings.dead_letter_topic, record, key=config_name)
            self.metrics.dead_lettered.labels(self.settings.mode).inc()
            self._status(component, name, "failed", reason, reason=reason, failure=failure)
        except TransientError as err:
            # Nothing durable was written: leave the message unacknowledged for redelivery.
            return Outcome(False, "retry", f"{reason}; and {err}")
        return Outcome(True, "failed", reason, failure=failure)


def _upload(client, bucket: str, dest: Path, out_key: str) -> None:
    """Upload ``dest`` as ``out_key``, and what decompressing writes beside it."""
    s3.upload(client, dest, bucket, out_key)
    for suffix in (".tiles.json", ".classes.json"):
        extra = dest.with_suffix(suffix)
        if extra.exists():
            s3.upload(client, extra, bucket, out_key[: -len(dest.suffix)] + suffix)


def _finished_text(mode: str, key: str, out: Outcome) -> str:
    """The ``SUCCESS`` description: what was done, in a line (the numbers are in ``nec``)."""
    report = out.report
    if not isinstance(report, StepReport):
        return f"{mode} {key}: already published as {out.output_key}"
    bpp = "" if report.bits_per_pixel is None else f", {report.bits_per_pixel} bits/pixel"
    return (
        f"{mode} {key} -> {out.output_key}: {report.result.tiles} tiles, "
        f"{report.bytes_in} -> {report.bytes_out} bytes{bpp}"
    )
