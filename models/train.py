"""MAE pretraining on EuroSAT RGB: resumable, logged, deterministic.

``train_mae(config)`` pretrains a registered MAE ViT (``mae_vit_tiny_patch8``: 64 tokens on
64 px patches) from scratch, as MAE does: 75 % of the patches masked, the loss on the
masked patches, AdamW (0.9, 0.95) with weight decay on the weights only, a cosine schedule
after a linear warm-up (per step), RandomResizedCrop and flips on the training images,
ImageNet normalisation as the service applies it to uint8 input.

Reproducible and resumable, through the one training loop (:func:`nec_models.loop.fit`,
by :func:`~nec_models.loop.run_task`; each trainer here is a small
:class:`~nec_models.loop.Task`):

- The split is made once (stratified, seeded; :mod:`nec_models.eurosat`) and written to
  ``<out>/split.csv``; a resumed run reads it back. Only ``train`` and ``val`` are used:
  the test part stays untouched for the final numbers.
- The data order and every augmentation and mask of an epoch come from generators seeded
  by ``(seed, epoch)``, so an epoch is the same whether or not the run was interrupted.
- After every epoch, ``<out>/checkpoint.pth`` is written (atomically) in the official
  layout ``{"model", "optimizer", "epoch", "scaler", "args"}`` plus the loop's ``lr``,
  ``rng``, ``metrics`` and ``best``, and a row goes to ``<out>/log.csv``. ``resume=True``
  continues after the last finished epoch: a run killed mid-epoch loses at most that
  epoch, and the result equals an uninterrupted run's. A resume may change ``epochs`` (the
  schedule follows the new count from then on), ``out`` and ``threads``; any other setting
  that differs from the checkpoint's is refused, naming the field.
- A non-finite loss stops the run with :class:`TrainingDiverged`; the checkpoint of the
  last good epoch is left as it was.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2 import functional as tvf

from nec_models.checkpoint import load_checkpoint
from nec_models.eurosat import CLASSES, Decoded, decode, make_split, read_split, scan, write_split
from nec_models.loop import (
    SEED,
    EpochStats,
    Step,
    Task,
    TrainingDiverged,
    epoch_seed,
    rate_distortion_optimizers,
    run_task,
)
from nec_models.registry import create_model
from nec_serve.errors import InvalidInput
from nec_serve.hashing import sha256_file
from nec_serve.imagery import Normalisation

__all__ = [
    "MAEConfig",
    "NECConfig",
    "ClassifierConfig",
    "train_classifier",
    "CLASSIFIER_OF_NEC",
    "TrainingDiverged",
    "train_mae",
    "train_nec",
    "LOG_FIELDS",
    "NEC_LOG_FIELDS",
    "NEC_OF_MAE",
]

LOG_FIELDS = ("epoch", "train_loss", "val_loss", "lr", "seconds", "images_per_s")


@dataclass(frozen=True)
class MAEConfig:
    """Everything a pretraining run depends on; stored as ``args`` in every checkpoint."""

    data: str
    out: str
    model: str = "mae_vit_tiny_patch8"
    epochs: int = 100
    batch_size: int = 64
    blr: float = 1.5e-4  # base learning rate; lr = blr * batch_size / 256, as in MAE
    min_lr: float = 0.0
    warmup_epochs: int = 5
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    crop_scale: tuple[float, float] = (0.2, 1.0)
    seed: int = SEED
    split_seed: int = 0
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_items: int = 0  # 0: all; else the first items of each class (for tests)
    threads: int = 0  # 0: torch's default

    def __post_init__(self) -> None:
        """Refuse settings that cannot work, naming the setting."""
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"train mae: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.mask_ratio < 1:
            raise InvalidInput(f"train mae: mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.blr <= 0 or self.warmup_epochs < 0 or self.max_items < 0:
            raise InvalidInput("train mae: blr must be > 0, warmup_epochs and max_items >= 0")

    @property
    def lr(self) -> float:
        """The peak learning rate."""
        return self.blr * self.batch_size / 256


def _lr_at(cfg: MAEConfig, t: float) -> float:
    """Learning rate at fractional epoch ``t``: linear warm-up, then half a cosine."""
    if t < cfg.warmup_epochs:
        return cfg.lr * t / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (
        1.0 + math.cos(math.pi * (t - cfg.warmup_epochs) / span)
    )


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith((".bias", "_token")) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class _Batches:
    """uint8 NHWC images -> normalised float NCHW batches, augmented from a generator."""

    def __init__(self, size: int, scale: tuple[float, float]):
        norm = Normalisation.for_dtype(np.uint8, 3)
        self.size = size
        self.scale = scale
        self.divisor = float(norm.scale)
        self.mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: np.ndarray, gen: torch.Generator | None) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        if gen is not None:
            x = torch.stack([self._augment(img, gen) for img in x])
        return (x / self.divisor - self.mean) / self.std

    def _augment(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # RandomResizedCrop (aspect 3/4..4/3, as torchvision's), then both flips.
        h, w = img.shape[-2:]
        for _ in range(10):
            u = torch.rand(3, generator=gen).tolist()
            area = h * w * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(u[2] * (h - ch + 1))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
                break
        else:
            top, left, ch, cw = 0, 0, h, w
        out = tvf.resized_crop(img, top, left, ch, cw, [self.size, self.size], antialias=True)
        flips = torch.rand(2, generator=gen).tolist()
        if flips[0] < 0.5:
            out = out.flip(-1)
        if flips[1] < 0.5:
            out = out.flip(-2)
        return out


def _shuffled(n: int, batch_size: int, gen: torch.Generator) -> Iterator[np.ndarray]:
    """One epoch's batches: the sorted indices of each, in an order drawn from ``gen``."""
    order = torch.randperm(n, generator=gen).numpy()
    for step in range(math.ceil(n / batch_size)):
        yield np.sort(order[step * batch_size : (step + 1) * batch_size])


