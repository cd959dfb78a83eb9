"""The toy family's PyTorch side: its model, graphs and export plan."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nec_export.graphs import ParityReport, session
from nec_export.plan import ExportPlan, FamilyExporter, GraphPlan, register_exporter
from nec_serve.categorical import categorical_tables
from nec_serve.contract import CATEGORICAL, DataType, GraphRole, InputSpec, TensorSpec
from nec_serve.errors import ExportCheckFailed
from toyfamily.runtime import TOY, ToyParams

STEPS = 4  # quantizer levels per standardised unit


class ToyPool(nn.Module):
    """2x2 average pool, scalar quantizer with ``entries`` levels around 0."""

    def __init__(self, bands: int = 2, img_size: int = 8, entries: int = 16):
        super().__init__()
        self.bands, self.img_size, self.entries = bands, img_size, entries

    def indices(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, bands, S, S)`` -> indices ``(B, bands, T)`` int32 and the pooled latent."""
        latent = nn.functional.avg_pool2d(images, 2).flatten(2)
        q = torch.round(latent * STEPS) + self.entries // 2
        return q.clamp(0, self.entries - 1).to(torch.int32), latent

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices -> standardised bands ``(B, bands, S, S)`` (nearest upsampling)."""
        side = self.img_size // 2
        y = (indices.to(torch.float32) - self.entries // 2) / STEPS
        y = y.reshape(indices.shape[0], self.bands, side, side)
        return y.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


class _Encoder(nn.Module):
    def __init__(self, model: ToyPool):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.indices(images)


class _Decoder(nn.Module):
    def __init__(self, model: ToyPool):
        super().__init__()
        self.model = model

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.model.decode(indices)


def _exact(name: str, module: nn.Module, path: Path, inputs: torch.Tensor) -> ParityReport:
    """onnxruntime must give PyTorch's first output exactly."""
    sess = session(path)
    with torch.no_grad():
        ref = module(inputs)
    ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: inputs.numpy()})[0]
    err = np.abs(got.astype(np.float64) - ref)
    if got.shape != ref.shape or err.max() > 1e-6:
        raise ExportCheckFailed(f"{name}: ONNX differs from PyTorch")
    return ParityReport(name, len(inputs), "out", float(err.max()), float(err.mean()), 1e-6)


class ToyExporter(FamilyExporter):
    """Exports :class:`ToyPool` models."""

    family = TOY

    def accepts(self, model: nn.Module) -> bool:
        return isinstance(model, ToyPool)

    def graph_roles(self, model: nn.Module) -> list[GraphRole]:
        return [GraphRole.ENCODER, GraphRole.RECONSTRUCTION]

    def graph_module(self, model: nn.Module, role: GraphRole) -> nn.Module:
        return _Encoder(model) if role == GraphRole.ENCODER else _Decoder(model)

    def plan(self, model: nn.Module, options: Any, trained: Mapping[str, Any]) -> ExportPlan:
        b, s, k = model.bands, model.img_size, model.entries
        t = (s // 2) ** 2
        gen = torch.Generator().manual_seed(options.seed)
        images = torch.randn(options.check_batch, b, s, s, generator=gen)
        encoder = self.graph_module(model, GraphRole.ENCODER)
        with torch.no_grad():
            indices = encoder(images)[0]
        counts = np.ones((b, k)) + np.stack(
            [np.bincount(r.ravel(), minlength=k) for r in indices.transpose(0, 1).numpy()]
        )
        fp32, idx = DataType.TYPE_FP32, TensorSpec("indices", DataType.TYPE_INT32, (b, t))
        graphs = (
            GraphPlan(
                GraphRole.ENCODER,
                encoder,
                (TensorSpec("images", fp32, (b, s, s)),),
                (idx, TensorSpec("latent", fp32, (b, t))),
                images,
                _exact,
            ),
            GraphPlan(
                GraphRole.RECONSTRUCTION,
                self.graph_module(model, GraphRole.RECONSTRUCTION),
                (idx,),
                (TensorSpec("bands", fp32, (b, s, s)),),
                indices,
                _exact,
            ),
        )
        return ExportPlan(
            family=TOY,
            model="toy_pool",
            input=InputSpec(s, b, (0.2,) * b, (0.2,) * b),
            entropy_kind=CATEGORICAL.kind,
            tables=categorical_tables(counts),
            graphs=graphs,
            family_params=ToyParams(b, t, k, tuple(f"T{i + 1}" for i in range(b))),
        )


register_exporter(ToyExporter())
