"""The one training loop (:func:`fit`) and the pieces it is made of.

Every trainer (:mod:`nec_models.train`, :mod:`nec_models.train_rvq`, the consumers of
``benchmarks/bench_rate.py``) is a small :class:`Task`; :func:`fit` owns what they share:
the seed, resume (refused when the config differs in a field that matters), the
learning-rate schedule step, the epochs with their progress bar, the divergence stop, the
atomic checkpoint after every epoch (model, optimizers, scheduler, the generators' states,
epoch, config, metrics) and the CSV log. An epoch's generators are seeded by
``(seed, epoch)``, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nec_models.checkpoint import load_checkpoint, read_checkpoint
from nec_serve.errors import InvalidInput, NecError

__all__ = [
    "CHECKPOINT",
    "LOG",
    "RESUME_FREE",
    "SEED",
    "EpochStats",
    "Step",
    "Task",
    "TrainingDiverged",
    "append_log",
    "epoch_seed",
    "fit",
    "run_task",
    "open_run",
    "rate_distortion_optimizers",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "stop_if_diverged",
]

SEED = 0
"""The default seed of every trainer."""


class TrainingDiverged(NecError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's generators: the same whether or not the run was interrupted."""
    return seed * 1_000_003 + epoch


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a failure leaves the previous file as it was."""
    tmp = path.with_name(f".{path.name}.part")
    torch.save(state, tmp)
    os.replace(tmp, path)


def append_log(path: Path, row: dict, names: tuple[str, ...]) -> None:
    """Append ``row`` to the CSV log at ``path``, writing the header ``names`` first if new."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        if new:
            writer.writeheader()
        writer.writerow(row)


def stop_if_diverged(
    loss: torch.Tensor,
    *,
    task: str,
    epoch: int,
    step: int,
    checkpoint: Path,
    knob: str,
) -> None:
    """Raise :class:`TrainingDiverged` if ``loss`` is NaN or infinite, in the one message form.

    Args:
        loss: the batch's loss.
        task: the trainer's name in the message (``mae``, ``nec``, ...).
        epoch: the current epoch, counted from 0.
        step: the step within the epoch.
        checkpoint: where the trainer writes its checkpoint; when it is on disk, it holds
            the epoch before ``epoch`` (trainers save after each epoch and refuse to start
            over an existing one).
        knob: the flag to lower (``--lr``, ``--blr``).
    """
    if torch.isfinite(loss):
        return
    kept = epoch - 1 if epoch and Path(checkpoint).is_file() else None
    where = f"epoch {kept} is kept at {checkpoint}" if kept is not None else "none was written"
    raise TrainingDiverged(
        f"train {task}: the loss is {float(loss.detach())} at epoch {epoch}, step {step}: "
        f"stopped; the checkpoint of the last good {where}; lower {knob}"
    )


# ------------------------------------------------------------------------ the one loop

CHECKPOINT = "checkpoint.pth"
LOG = "log.csv"
#: Config fields a resume may change: where the run is, how many threads run it, and how
#: many epochs it has (a schedule over epochs follows the new count from then on).
RESUME_FREE = frozenset({"out", "threads", "epochs"})


@dataclass
class Step:
    """What one training step gives the loop.

    Attributes:
        loss: the loss to minimise (the loop checks it, back-propagates and steps).
        sums: values to add up over the epoch (already weighted as the task wants).
    """

    loss: torch.Tensor
    sums: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EpochStats:
    """One finished epoch, as the loop saw it: the task turns it into a log row."""

    epoch: int
    sums: dict[str, float]
    steps: int
    lr: float  # the last step's (of the main optimizer's first group)
    seconds: float


class Task:
    """A training task that :func:`fit` runs (torchgeo's ``BaseTask``, made small).

    A task sets :attr:`config` (a dataclass, compared on resume), :attr:`name` and
    :attr:`knob` (for messages) and :attr:`log_fields`; :meth:`setup` builds
    :attr:`model` and :attr:`optimizers` (the loss trains ``optimizers["optimizer"]``; the
    others, e.g. ``aux_optimizer``, are stepped by :meth:`after_step`), and optionally
    :attr:`scheduler` (a torch scheduler stepped after every step). The rest has defaults.
    """

    name = "task"
    knob = "--lr"
    log_fields: tuple[str, ...] = ()
    #: Config fields, beyond :data:`RESUME_FREE`, that a resume may change.
    resume_free: frozenset[str] = frozenset()
    #: ``(log column, "min" or "max")``: the checkpoint records the best epoch by it.
    best_by: tuple[str, str] | None = None
    config: Any = None
    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    scheduler: Any = None
    steps: int = 1
    ckpt: Path  # set by fit: where the checkpoint goes

    def setup(self, resuming: bool) -> None:
        """Build data, :attr:`model`, :attr:`optimizers` and :attr:`steps` (seeded already).

        With ``resuming``, the loop loads the checkpoint's states into them afterwards.
        """
        raise NotImplementedError

    def batches(self, gen: torch.Generator) -> Iterator[Any]:
        """One epoch's :attr:`steps` batches; ``gen`` is seeded by ``(seed, epoch)``."""
        raise NotImplementedError

    def train_step(self, batch: Any, gen: torch.Generator) -> Step:
        """The loss of one batch (the loop back-propagates and steps)."""
        raise NotImplementedError

    def lr_at(self, t: float) -> float | None:
        """The learning rate of every group at fractional epoch ``t``; None: left as is."""
        return None

    def after_step(self) -> None:
        """Runs after each optimizer step (an auxiliary optimizer's step, say)."""

    def validate(self, epoch: int) -> dict:
        """Validation values of the epoch (the model is in eval mode)."""
        return {}

    def log_row(self, stats: EpochStats, val: dict) -> dict:
        """The epoch's ``log.csv`` row (columns :attr:`log_fields`)."""
        raise NotImplementedError

    def args(self) -> dict:
        """The checkpoint's ``args``: the config, plus what readers of the run need."""
        return asdict(self.config)

    def finish(self, result: dict) -> dict:
        """The run's result, from the loop's (``epochs_run``, ``last_epoch``, the last row)."""
        return result


def seed_everything(seed: int) -> None:
    """Seed every generator the trainers use: torch's, NumPy's and Python's."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict:
    """The global generators' states, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss_next))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def open_run(ckpt: Path, task: Task, resume: bool) -> dict | None:
    """The checkpoint to resume from, or None to start; refuses what cannot be resumed.

    Raises:
        InvalidInput: a checkpoint without ``resume``, ``resume`` without a checkpoint, or
            a checkpoint whose config differs in a field that matters (named).
        CheckpointMismatch: a checkpoint that cannot be read.
    """
    if not resume:
        if ckpt.exists():
            raise InvalidInput(f"{ckpt} exists: pass --resume, or choose another --out")
        return None
    if not ckpt.exists():
        raise InvalidInput(f"--resume: no checkpoint at {ckpt}")
    state = dict(read_checkpoint(ckpt))  # an unreadable file: CheckpointMismatch, named
    saved, free = state.get("args", {}), RESUME_FREE | task.resume_free
    for f in fields(task.config):
        if f.name in free or f.name not in saved:
            continue
        old, new = saved[f.name], getattr(task.config, f.name)
        if _same(old, new):
            continue
        if f.name == "model":
            raise InvalidInput(f"--resume: {ckpt} is a {old!r} run, not {new!r}")
        raise InvalidInput(
            f"--resume: {ckpt} was run with {f.name} = {old!r}, not {new!r}: resume with "
            f"the same {f.name}, or choose another --out"
        )
    return state


def _restore(task: Task, state: dict) -> None:
    load_checkpoint(task.model, state)  # sizes entropy tables' buffers, unlike torch
    for key, optimizer in task.optimizers.items():
        optimizer.load_state_dict(state[key])
    if task.scheduler is not None:
        task.scheduler.load_state_dict(state["scheduler"])
    if "rng" in state:
        set_rng_state(state["rng"])


def _better(task: Task, row: dict, best: dict | None) -> bool:
    if task.best_by is None:
        return False
    column, mode = task.best_by
    if best is None:
        return True
    value, kept = float(row[column]), float(best[column])
    return value < kept if mode == "min" else value > kept


