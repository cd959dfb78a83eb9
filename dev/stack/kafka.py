"""A real Apache Kafka broker for the local stack: one JVM, KRaft mode, broker and controller.

The jars are Apache Kafka's own release artifacts from Maven Central, fetched once by
``scripts/fetch_kafka.sh`` into ``.cache/kafka/libs`` (:func:`ensure_kafka` runs it when they
are missing). :class:`LocalKafka` formats a fresh KRaft log directory with a random cluster id,
writes a single-node ``server.properties`` (listeners on free loopback ports, topics created on
first use, replication factor 1 everywhere, small segments, no initial rebalance delay), starts
``kafka.Kafka`` with a bounded heap in its own process session, and returns once a real client
(kafka-python) sees the broker in the cluster metadata. The broker logs through log4j2 to a
file in its working directory, never to the caller's terminal.

The data directory and ports outlive :meth:`LocalKafka.stop`, :meth:`LocalKafka.kill` and
:meth:`LocalKafka.restart`, so committed offsets and messages survive a restart, as on a real
cluster; :meth:`LocalKafka.close` (or leaving the ``with`` block) removes a temporary one.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

from nec_dev.process import ChildProcess, run_fetch_script
from nec_dev.triton import ServerStartError, free_port

__all__ = [
    "KAFKA_VERSION",
    "KafkaStartError",
    "LocalKafka",
    "ensure_kafka",
    "kafka_libs",
]

#: Kafka release whose jars ``scripts/fetch_kafka.sh`` fetches (pinned in scripts/kafka/pom.xml).
KAFKA_VERSION = "4.3.1"

_ROOT = Path(__file__).resolve().parents[2]
_FETCH_SCRIPT = _ROOT / "scripts" / "fetch_kafka.sh"
_ADDRESS_IN_USE = "Address already in use"


class KafkaStartError(ServerStartError):
    """The local Kafka broker could not be fetched, formatted or started."""


def kafka_libs() -> Path:
    """Directory of the Kafka runtime jars (``$NEC_CACHE_DIR/kafka/libs``, default ``.cache``)."""
    cache = os.environ.get("NEC_CACHE_DIR")
    return (Path(cache) if cache else _ROOT / ".cache") / "kafka" / "libs"


def _libs_ready(libs: Path) -> bool:
    return (libs / "PINS").is_file() and (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()


def ensure_kafka(timeout: float = 1800.0) -> Path:
    """Make sure the pinned Kafka jars are in the cache; fetch them if not. Returns their dir.

    Runs ``scripts/fetch_kafka.sh`` (which returns at once when the cache matches the pins, and
    which holds a lock so that concurrent callers fetch once). Needs ``mvn`` and network access
    to Maven Central on the first call only.

    Raises:
        KafkaStartError: the jars are missing and could not be fetched.
    """
    libs = kafka_libs()
    run_fetch_script(
        _FETCH_SCRIPT,
        lambda: _libs_ready(libs),
        f"Kafka {KAFKA_VERSION} is not in {libs}",
        KafkaStartError,
        timeout,
    )
    return libs


def _cluster_id() -> str:
    # What `kafka-storage.sh random-uuid` prints: 16 random bytes, URL-safe base64, no padding,
    # never starting with "-" (Kafka's Uuid.randomUuid draws again; a CLI would take it for a flag).
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


_LOG4J2 = """\
status = error
name = nec-local-kafka
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.zk.name = org.apache.kafka.clients.NetworkClient
logger.zk.level = WARN
"""


class LocalKafka(ChildProcess):
    """A single-node Kafka broker + KRaft controller in a child JVM; a context manager.

    Args:
        data_dir: the KRaft log directory. None (default): a fresh one in a temporary working
            directory, removed by :meth:`close`. A directory that is not yet formatted is
            formatted with a random cluster id; a formatted one is reused as it is.
        host: address of both listeners; loopback unless told otherwise.
        port: client (PLAINTEXT) listener port; 0 picks a free one.
        controller_port: KRaft controller listener port; 0 picks a free one.
        heap: JVM maximum heap (``-Xmx``).
        config: extra ``server.properties`` entries, overriding the defaults.
        libs: directory of the Kafka jars (default :func:`kafka_libs`); fetched if missing.
        java: the ``java`` executable (default ``$JAVA_HOME/bin/java``, else ``java``).

    Example:
        >>> with LocalKafka() as kafka:  # doctest: +SKIP
        ...     producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    """

    stop_timeout = 30.0

    def __init__(
        self,
        data_dir: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        controller_port: int = 0,
        heap: str = "512m",
        config: dict[str, object] | None = None,
        libs: str | Path | None = None,
        java: str | None = None,
    ):
        self.host = host
        self._fixed_ports = bool(port or controller_port)
        self.port = port or free_port(host)
        self.controller_port = controller_port or free_port(host)
        while self.controller_port == self.port:
            self.controller_port = free_port(host)
        self.heap = heap
        self.extra_config = dict(config or {})
        self.libs = Path(libs) if libs else None
        java_home = os.environ.get("JAVA_HOME")
        self.java = java or (str(Path(java_home) / "bin" / "java") if java_home else "java")
        super().__init__("nec-kafka-")
        self.data_dir = Path(data_dir) if data_dir else self.work / "data"
        self.log_path = self.work / "kafka.log"
        self.out_path = self.work / "kafka.out"
        self.cluster_id: str | None = None
        #: Seconds the last :meth:`start` took, from launching the JVM to metadata served.
        self.start_seconds: float | None = None
        self._started_once = False

    # ---- properties ----------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` of the client listener, for ``bootstrap_servers=``."""
        return f"{self.host}:{self.port}"

    # ---- configuration ---------------------------------------------------------------------

    def properties(self) -> dict[str, object]:
        """The ``server.properties`` entries the broker runs with."""
        h, p, c = self.host, self.port, self.controller_port
        props: dict[str, object] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.voters": f"1@{h}:{c}",
            "listeners": f"PLAINTEXT://{h}:{p},CONTROLLER://{h}:{c}",
            "advertised.listeners": f"PLAINTEXT://{h}:{p}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            # Single node: every internal topic with one replica (and few partitions).
            "auto.create.topics.enable": "true",
            "num.partitions": 1,
            "default.replication.factor": 1,
            "min.insync.replicas": 1,
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "transaction.state.log.num.partitions": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
            # After a SIGKILL the restarted broker may register only once the controller has
            # fenced its previous incarnation: a short session makes that 4 s, not 9 s.
            "broker.session.timeout.ms": 4000,
            "broker.heartbeat.interval.ms": 500,
            # Small files and a short retention: a development broker, not an archive.
            "log.segment.bytes": 8 * 1024 * 1024,
            "offsets.topic.segment.bytes": 8 * 1024 * 1024,
            "log.index.size.max.bytes": 1024 * 1024,
            "log.retention.ms": 3_600_000,
            "log.retention.bytes": 256 * 1024 * 1024,
            "log.retention.check.interval.ms": 60_000,
            # Few threads: it shares a small machine with its clients.
            "num.network.threads": 2,
            "num.io.threads": 2,
            "num.recovery.threads.per.data.dir": 1,
            "background.threads": 2,
            "controlled.shutdown.enable": "true",
        }
        props.update(self.extra_config)
        return props

    def _write_config(self) -> Path:
        path = self.work / "server.properties"
        lines = [f"{k}={v}" for k, v in self.properties().items()]
        path.write_text("\n".join(lines) + "\n")
        (self.work / "log4j2.properties").write_text(_LOG4J2.format(log=self.log_path))
        return path

    def _java_command(self, main: str, *args: str) -> list[str]:
        libs = self.libs or kafka_libs()
        return [
            self.java,
            f"-Xmx{self.heap}",
            "-Xms64m",
            "-XX:+UseSerialGC",
            "-XX:-UsePerfData",
            "-Djava.awt.headless=true",
            "-Djava.net.preferIPv4Stack=true",
            f"-Dlog4j2.configurationFile={self.work / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.work}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def _prepare(self) -> None:
        libs = self.libs or kafka_libs()
        if not _libs_ready(libs):
            if self.libs is not None:
                raise KafkaStartError(f"no Kafka {KAFKA_VERSION} jars in {libs}")
            ensure_kafka()
        if shutil.which(self.java) is None and not Path(self.java).is_file():
            raise KafkaStartError(
                f"no Java runtime ({self.java}) found: Kafka {KAFKA_VERSION} needs Java >= 17"
            )

    def _format(self, config: Path) -> None:
        meta = self.data_dir / "meta.properties"
        if meta.is_file():  # already formatted (a restart, or a caller's data dir)
            for line in meta.read_text().splitlines():
                if line.startswith("cluster.id="):
                    self.cluster_id = line.split("=", 1)[1].strip()
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster_id = _cluster_id()
        cmd = self._java_command(
            "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", f"--config={config}"
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not meta.is_file():
            raise KafkaStartError(
                f"formatting the KRaft log dir {self.data_dir} failed (status {proc.returncode}):"
                f"\n{(proc.stdout + proc.stderr)[-3000:]}\n{self.log_tail()}"
            )
        self.cluster_id = cluster_id

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> LocalKafka:
        """Start the broker and wait until a client sees it in the cluster metadata.

        Formats the data directory first when it is not yet formatted. On the first start,
        if a picked free port was taken in the meantime, picks new ones and tries again.

        Args:
            timeout: seconds to wait for the broker to serve metadata.

        Returns:
            self, running.

        Raises:
            KafkaStartError: the broker exited or did not serve metadata in time; the message
                holds the tail of its log.
        """
        if self._proc is not None and self._proc.poll() is None:
            return self
        self._prepare()
        for attempt in range(3):
            config = self._write_config()
            self._format(config)
            try:
                return self._launch(config, timeout)
            except KafkaStartError:
                if (
                    attempt == 2
                    or self._fixed_ports
                    or self._started_once  # the ports were good once: keep them
                    or _ADDRESS_IN_USE not in self.log_tail(200)
                ):
                    raise
                self.port, self.controller_port = free_port(self.host), free_port(self.host)
        raise AssertionError("unreachable")

    def _launch(self, config: Path, timeout: float) -> LocalKafka:
        t0 = time.monotonic()
        self._spawn(self._java_command("kafka.Kafka", str(config)), self.out_path)
        deadline = t0 + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                status = self._proc.returncode
                self._reap()
                raise KafkaStartError(
                    f"the Kafka broker exited with status {status} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if _port_open(self.host, self.port):
                ok, last_error = self._metadata_ready(min(5.0, max(deadline - time.monotonic(), 1)))
                if ok:
                    self.start_seconds = time.monotonic() - t0
                    self._started_once = True
                    return self
            time.sleep(0.2)
        self.kill()
        raise KafkaStartError(
            f"the Kafka broker at {self.bootstrap_servers} served no metadata after "
            f"{timeout:.0f} s ({last_error}); log {self.log_path}:\n{self.log_tail()}"
        )

    def _metadata_ready(self, timeout: float) -> tuple[bool, str]:
        try:
            from kafka import KafkaAdminClient
            from kafka.errors import KafkaConfigurationError, KafkaError
        except ImportError as err:
            self.kill()
            raise KafkaStartError(
                "checking the broker needs kafka-python (pip install kafka-python)"
            ) from err
        ms = int(timeout * 1000)
        admin = None
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers,
                client_id="nec-local-kafka-probe",
                request_timeout_ms=ms,
                bootstrap_timeout_ms=ms,
                reconnect_backoff_max_ms=200,
            )
            cluster = admin.describe_cluster()
        except KafkaConfigurationError:
            raise
        except (KafkaError, OSError) as err:
            return False, f"{type(err).__name__}: {err}"
        finally:
            if admin is not None:
                admin.close()
        if any(b.get("port") == self.port for b in cluster.get("brokers") or []):
            return True, ""
        return False, f"the broker is not in the cluster metadata yet: {cluster}"

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the broker's log (and of its stdout/stderr, when not empty)."""
        parts = []
        for path in (self.out_path, self.log_path):
            try:
                text = path.read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                parts.append(f"--- {path.name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or "(no log)"

    def __repr__(self) -> str:
        state = "running" if self.poll() is None and self._proc else "stopped"
        return f"LocalKafka({self.bootstrap_servers}, {state}, data={self.data_dir})"


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0
