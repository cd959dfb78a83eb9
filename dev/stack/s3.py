"""A real S3 endpoint for the local stack: moto's server in a child process.

:class:`LocalS3` runs ``python -m moto.server`` (``moto[server]`` from PyPI) on a free loopback
port and hands out boto3 clients for it with fixed dummy credentials. moto implements the S3
REST protocol (SigV4, path-style addressing, multipart uploads with S3's 5 MiB minimum part
size, ranged gets, ETags, error codes), so code that talks to it through boto3 talks to AWS S3
or MinIO the same way.

moto keeps every bucket and object in the server process (objects above ~5 MB are spooled to
temporary files in its working directory): :meth:`LocalS3.stop`, :meth:`LocalS3.kill` and
:meth:`LocalS3.restart` lose all state. That is what a fault test of "S3 went away" needs;
a test that needs objects to survive must upload them again after a restart.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from nec_dev.process import ChildProcess
from nec_dev.triton import ServerStartError, free_port

__all__ = ["LocalS3", "S3StartError"]


class S3StartError(ServerStartError):
    """The local S3 server did not start or did not answer."""


class LocalS3(ChildProcess):
    """moto's S3 server on ``host:port`` in a child process; a context manager.

    Args:
        host: address to bind; loopback unless told otherwise.
        port: 0 picks a free port (kept across :meth:`restart`).
        region: the region clients sign for.
        python: interpreter that runs the server (default: this one).

    Attributes:
        access_key, secret_key, region: the dummy credentials and region to sign with (moto
            accepts any; these are what :meth:`client` and :meth:`credentials` hand out).
    """

    stop_timeout = 10.0
    access_key = "nec-local-access-key"
    secret_key = "nec-local-secret-key"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        region: str = "us-east-1",
        python: str | None = None,
    ):
        self.host = host
        self._fixed_port = bool(port)
        self.port = port or free_port(host)
        self.region = region
        self.python = python or sys.executable
        super().__init__("nec-s3-")
        self.log_path = self.work / "moto.log"
        #: Seconds the last :meth:`start` took until the server answered.
        self.start_seconds: float | None = None
        self._started_once = False

    @property
    def endpoint_url(self) -> str:
        """``http://host:port`` of the server, for ``endpoint_url=``."""
        return f"http://{self.host}:{self.port}"

    def credentials(self) -> dict[str, str]:
        """Keyword arguments for ``boto3.client("s3", ...)``: endpoint, keys and region."""
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
        }

    def client(
        self,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
        **config: Any,
    ) -> Any:
        """A boto3 S3 client for this server, with explicit timeouts and bounded retries.

        Args:
            connect_timeout: seconds to wait for a connection.
            read_timeout: seconds to wait for a response.
            max_attempts: attempts per call, first included (botocore "standard" retries,
                exponential backoff with jitter).
            **config: further ``botocore.config.Config`` arguments.

        Returns:
            ``botocore.client.S3`` using path-style addressing.
        """
        import boto3  # heavy; only clients of the local server need it
        from botocore.config import Config

        cfg = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            **config,
        )
        return boto3.session.Session().client("s3", config=cfg, **self.credentials())

    def start(self, timeout: float = 30.0) -> LocalS3:
        """Start the server and wait until it answers S3 requests.

        On the first start, if the picked free port was taken in the meantime, picks a new one
        and tries again.

        Args:
            timeout: seconds to wait for the server to answer.

        Returns:
            self, running.

        Raises:
            S3StartError: moto is not installed, or the server exited or did not answer in
                time; the message holds the tail of its log.
        """
        if self._proc is not None and self._proc.poll() is None:
            return self
        for attempt in range(3):
            try:
                return self._launch(timeout)
            except S3StartError:
                in_use = "Address already in use" in self.log_tail(50)
                if attempt == 2 or self._fixed_port or self._started_once or not in_use:
                    raise
                self.port = free_port(self.host)
        raise AssertionError("unreachable")

    def _launch(self, timeout: float) -> LocalS3:
        try:
            import moto.server  # noqa: F401 - only checks that moto[server] is installed
        except ImportError as err:
            raise S3StartError(
                "the local S3 server needs moto[server] (pip install 'moto[server]')"
            ) from err
        t0 = time.monotonic()
        env = dict(os.environ)
        env.pop("MOTO_PORT", None)
        # Objects above ~5 MB spill from memory to temporary files: keep them in our work dir,
        # which close() removes even after a SIGKILL.
        env["TMPDIR"] = str(self.work)
        cmd = [self.python, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        self._spawn(cmd, self.log_path, env)
        deadline = t0 + timeout
        # Anonymous ListBuckets: moto answers it with 200 once its WSGI app is up.
        url = f"{self.endpoint_url}/"
        if self._wait_http_ok(url, deadline, 0.1, S3StartError, "the moto S3 server"):
            self.start_seconds = time.monotonic() - t0
            self._started_once = True
            return self
        self.kill()
        raise S3StartError(
            f"the moto S3 server did not answer at {url} after {timeout:.0f} s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def __repr__(self) -> str:
        state = "running" if self._proc and self.poll() is None else "stopped"
        return f"LocalS3({self.endpoint_url}, {state})"
