"""The main job: export, compress, decompress and report, then the same as a workflow.

By default the model is a shipped, trained NEC rate point with its classifier (see
:mod:`nec_dev.demo_trained`): Sentinel-2 RGB data it fits is compressed, decoded to
embeddings and to class labels, and bits per image and top-1 are printed beside the raw
sizes. With ``--model`` a registry name (e.g. the untrained ViT-B/16
``mae_vit_compress_adapter``), that model is exported instead, its entropy bottleneck
calibrated to the latents of one NAIP scene (then left out), and NAIP, Landsat and
BigEarthNet are compressed: bits per pixel, compression ratio against the raw bytes and
against float32 embeddings, the coded size against the entropy bound, and the embedding
error measured end to end. Either way the workflow demo follows on the local stack.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np

from nec_dev.data import ENV_VAR, DataDir, resolve_data
from nec_dev.demo_rvq import RVQ_MODEL, SSL4EO_BANDS, run_rvq_demo, s2_workflow_inputs
from nec_dev.demo_trained import (
    RecordingEngine,
    eurosat_workflow_inputs,
    export_shipped,
    run_trained_sources,
)
from nec_dev.workflow_demo import run_workflow_demo
from nec_export import export_model
from nec_export.calibrate import calibrate_from_inputs
from nec_models import create_model
from nec_models.shipped import shipped_models
from nec_serve.bundle import ModelBundle
from nec_serve.contract import MANIFEST_FILENAME, GraphRole, Manifest
from nec_serve.engines import LocalEngine
from nec_serve.errors import InvalidInput, SchemaVersionError
from nec_serve.imagery import iter_inputs
from nec_serve.pipeline import compress, decompress

__all__ = ["run_demo", "DATASETS"]

#: The scene the entropy bottleneck is calibrated on; it is left out of the NAIP results.
CALIBRATION_SCENE = "naip/m_4709963_se_14_1_20090818.tif"
#: name -> (folder under the data dir, 1-based bands for the model's RGB input)
DATASETS = {
    "naip": ("naip", [1, 2, 3]),
    "landsat": ("landsat", [1, 2, 3]),
    "bigearthnet": ("bigearthnet", None),  # patch folders: B04, B03, B02
}


def _reusable(model: str, out: Path) -> bool:
    """Whether ``out`` holds an export of ``model`` that this nec-serve reads.

    An export by an older nec-serve (another manifest schema version) is made again.
    """
    if not (out / MANIFEST_FILENAME).exists():
        return False
    try:
        existing = Manifest.load(out)
    except SchemaVersionError as err:
        print(f"[export] not reusing {out}: {err}")
        return False
    return existing.model == model and (out / "model_repository_local").is_dir()


def _export(model: str, out: Path, calibration: Path) -> ModelBundle:
    if _reusable(model, out):
        print(f"[export] reusing {out}")
        return ModelBundle.load(out)
    if not calibration.is_file():
        raise InvalidInput(f"{calibration}: missing; {model} is calibrated on this scene")
    t0 = time.perf_counter()
    nec = create_model(model)
    report = calibrate_from_inputs(nec, iter_inputs(calibration, [1, 2, 3]), max_tiles=20)
    print(
        f"[calibrate] entropy bottleneck fitted to {report.tiles} tiles of {calibration.name} "
        f"(encoder frozen): {report.bits_per_symbol_before:.3f} -> "
        f"{report.bits_per_symbol_after:.3f} bits/symbol in {report.seconds:.1f} s"
    )
    calib = {"source": str(calibration), **report.as_dict()}
    man = export_model(nec, out, calibration=calib)
    enc = man.graph(GraphRole.ENCODER).parity
    nec_params = man.family_params
    print(
        f"[export] {model}: {nec_params.tokens} tokens x {nec_params.channels} channels in "
        f"{time.perf_counter() - t0:.1f} s; encoder ONNX vs PyTorch max |err| "
        f"{enc['max_abs_err']:.2e}, symbols differing {enc['symbol_mismatches']}/"
        f"{enc['symbols_total']}"
    )
    return ModelBundle.load(out)


def _announce_data(source: DataDir) -> None:
    """The report's first lines: which data the demo runs on."""
    print(f"[data] {source.describe()}")
    if source.samples:
        print(
            "[data] a small subset of the data sets (data/samples/README.md): figures are "
            f"indicative; the full figures need the full data (--data DIR, ${ENV_VAR} or "
            "../shared/data)"
        )


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The flags of ``nec-serve demo``."""
    s.add_argument(
        "--data",
        default=None,
        help="data folder (default: $NEC_DATA, else ../shared/data beside the checkout where "
        "it exists, else the sample data in data/samples/)",
    )
    s.add_argument(
        "--model",
        default="nec-eurosat-l3000000",
        help="a shipped trained model (`nec-serve models`), or a registry name such as the "
        "untrained mae_vit_compress_adapter",
    )
    s.add_argument("--work", default="artifacts/demo", help="where exports and outputs go")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument(
        "--skip-workflow",
        action="store_true",
        help="only the in-process part, no Kafka/S3/Triton workflow",
    )
    s.add_argument(
        "--no-rvq",
        dest="rvq",
        action="store_false",
        help="leave out the RVQ Sentinel-2 compressor that runs beside the NEC model",
    )


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo described in the module docstring; returns the exit status."""
    source = resolve_data(args.data)
    _announce_data(source)
    data = source.root
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shipped = shipped_models()
    if args.model in shipped:
        return _run_trained(args, shipped[args.model], data, work)
    bundle = _export(args.model, work / "export" / args.model, data / CALIBRATION_SCENE)
    engine = LocalEngine(bundle, threads=args.threads)
    rows = []
    for name, (folder, bands) in DATASETS.items():
        src = data / folder
        if not src.exists():
            print(f"[{name}] skipped: {src} not found")
            continue
        inputs = (
            (n, a) for n, a in iter_inputs(src, bands) if f"{folder}/{n}" != CALIBRATION_SCENE
        )
        rec = RecordingEngine(engine)
        container = work / f"{name}.necb"
        with container.open("wb") as f:
            stats = compress(
                inputs,
                bundle,
                rec,
                f,
                bands=bands,
                batch_size=args.batch_size,
                progress=not args.quiet,
            )
        t0 = time.perf_counter()
        with container.open("rb") as f:
            _, _, emb = decompress(f, bundle, engine, "embeddings", args.batch_size)
        t_dec = time.perf_counter() - t0
        latent = np.concatenate(rec.latents).transpose(0, 2, 1)
        err = emb - latent
        np.save(work / f"{name}_embeddings.npy", emb)
        emb_f32 = latent.size * 4
        row = {
            "dataset": name,
            **stats.report().to_wire(),
            "vs_float32_embeddings": round(emb_f32 / stats.container_bytes, 2),
            "decoded_rmse": round(float(np.sqrt(np.mean(err**2))), 5),
            "decoded_max_abs_err": round(float(np.abs(err).max()), 5),
            "decompress_s": round(t_dec, 3),
        }
        rows.append(row)
        print(f"[{name}] " + json.dumps(row))
    _print_table(rows)
    return _finish(
        rows, args, work, partial(run_workflow_demo, bundle.root, data, work / "workflow")
    )


