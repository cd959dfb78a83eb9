"""The trained weights that ship with the repository, stored small and rebuilt on demand.

``weights/<set>/`` holds one MAE base in half precision and, per NEC rate point, a *delta*:
only the tensors that differ from the base (the NEC adapter, the entropy bottleneck and
the classifier head), floats in half precision except the entropy bottleneck, which stays
in float32 because its quantiles and tables decide the transmitted code. ``index.json``
lists each shipped model with its files, their SHA-256 and its metrics; ``MODEL_CARD.md``
says how it was made.

:func:`materialize` rebuilds an ordinary checkpoint in the official layout
(``{"model", "args", ...}``, float32) that ``nec-serve export --shipped NAME`` exports like
any other; every number reported for a shipped model was measured on the rebuilt weights,
not on the float32 training run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from nec_models.checkpoint import load_checkpoint
from nec_models.eurosat import read_split
from nec_models.registry import create_model
from nec_serve.errors import InvalidInput
from nec_serve.hashing import sha256_file

__all__ = [
    "WEIGHTS_DIR",
    "shipped_models",
    "materialize",
    "pack",
    "pack_standalone",
    "split_of",
    "load_trained",
]

#: ``weights/`` at the repository root (the shipped models travel with the checkout).
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
INDEX = "index.json"
# Kept in float32: what decides the transmitted code. NEC: the entropy bottleneck. RVQ: the
# encoder, the band statistics and the codebooks (every index), and the index histograms
# (the tables); its decoder and training-only statistics go to half precision.
_FULL_PRECISION = (
    "bottleneck.",
    "backbone.bottleneck.",
    "enc_",
    "band_mean",
    "band_std",
    "quantizer.codebooks",
    "quantizer.index_counts",
)


def _index(root: Path) -> dict:
    path = root / INDEX
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {"base": None, "models": {}}
    except ValueError as err:
        raise InvalidInput(f"{path} is not valid JSON: {err}") from err


def shipped_models(root: Path | None = None) -> dict[str, dict]:
    """Name -> entry (registry model, files, metrics) of every shipped model under ``root``."""
    out: dict[str, dict] = {}
    base = Path(root) if root else WEIGHTS_DIR
    for index in sorted(base.glob(f"*/{INDEX}")):
        for name, entry in _index(index.parent).get("models", {}).items():
            out[name] = {**entry, "dir": str(index.parent)}
    return out


def _half(key: str, value: torch.Tensor) -> torch.Tensor:
    if value.is_floating_point() and not key.startswith(_FULL_PRECISION):
        return value.to(torch.float16)
    return value


def _load(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InvalidInput(f"shipped weights {path} are missing (is this a full checkout?)")
    got = sha256_file(path)
    if got != sha256:
        raise InvalidInput(f"shipped weights {path}: SHA-256 {got}, the index says {sha256}")
    return torch.load(path, map_location="cpu", weights_only=True)


def materialize(name: str, root: Path | None = None) -> dict:
    """The shipped model ``name`` as a float32 checkpoint ``{"model", "args", "epoch", ...}``.

    Raises:
        InvalidInput: an unknown name (the known ones are listed), a missing file or one
            whose SHA-256 differs from the index.
    """
    models = shipped_models(root)
    if name not in models:
        raise InvalidInput(f"no shipped model {name!r}; shipped: {', '.join(sorted(models))}")
    entry = models[name]
    folder = Path(entry["dir"])
    base_entry = _index(folder)["base"] or entry  # a standalone model is its own base
    base = _load(folder / base_entry["file"], base_entry["sha256"])
    state = dict(base)
    if entry["file"] != base_entry["file"]:
        delta = _load(folder / entry["file"], entry["sha256"])
        prefix = entry.get("base_prefix", "")
        state = {prefix + k: v for k, v in base.items() if prefix + k not in delta}
        state.update(delta)
        keep = set(entry["keys"])
        state = {k: v for k, v in state.items() if k in keep}
    model = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    args = dict(entry["args"])
    return {"model": model, "args": args, "epoch": entry.get("epoch"), "scaler": None}


def pack(
    base_checkpoint: Path,
    models: Mapping[str, Path],
    out: Path,
    metrics: Mapping[str, dict] | None = None,
) -> dict:
    """Write ``out`` (a weights set): the base in half precision, each model as a delta.

    Args:
        base_checkpoint: the MAE pretraining checkpoint every model was fine-tuned from.
        models: shipped name -> a trainer's checkpoint (NEC or classifier).
        out: the folder to write (``weights/<set>``).
        metrics: shipped name -> numbers measured on the rebuilt weights, for the index.

    The pretraining's ``split.csv`` (beside ``base_checkpoint``) is copied to ``out``: its
    test part holds the images no shipped model was trained on.

    Returns:
        the index written to ``out/index.json``.
    """
    out.mkdir(parents=True, exist_ok=True)
    split_csv = Path(base_checkpoint).parent / "split.csv"
    if split_csv.exists():  # which images trained them, and which were held out
        read_split(split_csv)  # checked before it ships
        (out / "split.csv").write_bytes(split_csv.read_bytes())
    base_ckpt = torch.load(base_checkpoint, map_location="cpu", weights_only=True)
    base = {k: _half(k, v) for k, v in base_ckpt["model"].items()}
    base_name = f"{base_ckpt['args']['model']}.pt"
    torch.save(base, out / base_name)
    index = {
        "base": {
            "name": base_ckpt["args"]["model"],
            "file": base_name,
            "sha256": sha256_file(out / base_name),
            "args": base_ckpt["args"],
            "epoch": base_ckpt.get("epoch"),
        },
        "models": {
            base_ckpt["args"]["model"]: {
                "model": base_ckpt["args"]["model"],
                "file": base_name,
                "sha256": sha256_file(out / base_name),
                "args": base_ckpt["args"],
                "epoch": base_ckpt.get("epoch"),
                "metrics": dict((metrics or {}).get(base_ckpt["args"]["model"], {})),
            }
        },
    }
    for name, path in models.items():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = ckpt["model"]
        prefix = "backbone." if any(k.startswith("backbone.") for k in state) else ""
        delta = {}
        for key, value in state.items():
            packed = _half(key, value)
            ref = base.get(key[len(prefix) :]) if key.startswith(prefix) else None
            if ref is None or ref.dtype != packed.dtype or not torch.equal(ref, packed):
                delta[key] = packed
        file = f"{name}.pt"
        torch.save(delta, out / file)
        index["models"][name] = {
            "model": ckpt["args"]["model"],
            "file": file,
            "sha256": sha256_file(out / file),
            "base_prefix": prefix,
            "keys": sorted(state),
            "args": {k: v for k, v in ckpt["args"].items() if k != "pretraining"},
            "epoch": ckpt.get("epoch"),
            "metrics": dict((metrics or {}).get(name, {})),
        }
    (out / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def pack_standalone(
    models: Mapping[str, Path],
    out: Path,
    metrics: Mapping[str, dict] | None = None,
    notes: Mapping[str, dict] | None = None,
) -> dict:
    """Write ``out`` (a weights set) of models trained from scratch, no shared base.

    Each model's tensors are stored in half precision except :data:`_FULL_PRECISION`
    (for RVQ: the encoder, band statistics, codebooks and index histograms stay float32,
    so the codes are the trained model's). The first model's run ``split.csv`` is copied
    beside them.

    Args:
        models: shipped name -> a trainer's checkpoint.
        out: the folder to write (``weights/<set>``).
        metrics: shipped name -> numbers measured on the rebuilt weights.
        notes: shipped name -> anything else the index should say (e.g. training time).

    Returns:
        the index written to ``out/index.json``.
    """
    out.mkdir(parents=True, exist_ok=True)
    index: dict = {"base": None, "models": {}}
    for i, (name, path) in enumerate(models.items()):
        if i == 0 and (Path(path).parent / "split.csv").exists():
            (out / "split.csv").write_bytes((Path(path).parent / "split.csv").read_bytes())
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: _half(k, v) for k, v in ckpt["model"].items()}
        file = f"{name}.pt"
        torch.save(state, out / file)
        index["models"][name] = {
            "model": ckpt["args"]["model"],
            "file": file,
            "sha256": sha256_file(out / file),
            "keys": sorted(state),
            "args": ckpt["args"],
            "epoch": ckpt.get("epoch"),
            "metrics": dict((metrics or {}).get(name, {})),
            **dict((notes or {}).get(name, {})),
        }
    (out / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def split_of(name: str, root: Path | None = None) -> Path:
    """The ``split.csv`` the shipped model ``name`` was trained on."""
    models = shipped_models(root)
    if name not in models:
        raise InvalidInput(f"no shipped model {name!r}; shipped: {', '.join(sorted(models))}")
    path = Path(models[name]["dir"]) / "split.csv"
    if not path.is_file():
        raise InvalidInput(f"shipped model {name!r} has no split.csv beside its weights")
    return path


#: Constructor arguments a trainer records in its checkpoint's ``args``.
_TRAINED_KWARGS = ("with_decoder", "num_classes")


def load_trained(ckpt: Mapping, name: str | None = None, **kwargs):
    """The model a checkpoint holds, built as its trainer built it, weights loaded.

    ``name`` defaults to the model the checkpoint's ``args`` name; where it is that model,
    the constructor arguments the trainer recorded (``with_decoder``, ``num_classes``) are
    used too, under any given in ``kwargs``.

    Raises:
        InvalidInput: no ``name`` given and none in the checkpoint.
        CheckpointMismatch: weights that do not fit the model.
    """
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    name = name or args.get("model")
    if not name:
        raise InvalidInput("name the model (the checkpoint names none)")
    if name == args.get("model"):
        kwargs = {**{k: args[k] for k in _TRAINED_KWARGS if k in args}, **kwargs}
    return load_checkpoint(create_model(name, **kwargs), ckpt)
