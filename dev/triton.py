"""Run the ``tritonserver`` bundled with PyTriton on a generated model repository.

PyTriton (``nvidia-pytriton`` on PyPI) ships a real Triton Inference Server binary with the
Python backend and one backend stub per Python version. This module starts that binary
directly, without PyTriton's own Python API, on ``model_repository_local/`` of an export
(ONNX graphs behind the Python backend), so the server speaks the real KServe v2 / Triton
protocol over HTTP and gRPC, with Triton's dynamic batcher and statistics. It binds to
loopback by default.
"""

from __future__ import annotations

import os
import socket
import sys
import sysconfig
import time
from pathlib import Path

from nec_dev.process import ChildProcess
from nec_serve.errors import NecError

__all__ = ["LocalTritonServer", "ServerStartError", "find_tritonserver", "free_port"]


class ServerStartError(NecError):
    """The local inference server did not start or did not become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def find_tritonserver() -> Path:
    """Directory of the ``tritonserver`` bundled with PyTriton (``bin/``, ``backends/``)."""
    try:
        import pytriton
    except ImportError as err:
        raise ServerStartError(
            "the local inference server needs nvidia-pytriton (it bundles tritonserver): "
            "run scripts/bootstrap.sh, or pip install nvidia-pytriton==0.7.0"
        ) from err
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").exists():
        raise ServerStartError(f"no tritonserver binary under {root}")
    return root


def _backend_dir(root: Path, work: Path) -> Path:
    # Triton looks for the Python backend stub beside libtriton_python.so; PyTriton keeps
    # one stub per Python version, so assemble a backend directory for this interpreter.
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerStartError(f"PyTriton has no Python backend stub for Python {version}")
    backend = work / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for src in (
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        link = backend / src.name
        if not link.exists():
            link.symlink_to(src)
    return work / "backends"


def _environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    # WAR: the stub links libpython dynamically; a pyenv or venv interpreter keeps it in
    # LIBDIR, which is not on the loader path. PyTriton's own libraries sit beside it.
    libs = [
        sysconfig.get_config_var("LIBDIR") or "",
        str(root.parent.parent / "nvidia_pytriton.libs"),
    ]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).strip(
        os.pathsep
    )
    # WAR: the stub embeds libpython, which finds its prefix (and so site-packages) by
    # looking for `python` on PATH; put this interpreter's directory first, as an activated
    # venv would, so the stub runs in this environment even when it is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # The stub's interpreter must see this environment's numpy and onnxruntime.
    paths = sysconfig.get_paths()
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (paths["purelib"], paths["platlib"], env.get("PYTHONPATH", "")) if p
    )
    return env


class LocalTritonServer(ChildProcess):
    """A ``tritonserver`` process serving ``repository``; a context manager.

    Args:
        repository: a Triton model repository (``model_repository_local/`` of an export).
        http_port, grpc_port, metrics_port: 0 picks a free port.
        host: address to bind; loopback unless told otherwise.
        log_path: where the server's output goes (default: a file in a temp dir).
    """

    def __init__(
        self,
        repository: str | Path,
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        host: str = "127.0.0.1",
        log_path: str | Path | None = None,
    ):
        self.repository = Path(repository)
        if not self.repository.is_dir():
            raise ServerStartError(f"model repository {self.repository} does not exist")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        super().__init__("nec-triton-")
        self.log_path = Path(log_path) if log_path else self.work / "tritonserver.log"

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        """The tritonserver command line."""
        root = find_tritonserver()
        return [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={_backend_dir(root, self.work)}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-cpu-metrics=false",
            "--exit-timeout-secs=10",
            "--log-info=true",
        ]

    def start(self, timeout: float = 120.0) -> LocalTritonServer:
        """Start the server and wait until it reports ready; raise with its log if not."""
        cmd = self.command()
        env = _environment(find_tritonserver())
        self._spawn(cmd, self.log_path, env)
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + timeout
        if self._wait_http_ok(url, deadline, 0.25, ServerStartError, "tritonserver"):
            return self
        self.stop()
        raise ServerStartError(
            f"tritonserver not ready at {url} after {timeout:.0f} s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )
