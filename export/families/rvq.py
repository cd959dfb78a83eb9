"""The RVQ family's PyTorch side: its graphs, categorical tables and parity checks.

The encoder graph maps bands to every codebook level's nearest-entry index (int32,
``(B, levels, T)``) and the continuous latent; the decoder maps indices, ``-1`` for the
levels a tile was not coded with, back to standardised bands. The runtime side is
:mod:`nec_serve.families.rvq`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nec_export.graphs import HALF_BAND, ParityReport, check_graph, judge_codes, session
from nec_export.plan import ExportPlan, FamilyExporter, GraphPlan, register_exporter
from nec_models.rvq import S2_BANDS, RVQAutoencoder
from nec_serve.categorical import categorical_tables
from nec_serve.contract import CATEGORICAL, DataType, GraphRole, InputSpec, TensorSpec
from nec_serve.errors import InvalidInput
from nec_serve.families.rvq import RVQ, RvqParams

__all__ = ["RVQEncoderGraph", "RVQDecoderGraph", "check_rvq_encoder", "RvqExporter"]


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


def check_rvq_encoder(
    name: str, module: RVQEncoderGraph, path: Path, inputs: torch.Tensor
) -> ParityReport:
    """Parity of the RVQ encoder: latent within ``LATENT_ATOL``, indices near-equal.

    An index may differ only at a position whose first differing level was a near tie
    in PyTorch: the two nearest entries' squared distances within ``HALF_BAND``
    relative of each other (later levels follow from that choice). Such positions must
    be rare (see :func:`nec_export.graphs.judge_codes`).
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
    return judge_codes(
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


def tensor_names(bands: int, size: int, eo4eu: bool) -> dict[str, str]:
    """The RVQ graphs' tensor names: the project's, or those EO4EU's wrappers call.

    EO4EU's wrappers name the encoder input ``input_sentinel2_10_bands_120``, the codes
    ``int64_latent32_15`` and the decoder output ``output_sentinel2_10_bands_120``; with
    ``eo4eu`` the graphs use these names (with this export's band count and tile size), so
    a client that addresses tensors by those names reaches them. The codes stay int32 in
    this project's ``(levels, positions)`` layout.
    """
    if not eo4eu:
        return {"images": "images", "indices": "indices", "bands": "bands"}
    return {
        "images": f"input_sentinel2_{bands}_bands_{size}",
        "indices": "int64_latent32_15",
        "bands": f"output_sentinel2_{bands}_bands_{size}",
    }


def _index_counts(model: RVQAutoencoder) -> np.ndarray:
    """The training set's ``(levels, K)`` index histograms the trainer left in the model."""
    counts = model.quantizer.index_counts.cpu().numpy()
    if not counts.any():
        raise InvalidInput(
            "the RVQ model has no index histograms (quantizer.index_counts is empty): export "
            "a checkpoint of a finished `nec-serve train rvq` run, or a shipped model"
        )
    if counts.shape != (model.levels, model.codebook_size):
        raise InvalidInput(
            f"index histograms {counts.shape} do not fit {model.levels} codebooks of "
            f"{model.codebook_size} entries"
        )
    return counts


class RvqExporter(FamilyExporter):
    """Exports :class:`~nec_models.rvq.RVQAutoencoder` models.

    The tables are one static distribution per codebook level, the training set's index
    histograms with +1 smoothing (:func:`nec_serve.categorical.categorical_tables`). Both
    graphs are checked against PyTorch (:func:`check_rvq_encoder`, and the decoder within
    ``EMBEDDING_ATOL`` on indices with random unused levels).
    """

    family = RVQ

    def accepts(self, model: nn.Module) -> bool:
        """RVQ autoencoders."""
        return isinstance(model, RVQAutoencoder)

    def graph_roles(self, model: nn.Module) -> list[GraphRole]:
        """Encoder and reconstruction."""
        return [GraphRole.ENCODER, GraphRole.RECONSTRUCTION]

    def graph_module(self, model: nn.Module, role: GraphRole) -> nn.Module:
        """The encoder or decoder graph wrapper."""
        return RVQEncoderGraph(model) if role == GraphRole.ENCODER else RVQDecoderGraph(model)

    def plan(self, model: nn.Module, options: Any, trained: Mapping[str, Any]) -> ExportPlan:
        """Both graphs, checked on random bands and on indices with unused levels."""
        tables = categorical_tables(_index_counts(model))
        s, bands, levels = model.img_size, model.in_chans, model.levels
        t = model.latent_size**2
        gen = torch.Generator().manual_seed(options.seed)
        images = torch.randn(options.check_batch, bands, s, s, generator=gen)
        encoder = self.graph_module(model, GraphRole.ENCODER)
        with torch.no_grad():
            indices = encoder(images)[0]
        # Each tile of the check batch uses a different number of levels (-1 beyond them).
        n = torch.arange(1, len(images) + 1)[:, None, None]
        used = torch.arange(levels)[None, :, None] < n
        indices = torch.where(used, indices, torch.full_like(indices, -1))
        names = tensor_names(bands, s, options.eo4eu_names)
        fp32 = DataType.TYPE_FP32
        idx = TensorSpec(names["indices"], DataType.TYPE_INT32, (levels, t))
        decoder = self.graph_module(model, GraphRole.RECONSTRUCTION)
        out = TensorSpec(names["bands"], fp32, (bands, s, s))
        graphs = (
            GraphPlan(
                GraphRole.ENCODER,
                encoder,
                (TensorSpec(names["images"], fp32, (bands, s, s)),),
                (idx, TensorSpec("latent", fp32, (model.latent, t))),
                images,
                check_rvq_encoder,
            ),
            GraphPlan(GraphRole.RECONSTRUCTION, decoder, (idx,), (out,), indices, check_graph),
        )
        return ExportPlan(
            family=RVQ,
            model=getattr(model, "registry_name", type(model).__name__),
            input=InputSpec(s, bands, model.band_mean.tolist(), model.band_std.tolist()),
            entropy_kind=CATEGORICAL.kind,
            tables=tables,
            code_extras={"codebooks": _codebook_bytes(model)},
            graphs=graphs,
            family_params=RvqParams(
                levels=levels,
                codebook_size=model.codebook_size,
                latent_channels=model.latent,
                downscale=model.downscale,
                tokens=t,
                band_names=S2_BANDS[:bands] if bands <= len(S2_BANDS) else (),
            ),
        )


register_exporter(RvqExporter())


def _codebook_bytes(model: RVQAutoencoder) -> bytes:
    """Every level's codebook as little-endian float32, level by level: what an index means."""
    books = [book.detach().cpu().numpy().astype("<f4") for book in model.quantizer.codebooks]
    return b"".join(book.tobytes() for book in books)
