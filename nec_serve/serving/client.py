"""Client for the NEC graphs on Triton (KServe v2 protocol), over gRPC or HTTP.

:class:`TritonEngine` is the same ``Engine`` the pipeline runs in-process, so
``nec-serve compress --server grpc://host:port`` gives byte-identical containers: only the
graph runs remotely, the entropy coding stays local. Before the first request to a model
it checks that the server is ready, that the model is ready, and that the model's inputs
and outputs (names, datatypes, shapes) are those of the export; it then sends batches of
at most the model's ``max_batch_size``. Transient failures (server unavailable, deadline
exceeded, connection refused or reset) are retried with exponential backoff a bounded
number of times; invalid requests are not retried. Where client and server share a host,
tensors can travel through system shared memory instead of the socket. Each inference
request carries the id of the workflow message being handled
(:func:`nec_serve.logs.current_message_id`) as its request id, so Triton's logs and traces
name the message too.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np

from nec_serve.contract import GraphRole, TensorSpec
from nec_serve.errors import InvalidInput, ModelMismatch, ServerUnavailable
from nec_serve.logs import current_message_id

__all__ = ["TritonEngine", "parse_server_url", "TRANSIENT_STATUSES"]

log = logging.getLogger(__name__)

#: Triton statuses worth another try: the server is (re)starting, overloaded or slow.
TRANSIENT_STATUSES = frozenset(
    {
        "StatusCode.UNAVAILABLE",
        "StatusCode.DEADLINE_EXCEEDED",
        "StatusCode.RESOURCE_EXHAUSTED",
        "StatusCode.ABORTED",
        "StatusCode.CANCELLED",
        "502",
        "503",
        "504",
    }
)


def parse_server_url(url: str) -> tuple[str, str]:
    """``grpc://host:port`` or ``http://host:port`` -> (protocol, ``host:port``)."""
    parsed = urlparse(url if "://" in url else f"grpc://{url}")
    if parsed.scheme not in ("grpc", "http") or not parsed.hostname or not parsed.port:
        raise InvalidInput(
            f"invalid server URL {url!r}: expected grpc://host:port or http://host:port"
        )
    return parsed.scheme, f"{parsed.hostname}:{parsed.port}"


@dataclass(frozen=True)
class _Served:
    """What was checked about one served model."""

    name: str
    max_batch_size: int
    input_name: str
    input_dtype: str


