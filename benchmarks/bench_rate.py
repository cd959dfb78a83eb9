"""Rate against accuracy on EuroSAT's test split: NEC rate points against image codecs.

Every condition is scored the same way: bits per image on the test split, and the top-1 of
classifiers trained on what a consumer of that condition receives, with one consumer
budget (the same ``--train-per-class`` training images per class, taken in split order
from the train split, the same epochs and optimiser):

* ``nec``: each NEC export given with ``--nec`` (an export of a trained classifier
  checkpoint). The test images (and the training images) go through the real pipeline:
  ``compress`` into one container per split with the export's graphs and rANS coder, then
  ``decompress``; bits per image = container bytes x 8 / images (header amortised; the
  per-tile payload alone is reported too). ``head_top1``: an attention-pooling head trained
  on the decoded embeddings; ``shipped_top1``: the export's own classifier graph (trained
  on the whole train split) through ``decompress --output classes``.
* ``embedding``: the frozen MAE encoder's continuous embeddings, float32 (the
  "uncompressed-embedding classifier"), and NEC's "uniformly quantized embedding"
  baseline: per-image min-max quantization to 2/3/4/5/8 bits, then zstd (level 19) per
  image, as the official ``find_average_size.py``; bits include the two float32 bounds.
* ``jpeg``, ``webp``, ``jpeg2000`` (Pillow with OpenJPEG, a bare codestream at fixed
  compression ratios; below ~1:80 its headers set the size of a 64 x 64 image)
  at several qualities, and lossless ``png`` and ``zstd`` of the raw bytes: each image
  coded alone (bits from the real files, headers included), decoded, then classified by
  (a) ``head_top1``: the same frozen MAE encoder + the same head trained on decoded images
  of that codec and quality, and (b) ``cnn_top1``: a small supervised CNN trained on them.

EuroSAT's RGB patches were JPEG-compressed at the source: "raw" here means their decoded
8-bit pixels (64 x 64 x 3 x 8 = 98,304 bits per image), not the sensor's data.

Writes ``rate.csv`` (one row per condition, appended as each finishes, so a rerun skips
what is done unless ``--fresh``), ``rate.png`` (top-1 against bits per image, log axis)
and ``rate.md`` (the headline comparisons) under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zstandard
from PIL import Image
from torch import nn

from nec_dev.data import resolve_data
from nec_dev.perf import machine_description
from nec_models import create_model
from nec_models.eurosat import CLASSES, decode, read_split
from nec_models.loop import SEED, EpochStats, Step, Task, fit
from nec_models.shipped import materialize, split_of
from nec_serve.bundle import ModelBundle
from nec_serve.contract import GraphRole
from nec_serve.engines import make_engine
from nec_serve.imagery import InputLimits, Normalisation
from nec_serve.pipeline import compress, decompress

ROOT = Path(__file__).resolve().parent
RAW_BITS = 64 * 64 * 3 * 8
FIELDS = (
    "kind",
    "codec",
    "setting",
    "bits_per_image",
    "payload_bits_per_image",
    "compression_pct",
    "head_top1",
    "cnn_top1",
    "shipped_top1",
    "seconds",
)


# ------------------------------------------------------------------------------ data


def _subset(items, per_class: int):
    """The first ``per_class`` items of each class, in split order."""
    if per_class <= 0:
        return list(items)
    seen: dict[int, int] = {}
    out = []
    for item in items:
        if seen.get(item.label, 0) < per_class:
            seen[item.label] = seen.get(item.label, 0) + 1
            out.append(item)
    return out


def _normalised(images: np.ndarray) -> torch.Tensor:
    norm = Normalisation.for_dtype(np.uint8, 3)
    return torch.from_numpy(norm.apply(np.ascontiguousarray(images).transpose(0, 3, 1, 2)))


# ------------------------------------------------------------------------------ codecs


def _pil_codec(fmt: str, **save) -> Callable[[np.ndarray], tuple[int, np.ndarray]]:
    def run(img: np.ndarray) -> tuple[int, np.ndarray]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, fmt, **save)
        size = buf.tell()
        buf.seek(0)
        with Image.open(buf) as im:
            return size, np.asarray(im.convert("RGB"), dtype=np.uint8)

    return run


def _zstd_raw(img: np.ndarray) -> tuple[int, np.ndarray]:
    data = zstandard.ZstdCompressor(level=19).compress(img.tobytes())
    out = np.frombuffer(zstandard.ZstdDecompressor().decompress(data), np.uint8)
    return len(data), out.reshape(img.shape)


def codec_grid(quick: bool) -> list[tuple[str, str, Callable]]:
    """``(codec, setting, encode+decode)`` of every raw-data baseline."""
    jpeg_q = (10, 50, 90) if quick else (5, 10, 20, 40, 60, 80, 95)
    ratios = (50, 12) if quick else (75, 50, 25, 12, 6, 3)
    grid = [("jpeg", f"q{q}", _pil_codec("JPEG", quality=q)) for q in jpeg_q]
    grid += [("webp", f"q{q}", _pil_codec("WEBP", quality=q, method=6)) for q in jpeg_q]
    grid += [
        (
            "jpeg2000",
            f"ratio{r}",
            # A bare J2K codestream: the JP2 boxes would add ~80 bytes to a ~200-byte image.
            _pil_codec("JPEG2000", quality_mode="rates", quality_layers=[r], no_jp2=True),
        )
        for r in ratios
    ]
    grid += [("png", "lossless", _pil_codec("PNG", optimize=True)), ("zstd", "lossless", _zstd_raw)]
    return grid


def code_all(images: np.ndarray, run) -> tuple[float, np.ndarray]:
    """Mean bits per image and the decoded images."""
    out = np.empty_like(images)
    total = 0
    for i, img in enumerate(images):
        size, out[i] = run(np.asarray(img))
        total += size
    return 8.0 * total / len(images), out


# ------------------------------------------------------------------------------ consumers


@torch.no_grad()
def mae_embeddings(mae, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """The frozen MAE encoder's continuous embeddings ``(N, T, C)`` (all tokens, CLS first)."""
    mae.eval()
    parts = [
        mae.forward_encoder(_normalised(images[i : i + batch])).numpy()
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(parts)


class _HeadTask(Task):
    """An attention-pooling head on fixed embeddings (:func:`~nec_models.loop.fit`'s task)."""

    name, knob = "head", "the head's learning rate"

    def __init__(self, emb_train: np.ndarray, y_train: np.ndarray, head_model: str):
        self.x = torch.from_numpy(np.ascontiguousarray(emb_train))
        self.y = torch.from_numpy(y_train)
        self.head_model = head_model
        self.steps = math.ceil(len(self.y) / 128)

    def setup(self, resuming: bool) -> None:
        cls = create_model(self.head_model, num_classes=len(CLASSES))
        self.model = nn.ModuleDict({"pool": cls.pool, "head": cls.head})
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        self.optimizers = {"optimizer": opt}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model["head"](self.model["pool"](x[:, 1:, :]))  # CLS token left out

    def batches(self, gen: torch.Generator):
        return iter(torch.randperm(len(self.y), generator=gen).split(128))

    def train_step(self, batch: torch.Tensor, gen: torch.Generator) -> Step:
        loss = nn.functional.cross_entropy(self.logits(self.x[batch]), self.y[batch])
        return Step(loss, {"loss": float(loss.detach()) * len(batch)})

    def log_row(self, stats: EpochStats, val: dict) -> dict:
        return {"epoch": stats.epoch, "train_loss": stats.sums["loss"] / len(self.y)}


def train_head(
    emb_train: np.ndarray, y_train: np.ndarray, emb_test: np.ndarray, y_test: np.ndarray, args
) -> float:
    """Test top-1 of an attention-pooling head (``nec_classifier_tiny_patch8``'s) trained
    on ``emb_train``; the same seed, epochs and optimiser for every condition."""
    task = _HeadTask(emb_train, y_train, args.head_model)
    fit(task, out=None, epochs=args.head_epochs, seed=args.seed, progress=False)
    task.model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(y_test), 256):
            x = torch.from_numpy(np.ascontiguousarray(emb_test[i : i + 256]))
            pred = task.logits(x).argmax(-1).numpy()
            right += int((pred == y_test[i : i + 256]).sum())
    return right / len(y_test)


