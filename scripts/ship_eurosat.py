"""Pack the EuroSAT runs of scripts/train_eurosat.sh into weights/eurosat/ (what ships).

    .venv/bin/python scripts/ship_eurosat.py --runs runs --lambdas 300 3000 30000 \
        [--metrics benchmarks/results/rate/rate.csv]

The MAE base and one delta per rate point (``nec-eurosat-l<L>``: the classifier run on the
NEC run at lambda L; see nec_models.shipped). With ``--metrics``, the numbers measured on
the rebuilt weights by ``make bench-rate`` (bits per image from real containers, test
top-1 of the shipped classifier graph) are written into ``index.json`` beside each model,
with each run's last validation row.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from nec_models.eurosat import decode, read_split
from nec_models.shipped import WEIGHTS_DIR, load_trained, materialize, pack
from nec_serve.imagery import Normalisation


def _last_row(log: Path) -> dict:
    with log.open() as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


@torch.no_grad()
def rate_estimates(name: str, images, root: Path, batch: int = 128) -> dict:
    """Bits per image of the rebuilt model ``name`` on ``images`` (uint8 NHWC), three ways.

    ``visible_estimate``: the official training-time estimate, ``-log2`` of the noisy
    likelihood of the visible tokens of a masked pass (mask 0.75); ``all_estimate``: the
    same on every token of an unmasked pass (``--rate-on all``); ``coded``: the bytes
    CompressAI's coder writes for the tile (what a container's payload holds).
    """
    nec = load_trained(materialize(name, root)).backbone
    nec.eval()
    eb = nec.bottleneck
    norm = Normalisation.for_dtype(np.uint8, 3)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the bottleneck's training noise
    sums = {"visible_estimate": 0.0, "all_estimate": 0.0, "coded": 0.0}
    for i in range(0, len(images), batch):
        x = torch.from_numpy(
            norm.apply(np.ascontiguousarray(images[i : i + batch]).transpose(0, 3, 1, 2))
        )
        tokens, _, _ = nec.encode_masked(x, 0.75, gen)
        eb.train()  # the noisy likelihood training sees
        _, lik_visible = eb(tokens.transpose(1, 2).unsqueeze(-1))
        _, lik_all = eb(nec.latent(x).unsqueeze(-1))
        eb.eval()
        sums["visible_estimate"] += float(-torch.log2(lik_visible).sum())
        sums["all_estimate"] += float(-torch.log2(lik_all).sum())
        sums["coded"] += 8.0 * sum(len(b) for b in nec.compress(x)["strings"][0])
    return {k: round(v / len(images), 1) for k, v in sums.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs")
    p.add_argument("--lambdas", nargs="+", required=True)
    p.add_argument("--metrics", help="rate.csv of bench_rate.py, run on the packed weights")
    p.add_argument("--out", default=str(WEIGHTS_DIR / "eurosat"))
    p.add_argument("--data", default="../shared/data/eurosat_rgb")
    p.add_argument(
        "--estimates", action="store_true", help="rate estimators against coded size (val)"
    )
    args = p.parse_args()
    runs = Path(args.runs)
    models = {f"nec-eurosat-l{lm}": runs / f"cls-{lm}" / "checkpoint.pth" for lm in args.lambdas}
    metrics: dict[str, dict] = {}
    mae_last = _last_row(runs / "mae" / "log.csv")
    metrics["mae_vit_tiny_patch8"] = {"val_loss": float(mae_last["val_loss"])}
    bench = {}
    if args.metrics:
        with open(args.metrics) as f:
            bench = {r["setting"]: r for r in csv.DictReader(f) if r["kind"] == "nec"}
    for lm in args.lambdas:
        name = f"nec-eurosat-l{lm}"
        nec, cls = (
            _last_row(runs / f"nec-{lm}" / "log.csv"),
            _last_row(runs / f"cls-{lm}" / "log.csv"),
        )
        m = {
            "val_bits_estimate": float(nec["val_bits_estimate"]),
            "val_bits_coded": float(nec["val_bits_coded"]),
            "val_top1": float(cls["val_top1"]),
        }
        if name in bench:
            r = bench[name]
            m["test_bits_per_image"] = float(r["bits_per_image"])
            m["test_top1"] = float(r["shipped_top1"])
        metrics[name] = m
    index = pack(runs / "mae" / "checkpoint.pth", models, Path(args.out), metrics)
    if args.estimates:  # on the rebuilt weights, the validation split
        split = read_split(Path(args.out) / "split.csv")
        val = decode(args.data, split["val"], runs / "mae" / "cache" / "val")
        for name in models:
            metrics[name].update(
                {
                    f"val_{k}": v
                    for k, v in rate_estimates(name, val.images, Path(args.out).parent).items()
                }
            )
            print(name, metrics[name], flush=True)
        index = pack(runs / "mae" / "checkpoint.pth", models, Path(args.out), metrics)
    total = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.suffix == ".pt")
    print(f"packed {len(index['models'])} models into {args.out}: {total / 1e6:.1f} MB of weights")
    for name, entry in index["models"].items():
        print(f"  {name}: {entry['file']} {entry['metrics']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