def _load_data(cfg: MAEConfig, out: Path) -> tuple[Decoded, Decoded, dict]:
    split_path = out / "split.csv"
    if split_path.exists():
        split = read_split(split_path)
    else:
        items = scan(cfg.data)
        if cfg.max_items:
            per_class: dict[int, int] = {}
            kept = []
            for item in items:
                per_class[item.label] = per_class.get(item.label, 0) + 1
                if per_class[item.label] <= cfg.max_items:
                    kept.append(item)
            items = kept
        split = make_split(items, cfg.split, cfg.split_seed)
        write_split(split, split_path)
    for name in ("train", "val"):
        if not split[name]:
            raise InvalidInput(
                f"train mae: the {name} split of {cfg.data} is empty; give more images "
                f"(--max-items) or other --split fractions"
            )
    train = decode(cfg.data, split["train"], out / "cache" / "train")
    val = decode(cfg.data, split["val"], out / "cache" / "val")
    info = {
        "split": {k: len(v) for k, v in split.items()},
        "skipped": len(train.skipped) + len(val.skipped),
    }
    return train, val, info


def _config_of(args: dict) -> MAEConfig:
    known = {f.name for f in fields(MAEConfig)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if k in known}
    return MAEConfig(**values)


@torch.no_grad()
def _val_loss(model, batches: _Batches, val: Decoded, cfg: MAEConfig, epoch: int) -> float:
    gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, 999_983))  # the same every epoch
    total, n = 0.0, 0
    for i in range(0, len(val.labels), cfg.batch_size):
        x = batches(val.images[i : i + cfg.batch_size], None)
        pred, mask = model.forward_masked(x, cfg.mask_ratio, gen)
        total += float(model.masked_loss(x, pred, mask, cfg.norm_pix_loss)) * len(x)
        n += len(x)
    return total / max(n, 1)


