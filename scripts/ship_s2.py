"""Pack the RVQ runs of scripts/train_s2.sh into weights/sentinel2/ (what ships).

    .venv/bin/python scripts/ship_s2.py --runs runs [--metrics benchmarks/results/rvq/rvq.csv]

``rvq-s2`` (one model, 1-8 codebooks) and ``rvq-s2-fixed8`` (trained with 8 always), each
with its decoder in half precision and what decides the codes (encoder, band statistics,
codebooks, index histograms) in float32. Before anything is written, the packed weights
are checked against the float32 run on the test split: how many indices change (none
should), and the RMS error at 8 codebooks either way; the numbers go into ``index.json``.
With ``--metrics`` (``make bench-rvq`` on the packed weights), the measured rate and
distortion per codebook count go there too.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import torch

from nec_models.checkpoint import read_checkpoint
from nec_models.sentinel2 import load_s2, read_s2_split
from nec_models.shipped import WEIGHTS_DIR, load_trained, materialize, pack_standalone
from nec_models.train_rvq import encoded_tiles, rvq_metrics

RUNS = {"rvq-s2": "rvq", "rvq-s2-fixed8": "rvq8"}


@torch.no_grad()
def half_precision_check(run_ckpt: Path, name: str, root: Path, test: list) -> dict:
    """Indices changed by the packed weights, and RMS % at N = 8 both ways."""
    full = load_trained(read_checkpoint(run_ckpt))
    half = load_trained(materialize(name, root))
    a, b = (
        torch.cat([idx for _, idx in encoded_tiles(m, test, full.img_size)]) for m in (full, half)
    )
    return {
        "indices_changed_pct": round(100 * float((a != b).float().mean()), 4),
        "rmse_pct_n8_fp32": round(rvq_metrics(full, test, full.img_size)["rmse_pct"][8], 4),
        "rmse_pct_n8_shipped": round(rvq_metrics(half, test, half.img_size)["rmse_pct"][8], 4),
    }


def _last_row(log: Path) -> dict:
    with log.open() as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def _metrics(path: Path | None) -> dict[str, dict]:
    if path is None:
        return {}
    rows = list(csv.DictReader(path.open()))
    ours = {r["setting"]: r for r in rows if r["method"] == "rvq"}
    fixed = [r for r in rows if r["method"] == "rvq_fixed8"]
    out = {
        "rvq-s2": {
            f"test_n{n}": f"{float(r['bpp']):.3f} bpp, {float(r['rmse_pct']):.3f} % RMS"
            for n, r in ours.items()
        }
    }
    if fixed:
        r = fixed[0]
        out["rvq-s2-fixed8"] = {
            "test_n8": f"{float(r['bpp']):.3f} bpp, {float(r['rmse_pct']):.3f} % RMS"
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default=str(WEIGHTS_DIR / "sentinel2"))
    p.add_argument("--metrics", type=Path, help="rvq.csv written by make bench-rvq")
    args = p.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    ckpts = {name: runs / run / "checkpoint.pth" for name, run in RUNS.items()}
    notes = {
        name: {"last_log_row": _last_row(ckpt.parent / "log.csv")} for name, ckpt in ckpts.items()
    }
    split = read_s2_split(runs / "rvq" / "split.csv")
    test = load_s2(split["test"])
    with tempfile.TemporaryDirectory() as tmp:  # check the packed weights before shipping
        pack_standalone(ckpts, Path(tmp) / out.name, notes=notes)
        for name, ckpt in ckpts.items():
            notes[name]["half_precision_check"] = half_precision_check(ckpt, name, Path(tmp), test)
            print(name, notes[name]["half_precision_check"])
    index = pack_standalone(ckpts, out, _metrics(args.metrics), notes)
    for name, entry in index["models"].items():
        size = (out / entry["file"]).stat().st_size
        print(f"{name}: {out / entry['file']} {size / 1e6:.1f} MB, sha256 {entry['sha256'][:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
