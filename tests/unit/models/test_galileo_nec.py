"""NEC on Galileo: shapes, what trains and what stays frozen, quantisation, the trainer."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

from nec_models import create_model
from nec_models.eurosat import CLASSES
from nec_models.galileo import load_galileo_nano
from nec_models.galileo_nec import GalileoNEC
from nec_models.train_galileo_nec import (
    GalileoNECConfig,
    _optimizers,
    train_galileo_nec,
)
from nec_serve.errors import InvalidInput


def _raw(n: int, bands: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, bands, size, size, generator=gen) * 3000


@pytest.fixture()
def tiny() -> GalileoNEC:
    torch.manual_seed(0)
    return create_model("galileo_nec_test")


def test_shapes_of_the_test_and_ten_band_variants(tiny):
    tokens, likelihoods = tiny(_raw(2))
    assert tiny.num_tokens == 64 and tiny.embed_dim == 32
    assert tokens.shape == (2, 64, 32) and likelihoods.shape == (2, 32, 64, 1)
    assert tiny.latent(_raw(2)).shape == (2, 32, 64)
    ten = create_model("galileo_nec_test", bands=10)
    assert ten.num_tokens == 320 and ten(_raw(1, bands=10))[0].shape == (1, 320, 32)


def test_nano_starts_as_the_pretrained_encoder():
    model = create_model("galileo_nec_nano")
    x = _raw(2)
    with torch.no_grad():
        target = model.target(x)
        want = load_galileo_nano()(x, patch_size=8)
        adapted = model.latent(x).transpose(1, 2) / model.gain()
    assert target.shape == (2, 64, 128) and torch.equal(target, want)
    # The adapter is a copy of the last block and the norm: before training it agrees.
    torch.testing.assert_close(adapted, target, rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.25e6


def test_a_training_step_changes_the_adapter_and_bottleneck_only(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    optimizer, aux = _optimizers(tiny, GalileoNECConfig(data="-", out="-"))
    tiny.train()
    assert not tiny.backbone.training
    distortion, bits = tiny.loss_terms(_raw(4))
    (1e3 * distortion + bits).backward()
    optimizer.step()
    tiny.bottleneck.loss().backward()
    aux.step()
    after = tiny.state_dict()
    frozen = [k for k in before if k.startswith("backbone.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(p.grad is None for p in tiny.backbone.parameters())
    for prefix in ("blocks.0.", "norm.", "log_gain", "bottleneck.matrices", "bottleneck.quantiles"):
        keys = [k for k in before if k.startswith(prefix)]
        assert keys and any(not torch.equal(before[k], after[k]) for k in keys), prefix


def test_eval_symbols_are_integers_and_dequantize_as_nec_does(tiny):
    with torch.no_grad():
        tiny.bottleneck.quantiles[:, 0, 1] = torch.linspace(-0.4, 0.6, tiny.embed_dim)
    tiny.eval()
    x = _raw(3)
    with torch.no_grad():
        latent = tiny.latent(x)
        symbols = tiny.symbols(latent)
        tokens, _ = tiny(x)
    med = tiny.medians()[None, :, None]
    assert symbols.dtype == torch.int32 and symbols.shape == (3, 32, 64)
    assert torch.equal(tiny.dequantize_latent(symbols), torch.round(latent - med) + med)
    assert torch.equal(tokens, tiny.dequantize(symbols))  # what forward decodes in eval
    torch.testing.assert_close(
        tiny.dequantize(symbols) * tiny.gain(), (torch.round(latent - med) + med).transpose(1, 2)
    )


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, 32, 32), "expected raw bands"),
        ((1, 10, 64, 64), "expected raw bands"),
        ((3, 64, 64), "expected raw bands"),
    ],
)
def test_bad_input_is_refused(tiny, shape, message):
    with pytest.raises(InvalidInput, match=message):
        tiny(torch.zeros(shape))


def test_nan_and_bad_settings_are_refused(tiny):
    x = _raw(1)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInput, match="NaN"):
        tiny(x)
    backbone = create_model("galileo_test")
    for kwargs, message in [
        ({"adapter_blocks": 2}, "adapter_blocks"),
        ({"bands": 4}, "bands"),
        ({"img_size": 60}, "multiple of patch_size"),
        ({"init_gain": 0.0}, "init_gain"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            GalileoNEC(backbone, **kwargs)
    for field, value in [("lmbda", 0.0), ("epochs", 0), ("max_items", -1)]:
        with pytest.raises(InvalidInput, match=field):
            GalileoNECConfig(data="-", out="-", **{field: value})


# ------------------------------------------------------------------------ the trainer


@pytest.fixture(scope="module")
def sample_split(eurosat, tmp_path_factory):
    """A split of the sample images: 3 a class to train, 1 to validate, 1 never read."""
    path = tmp_path_factory.mktemp("split") / "split.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for name in CLASSES:
            files = sorted((eurosat / name).glob("*.jpg"))[:5]
            for file, part in zip(files, ["train"] * 3 + ["val", "test"], strict=True):
                writer.writerow([f"{name}/{file.name}", name, part])
    return path


def _cfg(eurosat, split, out, epochs, **kw) -> GalileoNECConfig:
    return GalileoNECConfig(
        data=str(eurosat),
        out=str(out),
        model="galileo_nec_test",
        split=str(split),
        lmbda=1e4,
        epochs=epochs,
        batch_size=8,
        threads=1,
        **kw,
    )


def test_training_writes_a_checkpoint_and_resumes_exactly(eurosat, sample_split, tmp_path):
    straight = train_galileo_nec(_cfg(eurosat, sample_split, tmp_path / "a", 2), progress=False)
    assert straight["split"] == {"train": 30, "val": 10} and straight["epochs_run"] == 2
    assert straight["val_bits_coded"] > 0 and straight["val_bits_estimate"] > 0
    # The coder's size follows the estimate; after 8 steps the quantiles are still far
    # from fitted, so values beyond them take the coder's costly bypass.
    assert 0.5 < straight["val_bits_coded"] / straight["val_bits_estimate"] < 2
    train_galileo_nec(_cfg(eurosat, sample_split, tmp_path / "b", 1), progress=False)
    resumed = train_galileo_nec(
        _cfg(eurosat, sample_split, tmp_path / "b", 2), resume=True, progress=False
    )
    assert resumed["epochs_run"] == 1
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert a["args"]["model"] == "galileo_nec_test" and a["epoch"] == 1
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    logs = [(tmp_path / r / "log.csv").read_text().splitlines() for r in "ab"]
    strip = [[row.rsplit(",", 1)[0] for row in log] for log in logs]  # not the seconds
    assert strip[0] == strip[1] and strip[0][0].startswith("epoch,train_loss,train_distortion")
    cfg = dataclasses.replace(_cfg(eurosat, sample_split, tmp_path / "b", 3), lmbda=5.0)
    with pytest.raises(InvalidInput, match="lmbda"):
        train_galileo_nec(cfg, resume=True, progress=False)


def test_the_trainer_refuses_a_model_it_cannot_train(eurosat, sample_split, tmp_path):
    cfg = dataclasses.replace(_cfg(eurosat, sample_split, tmp_path, 1), model="galileo_test")
    with pytest.raises(InvalidInput, match="not an RGB GalileoNEC"):
        train_galileo_nec(cfg, progress=False)
    cfg = dataclasses.replace(cfg, model="galileo_nec_test", split=str(tmp_path / "none.csv"))
    with pytest.raises(InvalidInput, match="no split file"):
        train_galileo_nec(cfg, progress=False)


def test_the_cli_trains_it(eurosat, sample_split, tmp_path, capsys):
    from nec_cli.main import main

    out = tmp_path / "run"
    argv = ["train", "galileo_nec", "--data", str(eurosat), "--out", str(out), "--split"]
    argv += [str(sample_split), "--model", "galileo_nec_test", "--lmbda", "300", "--epochs", "1"]
    assert main([*argv, "--max-items", "1", "--batch-size", "8", "--threads", "1", "-q"]) == 0
    args = torch.load(out / "checkpoint.pth", weights_only=True)["args"]
    assert (args["lmbda"], args["max_items"], args["model"]) == (300.0, 1, "galileo_nec_test")
    assert '"val_bits_coded"' in capsys.readouterr().out