def _train_epoch(
    task: Task, epoch: int, seed: int, epochs: int, progress: bool
) -> tuple[dict[str, float], float]:
    """One epoch's steps, from generators seeded by ``(seed, epoch)``: (sums, last lr)."""
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    torch.manual_seed(epoch_seed(seed, epoch))  # noise that modules draw (the bottleneck's)
    optimizer = task.optimizers["optimizer"]
    task.model.train()
    sums: dict[str, float] = {}
    lr = None
    bar = tqdm(
        task.batches(gen),
        total=task.steps,
        desc=f"{task.name} {epoch + 1}/{epochs}",
        disable=not progress,
    )
    for step, batch in enumerate(bar):
        lr = task.lr_at(epoch + step / task.steps)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        out = task.train_step(batch, gen)
        stop_if_diverged(
            out.loss, task=task.name, epoch=epoch, step=step, checkpoint=task.ckpt, knob=task.knob
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if task.scheduler is not None:
            task.scheduler.step()
        task.after_step()
        for key, value in out.sums.items():
            sums[key] = sums.get(key, 0.0) + value
        bar.set_postfix(loss=f"{float(out.loss.detach()):.4g}")
    if lr is None:
        lr = optimizer.param_groups[0]["lr"]
    return sums, lr


def rate_distortion_optimizers(
    model: nn.Module,
    *,
    lr: float,
    density_lr: float,
    aux_lr: float,
    weight_decay: float,
    density: tuple[str, ...],
    betas: tuple[float, float] = (0.9, 0.999),
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """An entropy-bottleneck model's optimizers: the main AdamW and the quantiles' Adam.

    Trainable parameters whose names start with one of ``density`` (the bottleneck's
    density and what trains beside it) go at ``density_lr`` without weight decay, the rest
    at ``lr``; the bottleneck's quantiles (CompressAI's auxiliary loss) at ``aux_lr``.
    """
    aux = [p for n, p in model.named_parameters() if n.endswith("quantiles")]
    dens, rest = [], []
    for n, p in model.named_parameters():
        if p.requires_grad and not n.endswith("quantiles"):
            (dens if n.startswith(density) else rest).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": rest}, {"params": dens, "lr": density_lr, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        weight_decay=weight_decay,
    )
    return optimizer, torch.optim.Adam(aux, lr=aux_lr)


def run_task(task: Task, *, resume: bool = False, progress: bool = True) -> dict:
    """:func:`fit` with the run folder, epochs, seed and threads of ``task.config``.

    What every trainer's public function does (``train_mae``, ``train_rvq``, ...): its
    config dataclass has ``out``, ``epochs``, ``seed`` and ``threads``.
    """
    cfg = task.config
    return fit(
        task,
        out=cfg.out,
        epochs=cfg.epochs,
        seed=cfg.seed,
        threads=cfg.threads,
        resume=resume,
        progress=progress,
    )


def fit(
    task: Task,
    *,
    out: str | Path | None,
    epochs: int,
    seed: int = SEED,
    threads: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Run ``task`` for ``epochs`` epochs: the one training loop of every trainer.

    With ``out``, every epoch ends with an atomic ``<out>/checkpoint.pth`` (the model, each
    optimizer, the scheduler, the global generators' states, the epoch, the config as
    ``args``, the epoch's row as ``metrics`` and the best row as ``best``) and a row in
    ``<out>/log.csv``; ``resume`` continues after the checkpoint's epoch and ends with the
    same weights as an uninterrupted run, since each epoch's generators are seeded by
    ``(seed, epoch)``. Without ``out`` (benchmarks), nothing is written and no resume.

    Returns:
        ``task.finish`` of ``{"epochs_run", "last_epoch", "checkpoint", ...the last row}``.

    Raises:
        InvalidInput: a run that cannot start or resume (see :func:`open_run`).
        TrainingDiverged: a non-finite loss; the last good checkpoint is kept.
    """
    folder = Path(out) if out is not None else None
    task.ckpt = folder / CHECKPOINT if folder is not None else Path(os.devnull)
    state = open_run(task.ckpt, task, resume) if folder is not None else None
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    task.setup(resuming=state is not None)
    start, best = 0, None
    if state is not None:
        _restore(task, state)
        start, best = int(state["epoch"]) + 1, state.get("best")
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    result = {"epochs_run": 0, "last_epoch": start - 1}
    if folder is not None:
        result["checkpoint"] = str(task.ckpt)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        sums, lr = _train_epoch(task, epoch, seed, epochs, progress)
        task.model.eval()
        val = task.validate(epoch)
        stats = EpochStats(epoch, sums, task.steps, lr, time.perf_counter() - t0)
        row = task.log_row(stats, val)
        best = dict(row) if _better(task, row, best) else best
        if folder is not None:
            _save(task, epoch, lr, row, best)
            append_log(folder / LOG, row, task.log_fields)
        result.update(epochs_run=result["epochs_run"] + 1, last_epoch=epoch, **row)
    return task.finish(result)


def _save(task: Task, epoch: int, lr: float, row: dict, best: dict | None) -> None:
    state = {
        "model": task.model.state_dict(),
        **{key: opt.state_dict() for key, opt in task.optimizers.items()},
        "epoch": epoch,
        "scaler": None,  # CPU float32: no loss scaling
        "args": task.args(),
        "lr": lr,
        "rng": rng_state(),
        "metrics": row,
        "best": best,
    }
    if task.scheduler is not None:
        state["scheduler"] = task.scheduler.state_dict()
    save_checkpoint(task.ckpt, state)
