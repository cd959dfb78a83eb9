"""Lifecycle of a local server process: the part Triton, Kafka and S3 launchers share.

A :class:`ChildProcess` runs one server in a process session of its own (so a Ctrl-C in a
terminal reaches the caller, which then stops the server cleanly), writes the server's
output to a log file in its private working directory, and is stopped with SIGTERM, then
SIGKILL after a timeout, or killed at once for fault tests. Servers still running when the
interpreter exits are killed. Subclasses implement :meth:`start`, usually as a call to
:meth:`_spawn` followed by a readiness check.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

__all__ = ["ChildProcess"]

_RUNNING: set[ChildProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_RUNNING):
        proc.kill()


class ChildProcess:
    """A server process with a working directory; a context manager (start / close).

    Attributes:
        work: private working directory, removed by :meth:`close`.
        log_path: where the server's output goes (subclasses may point it elsewhere).
        stop_timeout: seconds :meth:`stop` waits after SIGTERM before SIGKILL.
    """

    stop_timeout = 20.0

    def __init__(self, prefix: str):
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        self.log_path = self.work / "server.log"
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Process id, while running."""
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        """Exit status, or None while running (or never started)."""
        return self._proc.poll() if self._proc else None

    def _spawn(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self._log = log_path.open("ab")
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        _RUNNING.add(self)

    def _wait_http_ok(
        self, url: str, deadline: float, interval: float, error: type[Exception], name: str
    ) -> bool:
        """Poll ``url`` until it answers 200 (True) or ``deadline`` passes (False).

        Raises ``error`` with the log's tail if the process exits first.
        """
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                status = self._proc.returncode
                self._reap()
                raise error(
                    f"{name} exited with status {status} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(interval)
        return False

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server wrote."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(no log)"

    def _reap(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self._proc = None
        _RUNNING.discard(self)

    def start(self, timeout: float) -> ChildProcess:
        """Start the server and wait until it is ready."""
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL the whole process group at once: no clean shutdown (for fault tests)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        self._reap()

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL after ``timeout`` seconds."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(self.stop_timeout if timeout is None else timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._reap()

    def restart(self, timeout: float = 90.0, kill: bool = False):
        """Stop (or, with ``kill``, SIGKILL) and start again with the same settings."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop and remove the working directory."""
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def run_fetch_script(
    script: Path, ready, what: str, error: type[Exception], timeout: float
) -> None:
    """Run one of ``scripts/fetch_*.sh`` (idempotent, locked) until ``ready()`` holds.

    Without the script (an installed package, not a checkout) a ready cache is enough;
    otherwise raises ``error`` saying what is missing, with the tail of the script's output.
    """
    if not script.is_file():
        if ready():
            return
        raise error(
            f"{what}, and there is no {script} to fetch it (a checkout of the project has it)"
        )
    try:
        proc = subprocess.run(
            ["bash", str(script)],
            cwd=script.parents[1],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        raise error(f"{script.name} did not finish in {timeout:.0f} s") from err
    if proc.returncode != 0 or not ready():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise error(f"{script.name} failed (status {proc.returncode}), so {what}:\n{tail}")
