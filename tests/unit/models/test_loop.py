"""The shared training pieces: atomic checkpoints and the CSV log."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch

from nec_models.loop import append_log, epoch_seed, save_checkpoint


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
    from nec_models.loop import TrainingDiverged, stop_if_diverged

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
