"""NEC fine-tuning of Galileo (:mod:`nec_models.galileo_nec`) on EuroSAT RGB: resumable, logged.

``train_galileo_nec(config)`` trains the adapter (the last block(s), the final norm and the
per-channel gain) and the entropy bottleneck of a registered
:class:`~nec_models.galileo_nec.GalileoNEC` for ``lmbda x distortion + bits per image``:
distortion is the mean squared error of the decoded tokens against the frozen backbone's,
the rate ``-log2`` of the likelihoods of every token (what is coded). The backbone never
changes. With the conventions of the other trainers (:mod:`nec_models.train`), through
the one training loop (:func:`nec_models.loop.fit`):

- the split is a ``path,label,split`` file (default the project's EuroSAT split,
  ``weights/eurosat/split.csv``), copied into ``<out>/split.csv`` at the start and read
  from there afterwards; only ``train`` and ``val`` are read, the test part never is.
  ``max_items`` keeps the first N images of each class in each part (quick runs).
- EuroSAT's 8-bit JPEGs become raw B2, B3, B4 (:func:`~nec_models.galileo.eurosat_rgb_to_raw`);
  training images are flipped at random, from generators seeded by ``(seed, epoch)``.
- The adapter trains with AdamW at ``lr``; the bottleneck's density and the gain in the
  same AdamW at ``bottleneck_lr`` (no weight decay); the bottleneck's quantiles with their
  own Adam on the auxiliary loss after every step. Constant learning rates: a resume that
  adds epochs ends as a run of that many epochs from the start.
- ``<out>/checkpoint.pth`` after every epoch (atomic), a ``log.csv`` row with validation
  distortion, the estimated bits per image and the bits CompressAI really codes after
  ``update()``; a non-finite loss stops the run with the last good checkpoint kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nec_models.eurosat import CLASSES, Decoded, Item, decode, read_split
from nec_models.galileo import RGB_BANDS, eurosat_rgb_to_raw
from nec_models.galileo_nec import GalileoNEC
from nec_models.loop import SEED, EpochStats, Step, Task, rate_distortion_optimizers, run_task
from nec_models.registry import create_model
from nec_serve.errors import InvalidInput

__all__ = ["GalileoNECConfig", "GALILEO_NEC_LOG_FIELDS", "DEFAULT_SPLIT", "train_galileo_nec"]

#: The project's EuroSAT split (train / val / test), the one every EuroSAT model uses.
DEFAULT_SPLIT = str(Path(__file__).resolve().parents[1] / "weights" / "eurosat" / "split.csv")
GALILEO_NEC_LOG_FIELDS = (
    "epoch",
    "train_loss",
    "train_distortion",
    "train_bits",
    "val_distortion",
    "val_bits_estimate",
    "val_bits_coded",
    "mean_gain",
    "seconds",
)


@dataclass(frozen=True)
class GalileoNECConfig:
    """A Galileo NEC run; stored as ``args`` in every checkpoint."""

    data: str  # EuroSAT RGB root (<Class>/<Class>_<n>.jpg)
    out: str
    model: str = "galileo_nec_nano"
    split: str = DEFAULT_SPLIT
    # Weight of the token MSE (a mean over elements) against bits per image: about
    # 5900 / lmbda is the MSE where one more bit per value stops paying (8192 values).
    lmbda: float = 1e7
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    bottleneck_lr: float = 1e-2  # the density and the gain, as NEC's bottleneck_lr
    aux_lr: float = 1e-3
    weight_decay: float = 0.05
    max_items: int = 0  # 0: all; else the first N images of each class in train and val
    seed: int = SEED
    threads: int = 0

    def __post_init__(self) -> None:
        """Refuse settings that cannot work, naming the setting."""
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"train galileo_nec: {name} must be >= 1")
        for name in ("lmbda", "lr", "bottleneck_lr", "aux_lr"):
            if not getattr(self, name) > 0:
                raise InvalidInput(f"train galileo_nec: {name} must be > 0")
        if self.max_items < 0 or self.weight_decay < 0:
            raise InvalidInput("train galileo_nec: max_items and weight_decay must be >= 0")


def _first_per_class(items: list[Item], n: int) -> list[Item]:
    if not n:
        return items
    seen = dict.fromkeys(range(len(CLASSES)), 0)
    kept = []
    for item in items:
        seen[item.label] += 1
        if seen[item.label] <= n:
            kept.append(item)
    return kept


def _load_data(cfg: GalileoNECConfig, out: Path) -> tuple[Decoded, Decoded, dict]:
    """Train and val images of the run's split (copied into ``out`` once); never test."""
    local = out / "split.csv"
    if not local.exists():
        src = Path(cfg.split)
        if not src.is_file():
            raise InvalidInput(f"train galileo_nec: no split file at {src}")
        local.write_bytes(src.read_bytes())
    split = read_split(local)
    parts = {name: _first_per_class(split[name], cfg.max_items) for name in ("train", "val")}
    for name, items in parts.items():
        if not items:
            raise InvalidInput(f"train galileo_nec: the {name} part of {local} is empty")
    train = decode(cfg.data, parts["train"], out / "cache" / "train")
    val = decode(cfg.data, parts["val"], out / "cache" / "val")
    info = {
        "split": {k: len(v) for k, v in parts.items()},
        "skipped": len(train.skipped) + len(val.skipped),
    }
    return train, val, info