def small_cnn() -> nn.Module:
    """A small supervised network for 64 px RGB (about 60k parameters)."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16),
        nn.MaxPool2d(2),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, len(CLASSES)),
    )


class _CNNTask(Task):
    """:func:`small_cnn` on decoded images, random flips, one-cycle schedule (a task)."""

    name, knob = "cnn", "the CNN's learning rate"

    def __init__(self, images: np.ndarray, labels: np.ndarray, epochs: int):
        self.x, self.y = _normalised(images), torch.from_numpy(labels)
        self.steps = math.ceil(len(self.y) / 64)
        self.epochs = epochs

    def setup(self, resuming: bool) -> None:
        self.model = small_cnn()
        opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=1e-4)
        self.optimizers = {"optimizer": opt}
        total = self.epochs * self.steps
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=total)

    def batches(self, gen: torch.Generator):
        return iter(torch.randperm(len(self.y), generator=gen).split(64))

    def train_step(self, batch: torch.Tensor, gen: torch.Generator) -> Step:
        x = self.x[batch]
        flip = torch.rand(len(batch), generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        loss = nn.functional.cross_entropy(self.model(x), self.y[batch])
        return Step(loss, {"loss": float(loss.detach()) * len(batch)})

    def log_row(self, stats: EpochStats, val: dict) -> dict:
        return {"epoch": stats.epoch, "train_loss": stats.sums["loss"] / len(self.y)}


def train_cnn(train: np.ndarray, y_train, test: np.ndarray, y_test, args) -> float:
    """Test top-1 of :func:`small_cnn` trained on decoded images (random flips)."""
    task = _CNNTask(train, y_train, args.cnn_epochs)
    fit(task, out=None, epochs=args.cnn_epochs, seed=args.seed, progress=False)
    net = task.model.eval()
    x_te = _normalised(test)
    with torch.no_grad():
        pred = torch.cat([net(x_te[i : i + 256]).argmax(-1) for i in range(0, len(x_te), 256)])
    return float((pred.numpy() == y_test).mean())


# ------------------------------------------------------------------------------ NEC


def nec_through_pipeline(bundle: ModelBundle, images: np.ndarray, work: Path, name: str):
    """Compress ``images`` into one container and decode it: bits, embeddings, scores."""
    engine = make_engine(bundle)
    path = work / f"{name}.nec"
    inputs = ((f"{i:06d}.png", img.transpose(2, 0, 1)) for i, img in enumerate(images))
    with path.open("wb") as f:
        stats = compress(inputs, bundle, engine, f, batch_size=32)
    limits = InputLimits(max_tiles=len(images), max_decoded_bytes=1 << 36)
    with path.open("rb") as f:
        _, records, emb = decompress(f, bundle, engine, "embeddings", 32, limits=limits)
    scores = None
    if GraphRole.CLASSIFIER in bundle.manifest.graphs:
        with path.open("rb") as f:
            _, _, scores = decompress(f, bundle, engine, "classes", 32, limits=limits)
    order = np.argsort([r.source for r in records], kind="stable")
    n = len(images)
    return {
        "bits": 8.0 * path.stat().st_size / n,
        "payload_bits": 8.0 * stats.payload_bytes / n,
        "embeddings": emb[order],
        "scores": None if scores is None else scores[order],
    }


# ------------------------------------------------------------------------------ main


def _done(csv_path: Path) -> set[tuple[str, str, str]]:
    if not csv_path.exists():
        return set()
    with csv_path.open() as f:
        return {(r["kind"], r["codec"], r["setting"]) for r in csv.DictReader(f)}


def _append(csv_path: Path, row: dict) -> None:
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in FIELDS})
    print(json.dumps(row), flush=True)


def _row(kind, codec, setting, bits, t0, **kw) -> dict:
    return {
        "kind": kind,
        "codec": codec,
        "setting": setting,
        "bits_per_image": round(bits, 1),
        "compression_pct": round(100 * (1 - bits / RAW_BITS), 3),
        "seconds": round(time.perf_counter() - t0, 1),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in kw.items()},
    }


def _present(data: Path, items: list) -> list:
    """``items``, all of which must be under ``data`` (the sample data holds no training image)."""
    missing = [i.path for i in items if not (data / i.path).is_file()]
    if missing:
        raise SystemExit(
            f"bench_rate: {len(missing)} of the {len(items)} training images are not in {data} "
            f"(first: {missing[0]}); the consumers train on the EuroSAT training split, which "
            f"the sample data does not hold: pass --data with the full EuroSAT RGB"
        )
    return items


def _score_nec(export: str, train, test, args, csv_path: Path, done: set) -> None:
    """The ``nec`` row of one export (unless done): its real containers, both heads."""
    bundle = ModelBundle.load(export)
    setting = Path(export).name
    if ("nec", bundle.manifest.model, setting) in done:
        return
    work = Path(args.work)
    t0 = time.perf_counter()
    tr = nec_through_pipeline(bundle, train.images, work, f"{setting}-train")
    te = nec_through_pipeline(bundle, test.images, work, f"{setting}-test")
    head = train_head(tr["embeddings"], train.labels, te["embeddings"], test.labels, args)
    shipped = (
        float((te["scores"].argmax(1) == test.labels).mean()) if te["scores"] is not None else ""
    )
    row = _row(
        "nec",
        bundle.manifest.model,
        setting,
        te["bits"],
        t0,
        payload_bits_per_image=round(te["payload_bits"], 1),
        head_top1=head,
        shipped_top1=shipped,
    )
    _append(csv_path, row)


def run(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "rate.csv"
    if args.fresh:
        csv_path.unlink(missing_ok=True)
    done = _done(csv_path)
    torch.set_num_threads(args.threads)
    if Path(args.mae).is_file():
        mae_ckpt = torch.load(args.mae, map_location="cpu", weights_only=True)
        split_csv = Path(args.mae).parent / "split.csv"
    else:  # a shipped model's name
        mae_ckpt, split_csv = materialize(args.mae), split_of(args.mae)
    split = read_split(Path(args.split) if args.split else split_csv)
    data = Path(args.data) if args.data else resolve_data().root / "eurosat_rgb"
    train_items = _present(data, _subset(split["train"], args.train_per_class))
    work = Path(args.work)
    train = decode(data, train_items, work / "train")
    test = decode(data, split["test"][: args.max_test or None], work / "test")
    print(
        f"{len(train.labels)} training and {len(test.labels)} test images; {machine_description()}"
    )
    mae = create_model(mae_ckpt["args"]["model"])
    mae.load_state_dict(mae_ckpt["model"])
    mae.eval()
    cache: dict[str, np.ndarray] = {}

    def embeddings(key: str, images: np.ndarray) -> np.ndarray:
        if key not in cache:
            cache[key] = mae_embeddings(mae, images)
        return cache[key]

    if ("embedding", "float32", "uncompressed") not in done:
        t0 = time.perf_counter()
        tr, te = embeddings("train", train.images), embeddings("test", test.images)
        top1 = train_head(tr, train.labels, te, test.labels, args)
        bits = 32.0 * te[0].size
        _append(csv_path, _row("embedding", "float32", "uncompressed", bits, t0, head_top1=top1))
    for b in args.uniform_bits:
        if ("embedding", "uniform+zstd", f"{b}bit") in done:
            continue
        t0 = time.perf_counter()
        tr, te = embeddings("train", train.images), embeddings("test", test.images)
        (tr_q, _), (te_q, bits) = _uniform(tr, b), _uniform(te, b)
        top1 = train_head(tr_q, train.labels, te_q, test.labels, args)
        _append(csv_path, _row("embedding", "uniform+zstd", f"{b}bit", bits, t0, head_top1=top1))
    for codec, setting, fn in codec_grid(args.quick):
        if ("raw", codec, setting) in done:
            continue
        t0 = time.perf_counter()
        _, tr_img = code_all(train.images, fn)
        bits, te_img = code_all(test.images, fn)
        head = train_head(
            mae_embeddings(mae, tr_img),
            train.labels,
            mae_embeddings(mae, te_img),
            test.labels,
            args,
        )
        cnn = train_cnn(tr_img, train.labels, te_img, test.labels, args)
        _append(csv_path, _row("raw", codec, setting, bits, t0, head_top1=head, cnn_top1=cnn))
    for export in args.nec:
        _score_nec(export, train, test, args, csv_path, done)
    summarise(csv_path, out, len(train.labels), len(test.labels))
    return csv_path


def _uniform(emb: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    """Per-image min-max quantization to ``bits``, zstd per image: dequantized, mean bits."""
    levels = (1 << bits) - 1
    zc = zstandard.ZstdCompressor(level=19)
    out = np.empty_like(emb)
    total = 0
    for i, e in enumerate(emb):
        lo, hi = float(e.min()), float(e.max())
        step = (hi - lo) / levels if hi > lo else 1.0
        q = np.round((e - lo) / step).astype(np.uint8 if bits <= 8 else np.uint16)
        total += len(zc.compress(q.tobytes())) + 8  # + the two float32 bounds
        out[i] = q.astype(np.float32) * step + lo
    return out, 8.0 * total / len(emb)


def summarise(csv_path: Path, out: Path, n_train: int, n_test: int) -> None:
    """``rate.png`` and ``rate.md`` from ``rate.csv``."""
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["bits"] = float(r["bits_per_image"])
        r["top1"] = max(float(r[k]) for k in ("head_top1", "cnn_top1", "shipped_top1") if r[k])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    groups: dict[tuple[str, str], list] = {}
    for r in rows:
        if r["kind"] == "raw":
            groups.setdefault((f"{r['codec']} + MAE head", "head_top1"), []).append(r)
            groups.setdefault((f"{r['codec']} + CNN", "cnn_top1"), []).append(r)
        elif r["kind"] == "nec":
            groups.setdefault(("NEC (head, same budget)", "head_top1"), []).append(r)
            if r["shipped_top1"]:
                groups.setdefault(("NEC (shipped classifier)", "shipped_top1"), []).append(r)
        else:
            groups.setdefault((f"embedding {r['codec']}", "head_top1"), []).append(r)
    for (label, key), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["bits"])
        style = "o-" if label.startswith("NEC") else ("s--" if "CNN" in label else ".-")
        ax.plot([r["bits"] for r in rs], [100 * float(r[key]) for r in rs], style, label=label)
    ax.axvline(RAW_BITS, color="grey", lw=0.8, ls=":")
    ax.text(RAW_BITS, 12, " raw 8-bit", color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bits per image (64 x 64 RGB, log)")
    ax.set_ylabel("top-1 on the EuroSAT test split (%)")
    ax.set_title(f"EuroSAT: rate against accuracy ({n_train} training images per consumer)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "rate.png", dpi=120)
    plt.close(fig)
    (out / "rate.md").write_text(headline(rows, n_train, n_test))


def _cheapest(rows: list[dict], top1: float) -> dict | None:
    """The raw-codec row with the fewest bits whose better consumer reaches ``top1``."""
    ok = [r for r in rows if r["kind"] == "raw" and r["top1"] >= top1]
    return min(ok, key=lambda r: r["bits"]) if ok else None


def headline(rows: list[dict], n_train: int, n_test: int) -> str:
    """The comparisons the targets ask for, from the rows."""
    lines = [
        "# Rate against accuracy (EuroSAT RGB test split)",
        "",
        f"{n_test} test images. Bits per image from real files and containers (NEC: the "
        "container, header amortised, and the entropy-coded payload alone); raw 8-bit RGB = "
        f"98,304 bits. *Same budget*: a consumer trained on the same {n_train} training images "
        "(NEC: attention-pooling head on decoded embeddings; raw codecs: the better of the "
        "frozen-MAE head and the small CNN). *Shipped*: the model's own classifier graph, "
        "trained on the whole train split.",
        "",
        "| NEC model | bits/image | payload bits | compression | top-1 same budget | "
        "top-1 shipped | cheapest raw codec at >= same-budget top-1 | its bits | its top-1 | "
        "NEC advantage |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in sorted((r for r in rows if r["kind"] == "nec"), key=lambda r: r["bits"]):
        head = float(r["head_top1"])
        best = _cheapest(rows, head)
        codec = f"{best['codec']} {best['setting']}" if best else "none reaches it"
        bits = f"{best['bits']:.0f}" if best else "-"
        its = f"{100 * best['top1']:.1f}%" if best else "-"
        adv = f"{best['bits'] / r['bits']:.2f}x" if best else "-"
        shipped = f"{100 * float(r['shipped_top1']):.1f}%" if r["shipped_top1"] else "-"
        lines.append(
            f"| {r['setting']} | {r['bits']:.0f} | {float(r['payload_bits_per_image']):.0f} | "
            f"{r['compression_pct']}% | {100 * head:.1f}% | {shipped} | {codec} | {bits} | "
            f"{its} | {adv} |"
        )
    ref = [r for r in rows if r["kind"] == "embedding" and r["codec"] == "float32"]
    if ref:
        top = float(ref[0]["head_top1"])
        lines += ["", f"Uncompressed-embedding head (same budget): {100 * top:.1f}% top-1."]
        for r in rows:
            if r["kind"] == "nec" and float(r["compression_pct"]) >= 99.0:
                gap = 100 * (top - float(r["head_top1"]))
                lines.append(
                    f"- {r['setting']}: {r['compression_pct']}% compression, same-budget top-1 "
                    f"{gap:.1f} points below it."
                )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--mae",
        default="mae_vit_tiny_patch8",
        help="the frozen MAE encoder: a pretraining checkpoint, or a shipped model's name",
    )
    p.add_argument("--split", help="split.csv (default: beside --mae)")
    p.add_argument("--nec", nargs="*", default=[], help="NEC exports (classifier checkpoints)")
    p.add_argument(
        "--data", help="EuroSAT RGB root (default: eurosat_rgb/ of the demo's data, nec_dev.data)"
    )
    p.add_argument("--out", default=str(ROOT / "results" / "rate"))
    p.add_argument("--work", default=str(ROOT / "results" / "tmp" / "rate"))
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--max-test", type=int, default=0, help="first N test images (0: all)")
    p.add_argument("--head-model", default="nec_classifier_tiny_patch8")
    p.add_argument("--head-epochs", type=int, default=30)
    p.add_argument("--cnn-epochs", type=int, default=15)
    p.add_argument("--uniform-bits", type=int, nargs="*", default=[2, 3, 4, 5, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--quick", action="store_true", help="3 qualities per codec (smoke runs)")
    p.add_argument("--fresh", action="store_true", help="start rate.csv anew")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
