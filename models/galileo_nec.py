"""NEC on Galileo: an entropy-coded adapter of a frozen Galileo encoder (Gomes & Brunschwiler).

Neural Embedding Compression codes a foundation model's tokens with a factorized prior
(:class:`compressai.entropy_models.EntropyBottleneck`, one density per channel) and
fine-tunes part of the model for ``lmbda x distortion + rate``. Galileo is no MAE, so there
is no pixel decoder to reconstruct through; the distortion is taken on the tokens
themselves, against the frozen pretrained encoder's:

- ``backbone``: the pretrained :class:`~nec_models.galileo.GalileoEncoder`, frozen (no
  gradient, always in eval mode). It embeds the image, runs the blocks the adapter does
  not replace (their output is shared by both paths) and gives the target tokens.
- the adapter: copies of the backbone's last ``adapter_blocks`` blocks and its final norm,
  initialised from the pretrained weights and trained; with them a per-channel ``gain``
  (``exp(log_gain)``): the latent is ``adapter tokens x gain``, so that the quantisation
  step of 1 is ``1 / gain`` in token units and ``lmbda`` can trade rate for distortion
  while the decoded tokens stay in the backbone's scale.
- ``bottleneck``: ``EntropyBottleneck(embed_dim)`` on the latent viewed as ``(B, C,
  tokens, 1)``, exactly as :class:`~nec_models.nec.NECFactorized`: uniform noise in
  training, ``round(y - median) + median`` in eval, the coded symbols ``round(y - median)``.

The decoded tokens are ``(symbols + median) / gain``; distortion is their mean squared
error against the frozen tokens, the rate ``-log2`` of the likelihoods of every token, as
coded, per image.

For an exporter (``nec_export.families.nec`` calls ``latent``, ``symbols``, ``medians``,
``dequantize`` and ``entropy_bottleneck``, which this class has with NECFactorized's
shapes) a Galileo export would still need: an input spec of raw reflectance x 10000 in
:data:`~nec_models.galileo.S2_BANDS` order (NEC's is ImageNet-normalised RGB; the
backbone normalises itself), ``num_tokens`` without a CLS token, a decoder graph whose
``dequantize`` divides by the gain (a per-channel float op after the integer symbols: the
stream stays bit-exact, only the decoded floats depend on the machine), and no
``first_decoder_block`` (no features or classifier graph). The bottleneck's tables are
frozen with ``update()`` as NEC's are.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
from torch import nn

from nec_models.galileo import (
    DEFAULT_MONTH,
    RGB_BANDS,
    S2_BANDS,
    GalileoEncoder,
    galileo_test,
    load_galileo_nano,
)
from nec_models.registry import register_model
from nec_serve.errors import InvalidInput

__all__ = ["GalileoNEC"]


class GalileoNEC(nn.Module):
    """A frozen Galileo encoder, a trained adapter and a factorized bottleneck (module doc).

    Args:
        backbone: the pretrained encoder; it is frozen here, and copied for the adapter.
        bands: 3 (B2, B3, B4: the RGB group's tokens) or 10 (all five groups').
        img_size: the square input size in pixels, a multiple of ``patch_size``.
        patch_size: Galileo's patch size (1 to the backbone's ``max_patch_size``).
        adapter_blocks: how many of the last blocks the adapter trains (1 to depth).
        month: the acquisition month the encoder is told (0-11).
        init_gain: the starting per-channel gain (the quantisation step is ``1 / gain``);
            Galileo-nano's RGB tokens vary by about 0.07 per channel over an image, so the
            default 16 starts with a step near that.
    """

    def __init__(
        self,
        backbone: GalileoEncoder,
        *,
        bands: int = len(RGB_BANDS),
        img_size: int = 64,
        patch_size: int = 8,
        adapter_blocks: int = 1,
        month: int = DEFAULT_MONTH,
        init_gain: float = 16.0,
    ):
        super().__init__()
        depth = len(backbone.blocks)
        if bands not in (len(RGB_BANDS), len(S2_BANDS)):
            raise InvalidInput(f"bands must be {len(RGB_BANDS)} or {len(S2_BANDS)}, got {bands}")
        if not 1 <= adapter_blocks <= depth:
            raise InvalidInput(f"adapter_blocks must be 1-{depth}, got {adapter_blocks}")
        if not 1 <= patch_size <= backbone.max_patch_size or img_size % patch_size or img_size < 1:
            raise InvalidInput(
                f"img_size {img_size} must be a positive multiple of patch_size {patch_size} "
                f"(1-{backbone.max_patch_size})"
            )
        if init_gain <= 0:
            raise InvalidInput(f"init_gain must be > 0, got {init_gain}")
        self.backbone = backbone.requires_grad_(False).eval()
        self.blocks = nn.ModuleList(
            copy.deepcopy(b) for b in backbone.blocks[depth - adapter_blocks :]
        )
        self.norm = copy.deepcopy(backbone.norm)
        for module in (self.blocks, self.norm):
            module.requires_grad_(True)
        self.embed_dim = backbone.embedding_size
        self.log_gain = nn.Parameter(torch.full((self.embed_dim,), float(init_gain)).log())
        self.bottleneck = EntropyBottleneck(self.embed_dim)
        self.in_chans, self.img_size, self.patch_size, self.month = (
            bands,
            img_size,
            patch_size,
            month,
        )
        self.adapter_blocks = adapter_blocks
        self.groups = backbone.groups_for(bands)

    @property
    def num_tokens(self) -> int:
        """Tokens per image: one per patch and channel group (no CLS token)."""
        return (self.img_size // self.patch_size) ** 2 * len(self.groups)

    @property
    def entropy_bottleneck(self) -> EntropyBottleneck:
        """The bottleneck whose tables the coder uses."""
        return self.bottleneck

    def train(self, mode: bool = True) -> GalileoNEC:
        """Train the adapter and bottleneck; the backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def gain(self) -> torch.Tensor:
        """Per-channel latent scale ``(embed_dim,)``: latent = adapter tokens x gain."""
        return self.log_gain.exp()

    def medians(self) -> torch.Tensor:
        """Per-channel medians subtracted before rounding, ``(embed_dim,)``."""
        return self.bottleneck.quantiles[:, 0, 1].detach()

    def _check(self, images: torch.Tensor) -> None:
        want = (self.in_chans, self.img_size, self.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise InvalidInput(
                f"expected raw bands (B, {', '.join(map(str, want))}) "
                f"(reflectance x 10000), got shape {tuple(images.shape)}"
            )

    def _shared_and_target(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen blocks' output the adapter starts from, and the frozen tokens."""
        self._check(images)
        frozen = self.backbone
        cut = len(frozen.blocks) - self.adapter_blocks
        with torch.no_grad():
            shared = frozen.embed(images, self.patch_size, self.groups, self.month)
            for block in frozen.blocks[:cut]:
                shared = block(shared)
            target = shared
            for block in frozen.blocks[cut:]:
                target = block(target)
            return shared, frozen.norm(target)

    def _adapt(self, shared: torch.Tensor) -> torch.Tensor:
        """Adapter tokens ``(B, T, C)`` x gain, in coder layout ``(B, C, T)``."""
        for block in self.blocks:
            shared = block(shared)
        return (self.norm(shared) * self.gain()).transpose(1, 2)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's tokens ``(B, T, C)``: what the decoded tokens approximate."""
        return self._shared_and_target(images)[1]

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous latent in coder layout ``(B, embed_dim, tokens)``."""
        return self._adapt(self._shared_and_target(images)[0])

    def symbols(self, latent: torch.Tensor) -> torch.Tensor:
        """``round(y - median)`` per channel as int32, exactly as CompressAI quantizes."""
        return torch.round(latent - self.medians()[None, :, None]).to(torch.int32)

    def dequantize_latent(self, symbols: torch.Tensor) -> torch.Tensor:
        """Symbols to the rounded latent ``symbols + median``, ``(B, embed_dim, tokens)``."""
        return symbols.to(torch.float32) + self.medians()[None, :, None]

    def dequantize(self, symbols: torch.Tensor) -> torch.Tensor:
        """Symbols ``(B, embed_dim, tokens)`` to decoded tokens ``(B, tokens, embed_dim)``."""
        return (self.dequantize_latent(symbols) / self.gain().detach()[None, :, None]).transpose(
            1, 2
        )

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoded tokens ``(B, T, C)``, likelihoods ``(B, C, T, 1)`` and the frozen tokens.

        Noise stands for rounding in training; in eval the bottleneck rounds around the
        medians, so the decoded tokens equal ``dequantize(symbols(latent(images)))``.
        """
        shared, target = self._shared_and_target(images)
        y_hat, likelihoods = self.bottleneck(self._adapt(shared).unsqueeze(-1))
        tokens = (y_hat.squeeze(-1) / self.gain()[None, :, None]).transpose(1, 2)
        return tokens, likelihoods, target

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw bands ``(B, bands, S, S)`` -> decoded tokens ``(B, T, C)`` and likelihoods."""
        tokens, likelihoods, _ = self.run(images)
        return tokens, likelihoods

    def loss_terms(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distortion (MSE of the decoded against the frozen tokens) and bits per image."""
        tokens, likelihoods, target = self.run(images)
        bits = -torch.log2(likelihoods).sum() / images.shape[0]
        return F.mse_loss(tokens, target), bits

    @torch.no_grad()
    def compress(self, images: torch.Tensor) -> dict:
        """Reference path through CompressAI's own coder (after ``bottleneck.update()``)."""
        latent = self.latent(images).unsqueeze(-1)
        strings = self.bottleneck.compress(latent)
        return {"strings": [strings], "shape": tuple(latent.shape[-2:])}


@register_model("galileo_nec_nano")
def galileo_nec_nano(
    pretrained: bool = True,
    bands: int = len(RGB_BANDS),
    img_size: int = 64,
    patch_size: int = 8,
    adapter_blocks: int = 1,
) -> GalileoNEC:
    """NEC on Galileo-nano: 64 tokens x 128 for 64 px RGB at patch 8 (320 with ten bands)."""
    backbone = load_galileo_nano() if pretrained else GalileoEncoder()
    return GalileoNEC(
        backbone,
        bands=bands,
        img_size=img_size,
        patch_size=patch_size,
        adapter_blocks=adapter_blocks,
    )


@register_model("galileo_nec_test")
def galileo_nec_test(
    bands: int = len(RGB_BANDS), img_size: int = 64, patch_size: int = 8
) -> GalileoNEC:
    """Tiny test variant of :func:`galileo_nec_nano` on :func:`galileo_test` (random)."""
    return GalileoNEC(galileo_test(), bands=bands, img_size=img_size, patch_size=patch_size)
