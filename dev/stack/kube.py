"""A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-controller-manager.

The binaries are Kubernetes' and etcd's own code at pinned releases, built from the Go module
proxy once by ``scripts/fetch_k8s.sh`` into a cache outside the checkout (:func:`ensure_kube`
runs it when they are missing; a cold build takes 10-15 minutes on 2 cores).

:class:`LocalKube` makes a self-signed CA and a serving certificate for 127.0.0.1 (openssl), a
service-account signing key and a static admin token, then starts

* ``etcd`` on free loopback ports with a private data directory;
* ``kube-apiserver`` against it with ``--authorization-mode=RBAC``, so every request not made
  with the admin token is authorised by the Roles actually applied, and CRD schemas are
  enforced as on any cluster; service-account tokens come from the TokenRequest API;
* ``kube-controller-manager`` with the namespace, garbage-collector and service-account
  controllers only: namespaces finish deleting and get their ``default`` ServiceAccount.
  There is no scheduler and no kubelet, so nothing ever runs: Deployments and
  InferenceServices are stored, validated and authorised, and stay unready.

It returns once ``/readyz`` answers and the ``default`` namespace has its ServiceAccount. The
admin kubeconfig is :attr:`LocalKube.kubeconfig`; :meth:`LocalKube.kubectl` runs the pinned
``kubectl`` with it. ``python -m nec_dev.stack.kube`` starts one until Ctrl-C and prints how
to reach it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from nec_dev.process import ChildProcess, run_fetch_script
from nec_dev.triton import ServerStartError, free_port

__all__ = [
    "KUBERNETES_VERSION",
    "KubeAccess",
    "KubeStartError",
    "LocalKube",
    "RemoteKube",
    "connect",
    "ensure_kube",
    "kube_tools",
]

#: The Kubernetes release ``scripts/fetch_k8s.sh`` builds (pinned in scripts/k8s/kube/go.mod).
KUBERNETES_VERSION = "v1.34.5"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kubectl", "etcd")

_ROOT = Path(__file__).resolve().parents[2]
_FETCH_SCRIPT = _ROOT / "scripts" / "fetch_k8s.sh"
_MODULE_FILES = ("kube/go.mod", "kube/go.sum", "etcd/go.mod", "etcd/go.sum", "etcd/main.go")
ADMIN = "nec-admin"


class KubeStartError(ServerStartError):
    """The local Kubernetes control plane could not be built or started."""


def kube_tools() -> Path:
    """Where ``scripts/fetch_k8s.sh`` puts the binaries for the pinned modules.

    ``$NEC_TOOLS_CACHE/k8s-<version>-<hash>`` (default ``~/.cache/nec-serve``), the hash being
    the script's: the first 12 hex digits of SHA-256 over the wrapper modules' files.
    """
    root = Path(os.environ.get("NEC_TOOLS_CACHE") or Path.home() / ".cache" / "nec-serve")
    digest = hashlib.sha256()
    for name in _MODULE_FILES:
        digest.update((_ROOT / "scripts" / "k8s" / name).read_bytes())
    return root / f"k8s-{KUBERNETES_VERSION}-{digest.hexdigest()[:12]}"


def _tools_ready(tools: Path) -> bool:
    return (tools / "PINS").is_file() and all(
        os.access(tools / "bin" / b, os.X_OK) for b in BINARIES
    )


def ensure_kube(timeout: float = 3600.0) -> Path:
    """Make sure the pinned binaries are built; build them if not. Returns the cache dir.

    Raises:
        KubeStartError: they are missing and could not be built.
    """
    tools = kube_tools()
    run_fetch_script(
        _FETCH_SCRIPT,
        lambda: _tools_ready(tools),
        f"Kubernetes {KUBERNETES_VERSION} is not built in {tools}",
        KubeStartError,
        timeout,
    )
    return tools


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KubeStartError(f"openssl {args[0]} failed: {proc.stderr.strip()[-500:]}")


def make_certificates(pki: Path) -> None:
    """CA, serving certificate for 127.0.0.1/localhost, service-account key pair (openssl)."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("genrsa", "-out", "ca.key", "2048", cwd=pki)
    _openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-days", "2", "-subj", "/CN=nec-test-ca",
        "-out", "ca.crt", cwd=pki,
    )  # fmt: skip
    _openssl("genrsa", "-out", "apiserver.key", "2048", cwd=pki)
    _openssl(
        "req", "-new", "-key", "apiserver.key", "-subj", "/CN=kube-apiserver",
        "-out", "apiserver.csr", cwd=pki,
    )  # fmt: skip
    (pki / "san.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "apiserver.crt", cwd=pki,
    )  # fmt: skip
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def kubeconfig(server: str, ca: Path, token: str, user: str) -> dict:
    """A kubeconfig with one cluster, one token user and one context."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "nec-test", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "nec-test", "user": user}}],
        "current-context": user,
    }


class _Etcd(ChildProcess):
    """etcd on loopback with a private data directory (owned by :class:`LocalKube`)."""

    def __init__(self, binary: Path):
        super().__init__("nec-etcd-")
        self.binary = binary
        self.client_port = free_port()
        self.peer_port = free_port()

    @property
    def url(self) -> str:
        """Client URL."""
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 30.0) -> _Etcd:
        """Start and wait until ``/health`` answers."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        self._spawn(
            [
                str(self.binary),
                "--name=nec-test",
                f"--data-dir={self.work / 'data'}",
                f"--listen-client-urls={self.url}",
                f"--advertise-client-urls={self.url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=nec-test={peer}",
                "--log-level=warn",
                "--quota-backend-bytes=1073741824",
            ],
            self.log_path,
        )
        if not self._wait_http_ok(
            f"{self.url}/health", time.monotonic() + timeout, 0.2, KubeStartError, "etcd"
        ):
            raise KubeStartError(f"etcd not healthy after {timeout:.0f} s:\n{self.log_tail()}")
        return self


