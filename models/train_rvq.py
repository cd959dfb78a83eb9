"""Training of the RVQ Sentinel-2 compressor (:mod:`nec_models.rvq`): resumable, logged.

``train_rvq(config)`` trains a registered :class:`~nec_models.rvq.RVQAutoencoder` on the
ten-band Sentinel-2 data of :mod:`nec_models.sentinel2`, with the conventions of the MAE
and NEC trainers (:mod:`nec_models.train`):

- the split is made once by group (seeded) and written to ``<out>/split.csv``; the test
  part is never read here;
- an epoch is ``crops_per_epoch`` random crops (``crop`` px, flips and 90-degree
  rotations) drawn from the training images with probability proportional to their
  area, from generators seeded by ``(seed, epoch)``, so a resumed run repeats exactly;
- ``<out>/checkpoint.pth`` is written atomically after every epoch in the layout
  ``{"model", "optimizer", "epoch", "scaler", "args"}`` (plus the loop's ``lr``, ``rng``,
  ``metrics``, ``best``), one row goes to ``<out>/log.csv``; a resume whose config differs
  in a field other than ``epochs``, ``out`` and ``threads`` is refused, naming the field;
- a non-finite loss stops the run (:class:`~nec_models.loop.TrainingDiverged`).

All of this is the one training loop, :func:`nec_models.loop.fit`; this module gives it
the RVQ task.

Each sample's number of codebooks is drawn uniformly from 1..levels
(``train_codebooks=0``) so that one model serves every rate, or fixed (e.g. 8, for the
comparison model). The loss is the mean squared error of the standardised bands plus
``beta`` x the commitment loss; with drawn codebook counts, the error is the mean of the
reconstruction from all levels (which alone trains the encoder) and the reconstruction
from each sample's drawn levels (which trains the decoder for every rate), see
:meth:`~nec_models.rvq.RVQAutoencoder.forward`. The codebooks start from k-means on
the latents of the first crops, then follow EMA updates with dead-code restart
(:class:`ResidualVQ`).

Validation reports, per number of codebooks, the RMS error in % of each band's range
(the deliverable's metric; the range is the validation set's max - min per band, raw
units) and the perplexity of each level's index distribution (how many entries it
really uses: ``2 ** entropy``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nec_models.checkpoint import load_checkpoint
from nec_models.loop import SEED, EpochStats, Step, Task, epoch_seed, run_task
from nec_models.registry import create_model
from nec_models.rvq import RVQAutoencoder
from nec_models.sentinel2 import load_s2, read_s2_split, scan_s2, split_s2, write_s2_split
from nec_serve.errors import InvalidInput

__all__ = [
    "RVQConfig",
    "train_rvq",
    "rvq_log_fields",
    "evaluate_rvq",
    "rvq_metrics",
    "index_histograms",
    "square_tiles",
    "encoded_tiles",
]


def rvq_log_fields(levels: int) -> tuple[str, ...]:
    """Columns of an RVQ run's ``log.csv``."""
    return (
        "epoch",
        "train_loss",
        "train_mse",
        "commit",
        *(f"val_rmse_pct_n{n}" for n in range(1, levels + 1)),
        *(f"perplexity_l{n}" for n in range(1, levels + 1)),
        "lr",
        "seconds",
        "crops_per_s",
    )


