"""The one training loop and its pieces: atomic checkpoints, the CSV log, exact resume,
resume refused on another config, the divergence stop."""

from __future__ import annotations

import dataclasses
import random
from unittest.mock import patch

import numpy as np
import pytest
import torch

from nec_models.loop import (
    EpochStats,
    Step,
    Task,
    TrainingDiverged,
    append_log,
    epoch_seed,
    fit,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from nec_serve.errors import InvalidInput


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"epoch": 1})

    def broken(state, f):
        open(f, "wb").write(b"half")
        raise OSError("disk full")

    with patch("nec_models.loop.torch.save", broken), pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2})
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_log_writes_its_header_once(tmp_path):
    path = tmp_path / "log.csv"
    append_log(path, {"epoch": 0, "loss": 1.5}, ("epoch", "loss"))
    append_log(path, {"epoch": 1, "loss": 0.5}, ("epoch", "loss"))
    assert path.read_text().splitlines() == ["epoch,loss", "0,1.5", "1,0.5"]


def test_epoch_seeds_differ_by_epoch():
    assert epoch_seed(0, 1) != epoch_seed(0, 2) and epoch_seed(1, 0) == 1_000_003


def test_divergence_names_the_loss_step_and_checkpoint(tmp_path):
    from nec_models.loop import stop_if_diverged

    ckpt = tmp_path / "checkpoint.pth"
    stop_if_diverged(torch.tensor(1.0), task="t", epoch=0, step=0, checkpoint=ckpt, knob="--lr")
    with pytest.raises(TrainingDiverged, match=r"at epoch 2, step 5: .*none was written"):
        stop_if_diverged(
            torch.tensor(float("nan")), task="t", epoch=2, step=5, checkpoint=ckpt, knob="--lr"
        )
    ckpt.write_bytes(b"epoch 1")
    with pytest.raises(
        TrainingDiverged, match=r"train t: the loss is inf at epoch 2, step 5: .*epoch 1 is kept"
    ):
        stop_if_diverged(
            torch.tensor(float("inf")),
            task="t",
            epoch=2,
            step=5,
            checkpoint=ckpt,
            knob="--lr",
        )


# ------------------------------------------------------------------------ the loop itself


@dataclasses.dataclass(frozen=True)
class _Config:
    out: str
    epochs: int = 2
    lr: float = 0.1
    threads: int = 0


class _Linear(Task):
    """A linear regression with a schedule, a scheduler and noise from every generator."""

    name, log_fields, best_by = "toy", ("epoch", "train_loss", "lr"), ("train_loss", "min")
    steps = 3

    def __init__(self, cfg: _Config, explode_at: int | None = None):
        self.config, self.explode_at, self.calls = cfg, explode_at, 0

    def setup(self, resuming: bool) -> None:
        self.model = torch.nn.Linear(4, 1)
        self.optimizers = {"optimizer": torch.optim.SGD(self.model.parameters(), lr=1.0)}
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizers["optimizer"], 2, 0.5)

    def lr_at(self, t: float) -> float:
        return self.config.lr / (1 + t)

    def batches(self, gen):
        for _ in range(self.steps):
            yield torch.randn(8, 4, generator=gen)

    def train_step(self, x, gen) -> Step:
        self.calls += 1
        noise = torch.randn(8, 1) + float(np.random.rand()) + random.random()
        loss = (self.model(x) - x.sum(1, keepdim=True) - noise).pow(2).mean()
        if self.calls == self.explode_at:
            loss = loss * float("nan")
        return Step(loss, {"loss": float(loss.detach())})

    def log_row(self, stats: EpochStats, val: dict) -> dict:
        return {"epoch": stats.epoch, "train_loss": stats.sums["loss"] / 3, "lr": stats.lr}


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    fit(_Linear(_Config(str(tmp_path / "a"), epochs=3)), out=tmp_path / "a", epochs=3)
    b = _Config(str(tmp_path / "b"), epochs=3)
    with pytest.raises(TrainingDiverged):  # a kill in epoch 1, before its checkpoint
        fit(_Linear(b, explode_at=5), out=tmp_path / "b", epochs=3, progress=False)
    task = _Linear(b)
    result = fit(task, out=tmp_path / "b", epochs=3, resume=True, progress=False)
    assert (result["epochs_run"], result["last_epoch"], task.calls) == (2, 2, 6)
    sa, sb = (
        torch.load(p / "checkpoint.pth", weights_only=True)
        for p in (tmp_path / "a", tmp_path / "b")
    )
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    assert sa["scheduler"] == sb["scheduler"] and sa["best"] == sb["best"]
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    log = [(p / "log.csv").read_text() for p in (tmp_path / "a", tmp_path / "b")]
    assert log[0] == log[1] and len(log[0].splitlines()) == 4


def test_resume_is_refused_naming_what_differs(tmp_path):
    fit(_Linear(_Config(str(tmp_path))), out=tmp_path, epochs=2, progress=False)
    with pytest.raises(InvalidInput, match="exists: pass --resume"):
        fit(_Linear(_Config(str(tmp_path))), out=tmp_path, epochs=2, progress=False)
    with pytest.raises(InvalidInput, match=r"was run with lr = 0.1, not 0.2: resume with the same"):
        fit(_Linear(_Config(str(tmp_path), lr=0.2)), out=tmp_path, epochs=2, resume=True)
    with pytest.raises(InvalidInput, match="--resume: no checkpoint at"):
        fit(_Linear(_Config(str(tmp_path / "none"))), out=tmp_path / "none", epochs=2, resume=True)
    other = _Config(str(tmp_path / "moved"), threads=1)  # where and how fast: free
    assert fit(_Linear(other), out=tmp_path, epochs=2, resume=True)["epochs_run"] == 0


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    cfg = _Config(str(tmp_path), epochs=3)
    with pytest.raises(
        TrainingDiverged, match=r"train toy: the loss is nan at epoch 2, step 1: .*epoch 1 is kept"
    ):
        fit(_Linear(cfg, explode_at=8), out=tmp_path, epochs=3, progress=False)
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1 and state["metrics"]["epoch"] == 1
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 3


def test_without_a_folder_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = _Linear(_Config(""))
    result = fit(task, out=None, epochs=2, progress=False)
    assert result == {"epochs_run": 2, "last_epoch": 1, **result} and "checkpoint" not in result
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TrainingDiverged, match="none was written"):
        fit(_Linear(_Config(""), explode_at=1), out=None, epochs=2, progress=False)


def test_generator_states_round_trip_through_a_checkpoint(tmp_path):
    seed_everything(3)
    save_checkpoint(tmp_path / "c.pth", {"rng": rng_state()})
    expected = (torch.rand(2), np.random.rand(2), random.random())
    set_rng_state(torch.load(tmp_path / "c.pth", weights_only=True)["rng"])
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(expected[0], got[0]) and (expected[1] == got[1]).all()
    assert expected[2] == got[2]
