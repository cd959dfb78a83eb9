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

from nec_models.shipped import WEIGHTS_DIR, pack


def _last_row(log: Path) -> dict:
    with log.open() as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs")
    p.add_argument("--lambdas", nargs="+", required=True)
    p.add_argument("--metrics", help="rate.csv of bench_rate.py, run on the packed weights")
    p.add_argument("--out", default=str(WEIGHTS_DIR / "eurosat"))
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
    total = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.suffix == ".pt")
    print(f"packed {len(index['models'])} models into {args.out}: {total / 1e6:.1f} MB of weights")
    for name, entry in index["models"].items():
        print(f"  {name}: {entry['file']} {entry['metrics']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
