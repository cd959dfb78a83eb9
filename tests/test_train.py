"""MAE pretraining on real EuroSAT patches, a few seconds of it: the loss goes down, a
checkpoint is in the official layout and loads, an interrupted run resumes to the same
weights, a diverging run stops and keeps its last good checkpoint, bad input is refused."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch

from nec_models import create_model, load_checkpoint
from nec_models.train import MAEConfig, TrainingDiverged, _Batches, train_mae
from nec_serve.errors import InvalidInput


@pytest.fixture(scope="module")
def eurosat(data_dir):
    root = data_dir / "eurosat_rgb"
    if not root.exists():
        pytest.skip("no eurosat_rgb in the sample data")
    return root


def _config(eurosat, out, **kw) -> MAEConfig:
    base = dict(
        data=str(eurosat),
        out=str(out),
        model="mae_vit_pretrain_test",
        epochs=4,
        batch_size=8,
        blr=1e-2,
        warmup_epochs=1,
        max_items=10,  # 10 real patches a class: 80 train, 10 val, 10 test
        threads=1,
    )
    return MAEConfig(**{**base, **kw})


def test_the_loss_goes_down_and_the_checkpoint_is_official(eurosat, tmp_path):
    cfg = _config(eurosat, tmp_path / "run", epochs=6)
    result = train_mae(cfg, progress=False)
    assert result["split"] == {"train": 80, "val": 10, "test": 10} and result["skipped"] == 0
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss,val_loss,lr,seconds,images_per_s" and len(rows) == 7
    train = [float(r.split(",")[1]) for r in rows[1:]]
    val = [float(r.split(",")[2]) for r in rows[1:]]
    assert train[-1] < 0.8 * train[0] and val[-1] < val[0], (train, val)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "epoch", "scaler", "args"} and ckpt["epoch"] == 5
    model = load_checkpoint(create_model(cfg.model), tmp_path / "run" / "checkpoint.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key


def test_an_interrupted_run_resumes_to_the_same_weights(eurosat, tmp_path):
    straight = _config(eurosat, tmp_path / "straight")
    train_mae(straight, progress=False)
    broken = _config(eurosat, tmp_path / "broken")
    real, calls = _Batches.__call__, []

    def killed(self, images, gen):  # the process dies in the middle of epoch 2
        calls.append(1)
        if len(calls) == 2 * 12 + 3:  # 10 train + 2 validation batches an epoch
            raise KeyboardInterrupt
        return real(self, images, gen)

    with patch.object(_Batches, "__call__", killed), pytest.raises(KeyboardInterrupt):
        train_mae(broken, progress=False)
    assert torch.load(tmp_path / "broken" / "checkpoint.pth", weights_only=True)["epoch"] == 1
    result = train_mae(broken, resume=True, progress=False)
    assert result["epochs_run"] == 2 and result["last_epoch"] == 3
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "broken" / "checkpoint.pth", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    log = (tmp_path / "broken" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in log[1:]] == ["0", "1", "2", "3"]
    assert train_mae(broken, resume=True, progress=False)["epochs_run"] == 0  # already done


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(eurosat, tmp_path):
    cfg = _config(eurosat, tmp_path / "run")
    real = type(create_model(cfg.model)).masked_loss
    calls = []

    def explode(self, *args, **kw):
        calls.append(1)
        loss = real(self, *args, **kw)
        return loss * float("nan") if len(calls) > 12 else loss

    with patch.object(type(create_model(cfg.model)), "masked_loss", explode):
        with pytest.raises(TrainingDiverged, match="loss is nan at epoch 1.*epoch 0 is kept"):
            train_mae(cfg, progress=False)
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["epoch"] == 0


def test_bad_runs_are_refused(eurosat, tmp_path):
    with pytest.raises(InvalidInput, match="no checkpoint"):
        train_mae(_config(eurosat, tmp_path / "none"), resume=True, progress=False)
    train_mae(_config(eurosat, tmp_path / "run", epochs=1), progress=False)
    with pytest.raises(InvalidInput, match="exists: pass --resume"):
        train_mae(_config(eurosat, tmp_path / "run", epochs=1), progress=False)
    other = _config(eurosat, tmp_path / "run", model="mae_vit_tiny_patch8")
    with pytest.raises(InvalidInput, match="is a 'mae_vit_pretrain_test' run"):
        train_mae(other, resume=True, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no images"):
        train_mae(_config(tmp_path / "empty", tmp_path / "e"), progress=False)
    with pytest.raises(InvalidInput, match="the val split .* is empty"):
        train_mae(_config(eurosat, tmp_path / "few", max_items=3), progress=False)
    with pytest.raises(InvalidInput, match="mask_ratio"):
        _config(eurosat, tmp_path / "x", mask_ratio=1.0)