def _finish(rows: list[dict], args: argparse.Namespace, work: Path, workflow) -> int:
    """Write the summary, fail on a decode off by more than half a step, run the workflow."""
    (work / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    bad = [r["dataset"] for r in rows if r["decoded_max_abs_err"] > 0.5 + 1e-3]
    if bad:
        print(f"FAILED: decoded embeddings off by more than half a step for {bad}")
        return 1
    if args.skip_workflow:
        return 0
    print("\n[workflow] the same export as a Kafka-triggered workflow on the local stack")
    return workflow()


def _run_trained(args: argparse.Namespace, entry: dict, data: Path, work: Path) -> int:
    """The demo on a shipped trained model (:mod:`nec_dev.demo_trained`), then the workflow."""
    bundle = export_shipped(args.model, work / "export" / args.model)
    engine = LocalEngine(bundle, threads=args.threads)
    metrics = entry.get("metrics", {})
    if metrics:
        print(f"[model] {args.model}: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))
    rows = run_trained_sources(
        bundle, engine, data, Path(entry["dir"]), work, batch_size=args.batch_size
    )
    _print_table(rows, trained=True)
    rvq = shipped_models().get(RVQ_MODEL) if args.rvq else None
    if rvq:
        run_rvq_demo(rvq, data, work, threads=args.threads)
    inputs = partial(eurosat_workflow_inputs, weights_dir=Path(entry["dir"]))
    workflow = partial(
        run_workflow_demo,
        bundle.root,
        data,
        work / "workflow",
        inputs=inputs,
        bands=None,
        output="classes",
    )

    def both() -> int:
        status = workflow()
        if rvq is None or status:
            return status
        print(f"\n[workflow] {RVQ_MODEL}: a step message asks for 4 codebooks; GeoTIFF out")
        return run_workflow_demo(
            work / "export" / RVQ_MODEL,
            data,
            work / "workflow-rvq",
            inputs=partial(s2_workflow_inputs, weights_dir=Path(rvq["dir"])),
            bands=SSL4EO_BANDS,
            output="bands",
            meta={"codebooks": 4},
        )

    return _finish(rows, args, work, both)


def _print_table(rows: list[dict], trained: bool = False) -> None:
    cols = [
        ("dataset", "dataset"),
        ("images", "images"),
        ("tiles", "tiles"),
        ("raw_bytes", "raw B"),
        ("container_bytes", "coded B"),
        *([("bits_per_image", "bits/image"), ("top1", "top-1")] if trained else []),
        ("bits_per_pixel", "bpp"),
        ("compression_ratio", "ratio raw"),
        ("vs_float32_embeddings", "ratio f32 emb"),
        ("payload_over_entropy_bound_pct", "% over bound"),
        ("decoded_rmse", "emb RMSE"),
        ("inference_s", "infer s"),
        ("coding_s", "code s"),
        ("decompress_s", "decode s"),
    ]
    print()
    print(" | ".join(h for _, h in cols))
    for r in rows:
        print(" | ".join(str(r[k]) for k, _ in cols))
    for r in rows:
        if trained:
            scored = f"top-1 {r['top1']} on {r['scored']} labelled; " if r["scored"] else ""
            print(f"{r['dataset']}: {scored}most predicted: {r['predicted']}")