def _raw(images: np.ndarray, gen: torch.Generator | None) -> torch.Tensor:
    """uint8 NHWC EuroSAT RGB -> raw B2, B3, B4 NCHW; with ``gen``, random flips."""
    x = eurosat_rgb_to_raw(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2))
    if gen is not None:
        flips = torch.rand(len(x), 2, generator=gen) < 0.5
        x = torch.where(flips[:, 0, None, None, None], x.flip(-1), x)
        x = torch.where(flips[:, 1, None, None, None], x.flip(-2), x)
    return x


def _optimizers(model: GalileoNEC, cfg: GalileoNECConfig):
    """Main AdamW (adapter at ``lr``; density and gain at ``bottleneck_lr``) and aux Adam."""
    return rate_distortion_optimizers(
        model,
        lr=cfg.lr,
        density_lr=cfg.bottleneck_lr,
        aux_lr=cfg.aux_lr,
        weight_decay=cfg.weight_decay,
        density=("bottleneck.", "log_gain"),
    )


@torch.no_grad()
def _validate(model: GalileoNEC, val: Decoded, batch_size: int) -> dict:
    """Val distortion (rounded), estimated and really coded bits per image, all tokens."""
    model.bottleneck.update(force=True)
    dist = est = coded = 0.0
    for i in range(0, len(val.labels), batch_size):
        x = _raw(val.images[i : i + batch_size], None)
        tokens, likelihoods, target = model.run(x)
        dist += float(F.mse_loss(tokens, target)) * len(x)
        est += float(-torch.log2(likelihoods).sum())
        coded += 8.0 * sum(len(s) for s in model.compress(x)["strings"][0])
    n = len(val.labels)
    return {"distortion": dist / n, "estimate": est / n, "coded": coded / n}


class _GalileoNECTask(Task):
    """Galileo NEC fine-tuning as a :class:`~nec_models.loop.Task`."""

    name, log_fields = "galileo_nec", GALILEO_NEC_LOG_FIELDS
    # The split is read once, into <out>/split.csv: where it came from no longer matters.
    resume_free = frozenset({"split"})

    def __init__(self, cfg: GalileoNECConfig):
        self.config = cfg

    def setup(self, resuming: bool) -> None:
        cfg, out = self.config, Path(self.config.out)
        model = create_model(cfg.model)
        if not isinstance(model, GalileoNEC) or model.in_chans != len(RGB_BANDS):
            raise InvalidInput(
                f"train galileo_nec: {cfg.model!r} is not an RGB GalileoNEC model "
                "(EuroSAT RGB has 3 bands)"
            )
        if model.img_size != 64:
            raise InvalidInput(
                f"train galileo_nec: {cfg.model!r} takes {model.img_size} px, not 64"
            )
        self.model: nn.Module = model
        out.mkdir(parents=True, exist_ok=True)
        self.train, self.val, self.info = _load_data(cfg, out)
        optimizer, aux_optimizer = _optimizers(model, cfg)
        self.optimizers = {"optimizer": optimizer, "aux_optimizer": aux_optimizer}
        self.steps = math.ceil(len(self.train.labels) / cfg.batch_size)

    def batches(self, gen: torch.Generator) -> Iterator[np.ndarray]:
        n, bs = len(self.train.labels), self.config.batch_size
        order = torch.randperm(n, generator=gen).numpy()
        for step in range(self.steps):
            yield np.sort(order[step * bs : (step + 1) * bs])

    def train_step(self, batch: np.ndarray, gen: torch.Generator) -> Step:
        distortion, bits = self.model.loss_terms(_raw(self.train.images[batch], gen))
        loss = self.config.lmbda * distortion + bits
        n = len(batch)
        sums = {"loss": float(loss.detach()) * n, "distortion": float(distortion.detach()) * n}
        return Step(loss, {**sums, "bits": float(bits.detach()) * n})

    def after_step(self) -> None:
        aux = self.optimizers["aux_optimizer"]
        aux.zero_grad(set_to_none=True)
        self.model.bottleneck.loss().backward()
        aux.step()

    def validate(self, epoch: int) -> dict:
        return _validate(self.model, self.val, self.config.batch_size)

    def log_row(self, stats: EpochStats, val: dict) -> dict:
        n = len(self.train.labels)
        return {
            "epoch": stats.epoch,
            "train_loss": round(stats.sums["loss"] / n, 4),
            "train_distortion": f"{stats.sums['distortion'] / n:.6g}",
            "train_bits": round(stats.sums["bits"] / n, 1),
            "val_distortion": f"{val['distortion']:.6g}",
            "val_bits_estimate": round(val["estimate"], 1),
            "val_bits_coded": round(val["coded"], 1),
            "mean_gain": round(float(self.model.gain().detach().mean()), 4),
            "seconds": round(stats.seconds, 2),
        }

    def finish(self, result: dict) -> dict:
        return {**result, **self.info}


def train_galileo_nec(
    cfg: GalileoNECConfig, *, resume: bool = False, progress: bool = True
) -> dict:
    """Fine-tune a Galileo NEC model as the module docstring says.

    Returns:
        ``{"epochs_run", "last_epoch", "checkpoint", "split", "skipped", ...the last log
        row}``.

    Raises:
        InvalidInput: bad data or split, a model that is not an RGB GalileoNEC, a resume
            without a checkpoint or of another config.
        TrainingDiverged: a non-finite loss.
    """
    return run_task(_GalileoNECTask(cfg), resume=resume, progress=progress)
