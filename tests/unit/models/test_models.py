from __future__ import annotations

import numpy as np
import pytest
import torch

from nec_models import NECClassifier, create_model, list_models, load_checkpoint
from nec_models.checkpoint import remap_compressai_keys
from nec_models.nec import sincos_pos_embed_2d
from nec_serve.errors import CheckpointMismatch, UnknownModel

TINY = "mae_vit_compress_adapter_tiny"


def _official_layout(model: torch.nn.Module, compressai_124: bool) -> dict:
    """A checkpoint as the official training code saves it: {"model": state_dict, ...}."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if compressai_124:
        renamed = {}
        for k, v in state.items():
            for new, old in (("matrices", "_matrix"), ("biases", "_bias"), ("factors", "_factor")):
                marker = f".{new}."
                if marker in k:
                    head, idx = k.split(marker)
                    k = f"{head}.{old}{idx}"
            renamed[k] = v
        state = renamed
    return {"model": state, "epoch": 3, "args": None}


def test_registry_lists_official_names_and_tiny_variants():
    names = list_models()
    for name in (
        "mae_vit_compress_adapter",
        "mae_vit_compress_hyperprior_adapter",
        "vit_base_compressed",
    ):
        assert name in names
        assert f"{name}_tiny" in names


def test_unknown_model_names_close_matches():
    with pytest.raises(UnknownModel, match="did you mean mae_vit_compress_adapter"):
        create_model("mae_vit_compress_adaptor")


@pytest.mark.slow
def test_vit_b_shapes_match_the_paper():
    m = create_model("mae_vit_compress_adapter")
    assert m.num_tokens == 197 and m.embed_dim == 768
    assert m.bottleneck.channels == 768
    assert m.norm.eps == 1e-6
    assert sum(p.numel() for p in m.blocks.parameters()) == pytest.approx(85.05e6, rel=0.01)


def test_sincos_matches_reference_formula():
    emb = sincos_pos_embed_2d(8, 2)
    # token 0 is CLS (zeros); token 1+i*2+j is row i, col j. Column first, then row.
    assert np.all(emb[0] == 0)
    row, col = 1, 0
    tok = emb[1 + row * 2 + col]
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    expect = np.concatenate(
        [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]
    )
    np.testing.assert_allclose(tok, expect)


@pytest.mark.parametrize("compressai_124", [False, True])
def test_official_checkpoint_loads_both_compressai_key_styles(tmp_path, compressai_124):
    torch.manual_seed(1)
    src = create_model(TINY)
    src.bottleneck.update(force=True)  # checkpoint saved after update(): tables included
    path = tmp_path / "ckpt.pth"
    torch.save(_official_layout(src, compressai_124), path)
    if compressai_124:
        assert "bottleneck._matrix0" in torch.load(path, weights_only=True)["model"]

    dst = load_checkpoint(create_model(TINY), path)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src.symbols(src.latent(x)), dst.symbols(dst.latent(x)))
    # The checkpoint's own tables are kept, not recomputed.
    assert torch.equal(dst.bottleneck._quantized_cdf, src.bottleneck._quantized_cdf)


def test_remap_only_touches_bottleneck_parameter_names():
    state = {
        "bottleneck._matrix0": 1,
        "bottleneck._bias3": 2,
        "bottleneck._factor1": 3,
        "blocks.0.attn.proj.bias": 4,
        "bottleneck._quantized_cdf": 5,
    }
    assert remap_compressai_keys(state) == {
        "bottleneck.matrices.0": 1,
        "bottleneck.biases.3": 2,
        "bottleneck.factors.1": 3,
        "blocks.0.attn.proj.bias": 4,
        "bottleneck._quantized_cdf": 5,
    }


@pytest.mark.parametrize("img_size", [48, 64])
def test_position_embeddings_are_interpolated(tmp_path, img_size):
    # The tiny model at 32 px has a 4x4 grid; 48/64 px play the role of 256/512 px.
    src = create_model(TINY)
    ckpt = _official_layout(src, False)
    dst = load_checkpoint(create_model(TINY, img_size=img_size), ckpt)
    grid = img_size // 8
    assert dst.pos_embed.shape == (1, grid * grid + 1, 64)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # CLS slot untouched
    # Row-major token order survives: resample the (4, 4, 64) grid image independently.
    img = src.pos_embed[0, 1:].reshape(4, 4, 64).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(img, size=(grid, grid), mode="bicubic")
    assert torch.allclose(dst.pos_embed[0, 1:], ref[0].permute(1, 2, 0).reshape(-1, 64))
    assert not torch.allclose(dst.pos_embed[0, 1:], ref[0].permute(2, 1, 0).reshape(-1, 64))
    with torch.no_grad():
        assert dst.latent(torch.randn(1, 3, img_size, img_size)).shape == (1, 64, grid * grid + 1)


@pytest.mark.slow
def test_vit_b_checkpoint_interpolates_224_to_256_and_512():
    src = create_model("mae_vit_compress_adapter").state_dict()
    for size, tokens in ((256, 257), (512, 1025)):
        m = load_checkpoint(create_model("mae_vit_compress_adapter", img_size=size), src)
        assert m.pos_embed.shape == (1, tokens, 768)
        assert m.decoder_pos_embed.shape == (1, tokens, 512)


def test_checkpoint_of_another_architecture_names_the_keys():
    hyper = create_model("mae_vit_compress_hyperprior_adapter_tiny")
    with pytest.raises(CheckpointMismatch) as info:
        load_checkpoint(create_model(TINY), {"model": hyper.state_dict()})
    msg = str(info.value)
    assert "missing keys: bottleneck." in msg
    assert "unexpected keys: entropy_bottleneck." in msg


def test_checkpoint_with_wrong_width_reports_shapes():
    wide = create_model("mae_vit_compress_adapter").state_dict()
    with pytest.raises(
        CheckpointMismatch, match=r"shape mismatches: blocks.0.attn.proj.bias \(768,\) != \(64,\)"
    ):
        load_checkpoint(create_model(TINY), wide)


def test_unreadable_and_missing_checkpoints(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="cannot read checkpoint"):
        load_checkpoint(create_model(TINY), bad)
    with pytest.raises(CheckpointMismatch, match="does not exist"):
        load_checkpoint(create_model(TINY), tmp_path / "nope.pth")


def test_pickled_code_in_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": Evil()}}, path)
    with pytest.raises(CheckpointMismatch, match="weights_only"):
        load_checkpoint(create_model(TINY), path)


@pytest.mark.parametrize("with_decoder", [False, True])
def test_classifier_loads_backbone_prefixed_checkpoint(with_decoder):
    torch.manual_seed(2)
    src = create_model("vit_base_compressed_tiny", with_decoder=with_decoder)
    state = src.state_dict()
    assert any(k.startswith("backbone.bottleneck.") for k in state)
    assert not any(k.startswith("backbone.decoder_pred") for k in state)
    assert any(k.startswith("backbone.decoder_blocks.0") for k in state) == with_decoder
    dst = load_checkpoint(
        create_model("vit_base_compressed_tiny", with_decoder=with_decoder), {"model": state}
    )
    assert isinstance(dst, NECClassifier)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = dst(x)
        assert logits.shape == (2, 10)
        assert torch.equal(logits, src(x))


def test_factorized_symbols_match_compressai_quantize(tiny_model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        lat = tiny_model.latent(x)
        ours = tiny_model.symbols(lat)
        eb = tiny_model.bottleneck
        ref = eb.quantize(lat.unsqueeze(-1), "symbols", eb._get_medians().reshape(1, -1, 1, 1))
    assert torch.equal(ours, ref.squeeze(-1))
    assert torch.equal(
        tiny_model.dequantize(ours).transpose(1, 2),
        eb.dequantize(ref, eb._get_medians().reshape(1, -1, 1, 1)).squeeze(-1),
    )


def test_hyperprior_runs():
    m = create_model("mae_vit_compress_hyperprior_adapter_tiny")
    m.entropy_bottleneck.update(force=True)
    with torch.no_grad():
        y = m.quantized_embedding(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 17, 64)
    assert torch.equal(y, torch.round(y))  # no means: dequantized values are integers
