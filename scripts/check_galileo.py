"""One-off check of nec_models.galileo against the publisher's Galileo encoder, on real images.

Runs the publisher's reference encoder (``single_file_galileo.py`` of a checkout of
github.com/nasaharvest/galileo, imported from the path given; the project itself does not
depend on it) and the project's :class:`~nec_models.galileo.GalileoEncoder` on the same
raw pixels and prints the largest absolute difference of their tokens per input set and
patch size, the same for the project's encoder run in float64 (the scale of float32
rounding), and the time per image on one core. The reference is fed as its code expects:
13 space-time channels (the S2 bands at 2-11, the rest zero), normalised here with the
statistics of the checkout's ``config/normalization.json`` (not the project's constants,
so those are checked too), absent groups and modalities masked, month 6.

    python scripts/check_galileo.py /path/to/galileo-checkout \
        [--weights ../shared/models/galileo_nano] [--data ../shared/data] [--per-class 3] \
        [--golden tests/golden/galileo/reference_tokens.npz]

``--golden`` also writes the reference's tokens on two sample images of ``data/samples``
(what ``tests/unit/models/test_galileo.py`` compares the project's encoder with).

Needs ``einops`` (the reference imports it); nothing is installed by this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nec_models.galileo import S2_GROUPS, GalileoEncoder, eurosat_rgb_to_raw
from nec_serve.imagery import read_raster

#: 1-based bands of B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12 in the EuroSAT MS GeoTIFFs
#: (B01-B12 with B10, then B8A last).
EUROSAT_MS_BANDS = [2, 3, 4, 5, 6, 7, 8, 13, 11, 12]
# The reference's space-time groups (S1, five S2 groups, NDVI) and channels.
REF_GROUPS = ["S1", *S2_GROUPS, "NDVI"]
S2_AT = 2  # B2 is the third of VV, VH, B2 ... B12, NDVI


def _pick(root: Path, suffix: str, per_class: int) -> list[Path]:
    return [p for d in sorted(root.iterdir()) for p in sorted(d.glob(f"*{suffix}"))[:per_class]]


def load_sets(data: Path, per_class: int) -> dict[str, torch.Tensor]:
    """Raw L1C-scale inputs: EuroSAT RGB JPEGs (x 2750/255, B2-B4) and MS GeoTIFFs (10 bands)."""
    rgb = [
        np.array(Image.open(p).convert("RGB"))
        for p in _pick(data / "eurosat_rgb", ".jpg", per_class)
    ]
    rgb8 = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2)
    ms = [read_raster(p, EUROSAT_MS_BANDS) for p in _pick(data / "eurosat_ms", ".tif", per_class)]
    return {
        "eurosat_rgb (B2-B4)": eurosat_rgb_to_raw(rgb8),
        "eurosat_ms (10 bands)": torch.from_numpy(np.stack(ms).astype(np.float32)),
    }


def reference_tokens(ref, encoder, raw: torch.Tensor, stats: dict, patch_size: int) -> torch.Tensor:
    """The reference encoder's tokens of the groups ``raw`` holds, ``(B, h*w*G, D)``."""
    b, bands, h, w = raw.shape
    mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
    shift, div = mean - 2 * std, 4 * std
    s_t = np.zeros((b, h, w, 1, len(ref.SPACE_TIME_BANDS)), dtype=np.float64)
    s_t[..., 0, S2_AT : S2_AT + bands] = raw.permute(0, 2, 3, 1).double().numpy()
    s_t = (s_t - shift) / div
    s_t[..., S2_AT + bands :] = 0.0
    s_t[..., :S2_AT] = 0.0
    present = ["S2_RGB"] if bands == 3 else list(S2_GROUPS)
    s_t_m = torch.ones(b, h, w, 1, len(REF_GROUPS))
    for g in present:
        s_t_m[..., REF_GROUPS.index(g)] = 0
    out = encoder(
        torch.from_numpy(s_t).float(),
        torch.zeros(b, h, w, len(ref.SPACE_BANDS)),
        torch.zeros(b, 1, len(ref.TIME_BANDS)),
        torch.zeros(b, len(ref.STATIC_BANDS)),
        s_t_m,
        torch.ones(b, h, w, len(ref.SPACE_BAND_GROUPS_IDX)),
        torch.ones(b, 1, len(ref.TIME_BAND_GROUPS_IDX)),
        torch.ones(b, len(ref.STATIC_BAND_GROUPS_IDX)),
        torch.full((b, 1), 6, dtype=torch.long),
        patch_size=patch_size,
    )[0]  # (B, h/p, w/p, T, 7, D)
    keep = [REF_GROUPS.index(g) for g in present]
    return out[:, :, :, 0, keep].reshape(b, -1, out.shape[-1])


