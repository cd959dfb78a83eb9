"""The graphs that cross the serving boundary, and their export to ONNX with self-checks.

Entropy coding never runs inside the inference server. The encoder graph maps images to
the integer symbols the coder takes, ``round(y - median)`` per channel (int32, coder
layout ``(B, C, T)``), and also returns the continuous latent for quality checks; the
decoder graphs map symbols back to embeddings ``(B, T, C)`` or through the first MAE
decoder block to ``(B, T - 1, D)``. Batch is a dynamic axis; the image size is fixed.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from nec_models.nec import NECClassifier, NECFactorized
from nec_models.rvq import RVQAutoencoder
from nec_serve.contract import GraphRole
from nec_serve.errors import ExportCheckFailed, InvalidInput
from nec_serve.hashing import sha256_file

__all__ = [
    "EncoderGraph",
    "DecoderGraph",
    "ClassifierGraph",
    "RVQEncoderGraph",
    "RVQDecoderGraph",
    "check_rvq_encoder",
    "graph_roles",
    "NEC_GRAPHS",
    "graph_module",
    "ParityReport",
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


class EncoderGraph(nn.Module):
    """images ``(B, 3, H, W)`` float32 -> symbols ``(B, C, T)`` int32, latent float32."""

    def __init__(self, model: NECFactorized):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symbols for the coder and the continuous latent they round."""
        latent = self.model.latent(images)
        return self.model.symbols(latent), latent


class DecoderGraph(nn.Module):
    """symbols ``(B, C, T)`` int32 -> embeddings, optionally through decoder block 1."""

    def __init__(self, model: NECFactorized, first_block: bool = False):
        super().__init__()
        self.model = model
        self.first_block = first_block

    def forward(self, symbols: torch.Tensor) -> torch.Tensor:
        """Dequantized embeddings ``(B, T, C)`` or block-1 features ``(B, T-1, D)``."""
        embeddings = self.model.dequantize(symbols)
        if self.first_block:
            return self.model.first_decoder_block(embeddings)
        return embeddings


class ClassifierGraph(nn.Module):
    """symbols ``(B, C, T)`` int32 -> class scores ``(B, K)`` float32 (softmax).

    The head of a :class:`~nec_models.nec.NECClassifier` on the embeddings a consumer
    decodes, so a consumer step outputs labels without ever seeing pixels.
    """

    def __init__(self, model: NECClassifier):
        super().__init__()
        self.model = model

    def forward(self, symbols: torch.Tensor) -> torch.Tensor:
        """Softmax over the head's logits of the dequantized embeddings."""
        embeddings = self.model.backbone.dequantize(symbols)
        return torch.softmax(self.model.forward_embeddings(embeddings), dim=-1)


class RVQEncoderGraph(nn.Module):
    """bands ``(B, 10, S, S)`` -> indices ``(B, levels, T)`` int32 (all levels), latent."""

    def __init__(self, model: RVQAutoencoder):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every level's nearest-entry index and the continuous latent ``(B, D, T)``."""
        return self.model.indices(images)


class RVQDecoderGraph(nn.Module):
    """indices ``(B, levels, T)`` int32, ``-1`` for unused levels -> bands ``(B, 10, S, S)``.

    The number of levels a tile was coded with travels in the indices themselves (the
    coder fills the levels it did not code with -1), so the graph has one input.
    """

    def __init__(self, model: RVQAutoencoder):
        super().__init__()
        self.model = model

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Standardised bands of the tile (the pipeline undoes the standardisation)."""
        return self.model.decode_indices(indices)


def _backbone(model: nn.Module) -> NECFactorized:
    return model.backbone if isinstance(model, NECClassifier) else model


#: The module behind each graph role NEC exports, built from the exported model (an
#: :class:`NECFactorized`, or an :class:`NECClassifier` and its backbone).
NEC_GRAPHS: dict[GraphRole, Callable[[nn.Module], nn.Module]] = {
    GraphRole.ENCODER: lambda m: EncoderGraph(_backbone(m)),
    GraphRole.DECODER: lambda m: DecoderGraph(_backbone(m)),
    GraphRole.FEATURES: lambda m: DecoderGraph(_backbone(m), first_block=True),
    GraphRole.CLASSIFIER: ClassifierGraph,
}


def graph_roles(model: nn.Module) -> list[GraphRole]:
    """The graph roles ``model`` can export.

    The classifier role needs a classifier's head; block-1 features need the first decoder
    block, which a classifier trained without it drops.
    """
    if isinstance(model, RVQAutoencoder):
        return [GraphRole.ENCODER, GraphRole.RECONSTRUCTION]
    nec = _backbone(model)
    roles = [GraphRole.ENCODER, GraphRole.DECODER]
    if hasattr(nec, "decoder_blocks") and hasattr(nec, "decoder_embed"):
        roles.append(GraphRole.FEATURES)
    if isinstance(model, NECClassifier) and isinstance(model.head, nn.Linear):
        roles.append(GraphRole.CLASSIFIER)
    return roles


def graph_module(model: nn.Module, role: GraphRole) -> nn.Module:
    """The PyTorch module of ``role`` for ``model`` (what is exported, or run by PyTorch)."""
    if role not in graph_roles(model):
        raise InvalidInput(f"{type(model).__name__} exports no {role} graph")
    if isinstance(model, RVQAutoencoder):
        return RVQEncoderGraph(model) if role == GraphRole.ENCODER else RVQDecoderGraph(model)
    return NEC_GRAPHS[role](model)


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
    return _judge_codes(
        name, path, "symbols", (ref_sym, got_sym), (ref_lat, got_lat), mismatch, near_half
    )


def _judge_codes(
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


def check_rvq_encoder(
    name: str, module: RVQEncoderGraph, path: Path, inputs: torch.Tensor
) -> ParityReport:
    """Parity of the RVQ encoder: latent within :data:`LATENT_ATOL`, indices near-equal.

    An index may differ only at a position whose first differing level was a near tie
    in PyTorch: the two nearest entries' squared distances within :data:`HALF_BAND`
    relative of each other (later levels follow from that choice). Such positions must
    be rare (:data:`MAX_FLIP_FRACTION`).
    """
    sess = session(path)
    model = module.model
    with torch.no_grad():
        ref_idx, ref_lat = (t.numpy() for t in module(inputs))
        gaps = _first_level_gaps(model, torch.from_numpy(ref_lat))
    got_idx, got_lat = sess.run(None, {sess.get_inputs()[0].name: inputs.numpy()})
    differ = got_idx != ref_idx  # (B, L, T)
    first = differ.argmax(1)  # first differing level per position
    tie = np.take_along_axis(gaps, first[:, None, :], 1)[:, 0] <= HALF_BAND
    return _judge_codes(
        name, path, "indices", (ref_idx, got_idx), (ref_lat, got_lat), differ.any(1), tie
    )


def _first_level_gaps(model: RVQAutoencoder, latent: torch.Tensor) -> np.ndarray:
    """Relative gap between the two nearest entries at every level, ``(B, L, T)``."""
    b, d, t = latent.shape
    residual = latent.permute(0, 2, 1).reshape(-1, d)
    gaps = []
    for level in range(model.levels):
        idx, dist = model.quantizer.nearest(residual, level)
        two = dist.topk(2, dim=1, largest=False).values
        gaps.append((two[:, 1] - two[:, 0]) / two[:, 1].abs().clamp(min=1e-6))
        residual = residual - model.quantizer.codebooks[level][idx]
    return torch.stack(gaps, 1).reshape(b, t, model.levels).permute(0, 2, 1).numpy()