class _MAETask(Task):
    """MAE pretraining as a :class:`~nec_models.loop.Task`."""

    name, knob, log_fields, best_by = "mae", "--blr", LOG_FIELDS, ("val_loss", "min")

    def __init__(self, cfg: MAEConfig):
        self.config = cfg

    def setup(self, resuming: bool) -> None:
        cfg, out = self.config, Path(self.config.out)
        out.mkdir(parents=True, exist_ok=True)
        self.train, self.val, self.info = _load_data(cfg, out)
        self.model = create_model(cfg.model)
        self.optimizers = {
            "optimizer": torch.optim.AdamW(
                _param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95)
            )
        }
        self.data = _Batches(self.model.img_size, cfg.crop_scale)
        self.steps = math.ceil(len(self.train.labels) / cfg.batch_size)

    def lr_at(self, t: float) -> float:
        return _lr_at(self.config, t)

    def batches(self, gen: torch.Generator) -> Iterator[np.ndarray]:
        return _shuffled(len(self.train.labels), self.config.batch_size, gen)

    def train_step(self, batch: np.ndarray, gen: torch.Generator) -> Step:
        cfg = self.config
        x = self.data(self.train.images[batch], gen)
        pred, mask = self.model.forward_masked(x, cfg.mask_ratio, gen)
        loss = self.model.masked_loss(x, pred, mask, cfg.norm_pix_loss)
        return Step(loss, {"loss": float(loss.detach()) * len(batch)})

    def validate(self, epoch: int) -> dict:
        return {"val_loss": _val_loss(self.model, self.data, self.val, self.config, epoch)}

    def log_row(self, stats: EpochStats, val: dict) -> dict:
        n = len(self.train.labels)
        return {
            "epoch": stats.epoch,
            "train_loss": round(stats.sums["loss"] / n, 6),
            "val_loss": round(val["val_loss"], 6),
            "lr": f"{stats.lr:.6g}",
            "seconds": round(stats.seconds, 2),
            "images_per_s": round(n / stats.seconds, 1),
        }

    def finish(self, result: dict) -> dict:
        return {**result, **self.info}


