"""Neural Embedding Compression (Gomes & Brunschwiler 2024) for serving.

The modules mirror the official code (IBM/neural-embedding-compression,
``MAEPretrain_SceneClassification/models_mae.py``) attribute for attribute, so that its
checkpoints load as they are: a MAE ViT encoder (CLS token, fixed sin-cos position
embeddings stored as buffers, LayerNorm eps 1e-6) whose final-norm output, all tokens
including CLS, goes through a factorized ``EntropyBottleneck(embed_dim)``; the latent is
viewed as ``(B, embed_dim, tokens, 1)``. Training code (masking, losses) is left out: this
project serves trained models.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import Block, PatchEmbed
from torch import nn

from nec_models.registry import register_model

__all__ = [
    "sincos_pos_embed_2d",
    "MaskedAutoencoderViT",
    "NECFactorized",
    "NECHyperprior",
    "NECClassifier",
]


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, ``(grid*grid [+1], dim)``, as in MAE.

    Half of the channels encode the row, half the column; each half is sin then cos of
    the position times ``1 / 10000 ** (k / (dim / 4))``.
    """
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE stacks (w, h) with w first, so the first half of channels follows the column.
    emb = np.concatenate([encode(cols), encode(rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb


_LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)


class MaskedAutoencoderViT(nn.Module):
    """MAE ViT encoder and decoder with the official attribute names (no masking)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: type[nn.Module] | partial = _LAYER_NORM,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of patch {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.norm_layer = norm_layer
        self.decoder_embed_dim = decoder_embed_dim
        self.decoder_num_heads = decoder_num_heads

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Buffers, as in the compressed NEC models: fixed, never trained.
        pos = torch.from_numpy(sincos_pos_embed_2d(embed_dim, grid)).float().unsqueeze(0)
        self.register_buffer("pos_embed", pos)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        dpos = torch.from_numpy(sincos_pos_embed_2d(decoder_embed_dim, grid)).float().unsqueeze(0)
        self.register_buffer("decoder_pos_embed", dpos)
        self.decoder_blocks = nn.ModuleList(
            Block(
                decoder_embed_dim,
                decoder_num_heads,
                mlp_ratio,
                qkv_bias=True,
                norm_layer=norm_layer,
            )
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme as MAE, so an untrained model behaves like one about to be trained.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_tokens(self) -> int:
        """Tokens per image: patches plus the CLS token."""
        return self.patch_embed.num_patches + 1

    def forward_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` to final-norm tokens ``(B, tokens, embed_dim)``."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, tokens: torch.Tensor) -> torch.Tensor:
        """All tokens ``(B, tokens, embed_dim)`` to pixel patches ``(B, patches, p*p*C)``."""
        x = self.decoder_embed(tokens) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` to pixel patches ``(B, patches, p*p*C)`` (MAE's order)."""
        p, c = self.patch_size, self.in_chans
        g = self.img_size // p
        x = images.reshape(images.shape[0], c, g, p, g, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(images.shape[0], g * g, p * p * c)

    def forward_masked(
        self, images: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MAE pretraining: reconstruct ``images`` from a random ``1 - mask_ratio`` of patches.

        Returns the predicted pixel patches ``(B, patches, p*p*C)`` and the mask ``(B,
        patches)`` (1 = masked, the patches the loss is taken on), as the official
        ``MaskedAutoencoderViT.forward`` does; the noise comes from ``generator``.
        """
        tokens, mask, restore = self.encode_masked(images, mask_ratio, generator)
        return self.decode_masked(tokens, restore), mask

    def encode_masked(
        self, images: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoder on a random ``1 - mask_ratio`` of the patches.

        Returns the final-norm tokens ``(B, 1 + kept, embed_dim)`` (CLS first), the mask
        ``(B, patches)`` (1 = masked) and the indices that restore the patch order.
        """
        b, n = images.shape[0], self.patch_embed.num_patches
        keep = int(n * (1 - mask_ratio))
        x = self.patch_embed(images) + self.pos_embed[:, 1:, :]
        noise = torch.rand(b, n, generator=generator, device=images.device)
        shuffle = torch.argsort(noise, dim=1)
        restore = torch.argsort(shuffle, dim=1)
        kept = shuffle[:, :keep]
        x = torch.gather(x, 1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        mask = torch.ones(b, n, device=images.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(b, -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, restore

    def decode_masked(self, tokens: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """The decoder on kept tokens (CLS first) plus mask tokens, in patch order."""
        b, n = restore.shape
        x = self.decoder_embed(tokens)
        fill = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        body = torch.cat((x[:, 1:, :], fill), dim=1)
        body = torch.gather(body, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat((x[:, :1, :], body), dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def masked_loss(
        self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False
    ) -> torch.Tensor:
        """Mean squared error on the masked patches (per-patch normalised with ``norm_pix``)."""
        target = self.patchify(images)
        if norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Pixel patches ``(B, patches, p*p*C)`` back to images ``(B, C, H, W)``."""
        p, c = self.patch_size, self.in_chans
        g = self.img_size // p
        x = patches.reshape(patches.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(patches.shape[0], c, g * p, g * p)


class NECFactorized(MaskedAutoencoderViT):
    """``mae_vit_compress_adapter``: MAE ViT + factorized entropy bottleneck over tokens."""

    def __init__(self, ld: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.ld = ld
        self.bottleneck = EntropyBottleneck(self.embed_dim)

    @property
    def entropy_bottleneck(self) -> EntropyBottleneck:
        """The bottleneck whose tables the coder uses."""
        return self.bottleneck

    def medians(self) -> torch.Tensor:
        """Per-channel medians subtracted before rounding, ``(embed_dim,)``."""
        return self.bottleneck.quantiles[:, 0, 1].detach()

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous latent in coder layout ``(B, embed_dim, tokens)``."""
        return self.forward_encoder(images).transpose(1, 2)

    def symbols(self, latent: torch.Tensor) -> torch.Tensor:
        """``round(y - median)`` per channel as int32, exactly as CompressAI quantizes."""
        return torch.round(latent - self.medians()[None, :, None]).to(torch.int32)

    def dequantize(self, symbols: torch.Tensor) -> torch.Tensor:
        """Symbols ``(B, embed_dim, tokens)`` to embeddings ``(B, tokens, embed_dim)``."""
        y_hat = symbols.to(torch.float32) + self.medians()[None, :, None]
        return y_hat.transpose(1, 2)

    def first_decoder_block(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings without CLS through the first MAE decoder block, as the classifier.

        ``(B, tokens, embed_dim)`` -> ``(B, tokens - 1, decoder_embed_dim)``.
        """
        x = self.decoder_embed(embeddings[:, 1:, :]) + self.decoder_pos_embed[:, 1:, :]
        return self.decoder_blocks[0](x)

    def forward_train(
        self,
        images: torch.Tensor,
        mask_ratio: float,
        generator: torch.Generator | None = None,
        rate_on: str = "visible",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """NEC compression fine-tuning: masked reconstruction through the bottleneck.

        The visible tokens (after the final norm) pass the bottleneck (noisy in training)
        and the decoder reconstructs the image from them, as the official code does. The
        rate is ``sum -log2 p`` per image, on those visible tokens (``rate_on="visible"``,
        the official estimate) or, with ``rate_on="all"``, on every token of one more,
        unmasked encoder pass: what ``compress()`` actually codes.

        Returns:
            predicted patches ``(B, patches, p*p*C)``, the mask, bits per image (scalar).
        """
        if rate_on not in ("visible", "all"):
            raise ValueError(f"rate_on must be 'visible' or 'all', got {rate_on!r}")
        tokens, mask, restore = self.encode_masked(images, mask_ratio, generator)
        y_hat, likelihoods = self.bottleneck(tokens.transpose(1, 2).unsqueeze(-1))
        pred = self.decode_masked(y_hat.squeeze(-1).transpose(1, 2), restore)
        if rate_on == "all":
            _, likelihoods = self.bottleneck(self.latent(images).unsqueeze(-1))
        bits = -torch.log2(likelihoods).sum() / images.shape[0]
        return pred, mask, bits

    @torch.no_grad()
    def compress(self, images: torch.Tensor) -> dict:
        """Reference path through CompressAI's own coder, as the official ``compress``."""
        latent = self.latent(images).unsqueeze(-1)
        strings = self.bottleneck.compress(latent)
        return {"strings": [strings], "shape": tuple(latent.shape[-2:])}


class NECHyperprior(MaskedAutoencoderViT):
    """``mae_vit_compress_hyperprior_adapter``: scale hyperprior over the tokens.

    Loadable and runnable in PyTorch. Not exported for serving: its decoder derives
    Gaussian scale indexes from a network's float output, and a last-bit difference
    between machines makes the stream undecodable (DESIGN section 3).
    """

    def __init__(
        self,
        ld: float = 0.0,
        hyper_dim: int = 96,
        hyper_depth: int = 2,
        hyper_heads: int = 4,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.ld = ld
        self.entropy_bottleneck = EntropyBottleneck(hyper_dim)
        self.gaussian_conditional = GaussianConditional(None)
        norm = self.norm_layer
        block = partial(Block, hyper_dim, hyper_heads, self.mlp_ratio, qkv_bias=True)
        self.h_a = nn.Sequential(
            nn.Linear(self.embed_dim, hyper_dim),
            nn.ReLU(),
            *(block(norm_layer=norm) for _ in range(hyper_depth)),
        )
        self.h_s = nn.Sequential(
            *(block(norm_layer=norm) for _ in range(hyper_depth)),
            nn.Linear(hyper_dim, self.embed_dim),
            nn.ReLU(),
        )

    @torch.no_grad()
    def quantized_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Dequantized embeddings ``(B, tokens, embed_dim)`` as the official model."""
        latent = self.forward_encoder(images)
        z = self.h_a(torch.abs(latent)).transpose(1, 2).unsqueeze(-1)
        z_hat, _ = self.entropy_bottleneck(z, training=False)
        scales = self.h_s(z_hat.squeeze(-1).transpose(1, 2)).transpose(1, 2).unsqueeze(-1)
        y = latent.transpose(1, 2).unsqueeze(-1)
        y_hat, _ = self.gaussian_conditional(y, scales, training=False)
        return y_hat.squeeze(-1).transpose(1, 2)


class NECClassifier(nn.Module):
    """``vit_base_compressed``: classifier on decoded NEC embeddings.

    As the official ``MaskedAutoencoderViTClassifierCompression``: the backbone's keys
    sit under ``backbone.``; with ``with_decoder`` the first MAE decoder block runs
    before attention pooling, else the decoder is dropped.
    """

    def __init__(self, backbone: NECFactorized, num_classes: int = 80, with_decoder: bool = False):
        super().__init__()
        self.backbone = backbone
        self.with_decoder = with_decoder
        dim = backbone.decoder_embed_dim if with_decoder else backbone.embed_dim
        heads = backbone.decoder_num_heads if with_decoder else backbone.num_heads
        self.pool = AttentionPoolLatent(
            dim, num_heads=heads, mlp_ratio=backbone.mlp_ratio, norm_layer=backbone.norm_layer
        )
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        if not with_decoder:
            del self.backbone.decoder_blocks
            del self.backbone.decoder_embed
        del self.backbone.decoder_pred
        del self.backbone.decoder_norm

    @property
    def img_size(self) -> int:
        """Input image size of the backbone."""
        return self.backbone.img_size

    def forward_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits from decoded embeddings ``(B, tokens, embed_dim)``, CLS included."""
        if self.with_decoder:
            x = self.backbone.first_decoder_block(embeddings)
        else:
            x = embeddings[:, 1:, :]
        return self.head(self.pool(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits from images, through quantization as the deployed pipeline does."""
        b = self.backbone
        return self.forward_embeddings(b.dequantize(b.symbols(b.latent(images))))


_VIT_B = dict(
    patch_size=16,
    embed_dim=768,
    depth=12,
    num_heads=12,
    decoder_embed_dim=512,
    decoder_depth=8,
    decoder_num_heads=16,
)
# A few blocks and a small width: exports, serves and codes in well under a second.
_VIT_TINY = dict(
    patch_size=8,
    embed_dim=64,
    depth=2,
    num_heads=4,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=4,
)


# MAE pretraining sizes for 64 px EuroSAT patches: patch 8 gives 64 tokens.
_VIT_TINY_P8 = dict(
    patch_size=8,
    embed_dim=192,
    depth=12,
    num_heads=3,
    decoder_embed_dim=128,
    decoder_depth=2,
    decoder_num_heads=4,
)


@register_model("mae_vit_tiny_patch8")
def mae_vit_tiny_patch8(img_size: int = 64) -> MaskedAutoencoderViT:
    """MAE ViT-Tiny/8 for pretraining on 64 px patches (64 tokens), with a small decoder."""
    return MaskedAutoencoderViT(img_size=img_size, **_VIT_TINY_P8)


@register_model("mae_vit_pretrain_test")
def mae_vit_pretrain_test(img_size: int = 64) -> MaskedAutoencoderViT:
    """Tiny test variant of :func:`mae_vit_tiny_patch8`."""
    return MaskedAutoencoderViT(img_size=img_size, **_VIT_TINY)


@register_model("nec_vit_tiny_patch8")
def nec_vit_tiny_patch8(img_size: int = 64, ld: float = 0.0) -> NECFactorized:
    """NEC on :func:`mae_vit_tiny_patch8` (fine-tuned from its pretraining)."""
    return NECFactorized(ld=ld, img_size=img_size, **_VIT_TINY_P8)


@register_model("nec_vit_pretrain_test")
def nec_vit_pretrain_test(img_size: int = 64, ld: float = 0.0) -> NECFactorized:
    """Tiny test variant of :func:`nec_vit_tiny_patch8`, on :func:`mae_vit_pretrain_test`."""
    return NECFactorized(ld=ld, img_size=img_size, **_VIT_TINY)


@register_model("nec_classifier_tiny_patch8")
def nec_classifier_tiny_patch8(
    img_size: int = 64, num_classes: int = 10, with_decoder: bool = False
) -> NECClassifier:
    """Classifier on :func:`nec_vit_tiny_patch8` embeddings (EuroSAT's 10 classes)."""
    return NECClassifier(nec_vit_tiny_patch8(img_size), num_classes, with_decoder)


@register_model("nec_classifier_pretrain_test")
def nec_classifier_pretrain_test(
    img_size: int = 64, num_classes: int = 10, with_decoder: bool = False
) -> NECClassifier:
    """Tiny test variant of :func:`nec_classifier_tiny_patch8`."""
    return NECClassifier(nec_vit_pretrain_test(img_size), num_classes, with_decoder)


@register_model("mae_vit_compress_adapter")
def mae_vit_compress_adapter(img_size: int = 224, ld: float = 0.0) -> NECFactorized:
    """NEC ViT-B/16 with a factorized prior (the paper's main model)."""
    return NECFactorized(ld=ld, img_size=img_size, **_VIT_B)


@register_model("mae_vit_compress_adapter_tiny")
def mae_vit_compress_adapter_tiny(img_size: int = 32, ld: float = 0.0) -> NECFactorized:
    """Tiny test variant of :func:`mae_vit_compress_adapter`."""
    return NECFactorized(ld=ld, img_size=img_size, **_VIT_TINY)


@register_model("mae_vit_compress_hyperprior_adapter")
def mae_vit_compress_hyperprior_adapter(img_size: int = 224, ld: float = 0.0) -> NECHyperprior:
    """NEC ViT-B/16 with a scale hyperprior."""
    return NECHyperprior(ld=ld, img_size=img_size, **_VIT_B)


@register_model("mae_vit_compress_hyperprior_adapter_tiny")
def mae_vit_compress_hyperprior_adapter_tiny(img_size: int = 32, ld: float = 0.0) -> NECHyperprior:
    """Tiny test variant of :func:`mae_vit_compress_hyperprior_adapter`."""
    return NECHyperprior(
        ld=ld, img_size=img_size, hyper_dim=16, hyper_depth=1, hyper_heads=2, **_VIT_TINY
    )


@register_model("vit_base_compressed")
def vit_base_compressed(
    img_size: int = 224, num_classes: int = 80, with_decoder: bool = False
) -> NECClassifier:
    """Classifier on NEC ViT-B/16 embeddings (attention pooling + linear head)."""
    return NECClassifier(mae_vit_compress_adapter(img_size), num_classes, with_decoder)


@register_model("vit_base_compressed_tiny")
def vit_base_compressed_tiny(
    img_size: int = 32, num_classes: int = 10, with_decoder: bool = False
) -> NECClassifier:
    """Tiny test variant of :func:`vit_base_compressed`."""
    return NECClassifier(mae_vit_compress_adapter_tiny(img_size), num_classes, with_decoder)