class _ControllerManager(ChildProcess):
    """kube-controller-manager with the controllers the tests need (owned by LocalKube)."""

    CONTROLLERS = "namespace,garbagecollector,serviceaccount"

    def __init__(self, binary: Path, kubeconfig_path: Path, pki: Path):
        super().__init__("nec-kcm-")
        self.binary, self.kubeconfig_path, self.pki = binary, kubeconfig_path, pki

    def start(self, timeout: float = 30.0) -> _ControllerManager:
        """Start; readiness is judged by :class:`LocalKube` (a ServiceAccount appears)."""
        self._spawn(
            [
                str(self.binary),
                f"--kubeconfig={self.kubeconfig_path}",
                f"--controllers={self.CONTROLLERS}",
                "--leader-elect=false",
                "--secure-port=0",
                f"--root-ca-file={self.pki / 'ca.crt'}",
                f"--service-account-private-key-file={self.pki / 'sa.key'}",
                "--concurrent-namespace-syncs=4",
                "--v=1",
            ],
            self.log_path,
        )
        return self


class KubeAccess:
    """kubectl and ServiceAccount credentials against one API server (local or remote).

    Needs ``kubectl_path`` and ``kubeconfig`` (an admin's kubeconfig file).
    """

    kubectl_path: Path
    kubeconfig: Path

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess:
        """Run the pinned kubectl against this server (admin unless ``kubeconfig``)."""
        proc = subprocess.run(
            [str(self.kubectl_path), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A real token for ``namespace/name`` from the TokenRequest API."""
        out = self.kubectl(
            "create", "token", name, "-n", namespace, f"--duration={seconds}s"
        ).stdout
        return out.strip()

    def kubeconfig_for(self, namespace: str, name: str, path: Path) -> Path:
        """Write a kubeconfig that authenticates as a ServiceAccount; returns ``path``."""
        token = self.service_account_token(namespace, name)
        user = f"system:serviceaccount:{namespace}:{name}"
        view = json.loads(self.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
        cluster = view["clusters"][0]
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [cluster],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": user,
                    "context": {"cluster": cluster["name"], "user": user, "namespace": namespace},
                }
            ],
            "current-context": user,
        }
        path.write_text(json.dumps(config))
        return path


class LocalKube(KubeAccess, ChildProcess):
    """kube-apiserver (this process) with its etcd and kube-controller-manager.

    Attributes:
        port: the API server's HTTPS port on 127.0.0.1.
        kubeconfig: admin kubeconfig (a static token in ``system:masters``).
        ca: the CA certificate clients verify the server with.
    """

    stop_timeout = 15.0
    local = True

    def __init__(self, tools: Path | None = None):
        super().__init__("nec-kube-")
        self.tools = tools or kube_tools()
        self.bin = self.tools / "bin"
        self.kubectl_path = self.bin / "kubectl"
        self.pki = self.work / "pki"
        self.port = free_port()
        self.token = secrets.token_hex(24)
        self.kubeconfig = self.work / "admin.kubeconfig"
        self.ca = self.pki / "ca.crt"
        self.etcd: _Etcd | None = None
        self.kcm: _ControllerManager | None = None

    @property
    def server(self) -> str:
        """The API server's URL."""
        return f"https://127.0.0.1:{self.port}"

    def _flags(self) -> list[str]:
        return [
            f"--etcd-servers={self.etcd.url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={self.work / 'certs'}",
            f"--tls-cert-file={self.pki / 'apiserver.crt'}",
            f"--tls-private-key-file={self.pki / 'apiserver.key'}",
            f"--client-ca-file={self.ca}",
            f"--token-auth-file={self.work / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--anonymous-auth=false",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.pki / 'sa.pub'}",
            f"--service-account-signing-key-file={self.pki / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
        ]

    def start(self, timeout: float = 90.0) -> LocalKube:
        """Start etcd, the API server and the controller manager; wait until usable."""
        if not _tools_ready(self.tools):
            raise KubeStartError(
                f"no Kubernetes binaries in {self.tools}: run scripts/fetch_k8s.sh (ensure_kube)"
            )
        deadline = time.monotonic() + timeout
        if not (self.pki / "sa.key").exists():
            make_certificates(self.pki)
            (self.work / "tokens.csv").write_text(f"{self.token},{ADMIN},{ADMIN},system:masters\n")
            self.kubeconfig.write_text(
                json.dumps(kubeconfig(self.server, self.ca, self.token, ADMIN))
            )
        self.etcd = self.etcd or _Etcd(self.bin / "etcd")
        self.etcd.start(timeout)
        self._spawn([str(self.bin / "kube-apiserver"), *self._flags()], self.log_path)
        ready = self._wait_ready(deadline)
        if not ready:
            self.close()
            raise KubeStartError(
                f"kube-apiserver not ready after {timeout:.0f} s:\n{self.log_tail()}"
            )
        self.kcm = self.kcm or _ControllerManager(
            self.bin / "kube-controller-manager", self.kubeconfig, self.pki
        )
        self.kcm.start()
        while time.monotonic() < deadline:
            if self.get("/api/v1/namespaces/default/serviceaccounts/default") is not None:
                return self
            if self.kcm.poll() is not None:
                break
            time.sleep(0.3)
        tail = self.kcm.log_tail()
        self.close()
        raise KubeStartError(f"kube-controller-manager made no default ServiceAccount:\n{tail}")

    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def _wait_ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise KubeStartError(
                    f"kube-apiserver exited with status {self._proc.returncode}:\n{self.log_tail()}"
                )
            try:
                if self.get("/readyz") is not None:
                    return True
            except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
                pass
            time.sleep(0.3)
        return False

    def get(self, path: str, token: str | None = None):
        """GET ``path`` (JSON, or text); None on 404. Raises ``urllib.error.HTTPError``."""
        req = urllib.request.Request(
            self.server + path, headers={"Authorization": f"Bearer {token or self.token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=10, context=self._ssl()) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise
        try:
            return json.loads(body)
        except ValueError:
            return body.decode()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the controller manager, the API server, then etcd."""
        if self.kcm is not None:
            self.kcm.stop(timeout)
        super().stop(timeout)
        if self.etcd is not None:
            self.etcd.stop(timeout)

    def kill(self) -> None:
        """SIGKILL all three."""
        for proc in (self.kcm, self.etcd):
            if proc is not None:
                proc.kill()
        super().kill()

    def close(self) -> None:
        """Stop all three and remove their directories."""
        self.stop()
        for proc in (self.kcm, self.etcd):
            if proc is not None:
                proc.close()
        super().close()

    def __repr__(self) -> str:
        return f"LocalKube({self.server}, kubeconfig={self.kubeconfig})"


class RemoteKube(KubeAccess):
    """An existing cluster, reached with a kubeconfig (``NEC_TEST_KUBECONFIG``).

    For running the same tests against a real cluster: ``kubectl`` is ``NEC_TEST_KUBECTL`` or
    the one on PATH. Nothing is started or stopped.
    """

    local = False

    def __init__(self, kubeconfig_path: str | Path, kubectl_path: str | None = None):
        self.kubeconfig = Path(kubeconfig_path).expanduser()
        if not self.kubeconfig.is_file():
            raise KubeStartError(f"no kubeconfig at {self.kubeconfig}")
        found = kubectl_path or shutil.which("kubectl")
        if not found:
            raise KubeStartError("no kubectl on PATH (set NEC_TEST_KUBECTL)")
        self.kubectl_path = Path(found)

    def __enter__(self) -> RemoteKube:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __repr__(self) -> str:
        return f"RemoteKube(kubeconfig={self.kubeconfig})"


def connect() -> LocalKube | RemoteKube:
    """The API server the tests use: ``NEC_TEST_KUBECONFIG``'s cluster, else a LocalKube.

    Use it as a context manager; a LocalKube is built (first time) and started on entry.
    """
    remote = os.environ.get("NEC_TEST_KUBECONFIG")
    if remote:
        return RemoteKube(remote, os.environ.get("NEC_TEST_KUBECTL"))
    return LocalKube(ensure_kube())


def main() -> None:
    """Start a control plane until Ctrl-C (builds the binaries first if needed)."""
    ensure_kube()
    with LocalKube() as kube:
        print(f"kube-apiserver {KUBERNETES_VERSION} at {kube.server}")
        print(f"export KUBECONFIG={kube.kubeconfig}")
        print(f"kubectl: {kube.bin / 'kubectl'}  (Ctrl-C stops it)", flush=True)
        try:
            while kube.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