def train_mae(cfg: MAEConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Pretrain (or, with ``resume``, continue pretraining) as the module docstring says.

    Returns:
        ``{"epochs_run", "last_epoch", "checkpoint", "split", "skipped", ...the last log
        row}``.

    Raises:
        InvalidInput: bad data, a ``--resume`` without a checkpoint or of another config.
        TrainingDiverged: a non-finite loss.
    """
    return run_task(_MAETask(cfg), resume=resume, progress=progress)


# ------------------------------------------------------------------------ NEC fine-tuning

#: The NEC model that fine-tunes each pretraining model (same ViT, plus the bottleneck).
NEC_OF_MAE = {
    "mae_vit_tiny_patch8": "nec_vit_tiny_patch8",
    "mae_vit_pretrain_test": "nec_vit_pretrain_test",
}
#: What the "adapter" setting trains (IBM/neural-embedding-compression main_compress.py):
#: patch_embed, CLS token, the last encoder block, the norms, the decoder's embedding, mask
#: token, first block, norm and prediction, and the bottleneck; the rest stays frozen.
_ADAPTER_PREFIXES = (
    "patch_embed.",
    "cls_token",
    "norm.",
    "decoder_embed.",
    "mask_token",
    "decoder_blocks.0.",
    "decoder_norm.",
    "decoder_pred.",
    "bottleneck.",
)
NEC_LOG_FIELDS = (
    "epoch",
    "train_loss",
    "train_recon",
    "train_bits",
    "val_recon",
    "val_bits_estimate",
    "val_bits_coded",
    "seconds",
)


@dataclass(frozen=True)
class NECConfig:
    """A NEC compression fine-tuning run; stored as ``args`` in every checkpoint."""

    init: str  # an MAE pretraining checkpoint (its folder holds the split)
    out: str
    lmbda: float = 1000.0  # weight of the reconstruction against the rate (bits per image)
    rate_on: str = "visible"  # "visible": the official estimate; "all": what is coded
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-4
    # The factorized density's own parameters, and the encoder's final norm (its affine
    # weight is each channel's scale against the quantization step of 1, so it sets the
    # rate): at the adapter's 1e-4 a fresh bottleneck (CompressAI's init_scale 10) sheds
    # ~16 bits per image per step from ~67,000 on ViT-Tiny/8; at 1e-2 it fits the latent
    # within 50 steps (measured on EuroSAT).
    bottleneck_lr: float = 1e-2
    aux_lr: float = 1e-3
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    seed: int = SEED
    threads: int = 0

    def __post_init__(self) -> None:
        """Refuse settings that cannot work, naming the setting."""
        if self.bottleneck_lr <= 0 or self.aux_lr <= 0:
            raise InvalidInput("train nec: bottleneck and aux learning rates must be > 0")
        if self.rate_on not in ("visible", "all"):
            raise InvalidInput(f"train nec: --rate-on must be visible or all, got {self.rate_on!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lmbda <= 0 or self.lr <= 0:
            raise InvalidInput("train nec: epochs, batch size, lmbda and lr must be > 0")


def _is_adapter(name: str) -> bool:
    last_block = name.startswith("blocks.") and name.split(".")[1] == "_LAST_"
    return last_block or name.startswith(_ADAPTER_PREFIXES)


def _nec_from_mae(init: Path) -> tuple[nn.Module, dict]:
    state = _read_run(init, "an MAE pretraining")
    mae_args, weights = state["args"], state["model"]
    name = NEC_OF_MAE.get(mae_args.get("model"))
    if name is None:
        raise InvalidInput(
            f"--init {init}: model {mae_args.get('model')!r} has no NEC variant; "
            f"known: {sorted(NEC_OF_MAE)}"
        )
    model = create_model(name)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shapes of another architecture
        raise InvalidInput(f"--init {init}: does not fit {name!r}: {err}") from None
    if unexpected or any(not k.startswith("bottleneck.") for k in missing):
        raise InvalidInput(
            f"--init {init}: does not fit {name!r} (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]})"
        )
    last = str(len(model.blocks) - 1)
    for pname, p in model.named_parameters():
        p.requires_grad = _is_adapter(pname.replace(f"blocks.{last}.", "blocks._LAST_.", 1))
    return model, mae_args


@torch.no_grad()
def _rate_check(
    model, batches: _Batches, val: Decoded, cfg: NECConfig
) -> tuple[float, float, float]:
    """Validation reconstruction loss, estimated and really coded bits per image (all tokens)."""
    model.eval()
    gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, 999_983))
    model.bottleneck.update(force=True)
    recon = est = coded = 0.0
    for i in range(0, len(val.labels), cfg.batch_size):
        x = batches(val.images[i : i + cfg.batch_size], None)
        pred, mask, _ = model.forward_train(x, cfg.mask_ratio, gen, "visible")
        recon += float(model.masked_loss(x, pred, mask)) * len(x)
        _, likelihoods = model.bottleneck(model.latent(x).unsqueeze(-1))
        est += float(-torch.log2(likelihoods).sum())
        coded += 8.0 * sum(len(s) for s in model.compress(x)["strings"][0])
    n = len(val.labels)
    return recon / n, est / n, coded / n


def _nec_optimizers(model: nn.Module, cfg: NECConfig):
    """The NEC fine-tuning optimizers: main AdamW and the quantiles' Adam.

    The adapter trains at ``lr``; the density and the encoder's final norm at
    ``bottleneck_lr``; the quantiles at ``aux_lr``.
    """
    return rate_distortion_optimizers(
        model,
        lr=cfg.lr,
        density_lr=cfg.bottleneck_lr,
        aux_lr=cfg.aux_lr,
        weight_decay=cfg.weight_decay,
        density=("bottleneck.", "norm."),
        betas=(0.9, 0.95),
    )


class _NECTask(Task):
    """NEC fine-tuning as a :class:`~nec_models.loop.Task` (constant learning rates)."""

    name, log_fields = "nec", NEC_LOG_FIELDS

    def __init__(self, cfg: NECConfig):
        self.config = cfg

    def setup(self, resuming: bool) -> None:
        cfg, out, init = self.config, Path(self.config.out), Path(self.config.init)
        self.model, self.mae_args = _nec_from_mae(init)
        split_src = init.parent / "split.csv"
        if not split_src.exists():
            raise InvalidInput(f"--init {init}: no split.csv beside it (the pretraining's split)")
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "split.csv").exists():
            (out / "split.csv").write_bytes(split_src.read_bytes())
        self.train, self.val, self.info = _load_data(
            _config_of(dict(self.mae_args, out=str(out))), out
        )
        optimizer, aux_optimizer = _nec_optimizers(self.model, cfg)
        self.optimizers = {"optimizer": optimizer, "aux_optimizer": aux_optimizer}
        crop_scale = tuple(self.mae_args.get("crop_scale", (0.2, 1.0)))
        self.data = _Batches(self.model.img_size, crop_scale)
        self.steps = math.ceil(len(self.train.labels) / cfg.batch_size)

    def batches(self, gen: torch.Generator) -> Iterator[np.ndarray]:
        return _shuffled(len(self.train.labels), self.config.batch_size, gen)

    def train_step(self, batch: np.ndarray, gen: torch.Generator) -> Step:
        cfg = self.config
        x = self.data(self.train.images[batch], gen)
        pred, mask, bits = self.model.forward_train(x, cfg.mask_ratio, gen, cfg.rate_on)
        recon = self.model.masked_loss(x, pred, mask)
        loss = cfg.lmbda * recon + bits
        n = len(batch)
        return Step(
            loss,
            {
                "loss": float(loss.detach()) * n,
                "recon": float(recon.detach()) * n,
                "bits": float(bits.detach()) * n,
            },
        )

    def after_step(self) -> None:
        aux = self.optimizers["aux_optimizer"]
        aux.zero_grad(set_to_none=True)
        self.model.bottleneck.loss().backward()
        aux.step()

    def validate(self, epoch: int) -> dict:
        recon, est, coded = _rate_check(self.model, self.data, self.val, self.config)
        return {"recon": recon, "estimate": est, "coded": coded}

    def log_row(self, stats: EpochStats, val: dict) -> dict:
        n = len(self.train.labels)
        return {
            "epoch": stats.epoch,
            "train_loss": round(stats.sums["loss"] / n, 4),
            "train_recon": round(stats.sums["recon"] / n, 6),
            "train_bits": round(stats.sums["bits"] / n, 1),
            "val_recon": round(val["recon"], 6),
            "val_bits_estimate": round(val["estimate"], 1),
            "val_bits_coded": round(val["coded"], 1),
            "seconds": round(stats.seconds, 2),
        }

    def args(self) -> dict:
        return {
            **asdict(self.config),
            "model": NEC_OF_MAE[self.mae_args["model"]],
            "pretraining": self.mae_args,  # its data settings, for the heads trained on it
        }

    def finish(self, result: dict) -> dict:
        return {**result, **self.info}


def train_nec(cfg: NECConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune NEC from an MAE checkpoint: ``lmbda`` x reconstruction + bits per image.

    The adapter parameters train with AdamW at ``lr``; the bottleneck's density parameters
    and the encoder's final norm (the per-channel scale of the code) in the same AdamW at
    ``bottleneck_lr`` (no weight decay); the bottleneck's quantiles with their own Adam on
    the auxiliary loss every step. The split is the MAE run's (copied next to this run),
    so the test part stays untouched. Every epoch writes ``checkpoint.pth`` (official
    layout plus ``aux_optimizer``) and a ``log.csv`` row with the training-time rate
    estimate beside the size really coded on the validation images. With constant learning
    rates, a resume that adds epochs ends as a run of that many epochs from the start.
    """
    return run_task(_NECTask(cfg), resume=resume, progress=progress)


# ------------------------------------------------------------------------ classifier head

#: The classifier on each NEC model's decoded embeddings.
CLASSIFIER_OF_NEC = {
    "nec_vit_tiny_patch8": "nec_classifier_tiny_patch8",
    "nec_vit_pretrain_test": "nec_classifier_pretrain_test",
}
CLS_LOG_FIELDS = ("epoch", "train_loss", "train_top1", "val_top1", "seconds")


@dataclass(frozen=True)
class ClassifierConfig:
    """A classifier-head run on decoded embeddings; stored as ``args`` in its checkpoint."""

    init: str  # a NEC fine-tuning checkpoint (its folder holds the split)
    out: str
    with_decoder: bool = False
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = SEED
    threads: int = 0
    evaluate_test: bool = False  # the test split: only for the final numbers

    def __post_init__(self) -> None:
        """Refuse settings that cannot work, naming the setting."""
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise InvalidInput("train classifier: epochs, batch size and lr must be > 0")


def _read_run(path: Path, what: str) -> dict:
    """A trainer's checkpoint: a dict with ``args`` (a dict) and ``model``, or a clear error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.PickleError) as err:
        raise InvalidInput(f"--init {path}: not {what} checkpoint: {err}") from None
    if not (isinstance(state, dict) and isinstance(state.get("args"), dict) and "model" in state):
        raise InvalidInput(f"--init {path}: not {what} checkpoint (no args and model)")
    return state


@torch.no_grad()
def _decoded_embeddings(backbone, batches: _Batches, data: Decoded, batch_size: int) -> np.ndarray:
    """Embeddings as a consumer decodes them: latent -> symbols -> dequantized, once."""
    parts = []
    for i in range(0, len(data.labels), batch_size):
        x = batches(data.images[i : i + batch_size], None)
        parts.append(backbone.dequantize(backbone.symbols(backbone.latent(x))).numpy())
    return np.concatenate(parts)


def _top1(model, emb: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            logits = model.forward_embeddings(torch.from_numpy(emb[i : i + batch_size]))
            right += int((logits.argmax(-1).numpy() == labels[i : i + batch_size]).sum())
    return right / max(len(labels), 1)


class _ClassifierTask(Task):
    """The classifier head on decoded embeddings as a :class:`~nec_models.loop.Task`."""

    name, log_fields, best_by = "classifier", CLS_LOG_FIELDS, ("val_top1", "max")
    resume_free = frozenset({"evaluate_test"})

    def __init__(self, cfg: ClassifierConfig):
        self.config = cfg

    def _backbone(self) -> dict:
        """The NEC run's checkpoint; builds :attr:`model` with its frozen backbone."""
        cfg, init = self.config, Path(self.config.init)
        state = _read_run(init, "a NEC fine-tuning")
        nec_name = state["args"].get("model")
        if nec_name not in CLASSIFIER_OF_NEC:
            raise InvalidInput(
                f"--init {init}: model {nec_name!r} has no classifier; "
                f"known: {sorted(CLASSIFIER_OF_NEC)}"
            )
        self.model = create_model(CLASSIFIER_OF_NEC[nec_name], with_decoder=cfg.with_decoder)
        kept = set(self.model.backbone.state_dict())
        load_checkpoint(self.model.backbone, {k: v for k, v in state["model"].items() if k in kept})
        trainable = ("decoder_embed.", "decoder_blocks.0.") if cfg.with_decoder else ()
        for name, p in self.model.backbone.named_parameters():
            p.requires_grad = name.startswith(trainable)
        return state

    def setup(self, resuming: bool) -> None:
        cfg, out, init = self.config, Path(self.config.out), Path(self.config.init)
        state = self._backbone()
        split_src = init.parent / "split.csv"
        if not split_src.exists():
            raise InvalidInput(f"--init {init}: no split.csv beside it")
        out.mkdir(parents=True, exist_ok=True)
        (out / "split.csv").write_bytes(split_src.read_bytes())
        pretraining = state["args"].get("pretraining")
        if not isinstance(pretraining, dict):
            raise InvalidInput(f"--init {init}: its args name no pretraining run")
        self.nec_name, self.mae_like = state["args"]["model"], dict(pretraining, out=str(out))
        self.train, self.val, self.info = _load_data(_config_of(self.mae_like), out)
        self.data = _Batches(self.model.img_size, (1.0, 1.0))
        self.model.eval()
        self.emb = {
            "train": _decoded_embeddings(
                self.model.backbone, self.data, self.train, cfg.batch_size
            ),
            "val": _decoded_embeddings(self.model.backbone, self.data, self.val, cfg.batch_size),
        }
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizers = {
            "optimizer": torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        }
        self.loss_fn = nn.CrossEntropyLoss()
        self.steps = math.ceil(len(self.train.labels) / cfg.batch_size)

    def batches(self, gen: torch.Generator) -> Iterator[np.ndarray]:
        return _shuffled(len(self.train.labels), self.config.batch_size, gen)

    def train_step(self, batch: np.ndarray, gen: torch.Generator) -> Step:
        x = torch.from_numpy(self.emb["train"][batch])
        y = torch.from_numpy(self.train.labels[batch])
        logits = self.model.forward_embeddings(x)
        loss = self.loss_fn(logits, y)
        right = int((logits.argmax(-1) == y).sum())
        return Step(loss, {"loss": float(loss.detach()) * len(batch), "right": right})

    def validate(self, epoch: int) -> dict:
        bs = self.config.batch_size
        return {"val_top1": _top1(self.model, self.emb["val"], self.val.labels, bs)}

    def log_row(self, stats: EpochStats, val: dict) -> dict:
        n = len(self.train.labels)
        return {
            "epoch": stats.epoch,
            "train_loss": round(stats.sums["loss"] / n, 5),
            "train_top1": round(stats.sums["right"] / n, 4),
            "val_top1": round(val["val_top1"], 4),
            "seconds": round(stats.seconds, 2),
        }

    def args(self) -> dict:
        return {
            **asdict(self.config),
            "model": CLASSIFIER_OF_NEC[self.nec_name],
            "num_classes": len(CLASSES),
            "class_names": list(CLASSES),
            "nec_init_sha256": sha256_file(self.config.init),
        }

    def finish(self, result: dict) -> dict:
        result = {**result, **self.info}
        if self.config.evaluate_test:
            cfg, out = self.config, Path(self.config.out)
            split = read_split(out / "split.csv")
            test = decode(self.mae_like["data"], split["test"], out / "cache" / "test")
            emb = _decoded_embeddings(self.model.backbone, self.data, test, cfg.batch_size)
            result["test_top1"] = round(_top1(self.model, emb, test.labels, cfg.batch_size), 4)
        return result


def train_classifier(cfg: ClassifierConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train the attention-pooling head on decoded embeddings, the NEC model frozen.

    The encoder, its final norm and the bottleneck never change (the official code leaves
    the norm trainable, which would change the transmitted code); with ``with_decoder`` the
    first decoder block trains with the head. The embeddings of the split's images are
    decoded once, exactly as a consumer decodes a container, and cached. Top-1 is reported
    on validation every epoch and on the test split only with ``evaluate_test``. Every
    epoch writes ``checkpoint.pth`` and a ``log.csv`` row; ``resume`` continues a run.
    """
    return run_task(_ClassifierTask(cfg), resume=resume, progress=progress)
