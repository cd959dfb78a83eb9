"""Export a model of any family: ONNX graphs, frozen entropy tables, Triton model repositories.

Layout of an export directory::

    <out>/manifest.json                    what was exported, hashes, parity numbers
    <out>/entropy_tables.bin (+ .sha256)   frozen tables the coder uses
    <out>/onnx/<graph>.onnx                the checked graphs
    <out>/model_repository_gpu/<graph>/config.pbtxt, 1/model.onnx, 1/entropy_tables.bin
    <out>/model_repository_cpu/...         the same graphs with the CPU configuration
    <out>/model_repository_local/<graph>/config.pbtxt, 1/model.py, 1/model.onnx
                                           the same graphs behind Triton's Python backend,
                                           for the tritonserver bundled with PyTriton
    <out>/model_repository_torch/...       (``torch_runtime``) the same Python backend
                                           running the PyTorch graphs on the GPU when
                                           there is one (else the CPU), from
    <out>/torch/weights.pt                 the model's state dict

Files in the two repositories are hard links to ``onnx/`` where the filesystem allows,
so the second variant costs no space. The tables travel inside each repository too, so
the repository uploaded for Triton is enough for a coder to find them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from nec_export.graphs import export_onnx
from nec_export.plan import ExportPlan, GraphPlan, exporter_for
from nec_export.triton import (
    StringParameter,
    cpu_config,
    gpu_config,
    local_config,
    to_pbtxt,
)
from nec_serve import __version__
from nec_serve.contract import (
    MANIFEST_FILENAME,
    EntropyModelSpec,
    GraphRole,
    GraphSpec,
    Manifest,
)
from nec_serve.errors import InvalidInput
from nec_serve.fingerprint import extras_digests
from nec_serve.tables import TABLES_FILENAME

__all__ = ["export_model", "ExportOptions"]

# Not imported here: it needs Triton's triton_python_backend_utils, present only in Triton.
TRITON_MODEL_PY = Path(__file__).resolve().parent / "triton_model.py"


@dataclass(frozen=True)
class ExportOptions:
    """Knobs of an export."""

    version: str = "1"
    gpu_max_batch: int = 32
    cpu_max_batch: int = 8
    cpu_instances: int = 1
    check_batch: int = 4  # >= 2: torch.export specialises a batch of 1
    seed: int = 0
    torch_runtime: bool = False  # also model_repository_torch + torch/weights.pt
    torch_device: str = "auto"  # where that runtime runs: auto (GPU if any), cuda, cpu
    torch_precision: str = "fp32"  # fp32, or bf16/fp16 autocast (speed only: symbols move)
    # Serve the graphs under the tensor names of EO4EU's wrappers (the RVQ family's).
    eo4eu_names: bool = False

    def __post_init__(self) -> None:
        """Refuse settings the torch runtime does not know, before any work is done."""
        if self.torch_device not in ("auto", "cuda", "cpu"):
            raise InvalidInput(f"torch device {self.torch_device!r} is not auto, cuda or cpu")
        if self.torch_precision not in ("fp32", "bf16", "fp16"):
            raise InvalidInput(
                f"torch precision {self.torch_precision!r} is not fp32, bf16 or fp16"
            )


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_torch_repository(
    model, plan: ExportPlan, out: Path, graphs: dict[GraphRole, GraphSpec], options, make_config
) -> None:
    """``model_repository_torch``: the Python backend running the PyTorch graphs.

    The model file is the same ``model.py``; parameters tell it to rebuild the registered
    architecture, load ``weights.pt`` and run the graph of its role with PyTorch on
    ``torch_device``.
    """
    name = getattr(model, "registry_name", None)
    if name is None:
        raise InvalidInput(
            "the torch runtime rebuilds the model from the registry: export a model made by "
            "nec_models.create_model"
        )
    weights = out / "torch" / "weights.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    repo = out / "model_repository_torch"
    for graph in graphs.values():
        config = make_config(graph.name, graph.inputs, graph.outputs)
        params = {
            "runtime": "torch",
            "nec_model": name,
            "model_kwargs": json.dumps(dict(plan.rebuild_kwargs)),
            "img_size": str(plan.input.img_size),
            "graph": graph.name,
            "role": graph.role.value,
            "device": options.torch_device,
            "precision": options.torch_precision,
        }
        config = dataclasses.replace(
            config,
            parameters={**config.parameters, **{k: StringParameter(v) for k, v in params.items()}},
        )
        (repo / graph.name).mkdir(parents=True, exist_ok=True)
        (repo / graph.name / "config.pbtxt").write_text(to_pbtxt(config))
        vdir = repo / graph.name / options.version
        _link_or_copy(weights, vdir / "weights.pt")
        _link_or_copy(TRITON_MODEL_PY, vdir / "model.py")
        for fname in (TABLES_FILENAME, TABLES_FILENAME + ".sha256"):
            _link_or_copy(out / fname, vdir / fname)


def _write_repositories(
    model: torch.nn.Module,
    plan: ExportPlan,
    out: Path,
    graphs: dict[GraphRole, GraphSpec],
    options,
) -> None:
    """The GPU, CPU and local Triton repositories of ``graphs`` (and the torch one)."""
    configs = {
        "gpu": partial(gpu_config, max_batch_size=options.gpu_max_batch),
        "cpu": partial(
            cpu_config, max_batch_size=options.cpu_max_batch, instances=options.cpu_instances
        ),
        "local": partial(
            local_config, max_batch_size=options.cpu_max_batch, instances=options.cpu_instances
        ),
    }
    for variant, make_config in configs.items():
        repo = out / f"model_repository_{variant}"
        for graph in graphs.values():
            name = graph.name
            (repo / name).mkdir(parents=True, exist_ok=True)
            config = make_config(name, graph.inputs, graph.outputs)
            (repo / name / "config.pbtxt").write_text(to_pbtxt(config))
            vdir = repo / name / options.version
            _link_or_copy(out / graph.file, vdir / "model.onnx")
            for fname in (TABLES_FILENAME, TABLES_FILENAME + ".sha256"):
                _link_or_copy(out / fname, vdir / fname)
            if variant == "local":
                _link_or_copy(TRITON_MODEL_PY, vdir / "model.py")
    if options.torch_runtime:
        _write_torch_repository(model, plan, out, graphs, options, configs["local"])


def export_model(
    model: torch.nn.Module,
    out_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    checkpoint_sha256: str | None = None,
    calibration: dict | None = None,
    trained: Mapping[str, Any] | None = None,
) -> Manifest:
    """Export graphs, tables and the Triton repositories; write and return the manifest.

    The family that accepts ``model`` (:func:`nec_export.plan.exporter_for`) plans the
    export: its graphs by role, their tensors and parity checks, its frozen tables and
    manifest sections; ``trained`` is what the checkpoint's trainer recorded (e.g. a
    classifier's class names). Every graph is checked against PyTorch on a batch of
    ``options.check_batch`` inputs; a failed check raises and leaves no manifest, so a
    half-done export is never mistaken for a good one.
    """
    exporter = exporter_for(model)
    model.eval()
    plan = exporter.plan(model, options, trained or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILENAME).unlink(missing_ok=True)
    plan.tables.save(out / TABLES_FILENAME)
    graphs = {g.role: _export_graph(g, plan, out) for g in plan.graphs}
    _write_repositories(model, plan, out, graphs, options)
    manifest = Manifest(
        family=plan.family.name,
        model=plan.model,
        model_version=options.version,
        input=plan.input,
        graphs=graphs,
        entropy=EntropyModelSpec(
            plan.entropy_kind,
            TABLES_FILENAME,
            plan.tables.sha256,
            extras_digests(plan.code_extras) or None,
        ),
        family_params=plan.family_params,
        checkpoint_sha256=checkpoint_sha256,
        calibration=calibration,
        created_by=f"nec-serve {__version__}",
        torch_version=torch.__version__,
    )
    manifest.save(out)
    return manifest


def _export_graph(graph: GraphPlan, plan: ExportPlan, out: Path) -> GraphSpec:
    """One graph to ``onnx/<name>.onnx``, checked against PyTorch on its check inputs."""
    name = plan.family.graph_name(graph.role)
    file = f"onnx/{name}.onnx"
    check_in = graph.check_input
    outputs = [o.name for o in graph.outputs]
    path = export_onnx(graph.module, check_in[:2], out / file, graph.inputs[0].name, outputs)
    parity = graph.check(name, graph.module, path, check_in).as_dict()
    return GraphSpec(graph.role, name, file, graph.inputs, graph.outputs, parity)
