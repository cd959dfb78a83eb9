"""One workflow step: the handler behind both triggers (HTTP from a KafkaSource, Kafka).

``StepHandler.handle(config_name, raw)`` does everything for one message and reports
whether the message is done with (``Outcome.done``): it parses and validates the message,
finds the workflow's config, downloads the input, runs the graph through the inference
engine in batches, entropy-codes (or decodes) locally, uploads the result under a
deterministic key, sends the next message and emits status events. Transient failures
(S3 or the inference server unreachable) are retried with backoff a bounded number of
times; whatever still fails, and every invalid message, gets a ``failed`` status with the
reason and a dead-letter record, after which the message is done with so it never blocks
its partition. A message is only "done" once its output object, its next message (or its
dead-letter record) and its status are durably written: the trigger acknowledges it
(Kafka commit, HTTP 2xx) only then.
"""

from __future__ import annotations

import base64
import json
import logging
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nec_serve import s3
from nec_serve.config_store import ConfigStore
from nec_serve.container import ContainerReader
from nec_serve.errors import InvalidInput, NecError, TransientError
from nec_serve.imagery import iter_inputs
from nec_serve.messages import (
    StepMessage,
    WorkflowConfig,
    parse_step,
    redacted,
    status_event,
)
from nec_serve.pipeline import ModelBundle, compress, iter_decoded, make_engine, tile_index

__all__ = ["WrapperSettings", "Outcome", "StepHandler", "output_name"]

log = logging.getLogger(__name__)

_INPUT_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tiff", ".tif", ".npy", ".necb")


@dataclass(frozen=True)
class WrapperSettings:
    """Everything a wrapper process is configured with (built once in ``main``)."""

    mode: str  # "compress" or "decompress"
    model_dir: Path
    bootstrap_servers: str
    server: str | None = None  # grpc://host:port; None runs the graphs in-process
    status_topic: str = "monitoring.notify"
    dead_letter_topic: str = "nec.deadletter"
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    max_input_bytes: int = 4 << 30
    batch_size: int = 8
    attempts: int = 3
    backoff_s: float = 1.0
    bands: tuple[int, ...] | None = None
    output: str = "embeddings"
    s3_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        """Refuse settings that cannot work, naming the setting."""
        if self.mode not in ("compress", "decompress"):
            raise InvalidInput(f"invalid wrapper mode {self.mode!r}: compress or decompress")
        if self.attempts < 1 or self.batch_size < 1:
            raise InvalidInput("attempts and batch size must be >= 1")


@dataclass
class Outcome:
    """What happened to one message."""

    done: bool  # safe to acknowledge (commit / 2xx)
    status: str  # finished | failed | retry
    reason: str = ""
    output_key: str | None = None
    stats: dict = field(default_factory=dict)


def output_name(key: str, mode: str) -> str:
    """Deterministic output file name for an input key."""
    name = key.rsplit("/", 1)[-1]
    for suffix in _INPUT_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{name}.necb" if mode == "compress" else f"{name}.npy"


