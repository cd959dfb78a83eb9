"""Export of a graph to ONNX, and its parity check against PyTorch.

Entropy coding never runs inside the inference server: every family's encoder graph maps
images to the integer symbols the coder takes and the continuous latent they come from;
its decoding graphs map symbols to one output each (the family modules under
:mod:`nec_export.families` build them). Batch is a dynamic axis; the image size is fixed.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from nec_serve.errors import ExportCheckFailed
from nec_serve.hashing import sha256_file

__all__ = [
    "ParityReport",
    "judge_codes",
    "session",
    "export_onnx",
    "check_graph",
    "LATENT_ATOL",
    "EMBEDDING_ATOL",
]

log = logging.getLogger(__name__)

# ORT and PyTorch order float reductions differently; over 12 ViT-B blocks the final-norm
# output differs by ~1e-5 typically. 1e-3 is far below the quantization step of 1.
LATENT_ATOL = 1e-3
EMBEDDING_ATOL = 1e-4
# A symbol may flip only where y - median lies within this distance of a rounding edge.
HALF_BAND = 1e-3
# ...and such flips must be rare: at most this fraction of all symbols (plus one), or of
# the positions PyTorch itself had on an edge, whichever allows more. On a batch with a few
# near ties, two backends' rounding may legitimately flip two of them.
MAX_FLIP_FRACTION = 1e-4
MAX_TIE_FLIP_FRACTION = 0.5


@dataclass
class ParityReport:
    """How an exported graph compares with PyTorch on the same inputs."""

    graph: str
    batch: int
    output: str
    max_abs_err: float
    mean_abs_err: float
    atol: float
    symbols_total: int = 0
    symbol_mismatches: int = 0
    mismatches_near_half: int = 0
    sha256: str = ""

    def as_dict(self) -> dict:
        """Plain dict for the manifest."""
        return asdict(self)


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_names: list[str],
) -> Path:
    """Export ``module`` to a single ONNX file with a dynamic batch axis and full check."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=[input_name],
            output_names=output_names,
            dynamic_shapes={next(iter(_forward_args(module))): {0: batch}},
            external_data=False,  # Triton wants one file per model
            dynamo=True,
            verbose=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def _forward_args(module: nn.Module) -> list[str]:
    return [p for p in inspect.signature(module.forward).parameters if p != "self"]


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU onnxruntime session for ``path`` (``threads`` 0 = onnxruntime's default)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_graph(
    name: str,
    module: nn.Module,
    path: Path,
    inputs: torch.Tensor,
    medians: torch.Tensor | None = None,
) -> ParityReport:
    """Run PyTorch and onnxruntime on ``inputs`` and compare; raise if out of tolerance.

    For the encoder (``medians`` given) the first output is symbols and the second the
    latent: the latent must agree within :data:`LATENT_ATOL`, and a symbol may differ
    only where ``latent - median`` lies within :data:`HALF_BAND` of a rounding edge,
    in at most :data:`MAX_FLIP_FRACTION` of symbols. Decoders must agree within
    :data:`EMBEDDING_ATOL`.
    """
    sess = session(path)
    with torch.no_grad():
        ref = module(inputs)
    got = sess.run(None, {sess.get_inputs()[0].name: inputs.numpy()})
    if medians is None:
        ref_np = ref.numpy()
        err = np.abs(got[0] - ref_np)
        report = ParityReport(
            name,
            len(inputs),
            sess.get_outputs()[0].name,
            float(err.max()),
            float(err.mean()),
            EMBEDDING_ATOL,
            sha256=sha256_file(path),
        )
        if report.max_abs_err > EMBEDDING_ATOL or got[0].shape != ref_np.shape:
            raise ExportCheckFailed(f"{name}: ONNX differs from PyTorch: {report}")
        return report
    ref_sym, ref_lat = (t.numpy() for t in ref)
    got_sym, got_lat = got
    mismatch = got_sym != ref_sym
    centred = ref_lat - medians.numpy()[None, :, None]
    near_half = np.abs(np.abs(centred - np.floor(centred)) - 0.5) <= HALF_BAND
    return judge_codes(
        name, path, "symbols", (ref_sym, got_sym), (ref_lat, got_lat), mismatch, near_half
    )


def judge_codes(
    name: str,
    path: Path,
    what: str,
    codes: tuple[np.ndarray, np.ndarray],
    latents: tuple[np.ndarray, np.ndarray],
    mismatch: np.ndarray,
    tolerated: np.ndarray,
) -> ParityReport:
    """The parity report of an encoder; raise unless codes differ only where ``tolerated``.

    ``codes`` and ``latents`` are (PyTorch, onnxruntime); ``mismatch`` marks the codes that
    differ, ``tolerated`` where PyTorch itself was on an edge (a rounding or a near tie).
    """
    (ref, got), err = codes, np.abs(latents[1] - latents[0])
    report = ParityReport(
        name,
        len(ref),
        "latent",
        float(err.max()),
        float(err.mean()),
        LATENT_ATOL,
        symbols_total=int(mismatch.size),
        symbol_mismatches=int(mismatch.sum()),
        mismatches_near_half=int((mismatch & tolerated).sum()),
        sha256=sha256_file(path),
    )
    if got.dtype != np.int32 or got.shape != ref.shape:
        raise ExportCheckFailed(f"{name}: {what} are {got.dtype}{got.shape}")
    if report.max_abs_err > LATENT_ATOL:
        raise ExportCheckFailed(f"{name}: latent differs from PyTorch: {report}")
    far = report.symbol_mismatches - report.mismatches_near_half
    ties = int(tolerated.sum())
    allowed = max(MAX_FLIP_FRACTION * report.symbols_total + 1, MAX_TIE_FLIP_FRACTION * ties)
    if far or report.symbol_mismatches > allowed:
        raise ExportCheckFailed(f"{name}: {what} differ from PyTorch: {report}")
    log.info("%s parity: %s", name, report)
    return report
