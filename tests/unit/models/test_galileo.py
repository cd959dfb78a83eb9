"""Galileo-nano: the shipped weights, shapes, tokens against the publisher's, input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from support import ROOT

from nec_models import create_model
from nec_models.galileo import (
    GALILEO_DIR,
    IGNORED_KEYS,
    NANO_SHA256,
    S2_GROUPS,
    GalileoEncoder,
    _sincos,
    eurosat_rgb_to_raw,
    load_galileo_nano,
    normalise,
)
from nec_serve.errors import CheckpointMismatch, InvalidInput
from nec_serve.hashing import sha256_file
from nec_serve.imagery import read_raster

#: The publisher's tokens on two sample images (scripts/check_galileo.py --golden).
GOLDEN = ROOT / "tests" / "golden" / "galileo" / "reference_tokens.npz"
EUROSAT_MS_BANDS = [2, 3, 4, 5, 6, 7, 8, 13, 11, 12]  # B8A is the files' 13th band


@pytest.fixture(scope="module")
def nano() -> GalileoEncoder:
    return load_galileo_nano()


@pytest.fixture(scope="module")
def state() -> dict:
    return torch.load(GALILEO_DIR / "encoder.pt", map_location="cpu", weights_only=True)


def _config() -> dict:
    return json.loads((GALILEO_DIR / "config.json").read_text())


def test_shipped_files_are_the_published_ones():
    assert sha256_file(GALILEO_DIR / "encoder.pt") == NANO_SHA256
    assert "MIT License" in (GALILEO_DIR / "LICENSE").read_text()
    assert (GALILEO_DIR / "MODEL_CARD.md").is_file()


def test_weights_load_strictly_and_only_other_modalities_are_ignored(nano, state):
    assert set(state) - set(nano.state_dict()) == IGNORED_KEYS
    assert set(nano.state_dict()) <= set(state)
    for key, value in nano.state_dict().items():
        assert torch.equal(value, state[key].cpu()), key
    assert sum(p.numel() for p in nano.parameters()) == pytest.approx(0.86e6, rel=0.05)
    assert not nano.training
    assert create_model("galileo_nano").state_dict().keys() == nano.state_dict().keys()


def test_unknown_missing_or_misshapen_keys_fail_by_name(state):
    with pytest.raises(CheckpointMismatch, match="surprise"):
        GalileoEncoder.from_state_dict({**state, "surprise": torch.zeros(1)}, _config())
    partial = {k: v for k, v in state.items() if k != "norm.bias"}
    with pytest.raises(CheckpointMismatch, match="norm.bias"):
        GalileoEncoder.from_state_dict(partial, _config())
    bad = {**state, "s_t_channel_embed": torch.zeros(5, 32)}
    with pytest.raises(CheckpointMismatch, match="s_t_channel_embed"):
        GalileoEncoder.from_state_dict(bad, _config())


def test_the_fixed_encodings_follow_the_published_formulas(state):
    # The stored time-step table is the same sinusoid the position encoding uses.
    torch.testing.assert_close(_sincos(torch.arange(24), 32).float(), state["pos_embed"].cpu())
    fresh = GalileoEncoder()
    torch.testing.assert_close(fresh.month_embed.weight, state["month_embed.weight"].cpu())


@pytest.mark.parametrize("bands,groups", [(3, 1), (10, 5)])
@pytest.mark.parametrize("patch_size", [4, 8])
def test_token_shapes(nano, bands, groups, patch_size):
    x = torch.rand(2, bands, 32, 32) * 3000
    with torch.no_grad():
        tokens = nano(x, patch_size=patch_size)
    side = 32 // patch_size
    assert tokens.shape == (2, side * side * groups, 128)
    assert torch.isfinite(tokens).all()


def test_a_subset_of_groups_drops_their_tokens(nano):
    x = torch.rand(1, 10, 16, 16) * 3000
    with torch.no_grad():
        two = nano(x, patch_size=8, groups=["S2_SWIR", "S2_RGB"]).view(1, 2, 2, 2, 128)
        rgb_only = nano(x[:, :3], patch_size=8).view(1, 2, 2, 1, 128)
    assert two.shape[3] == 2  # publisher's order: RGB first
    assert not torch.allclose(two[..., :1, :], rgb_only, atol=1e-3)  # SWIR tokens attended to


def _sample(data_dir, rel):
    path = data_dir / rel
    if path.suffix == ".jpg":
        rgb8 = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        return eurosat_rgb_to_raw(rgb8)[None]
    return torch.from_numpy(read_raster(path, EUROSAT_MS_BANDS).astype(np.float32))[None]


@pytest.mark.parametrize(
    "key,rel,patch_size",
    [
        ("rgb_p4", "eurosat_rgb/Forest/Forest_100.jpg", 4),
        ("ms_p8", "eurosat_ms/AnnualCrop/AnnualCrop_916.tif", 8),
    ],
)
def test_tokens_match_the_publishers_encoder_on_real_images(nano, data_dir, key, rel, patch_size):
    golden = np.load(GOLDEN)
    with torch.no_grad():
        tokens = nano(_sample(data_dir, rel), patch_size=patch_size)[0].numpy()
    np.testing.assert_allclose(tokens[::8], golden[f"{key}_tokens"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(tokens.mean(0), golden[f"{key}_mean"], rtol=0, atol=1e-5)


def test_normalisation_and_eurosat_scale():
    raw = torch.tensor([1395.3408730676722, 1338.4026921784578, 1343.09883810357])[:, None, None]
    np.testing.assert_allclose(normalise(raw).flatten().numpy(), 0.5, atol=1e-6)  # mean -> 0.5
    rgb8 = torch.tensor([255, 0, 51], dtype=torch.uint8)[:, None, None]
    np.testing.assert_allclose(eurosat_rgb_to_raw(rgb8).flatten().numpy(), [550, 0, 2750])


@pytest.mark.parametrize(
    "shape,kwargs,message",
    [
        ((1, 4, 32, 32), {}, "3 bands"),
        ((1, 10, 30, 32), {"patch_size": 4}, "30x32 is not a positive multiple of patch_size 4"),
        ((1, 3, 32, 32), {"patch_size": 9}, "patch_size must be 1-8"),
        ((1, 3, 32, 32), {"patch_size": 4.0}, "patch_size must be 1-8, got 4.0"),
        ((1, 3, 32, 32), {"groups": ["S2_SWIR"]}, "among \\['S2_RGB'\\]"),
        ((1, 3, 32, 32), {"month": 12}, "month must be 0-11"),
        ((10, 32, 32), {}, "got shape \\(10, 32, 32\\)"),
    ],
)
def test_bad_input_is_refused_naming_what_is_wrong(shape, kwargs, message):
    model = create_model("galileo_test")
    with pytest.raises(InvalidInput, match=message):
        model(torch.zeros(shape), **kwargs)


def test_integer_input_gives_the_float_tokens(nano):
    raw = torch.randint(0, 5000, (1, 10, 16, 16), dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(nano(raw, patch_size=8), nano(raw.float(), patch_size=8))


def test_nan_is_refused():
    x = torch.zeros(1, 10, 16, 16)
    x[0, 4, 3, 3] = float("nan")
    with pytest.raises(InvalidInput, match="NaN"):
        create_model("galileo_test")(x)


def test_groups_are_the_publishers():
    assert [b for bands in S2_GROUPS.values() for b in bands] == [
        "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"
    ]  # fmt: skip