def ours_config(weights: Path) -> dict:
    return json.loads((weights / "config.json").read_text())


#: The sample images of the regression test, with the patch size each is encoded at.
GOLDEN_INPUTS = {
    "rgb_p4": ("eurosat_rgb/Forest/Forest_100.jpg", 4),
    "ms_p8": ("eurosat_ms/AnnualCrop/AnnualCrop_916.tif", 8),
}
#: Every GOLDEN_STRIDE-th token is kept (and the mean of all of them).
GOLDEN_STRIDE = 8


def read_sample(path: Path) -> torch.Tensor:
    """A sample image as raw ``(1, bands, H, W)``: RGB JPEG -> B2-B4, MS GeoTIFF -> 10 bands."""
    if path.suffix == ".jpg":
        rgb8 = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        return eurosat_rgb_to_raw(rgb8)[None]
    return torch.from_numpy(read_raster(path, EUROSAT_MS_BANDS).astype(np.float32))[None]


def write_golden(ref, encoder, norm: dict, out: Path) -> None:
    """The reference's tokens on :data:`GOLDEN_INPUTS`: every 8th token and the mean."""
    samples = Path(__file__).resolve().parents[1] / "data" / "samples"
    arrays = {}
    for key, (rel, ps) in GOLDEN_INPUTS.items():
        tokens = reference_tokens(ref, encoder, read_sample(samples / rel), norm, ps)[0]
        arrays[f"{key}_tokens"] = tokens[::GOLDEN_STRIDE].numpy()
        arrays[f"{key}_mean"] = tokens.mean(0).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}: {', '.join(f'{k} {v.shape}' for k, v in arrays.items())}")


def _per_image_ms(fn, x: torch.Tensor, repeats: int = 5) -> float:
    fn(x[:1])
    start = time.perf_counter()
    for i in range(repeats):
        fn(x[i % len(x) : i % len(x) + 1])
    return 1000 * (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", help="a checkout of github.com/nasaharvest/galileo")
    p.add_argument("--weights", default="../shared/models/galileo_nano")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--per-class", type=int, default=3, help="images per EuroSAT class")
    p.add_argument("--patch-sizes", type=int, nargs="+", default=[4, 8])
    p.add_argument("--golden", help="write the reference's tokens on the sample images here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(args.checkout).resolve()))
    import single_file_galileo as ref

    norm = json.loads((Path(args.checkout) / "config" / "normalization.json").read_text())["13"]
    weights = Path(args.weights)
    theirs = ref.Encoder.load_from_folder(weights, device=torch.device("cpu")).eval()
    state = torch.load(weights / "encoder.pt", map_location="cpu", weights_only=True)
    ours = GalileoEncoder.from_state_dict(state, ours_config(weights))
    ours64 = GalileoEncoder.from_state_dict(state, ours_config(weights)).double()
    print(
        "input set, images, patch size, tokens per image, max abs diff, mean abs diff, "
        "max abs diff float64 ours vs float32 ours, ms per image (ours, reference, one core)"
    )
    with torch.no_grad():
        for name, raw in load_sets(Path(args.data), args.per_class).items():
            for ps in args.patch_sizes:
                a = ours(raw, patch_size=ps)
                b = torch.cat([reference_tokens(ref, theirs, c, norm, ps) for c in raw.split(10)])
                diff = (a - b).abs()
                rounding = (ours64(raw.double(), patch_size=ps) - a).abs().max()
                t_ours = _per_image_ms(partial(ours, patch_size=ps), raw)
                t_ref = _per_image_ms(
                    partial(reference_tokens, ref, theirs, stats=norm, patch_size=ps), raw
                )
                print(
                    f"{name}, {len(raw)}, {ps}, {a.shape[1]}, {diff.max():.3g}, "
                    f"{diff.mean():.3g}, {rounding:.3g}, {t_ours:.1f}, {t_ref:.1f}"
                )
        if args.golden:
            write_golden(ref, theirs, norm, Path(args.golden))
    return 0


if __name__ == "__main__":
    sys.exit(main())