@dataclass(frozen=True)
class RVQConfig:
    """Everything an RVQ run depends on; stored as ``args`` in every checkpoint."""

    data: tuple[str, ...]
    out: str
    model: str = "rvq_s2_small"
    epochs: int = 40
    crops_per_epoch: int = 2048
    crop: int = 64
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-5
    beta: float = 0.25  # commitment weight
    train_codebooks: int = 0  # 0: drawn per sample from 1..levels; else always this many
    init_crops: int = 64  # crops whose latents seed the codebooks by k-means
    seed: int = SEED
    split_seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        """Refuse settings that cannot work, naming the setting."""
        object.__setattr__(self, "data", tuple(str(d) for d in self.data))
        for name in ("epochs", "crops_per_epoch", "crop", "batch_size", "init_crops"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"train rvq: {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.beta < 0 or self.train_codebooks < 0:
            raise InvalidInput("train rvq: lr must be > 0, beta and train_codebooks >= 0")
        if not self.data:
            raise InvalidInput("train rvq: give --data folders")


class _Crops:
    """Random crops with flips and rotations from a list of ``(10, H, W)`` images."""

    def __init__(self, images: list[np.ndarray], size: int, mean: torch.Tensor, std: torch.Tensor):
        self.images = [img for img in images if min(img.shape[1:]) >= size]
        if not self.images:
            raise InvalidInput(f"train rvq: no training image is at least {size} px")
        area = np.array([img.shape[1] * img.shape[2] for img in self.images], dtype=np.float64)
        self.p = torch.from_numpy(area / area.sum())
        self.size, self.mean, self.std = size, mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def batch(self, n: int, gen: torch.Generator) -> torch.Tensor:
        picks = torch.multinomial(self.p, n, replacement=True, generator=gen).tolist()
        out = []
        for i in picks:
            img = self.images[i]
            h, w = img.shape[1:]
            top = int(torch.randint(0, h - self.size + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - self.size + 1, (1,), generator=gen))
            crop = torch.from_numpy(img[:, top : top + self.size, left : left + self.size])
            rot, flip = (int(v) for v in torch.randint(0, 4, (2,), generator=gen))
            crop = torch.rot90(crop, rot, (1, 2))
            if flip % 2:
                crop = crop.flip(2)
            out.append(crop)
        return (torch.stack(out) - self.mean) / self.std


def _band_stats(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    total = sum(img.shape[1] * img.shape[2] for img in images)
    s = sum(img.reshape(img.shape[0], -1).astype(np.float64).sum(1) for img in images)
    s2 = sum((img.reshape(img.shape[0], -1).astype(np.float64) ** 2).sum(1) for img in images)
    mean = s / total
    std = np.sqrt(np.maximum(s2 / total - mean**2, 1e-12))
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def square_tiles(images: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Non-overlapping ``size`` tiles of each image (edges that do not fill one dropped)."""
    out = []
    for img in images:
        for r in range(0, img.shape[1] - size + 1, size):
            for c in range(0, img.shape[2] - size + 1, size):
                out.append(img[:, r : r + size, c : c + size])
    return out


def encoded_tiles(
    model: RVQAutoencoder, images: list[np.ndarray], size: int, batch_size: int = 16
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(reflectance tiles (B, 10, S, S), every level's indices (B, L, T))``, batch by batch.

    The tiles are the non-overlapping ``size`` tiles of ``images`` (:func:`square_tiles`),
    standardised with the model's band statistics before encoding.
    """
    model.eval()
    tiles = np.stack(square_tiles(images, size))
    mean, std = model.band_mean.view(1, -1, 1, 1), model.band_std.view(1, -1, 1, 1)
    with torch.no_grad():
        for i in range(0, len(tiles), batch_size):
            x = torch.from_numpy(tiles[i : i + batch_size])
            yield x, model.indices((x - mean) / std)[0]


def _count(counts: torch.Tensor, idx: torch.Tensor) -> None:
    """Add each level's index histogram of ``idx`` ``(B, L, T)`` to ``counts`` ``(L, K)``."""
    for level in range(counts.shape[0]):
        counts[level] += torch.bincount(idx[:, level].flatten().long(), minlength=counts.shape[1])


@torch.no_grad()
def rvq_metrics(
    model: RVQAutoencoder, images: list[np.ndarray], size: int, batch_size: int = 16
) -> dict:
    """RMS error in % of each band's range per number of codebooks, perplexity per level.

    ``images`` are reflectance ``(10, H, W)``; they are cut into ``size`` tiles, encoded
    once, and decoded with 1..levels codebooks. The range of a band is its max - min over
    ``images`` (raw units, reflectance x 10000). Returns ``{"rmse_pct": {n: overall},
    "rmse_pct_band": {n: [per band]}, "rmse": {n: raw units}, "perplexity": [per level]}``.
    """
    mean, std = model.band_mean.view(1, -1, 1, 1), model.band_std.view(1, -1, 1, 1)
    lo = np.min([img.reshape(img.shape[0], -1).min(1) for img in images], axis=0)
    hi = np.max([img.reshape(img.shape[0], -1).max(1) for img in images], axis=0)
    span = np.maximum(hi - lo, 1e-6) * 10000.0
    sq = np.zeros((model.levels, model.in_chans))
    counts = torch.zeros(model.levels, model.codebook_size)
    tiles = 0
    for x, idx in encoded_tiles(model, images, size, batch_size):
        tiles += len(x)
        _count(counts, idx)
        for n in range(1, model.levels + 1):
            used = idx.clone()
            used[:, n:] = -1
            rec = model.decode_indices(used) * std + mean
            sq[n - 1] += ((rec - x) * 10000.0).pow(2).mean((2, 3)).sum(0).numpy()
    rmse_band = np.sqrt(sq / tiles)
    pct_band = 100 * rmse_band / span
    p = (counts / counts.sum(1, keepdim=True)).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
    levels = range(1, model.levels + 1)
    return {
        "rmse_pct": {n: float(pct_band[n - 1].mean()) for n in levels},
        "rmse_pct_band": {n: [round(float(v), 4) for v in pct_band[n - 1]] for n in levels},
        "rmse": {n: float(np.sqrt((rmse_band[n - 1] ** 2).mean())) for n in levels},
        "perplexity": [float(2**e) for e in ent],
        "tiles": tiles,
    }


def index_histograms(
    model: RVQAutoencoder, images: list[np.ndarray], size: int, batch_size: int = 16
) -> torch.Tensor:
    """How often each entry of each level is chosen on ``size`` tiles of ``images``.

    Returns ``(levels, K)`` counts (float32): the statistics the export's categorical
    entropy tables are made from.
    """
    counts = torch.zeros(model.levels, model.codebook_size)
    for _, idx in encoded_tiles(model, images, size, batch_size):
        _count(counts, idx)
    return counts


def evaluate_rvq(checkpoint: str | Path, part: str = "val", size: int | None = None) -> dict:
    """:func:`rvq_metrics` of a run's checkpoint on a part of its split (``test``: final)."""
    state = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
    args = state["args"]
    model = create_model(args["model"])
    load_checkpoint(model, state)
    split = read_s2_split(Path(checkpoint).parent / "split.csv")
    return rvq_metrics(model, load_s2(split[part]), size or args["crop"])


class _RVQTask(Task):
    """RVQ training as a :class:`~nec_models.loop.Task`."""

    name = "rvq"

    def __init__(self, cfg: RVQConfig):
        self.config = cfg

    def _model(self) -> RVQAutoencoder:
        cfg = self.config
        model = create_model(cfg.model)
        if not isinstance(model, RVQAutoencoder):
            raise InvalidInput(f"train rvq: {cfg.model!r} is not an RVQ model")
        if cfg.crop % model.downscale:
            raise InvalidInput(f"train rvq: crop {cfg.crop} is not a multiple of {model.downscale}")
        if cfg.train_codebooks > model.levels:
            raise InvalidInput(
                f"train rvq: train_codebooks {cfg.train_codebooks} > the model's {model.levels}"
            )
        return model

    def setup(self, resuming: bool) -> None:
        """Model, optimizer, training crops, validation images; k-means codebooks if new."""
        cfg, out = self.config, Path(self.config.out)
        self.model = model = self._model()
        self.log_fields = rvq_log_fields(model.levels)
        self.best_by = (f"val_rmse_pct_n{model.levels}", "min")
        out.mkdir(parents=True, exist_ok=True)
        split_path = out / "split.csv"
        if split_path.exists():
            split = read_s2_split(split_path)
        else:
            split = split_s2(scan_s2(list(cfg.data)), seed=cfg.split_seed)
            write_s2_split(split, split_path)
        self.info = {k: len(v) for k, v in split.items()}
        train = load_s2(split["train"])
        self.val = load_s2(split["val"]) or train[:4]
        mean, std = _band_stats(train)
        model.band_mean.copy_(mean)
        model.band_std.copy_(std)
        self.crops = _Crops(train, cfg.crop, mean, std)
        self.optimizers = {"optimizer": torch.optim.Adam(model.parameters(), lr=cfg.lr)}
        self.steps = math.ceil(cfg.crops_per_epoch / cfg.batch_size)
        if not resuming:
            gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, -1))
            with torch.no_grad():
                z = model.encode(self.crops.batch(cfg.init_crops, gen))
            model.quantizer.kmeans_init(
                z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), seed=cfg.seed
            )

    def lr_at(self, t: float) -> float:
        cfg = self.config
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t / cfg.epochs))

    def batches(self, gen: torch.Generator) -> Iterator[torch.Tensor]:
        for _ in range(self.steps):
            yield self.crops.batch(self.config.batch_size, gen)

    def train_step(self, batch: torch.Tensor, gen: torch.Generator) -> Step:
        cfg, model, x = self.config, self.model, batch
        if cfg.train_codebooks:
            active = torch.full((len(x),), cfg.train_codebooks)
        else:
            active = torch.randint(1, model.levels + 1, (len(x),), generator=gen)
        full, part, commit = model(x, active)
        mse = F.mse_loss(full, x)
        if part is not None:  # the drawn rates, for the decoder
            mse = 0.5 * (mse + F.mse_loss(part, x))
        loss = mse + cfg.beta * commit
        sums = {"loss": loss, "mse": mse, "commit": commit}
        return Step(loss, {k: float(v.detach()) for k, v in sums.items()})

    def validate(self, epoch: int) -> dict:
        cfg, model = self.config, self.model
        metrics = rvq_metrics(model, self.val, cfg.crop)
        if epoch == cfg.epochs - 1:  # the tables' statistics, from the final codebooks
            counts = index_histograms(model, self.crops.images, cfg.crop)
            model.quantizer.index_counts.copy_(counts)
        return metrics

    def log_row(self, stats: EpochStats, val: dict) -> dict:
        steps, sums = stats.steps, stats.sums
        return {
            "epoch": stats.epoch,
            "train_loss": round(sums["loss"] / steps, 5),
            "train_mse": round(sums["mse"] / steps, 5),
            "commit": round(sums["commit"] / steps, 5),
            **{f"val_rmse_pct_n{n}": round(v, 4) for n, v in val["rmse_pct"].items()},
            **{f"perplexity_l{i + 1}": round(v, 1) for i, v in enumerate(val["perplexity"])},
            "lr": round(stats.lr, 7),
            "seconds": round(stats.seconds, 1),
            "crops_per_s": round(steps * self.config.batch_size / stats.seconds, 1),
        }

    def finish(self, result: dict) -> dict:
        return {**result, "split": self.info}


def train_rvq(cfg: RVQConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train (or, with ``resume``, continue) as the module docstring says.

    Returns:
        ``{"epochs_run", "last_epoch", "checkpoint", "split", ...the last log row}``.
    """
    return run_task(_RVQTask(cfg), resume=resume, progress=progress)
