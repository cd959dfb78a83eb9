"""Inference engines: what runs the exported graphs for the pipeline.

An engine is anything with ``encode(images) -> (symbols, latent)`` and
``decode(role, symbols) -> array`` (:class:`Engine`): :class:`LocalEngine` runs the ONNX
graphs in-process with onnxruntime, :class:`~nec_serve.serving.client.TritonEngine` on a
Triton server; :func:`make_engine` picks one from a server URL.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from nec_serve.bundle import ModelBundle
from nec_serve.contract import GraphRole
from nec_serve.serving.client import TritonEngine

__all__ = ["Engine", "LocalEngine", "make_engine"]


class Engine(Protocol):
    """What the pipeline needs from an inference backend."""

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images ``(B, bands, S, S)`` float32 -> symbols ``(B, C, T)`` int32, latent."""

    def decode(self, role: GraphRole, symbols: np.ndarray) -> np.ndarray:
        """Symbols ``(B, C, T)`` int32 -> the output of the graph of ``role``."""


class LocalEngine:
    """Runs the exported graphs in-process with onnxruntime on the CPU."""

    def __init__(self, bundle: ModelBundle, threads: int = 0):
        import onnxruntime as ort  # heavy; only engines that run graphs locally need it

        self._bundle = bundle
        self._opts = ort.SessionOptions()
        if threads:
            self._opts.intra_op_num_threads = threads
        self._ort = ort
        self._sessions: dict = {}

    def _run(self, role: GraphRole, array: np.ndarray) -> list[np.ndarray]:
        spec = self._bundle.manifest.graph(role)
        if role not in self._sessions:
            self._sessions[role] = self._ort.InferenceSession(
                str(self._bundle.graph_path(role)), self._opts, providers=["CPUExecutionProvider"]
            )
        return self._sessions[role].run(None, {spec.inputs[0].name: array})

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the encoder graph."""
        symbols, latent = self._run(GraphRole.ENCODER, images)[:2]
        return symbols, latent

    def decode(self, role: GraphRole, symbols: np.ndarray) -> np.ndarray:
        """Run the decoding graph of ``role``."""
        return self._run(role, symbols)[0]


def make_engine(bundle: ModelBundle, server: str | None = None, *, threads: int = 0, **client):
    """The engine for ``server`` (a Triton URL), or in-process onnxruntime when None.

    ``client`` goes to :class:`~nec_serve.serving.client.TritonEngine` (timeouts, retries,
    shared memory); ``threads`` to the in-process engine.
    """
    if server:
        return TritonEngine(server, bundle, **client)
    return LocalEngine(bundle, threads=threads)
