"""Pieces every trainer shares: the seed, atomic checkpoints, the CSV log, the divergence stop.

This is the first step towards one training loop (issue 21, item 2): the trainers in
:mod:`nec_models.train` and :mod:`nec_models.train_rvq` use these public names instead of
each other's private helpers.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from nec_serve.errors import NecError

__all__ = [
    "SEED",
    "TrainingDiverged",
    "append_log",
    "epoch_seed",
    "save_checkpoint",
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
        f"train {task}: the loss is {float(loss)} at epoch {epoch}, step {step}: "
        f"stopped; the checkpoint of the last good {where}; lower {knob}"
    )
