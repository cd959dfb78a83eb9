"""Export a NEC model: ONNX graphs, frozen entropy tables, Triton model repositories.

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
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from nec_export.graphs import (
    check_graph,
    check_rvq_encoder,
    export_onnx,
    graph_module,
    graph_roles,
)
from nec_export.triton import (
    StringParameter,
    cpu_config,
    gpu_config,
    local_config,
    to_pbtxt,
)
from nec_models.nec import NECClassifier, NECFactorized, NECHyperprior
from nec_models.rvq import S2_BANDS, RVQAutoencoder
from nec_serve import __version__
from nec_serve.categorical import categorical_tables
from nec_serve.contract import (
    CATEGORICAL,
    FACTORIZED,
    MANIFEST_FILENAME,
    NEC,
    RVQ,
    DataType,
    EntropyModelSpec,
    GraphRole,
    GraphSpec,
    InputSpec,
    Manifest,
    NecParams,
    RvqParams,
    TensorSpec,
)
from nec_serve.errors import InvalidInput
from nec_serve.imagery import Normalisation
from nec_serve.tables import TABLES_FILENAME, EntropyTables

__all__ = ["tables_from_model", "export_model", "export_rvq", "ExportOptions"]

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
    # RVQ: serve the graphs under the tensor names of EO4EU's wrappers (see export_rvq).
    eo4eu_names: bool = False

    def __post_init__(self) -> None:
        """Refuse settings the torch runtime does not know, before any work is done."""
        if self.torch_device not in ("auto", "cuda", "cpu"):
            raise InvalidInput(f"torch device {self.torch_device!r} is not auto, cuda or cpu")
        if self.torch_precision not in ("fp32", "bf16", "fp16"):
            raise InvalidInput(
                f"torch precision {self.torch_precision!r} is not fp32, bf16 or fp16"
            )


def tables_from_model(model: NECFactorized) -> EntropyTables:
    """Freeze the bottleneck's tables: the checkpoint's own if it has them, else update().

    A checkpoint saved after CompressAI's ``update()`` carries the tables it was evaluated
    with; those are used as they are, since recomputing them elsewhere may differ.
    """
    eb = model.entropy_bottleneck
    if eb._quantized_cdf.numel() == 0 or eb._offset.numel() == 0:
        eb.update(force=True)
    return EntropyTables(
        quantized_cdf=eb._quantized_cdf.cpu().numpy(),
        cdf_length=eb._cdf_length.cpu().numpy(),
        offset=eb._offset.cpu().numpy(),
        medians=model.medians().cpu().numpy(),
        precision=int(eb.entropy_coder_precision),
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
    model, nec, out: Path, graphs: dict[GraphRole, GraphSpec], options, make_config
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
            "model_kwargs": json.dumps(_model_kwargs(model)),
            "img_size": str(nec.img_size),
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


def _model_kwargs(model: torch.nn.Module) -> dict:
    """What rebuilds ``model`` from the registry beside its name and image size."""
    if isinstance(model, NECClassifier):
        return {"num_classes": model.head.out_features, "with_decoder": model.with_decoder}
    return {}


def _check_exportable(model: torch.nn.Module) -> NECFactorized:
    if isinstance(model, NECClassifier):
        return model.backbone
    if isinstance(model, NECHyperprior):
        raise InvalidInput(
            "the hyperprior NEC model is not exported for serving: its decoder derives "
            "Gaussian scale indexes from a float network output, which differs in the last "
            "bit between machines and corrupts streams (DESIGN section 3)"
        )
    if not isinstance(model, NECFactorized):
        raise InvalidInput(f"cannot export {type(model).__name__}: not an NEC model")
    return model


def _write_repositories(
    model: torch.nn.Module, nec, out: Path, graphs: dict[GraphRole, GraphSpec], options
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
        _write_torch_repository(model, nec, out, graphs, options, configs["local"])


def export_model(
    model: torch.nn.Module,
    out_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    checkpoint_sha256: str | None = None,
    calibration: dict | None = None,
    class_names: Sequence[str] | None = None,
    index_counts=None,
) -> Manifest:
    """Export graphs, tables and the Triton repositories; write and return the manifest.

    Every graph is checked against PyTorch on a batch of ``options.check_batch`` random
    images (see :func:`nec_export.graphs.check_graph`); a failed check raises and leaves
    no manifest, so a half-done export is never mistaken for a good one. A classifier
    (:class:`NECClassifier`) also exports its head as the ``classifier`` graph, its scores
    named by ``class_names`` (default ``class_0`` ...). An RVQ model
    (:class:`~nec_models.rvq.RVQAutoencoder`) exports its encoder and decoder with
    categorical tables made from ``index_counts``, its training set's ``(levels, K)``
    index histograms (:func:`export_rvq`).
    """
    if isinstance(model, RVQAutoencoder):
        return export_rvq(model, out_dir, index_counts, options, checkpoint_sha256)
    if options.eo4eu_names:
        raise InvalidInput("--eo4eu-names applies to the RVQ family's graphs")
    nec = _check_exportable(model).eval()
    model.eval()
    roles = graph_roles(model)
    names: tuple[str, ...] = ()
    if GraphRole.CLASSIFIER in roles:
        k = model.head.out_features
        names = tuple(class_names) if class_names else tuple(f"class_{i}" for i in range(k))
        if len(names) != k or len(set(names)) != k or not all(names):
            raise InvalidInput(
                f"the classifier scores {k} classes; class names {list(names)} must be {k} "
                "distinct non-empty names"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILENAME).unlink(missing_ok=True)
    tables = tables_from_model(nec)
    tables.save(out / TABLES_FILENAME)

    c, t, s = nec.embed_dim, nec.num_tokens, nec.img_size
    gen = torch.Generator().manual_seed(options.seed)
    images = torch.randn(options.check_batch, nec.in_chans, s, s, generator=gen)
    modules = {role: graph_module(model, role) for role in roles}
    with torch.no_grad():
        symbols = modules[GraphRole.ENCODER](images)[0]
    fp32, sym = DataType.TYPE_FP32, TensorSpec("symbols", DataType.TYPE_INT32, (c, t))
    tensors = {  # role -> (inputs, outputs), the encoder's outputs in the order the role fixes
        GraphRole.ENCODER: (
            (TensorSpec("images", fp32, (nec.in_chans, s, s)),),
            (sym, TensorSpec("latent", fp32, (c, t))),
        ),
        GraphRole.DECODER: ((sym,), (TensorSpec("embeddings", fp32, (t, c)),)),
        GraphRole.FEATURES: (
            (sym,),
            (TensorSpec("features", fp32, (t - 1, nec.decoder_embed_dim)),),
        ),
        GraphRole.CLASSIFIER: ((sym,), (TensorSpec("scores", fp32, (len(names),)),)),
    }
    graphs: dict[GraphRole, GraphSpec] = {}
    for role, module in modules.items():
        name, (inputs, outputs) = NEC.graph_name(role), tensors[role]
        is_encoder = role == GraphRole.ENCODER
        check_in = images if is_encoder else symbols
        file = f"onnx/{name}.onnx"
        path = export_onnx(
            module, check_in[:2], out / file, inputs[0].name, [o.name for o in outputs]
        )
        medians = nec.medians() if is_encoder else None
        parity = check_graph(name, module, path, check_in, medians).as_dict()
        graphs[role] = GraphSpec(role, name, file, inputs, outputs, parity)

    _write_repositories(model, nec, out, graphs, options)

    # The statistics the model expects of [0, 1] pixels with its band count.
    norm = Normalisation.for_dtype("float32", nec.in_chans)
    manifest = Manifest(
        family=NEC.name,
        model=getattr(model, "registry_name", type(nec).__name__),
        model_version=options.version,
        input=InputSpec(s, nec.in_chans, norm.mean, norm.std),
        graphs=graphs,
        entropy=EntropyModelSpec(FACTORIZED.kind, TABLES_FILENAME, tables.sha256),
        family_params=NecParams(c, t, nec.decoder_embed_dim, names),
        checkpoint_sha256=checkpoint_sha256,
        calibration=calibration,
        created_by=f"nec-serve {__version__}",
        torch_version=torch.__version__,
    )
    manifest.save(out)
    return manifest


def _rvq_tensor_names(bands: int, size: int, eo4eu: bool) -> dict[str, str]:
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


def export_rvq(
    model: RVQAutoencoder,
    out_dir: str | Path,
    index_counts,
    options: ExportOptions = ExportOptions(),
    checkpoint_sha256: str | None = None,
) -> Manifest:
    """Export the RVQ compressor: encoder, decoder, categorical tables, repositories.

    The tables are one static distribution per codebook level, the training set's index
    histogram ``index_counts`` ``(levels, K)`` (default: the model's
    ``quantizer.index_counts``, filled by the trainer) with +1 smoothing
    (:func:`nec_serve.categorical.categorical_tables`). Both graphs are checked against
    PyTorch (:func:`nec_export.graphs.check_rvq_encoder`, and the decoder within
    :data:`~nec_export.graphs.EMBEDDING_ATOL` on indices with random unused levels).
    """
    if index_counts is None:
        index_counts = model.quantizer.index_counts.cpu().numpy()
    counts = np.asarray(index_counts)
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
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILENAME).unlink(missing_ok=True)
    tables = categorical_tables(counts)
    tables.save(out / TABLES_FILENAME)
    s, bands, levels = model.img_size, model.in_chans, model.levels
    t = model.latent_size**2
    gen = torch.Generator().manual_seed(options.seed)
    images = torch.randn(options.check_batch, bands, s, s, generator=gen)
    encoder = graph_module(model, GraphRole.ENCODER)
    with torch.no_grad():
        indices = encoder(images)[0]
    # Each tile of the check batch uses a different number of levels (-1 beyond them).
    used = torch.arange(levels)[None, :, None] < torch.arange(1, len(images) + 1)[:, None, None]
    indices = torch.where(used, indices, torch.full_like(indices, -1))
    names = _rvq_tensor_names(bands, s, options.eo4eu_names)
    fp32 = DataType.TYPE_FP32
    idx = TensorSpec(names["indices"], DataType.TYPE_INT32, (levels, t))
    tensors = {
        GraphRole.ENCODER: (
            (TensorSpec(names["images"], fp32, (bands, s, s)),),
            (idx, TensorSpec("latent", fp32, (model.latent, t))),
        ),
        GraphRole.RECONSTRUCTION: ((idx,), (TensorSpec(names["bands"], fp32, (bands, s, s)),)),
    }
    graphs: dict[GraphRole, GraphSpec] = {}
    for role, (inputs, outputs) in tensors.items():
        name, module = RVQ.graph_name(role), graph_module(model, role)
        check_in = images if role == GraphRole.ENCODER else indices
        file = f"onnx/{name}.onnx"
        path = export_onnx(
            module, check_in[:2], out / file, inputs[0].name, [o.name for o in outputs]
        )
        if role == GraphRole.ENCODER:
            parity = check_rvq_encoder(name, module, path, check_in).as_dict()
        else:
            parity = check_graph(name, module, path, check_in).as_dict()
        graphs[role] = GraphSpec(role, name, file, inputs, outputs, parity)
    _write_repositories(model, model, out, graphs, options)
    manifest = Manifest(
        family=RVQ.name,
        model=getattr(model, "registry_name", type(model).__name__),
        model_version=options.version,
        input=InputSpec(s, bands, model.band_mean.tolist(), model.band_std.tolist()),
        graphs=graphs,
        entropy=EntropyModelSpec(CATEGORICAL.kind, TABLES_FILENAME, tables.sha256),
        family_params=RvqParams(
            levels=levels,
            codebook_size=model.codebook_size,
            latent_channels=model.latent,
            downscale=model.downscale,
            tokens=t,
            band_names=S2_BANDS[:bands] if bands <= len(S2_BANDS) else (),
        ),
        checkpoint_sha256=checkpoint_sha256,
        calibration=None,
        created_by=f"nec-serve {__version__}",
        torch_version=torch.__version__,
    )
    manifest.save(out)
    return manifest