class TritonEngine:
    """Runs the exported graphs on a Triton server (``Engine`` of :mod:`nec_serve.pipeline`).

    Args:
        url: ``grpc://host:port`` or ``http://host:port``.
        bundle: the export the server was loaded from (:class:`ModelBundle`).
        timeout_s: per-request deadline.
        retries: extra attempts after a transient failure.
        backoff_s: first backoff; doubles on each retry.
        shared_memory: pass tensors through system shared memory (same host only).
        model_version: Triton model version ("" = the server's choice).
    """

    def __init__(
        self,
        url: str,
        bundle,
        *,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        shared_memory: bool = False,
        model_version: str = "",
    ):
        self.url = url
        self.protocol, self._hostport = parse_server_url(url)
        self.bundle = bundle
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.model_version = model_version
        self.shared_memory = shared_memory
        # tritonclient is imported on use: its gRPC part cannot share a process with kserve
        # (kserve issue #3099), and only this client needs it.
        if self.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self._tc = tc
        self._client = self._new_client()
        self._served: dict[str, _Served] = {}
        self._regions: dict[str, tuple[object, int]] = {}

    def _new_client(self):
        if self.protocol == "grpc":
            return self._tc.InferenceServerClient(self._hostport)
        return self._tc.InferenceServerClient(
            self._hostport, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
        )

    # -- checks ----------------------------------------------------------------------

    def _call(self, what: str, fn, *args, **kwargs):
        """Call the client with bounded retries on transient failures."""
        from tritonclient.utils import InferenceServerException  # on use, see __init__

        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except InferenceServerException as err:
                status = str(err.status())
                if status not in TRANSIENT_STATUSES:
                    raise
                reason = f"{status}: {err.message()}"
            except (ConnectionError, OSError, TimeoutError) as err:
                reason = f"{type(err).__name__}: {err}"
            if attempt == self.retries:
                raise ServerUnavailable(
                    f"inference server {self.url} unavailable for {what} after "
                    f"{self.retries + 1} attempts: {reason}"
                )
            log.warning("%s on %s failed (%s); retry in %.1f s", what, self.url, reason, delay)
            time.sleep(delay)
            delay *= 2
            if self.protocol == "http":
                self._client = self._new_client()  # a broken keep-alive socket stays broken
        raise AssertionError("unreachable")  # pragma: no cover

    def _check(self, role: GraphRole) -> _Served:
        if role in self._served:
            return self._served[role]
        from tritonclient.utils import InferenceServerException  # on use, see __init__

        spec = self.bundle.manifest.graph(role)
        name = spec.name
        c = self._client
        try:
            ready = self._call("readiness", c.is_server_ready)
        except InferenceServerException as err:
            raise ServerUnavailable(f"inference server {self.url} answered: {err}") from err
        if not ready:
            raise ServerUnavailable(f"inference server {self.url} is up but not ready")
        try:
            model_ready = self._call("model readiness", c.is_model_ready, name, self.model_version)
        except InferenceServerException:
            model_ready = False
        if not model_ready:
            raise ModelMismatch(
                f"model {name!r} (version {self.model_version or 'any'}) is not ready on "
                f"{self.url}; served: {self._served_names() or 'none'}"
            )
        meta = self._call("metadata", c.get_model_metadata, name, self.model_version)
        config = self._call("config", c.get_model_config, name, self.model_version)
        meta, config = self._as_dicts(meta, config)
        max_batch = int(config.get("max_batch_size", 0))

        def described(tensors: list) -> list[tuple[str, str, list[int]]]:
            return [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in tensors]

        def expected(tensors: tuple[TensorSpec, ...]) -> list[tuple[str, str, list[int]]]:
            return [(t.name, t.data_type.v2, [-1, *t.dims]) for t in tensors]

        got_in, got_out = described(meta["inputs"]), described(meta["outputs"])
        want_in, want_out = expected(spec.inputs), expected(spec.outputs)
        if got_in != want_in or sorted(got_out) != sorted(want_out) or max_batch < 1:
            raise ModelMismatch(
                f"model {name!r} on {self.url} does not match the export "
                f"{self.bundle.root}: served inputs {got_in} outputs {got_out} "
                f"max_batch_size {max_batch}; expected inputs {want_in} outputs {want_out} "
                "with batching"
            )
        served = _Served(name, max_batch, want_in[0][0], want_in[0][1])
        self._served[role] = served
        return served

    def _as_dicts(self, meta, config) -> tuple[dict, dict]:
        if self.protocol == "http":
            return meta, config
        from google.protobuf.json_format import MessageToDict  # comes with tritonclient.grpc

        m = MessageToDict(meta, preserving_proto_field_name=True)
        cfg = MessageToDict(config.config, preserving_proto_field_name=True)
        return m, cfg

    def _served_names(self) -> list[str]:
        try:
            index = self._client.get_model_repository_index()
        except Exception:  # the listing is only a hint in an error message
            return []
        if self.protocol == "grpc":
            return sorted(m.name for m in index.models if m.state == "READY")
        return sorted(m["name"] for m in index if m.get("state") == "READY")

    # -- inference -------------------------------------------------------------------

    def _infer_once(self, served: _Served, batch: np.ndarray, outputs: list[str]) -> dict:
        tc = self._tc
        inp = tc.InferInput(served.input_name, list(batch.shape), served.input_dtype)
        requested = [tc.InferRequestedOutput(o) for o in outputs]
        if self.shared_memory:
            self._to_shm(inp, served.name, batch)
        elif self.protocol == "http":
            inp.set_data_from_numpy(batch, binary_data=True)
        else:
            inp.set_data_from_numpy(batch)
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self._call(
            f"{served.name} inference",
            self._client.infer,
            served.name,
            [inp],
            model_version=self.model_version,
            outputs=requested,
            request_id=current_message_id() or "",
            **kwargs,
        )
        return {o: result.as_numpy(o) for o in outputs}

    def _to_shm(self, inp, model: str, batch: np.ndarray) -> None:
        import tritonclient.utils.shared_memory as shm  # on use, see __init__

        region = f"nec_{model}_in"
        handle, size = self._regions.get(region, (None, 0))
        if batch.nbytes > size:
            if handle is not None:
                self._client.unregister_system_shared_memory(region)
                shm.destroy_shared_memory_region(handle)
            size = batch.nbytes
            key = f"/{region}_{uuid.uuid4().hex[:8]}"
            handle = shm.create_shared_memory_region(region, key, size)
            self._client.register_system_shared_memory(region, key, size)
            self._regions[region] = (handle, size)
        shm.set_shared_memory_region(handle, [np.ascontiguousarray(batch)])
        inp.set_shared_memory(region, batch.nbytes)

    def _run(self, role: GraphRole, array: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        from tritonclient.utils import InferenceServerException  # on use, see __init__

        served = self._check(role)
        parts: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        for start in range(0, len(array), served.max_batch_size):
            chunk = np.ascontiguousarray(array[start : start + served.max_batch_size])
            try:
                got = self._infer_once(served, chunk, outputs)
            except InferenceServerException as err:
                raise InvalidInput(
                    f"{self.url} refused a {served.name} request of shape {chunk.shape}: "
                    f"{err.message()}"
                ) from err
            for o in outputs:
                parts[o].append(got[o])
        return [np.concatenate(parts[o]) for o in outputs]

    def _outputs(self, role: GraphRole, count: int) -> list[str]:
        """Names of the first ``count`` outputs of the graph of ``role``."""
        return [t.name for t in self.bundle.manifest.graph(role).outputs[:count]]

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images ``(B, bands, S, S)`` float32 -> symbols int32 and latent, via the server."""
        role = GraphRole.ENCODER
        images = images.astype(np.float32, copy=False)
        symbols, latent = self._run(role, images, self._outputs(role, 2))
        return symbols, latent

    def encode_symbols(self, images: np.ndarray) -> np.ndarray:
        """Only the symbols: half the bytes over the wire of :meth:`encode`."""
        role = GraphRole.ENCODER
        return self._run(role, images.astype(np.float32, copy=False), self._outputs(role, 1))[0]

    def decode(self, role: GraphRole, symbols: np.ndarray) -> np.ndarray:
        """Symbols ``(B, C, T)`` int32 -> the output of the graph of ``role``, via the server."""
        return self._run(role, symbols.astype(np.int32, copy=False), self._outputs(role, 1))[0]

    def close(self) -> None:
        """Release shared-memory regions and the connection."""
        if self._regions:
            import tritonclient.utils.shared_memory as shm  # on use, see __init__

            for region, (handle, _) in self._regions.items():
                try:
                    self._client.unregister_system_shared_memory(region)
                except Exception:  # the server may be gone; the region is ours to free
                    log.debug("could not unregister %s", region)
                shm.destroy_shared_memory_region(handle)
            self._regions.clear()
        self._client.close()

    def __enter__(self) -> TritonEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
