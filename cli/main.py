"""``nec-serve``: one entry point for export, compression, inspection and the demo.

Errors the user can cause print one line naming what was wrong and exit with status 2;
outputs are written to a temporary file beside the target and renamed into place only
when complete, so a failed run never leaves a half-written container or array.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from nec_controller.main import add_parser as add_controller
from nec_serve import __version__, deploy
from nec_serve.bundle import ModelBundle
from nec_serve.container import ContainerReader
from nec_serve.contract import GraphRole, Trainer, decode_outputs, model_families
from nec_serve.engines import make_engine
from nec_serve.errors import InvalidInput, NecError
from nec_serve.hashing import sha256_file
from nec_serve.imagery import iter_inputs, parse_bands
from nec_serve.logs import configure_logging
from nec_serve.pipeline import (
    compress,
    default_output,
    output_writer,
)
from nec_serve.settings_flags import DeferredParser, add_settings_flags, settings_values
from nec_wrapper.main import add_parser as add_wrapper

# Imported by the commands that need them, not here: nec_models and nec_export need PyTorch,
# and nec_dev (local servers, the demo) is dev tooling; neither is in the runtime images,
# where this CLI starts the wrapper and the controller.

__all__ = ["main", "build_parser", "setup_logging", "SERVICES"]

log = logging.getLogger("nec_serve")


@contextmanager
def atomic_output(path: Path):
    """Open a temporary file beside ``path``; move it to ``path`` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_models(args: argparse.Namespace) -> int:
    """List registered models."""
    from nec_models import list_models  # PyTorch: see the imports above
    from nec_models.shipped import shipped_models

    print("\n".join(list_models()))
    shipped = shipped_models()
    if shipped:
        print("\nshipped trained weights (nec-serve export --shipped NAME):")
        for name, entry in shipped.items():
            metrics = ", ".join(f"{k} {v}" for k, v in entry.get("metrics", {}).items())
            print(f"  {name}: {entry['model']}" + (f" ({metrics})" if metrics else ""))
    return 0


def _from_args(config_class, args: argparse.Namespace):
    """A training config from the flags of its fields (the rest keep their defaults)."""
    return config_class(**settings_values(args, config_class))


def _import(ref: str):
    """The object ``"module:name"`` names (trainers need PyTorch: imported on use)."""
    from importlib import import_module

    module, name = ref.split(":")
    return getattr(import_module(module), name)