class StepHandler:
    """Processes workflow-step messages; shared by the HTTP and Kafka triggers."""

    def __init__(self, settings: WrapperSettings, store: ConfigStore, producer, engine=None):
        self.settings = settings
        self.store = store
        self.producer = producer
        self.bundle = ModelBundle.load(settings.model_dir)
        self.engine = engine or make_engine(self.bundle, settings.server)

    # -- the entry point -----------------------------------------------------------

    def handle(self, config_name: str, raw: bytes) -> Outcome:
        """Process one message end to end; never raises for a bad message."""
        workflow: WorkflowConfig | None = None
        component = "nec-" + self.settings.mode
        try:
            workflow = self.store.get(config_name)
            component = workflow.component
            step = parse_step(raw)
            if not step.filename:
                raise InvalidInput("field 'S3_bucket_desc.filename' is required by this step")
            if not step.previous_component_end:
                raise InvalidInput("previous component did not end (previous_component_end false)")
        except InvalidInput as err:
            return self._give_up(config_name, raw, workflow, component, str(err), attempts=1)

        self._status(component, workflow.name, "started", f"{self.settings.mode} {step.key}")
        delay = self.settings.backoff_s
        for attempt in range(1, self.settings.attempts + 1):
            try:
                out = self._run(workflow, step)
            except InvalidInput as err:
                return self._give_up(config_name, raw, workflow, component, str(err), attempt)
            except (TransientError, OSError) as err:
                if attempt == self.settings.attempts:
                    return self._give_up(
                        config_name,
                        raw,
                        workflow,
                        component,
                        f"gave up after {attempt} attempts: {err}",
                        attempt,
                    )
                log.warning("attempt %d failed (%s); retrying in %.1f s", attempt, err, delay)
                time.sleep(delay)
                delay *= 2
            except NecError as err:
                return self._give_up(config_name, raw, workflow, component, str(err), attempt)
            else:
                self._status(component, workflow.name, "finished", json.dumps(out.stats))
                return out
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the work ------------------------------------------------------------------

    def _run(self, workflow: WorkflowConfig, step: StepMessage) -> Outcome:
        client = s3.make_client(workflow.s3, timeout_s=self.settings.s3_timeout_s)
        bucket = workflow.s3.bucket
        out_name = output_name(step.key, self.settings.mode)
        out_key = f"result-{workflow.component}/{out_name}"
        work = Path(tempfile.mkdtemp(prefix="nec-step-", dir=self.settings.work_dir))
        try:
            src = work / "in" / step.filename  # the name tiles are recorded under
            src.parent.mkdir()
            t0 = time.perf_counter()
            n_in = s3.download(client, bucket, step.key, src, self.settings.max_input_bytes)
            t1 = time.perf_counter()
            dest = work / out_name
            stats = (
                self._compress(src, dest)
                if self.settings.mode == "compress"
                else self._decompress(src, dest)
            )
            t2 = time.perf_counter()
            s3.upload(client, dest, bucket, out_key)
            extra_keys = []
            index = dest.with_suffix(".tiles.json")
            if index.exists():
                extra_keys.append(out_key[: -len(".npy")] + ".tiles.json")
                s3.upload(client, index, bucket, extra_keys[-1])
            t3 = time.perf_counter()
            stats.update(
                input_key=step.key,
                output_key=out_key,
                bytes_in=n_in,
                bytes_out=dest.stat().st_size,
                s3_get_s=round(t1 - t0, 3),
                process_s=round(t2 - t1, 3),
                s3_put_s=round(t3 - t2, 3),
                max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            )
            nxt = StepMessage(
                True, f"result-{workflow.component}", out_name, {**step.meta, "nec": stats}
            )
            t4 = time.perf_counter()
            self._send(workflow.topic_out, nxt.to_dict(), key=out_key)
            stats["kafka_s"] = round(time.perf_counter() - t4, 3)
            return Outcome(True, "finished", output_key=out_key, stats=stats)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _compress(self, src: Path, dest: Path) -> dict:
        bands = list(self.settings.bands) if self.settings.bands else None
        with dest.open("wb") as f:
            stats = compress(
                iter_inputs(src, bands),
                self.bundle,
                self.engine,
                f,
                bands=bands,
                batch_size=self.settings.batch_size,
            )
        return {**stats.summary(), "mode": "compress"}

    def _decompress(self, src: Path, dest: Path) -> dict:
        # Two passes over the local container: count tiles (CRC-checked), then decode
        # straight into a memory-mapped .npy, so memory stays bounded by one batch.
        with src.open("rb") as f:
            reader = ContainerReader(f)
            count = sum(1 for _ in reader)
        t0 = time.perf_counter()
        index = []
        with src.open("rb") as f:
            reader = ContainerReader(f)
            out = None
            row = 0
            for records, arr in iter_decoded(
                reader, self.bundle, self.engine, self.settings.output, self.settings.batch_size
            ):
                if out is None:
                    out = np.lib.format.open_memmap(
                        dest, mode="w+", dtype=arr.dtype, shape=(count, *arr.shape[1:])
                    )
                out[row : row + len(arr)] = arr
                row += len(arr)
                index.extend(tile_index(records))
            if out is None:
                raise InvalidInput("container holds no tiles")
            out.flush()
            del out
        dest.with_suffix(".tiles.json").write_text(json.dumps(index))
        return {
            "mode": "decompress",
            "tiles": count,
            "output": self.settings.output,
            "decode_s": round(time.perf_counter() - t0, 3),
        }

    # -- Kafka side effects ----------------------------------------------------------

    def _send(self, topic: str, value: dict, key: str | None = None) -> None:
        try:
            self.producer.send(topic, value=value, key=key).get(timeout=30)
        except Exception as err:  # kafka-python raises KafkaError subclasses and timeouts
            raise TransientError(f"could not write to Kafka topic {topic!r}: {err}") from err

    def _status(self, component: str, workflow: str, status: str, description: str) -> None:
        self._send(
            self.settings.status_topic, status_event(component, workflow, status, description)
        )

    def _give_up(self, config_name, raw, workflow, component, reason, attempts) -> Outcome:
        """Dead-letter ``raw`` and emit ``failed``; the message is then done with."""
        name = workflow.name if workflow else config_name
        log.error("step failed for %s: %s", name, reason)
        try:
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            try:
                body = redacted(json.loads(text))
            except ValueError:
                body = text
        except UnicodeDecodeError:
            body = {"base64": base64.b64encode(raw).decode()}
        record = {
            "component_name": component,
            "workflow_name": name,
            "config": config_name,
            "error": reason,
            "attempts": attempts,
            "message": body,
        }
        try:
            self._send(self.settings.dead_letter_topic, record, key=config_name)
            self._status(component, name, "failed", reason)
        except TransientError as err:
            # Nothing durable was written: leave the message unacknowledged for redelivery.
            return Outcome(False, "retry", f"{reason}; and {err}")
        return Outcome(True, "failed", reason)