def cmd_train(args: argparse.Namespace) -> int:
    """Run a family's trainer (:class:`~nec_serve.contract.Trainer`) with its flags."""
    trainer = args.trainer
    cfg = _from_args(_import(trainer.config), args)
    result = _import(trainer.run)(cfg, resume=args.resume, progress=not args.quiet)
    print(json.dumps(result, indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export graphs, tables and Triton repositories for a model (and checkpoint)."""
    from nec_export import ExportOptions, export_model  # PyTorch: see the imports above
    from nec_models import create_model
    from nec_models.checkpoint import read_checkpoint
    from nec_models.shipped import load_trained, materialize, shipped_models

    ckpt, ckpt_sha = None, None
    if args.checkpoint and args.shipped:
        raise InvalidInput("export: give --checkpoint or --shipped, not both")
    if args.checkpoint:
        ckpt = read_checkpoint(args.checkpoint)
        ckpt_sha = sha256_file(args.checkpoint)
    elif args.shipped:
        ckpt = materialize(args.shipped)
        ckpt_sha = shipped_models()[args.shipped]["sha256"]
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    if ckpt is None:
        if not args.model:
            raise InvalidInput("export: name the model with --model")
        model = create_model(args.model, **kwargs)
    else:
        model = load_trained(ckpt, args.model, **kwargs)
    trained = ckpt.get("args") if ckpt is not None and isinstance(ckpt.get("args"), dict) else {}
    calibration = None
    if args.calibrate:
        from nec_export.plan import exporter_for

        inputs = iter_inputs(args.calibrate, parse_bands(args.calibrate_bands, "--calibrate-bands"))
        report = exporter_for(model).calibrate(model, inputs, args.calibrate_tiles)
        calibration = {"source": str(args.calibrate), **report.as_dict()}
        print(
            f"calibrated the entropy bottleneck on {report.tiles} tiles of {args.calibrate}: "
            f"{report.bits_per_symbol_before:.3f} -> {report.bits_per_symbol_after:.3f} "
            f"bits/symbol in {report.seconds:.1f} s"
        )
    options = ExportOptions(**settings_values(args, ExportOptions))
    manifest = export_model(
        model,
        args.out,
        options,
        checkpoint_sha256=ckpt_sha,
        calibration=calibration,
        trained=trained,
    )
    enc = manifest.graph(GraphRole.ENCODER).parity
    shape = manifest.family_params.describe()
    print(
        f"exported {manifest.model} ({manifest.family}, {manifest.input.img_size} px, {shape}) "
        f"to {args.out}\n"
        f"  tables sha256 {manifest.entropy.sha256}\n"
        f"  encoder parity: latent max |err| {enc['max_abs_err']:.2e} (tol {enc['atol']:.0e}), "
        f"symbols differing {enc['symbol_mismatches']}/{enc['symbols_total']} "
        f"({enc['mismatches_near_half']} at near ties)"
    )
    return 0


def _engine(args: argparse.Namespace, bundle):
    return make_engine(
        bundle, args.server, threads=args.threads, shared_memory=args.shm, timeout_s=args.timeout
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve an export's graphs on the local tritonserver until interrupted."""
    from nec_dev.triton import LocalTritonServer  # dev tooling: see the imports above

    repo = Path(args.model_dir) / f"model_repository_{args.repository}"
    server = LocalTritonServer(
        repo,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        host=args.host,
        log_path=args.log,
    )
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        server.start(timeout=args.start_timeout)
        print(
            f"serving {repo} on tritonserver (pid {server.pid}): grpc://{server.grpc_url} "
            f"http://{server.http_url} metrics {server.host}:{server.metrics_port}; "
            f"log {server.log_path}; Ctrl-C stops it",
            flush=True,
        )
        while not stop and server.poll() is None:
            time.sleep(0.5)
        if server.poll() not in (None, 0):
            print(f"tritonserver exited:\n{server.log_tail()}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress imagery into a container."""
    bundle = ModelBundle.load(args.model_dir)
    bands = parse_bands(args.bands)
    out = Path(args.out)
    with atomic_output(out) as f:
        stats = compress(
            iter_inputs(args.input, bands),
            bundle,
            _engine(args, bundle),
            f,
            bands=bands,
            batch_size=args.batch_size,
            progress=not args.quiet,
            rate=args.rate,
        )
    knob = bundle.manifest.family_spec.rate
    rate = {} if knob is None else {knob: stats.rate}
    print(
        json.dumps(
            {"output": str(out), "family": bundle.family, **rate, **stats.report().to_wire()},
            indent=2,
        )
    )
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    """Decode a container into embeddings, block-1 features, class scores or symbols."""
    bundle = ModelBundle.load(args.model_dir)
    args.output = args.output or default_output(bundle)
    engine = _engine(args, bundle) if decode_outputs()[args.output] else None
    container, out = Path(args.input), Path(args.out)
    if not container.is_file():
        raise InvalidInput(f"cannot read container {args.input}: no such file")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = output_writer(args.output)
    done = writer.write(
        container,
        out,
        bundle,
        engine,
        args.output,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    print(writer.describe(done, bundle, out))
    classes = out.with_suffix(".classes.json")
    if args.output == "classes" and classes.exists():
        tiles = json.loads(classes.read_text())["tiles"]
        counts = Counter(t["class"] for t in tiles)
        print(f"classes -> {classes}: " + ", ".join(f"{n} {c}" for c, n in counts.most_common()))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print a container's header and, with --tiles, its tile records (CRC-checked)."""
    try:
        f = open(args.input, "rb")  # noqa: SIM115 - closed below
    except OSError as err:
        raise InvalidInput(f"cannot read container {args.input}: {err}") from err
    with f:
        reader = ContainerReader(f)
        digest = "code_sha256" if reader.header.names_code else "table_sha256"
        info = {"version": reader.header.version, digest: reader.header.code_sha256}
        info.update(reader.header.meta)
        tiles = 0
        for rec in reader:
            tiles += 1
            if args.tiles:
                share = f" (part {rec.part + 1} of {rec.parts})" if rec.parts > 1 else ""
                where = f"{rec.source} @({rec.row},{rec.col})"
                print(f"tile {rec.index}: {where} {len(rec.payload)} B{share}")
        info["tiles"] = tiles
        info["payload_bytes"] = reader.payload_bytes
        info["container_bytes"] = Path(args.input).stat().st_size
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the main job: export, compress and decompress real imagery, print a summary."""
    from nec_dev.demo import run_demo  # dev tooling: see the imports above

    return run_demo(args)


def _trainer_flags(trainer: Trainer):
    """Adds a trainer's flags: one per field of its config dataclass (imported on use)."""

    def populate(s: argparse.ArgumentParser) -> None:
        add_settings_flags(
            s, _import(trainer.config), help=trainer.flag_help, options=trainer.options
        )
        s.add_argument("--resume", action="store_true", help="continue after the last epoch")
        s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    return populate


#: The export's own flags (the other ExportOptions fields keep their defaults).
_EXPORT_FLAGS = (
    "version",
    "gpu_max_batch",
    "cpu_max_batch",
    "torch_runtime",
    "eo4eu_names",
    "torch_device",
    "torch_precision",
)
_EXPORT_HELP = {
    "version": "model version in the Triton repository",
    "torch_runtime": "also write model_repository_torch (+ torch/weights.pt): the local server "
    "running the PyTorch graphs, on the GPU when there is one",
    "eo4eu_names": "name the graphs' tensors as EO4EU's wrappers do "
    "(input_sentinel2_10_bands_120, int64_latent32_15, output_sentinel2_10_bands_120)",
    "torch_precision": "bf16/fp16 autocast: faster on a GPU, symbols move at rounding boundaries",
}
_EXPORT_OPTIONS = {
    "torch_device": {"choices": ["auto", "cuda", "cpu"]},
    "torch_precision": {"choices": ["fp32", "bf16", "fp16"]},
}


def _export_flags(s: argparse.ArgumentParser) -> None:
    """The export's flags built from :class:`nec_export.ExportOptions` (imported on use)."""
    from nec_export import ExportOptions  # PyTorch: see the imports above

    add_settings_flags(s, ExportOptions, _EXPORT_FLAGS, help=_EXPORT_HELP, options=_EXPORT_OPTIONS)


def _demo_flags(s: argparse.ArgumentParser) -> None:
    """The demo's flags (:func:`nec_dev.demo.add_arguments`, imported on use)."""
    from nec_dev.demo import add_arguments  # dev tooling: see the imports above

    add_arguments(s)


def _rate_flags() -> dict[str, str]:
    """``compress`` flags of the families' rate knobs: name -> help."""
    flags: dict[str, list[str]] = {}
    for family in model_families():
        if family.rate:
            flags.setdefault(family.rate, []).append(family.rate_help)
    return {knob: "; ".join(filter(None, helps)) for knob, helps in flags.items()}


def build_parser() -> argparse.ArgumentParser:
    """The ``nec-serve`` argument parser."""
    p = argparse.ArgumentParser(prog="nec-serve", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"nec-serve {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, parser_class=DeferredParser)
    sub.add_parser("models", help="list registered models").set_defaults(func=cmd_models)
    _add_train(sub)
    _add_export(sub)
    _add_compress(sub)
    _add_decompress(sub)
    _add_serve(sub)
    s = sub.add_parser("inspect", help="print a container's header")
    s.add_argument("input")
    s.add_argument("--tiles", action="store_true", help="also list every tile")
    s.set_defaults(func=cmd_inspect)
    add_wrapper(sub)
    add_controller(sub)
    deploy.add_parser(sub)
    s = sub.add_parser(
        "demo",
        help="the main job: export, codec report on real imagery, local workflow",
        populate=_demo_flags,  # dev tooling: imported by `demo` only
    )
    s.set_defaults(func=cmd_demo)
    return p


def _add_train(sub) -> None:
    """``train <stage>``: every family's trainers."""
    train = sub.add_parser("train", help="train models on the full data sets").add_subparsers(
        dest="stage", required=True, parser_class=DeferredParser
    )
    for family in model_families():
        for stage, trainer in family.trainers.items():
            s = train.add_parser(stage, help=trainer.help, populate=_trainer_flags(trainer))
            s.set_defaults(func=cmd_train, trainer=trainer)


def _add_export(sub) -> None:
    s = sub.add_parser(
        "export",
        help="export ONNX graphs, entropy tables, Triton repositories",
        populate=_export_flags,  # ExportOptions needs PyTorch: imported by `export` only
    )
    s.add_argument(
        "--model",
        help="registry name (see `nec-serve models`); default: the one a trainer's checkpoint "
        "names",
    )
    s.add_argument(
        "--checkpoint",
        help="an official checkpoint ({'model': state_dict}) or one written by `train`",
    )
    s.add_argument("--shipped", help="a trained model shipped in weights/ (`nec-serve models`)")
    s.add_argument("--img-size", type=int, help="input size in pixels (224, 256, 512)")
    s.add_argument("--out", required=True, help="export directory")
    s.add_argument(
        "--calibrate",
        help="imagery to fit the entropy bottleneck to (encoder frozen), e.g. when no "
        "trained checkpoint is at hand",
    )
    s.add_argument("--calibrate-bands", help="1-based bands of the calibration imagery")
    s.add_argument("--calibrate-tiles", type=int, default=32, help="tiles used to calibrate")
    s.set_defaults(func=cmd_export)


def _coding_args(s: argparse.ArgumentParser) -> None:
    """The flags ``compress`` and ``decompress`` share: the export and the engine."""
    s.add_argument("--model-dir", required=True, help="directory written by export")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.add_argument(
        "--server",
        help="run the graphs on a Triton server (grpc://host:port or http://host:port) "
        "instead of in-process; entropy coding stays local",
    )
    s.add_argument("--shm", action="store_true", help="send tensors via shared memory")
    s.add_argument("--timeout", type=float, default=60.0, help="per-request seconds")


def _add_compress(sub) -> None:
    s = sub.add_parser("compress", help="GeoTIFF/.npy/JPEG/PNG, .tar.gz or folder -> container")
    s.add_argument("input")
    s.add_argument("--out", required=True, help="container file to write")
    s.add_argument("--bands", help="1-based bands to read, e.g. 1,2,3 (NAIP RGB)")
    for knob, what in _rate_flags().items():
        s.add_argument(f"--{knob}", dest="rate", type=int, metavar=knob.upper(), help=what)
    _coding_args(s)
    s.set_defaults(func=cmd_compress)


def _add_decompress(sub) -> None:
    s = sub.add_parser("decompress", help="container -> embeddings .npy or bands GeoTIFF")
    s.add_argument("input")
    s.add_argument(
        "--out",
        required=True,
        help=".npy file to write (bands: a .tif, or a .tar of them for several images)",
    )
    s.add_argument(
        "--output",
        choices=tuple(decode_outputs()),
        default=None,
        help="embeddings (T x C), first-decoder-block features, class scores (+ .classes.json), "
        "raw symbols, or the reconstructed bands as GeoTIFF; default: the family's",
    )
    _coding_args(s)
    s.set_defaults(func=cmd_decompress)


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="serve an export on the local tritonserver")
    s.add_argument("--model-dir", required=True, help="directory written by export")
    s.add_argument(
        "--repository",
        default="local",
        choices=["local", "torch"],
        help="model_repository_local (onnxruntime) or _torch (export --torch-runtime)",
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--log", help="server log file (default: a temporary file)")
    s.add_argument("--start-timeout", type=float, default=120.0)
    s.set_defaults(func=cmd_serve)


#: The long-running services: JSON log lines and INFO level unless told otherwise.
SERVICES = ("wrapper", "controller")


def setup_logging(args: argparse.Namespace, environ=None) -> None:
    """Set up logging for a command; credentials are redacted in either format.

    The format is ``--log-format``, else ``$NEC_LOG_FORMAT``, else JSON for the services
    (:data:`SERVICES`) and text for the other commands. The services log at INFO (a few
    lines per message), the other commands at WARNING unless ``-v``.
    """
    environ = os.environ if environ is None else environ
    service = args.command in SERVICES
    default = "json" if service else "text"
    fmt = getattr(args, "log_format", None) or environ.get("NEC_LOG_FORMAT") or default
    configure_logging(fmt, logging.INFO if args.verbose or service else logging.WARNING)
    if not args.verbose:
        # GDAL reports harmless TIFF oddities (e.g. Landsat ExtraSamples) as warnings.
        logging.getLogger("rasterio").setLevel(logging.ERROR)
        # kafka-python narrates every connection and rebalance at INFO.
        logging.getLogger("kafka").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        setup_logging(args)
    except NecError as err:
        print(f"nec-serve {args.command}: error: {err}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except NecError as err:
        print(f"nec-serve {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
