"""The Galileo encoder (Tseng et al. 2025) for Sentinel-2 images, to load the published weights.

Galileo is a self-supervised ViT for many remote-sensing inputs; this is the project's own
implementation of its encoder for one of them, a single Sentinel-2 image. The ten bands
are split into five channel *groups* (:data:`S2_GROUPS`); each group is cut into
``patch_size`` x ``patch_size`` patches and projected to a 128-wide token by its own
linear patch embedding (an 8x8 kernel, resized for smaller patches by the pseudo-inverse
of the bicubic resize, after FlexiViT). Every token gets four 32-wide encodings
concatenated into one 128-wide vector that is added to it: its group's learned channel
embedding, the time step's sinusoid (one image: step 0), the month's (``month``, 0-11),
and a 2-D sinusoid of its position in units of 10 m pixels (so a patch-8 token sits at
0, 8, 16, ...). The tokens of all groups and positions then go through a pre-norm
transformer (``depth`` blocks, multi-head self-attention and a GELU MLP) and a final
LayerNorm.

The published encoder takes many modalities at once and masks the absent ones; a masked
token takes no part in attention and comes back as the final norm's bias. Here absent
groups are simply never made, which gives the same tokens for the groups present
(checked against the publisher's code; see ``weights/galileo/MODEL_CARD.md``) at a
fraction of the cost. RGB input (B2, B3, B4) makes only the RGB group's tokens.

Tokens come back as ``(B, h * w * G, D)`` ordered row, column, group (the publisher's
order): ``tokens.view(B, h, w, G, D)`` recovers the grid, ``h = H / patch_size``.

Input is Sentinel-2 L1C top-of-atmosphere reflectance x 10000 (the digital numbers of the
products, what the publisher's statistics were computed on); :func:`normalise` applies
the publisher's normalisation and :func:`eurosat_rgb_to_raw` turns 8-bit EuroSAT RGB
JPEGs into that scale.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nec_models.registry import register_model
from nec_serve.errors import CheckpointMismatch, InvalidInput
from nec_serve.hashing import sha256_file

__all__ = [
    "S2_BANDS",
    "S2_GROUPS",
    "RGB_BANDS",
    "S2_MEAN",
    "S2_STD",
    "EUROSAT_RGB_SCALE",
    "IGNORED_KEYS",
    "GALILEO_DIR",
    "GalileoEncoder",
    "normalise",
    "eurosat_rgb_to_raw",
    "load_galileo_nano",
]

#: The ten Sentinel-2 bands the encoder takes, in the order it takes them.
S2_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
RGB_BANDS = S2_BANDS[:3]

#: The publisher's Sentinel-2 channel groups, in its order, with their bands.
S2_GROUPS: dict[str, tuple[str, ...]] = {
    "S2_RGB": ("B2", "B3", "B4"),
    "S2_Red_Edge": ("B5", "B6", "B7"),
    "S2_NIR_10m": ("B8",),
    "S2_NIR_20m": ("B8A",),
    "S2_SWIR": ("B11", "B12"),
}
# The published space-time groups are S1, the five above and NDVI: the row of each S2
# group in the learned ``s_t_channel_embed`` is its position in that list.
_CHANNEL_ROW = {name: 1 + i for i, name in enumerate(S2_GROUPS)}
# Each group's bands as a slice of the ten-band input.
_BAND_SLICE = {
    name: slice(S2_BANDS.index(bands[0]), S2_BANDS.index(bands[-1]) + 1)
    for name, bands in S2_GROUPS.items()
}

#: Mean and standard deviation of each of :data:`S2_BANDS` (L1C reflectance x 10000) over
#: the publisher's pretraining data: nasaharvest/galileo ``config/normalization.json``,
#: entry ``"13"`` (the 13 space-time channels VV, VH, B2 ... B12, NDVI), channels 2-11.
S2_MEAN = (
    1395.3408730676722,
    1338.4026921784578,
    1343.09883810357,
    1543.8607982512297,
    2186.2022069512263,
    2525.0932853316694,
    2410.3377187373408,
    2750.2854646886753,
    2234.911100061487,
    1474.5311266077113,
)
S2_STD = (
    917.7041440370853,
    913.2988423581528,
    1092.678723527555,
    1047.2206083460424,
    1048.0101611156767,
    1143.6903026819996,
    1098.979177731649,
    1204.472755085893,
    1145.9774063078878,
    980.2429840007796,
)
#: The publisher maps ``[mean - 2 std, mean + 2 std]`` to ``[0, 1]`` (its default).
STD_MULTIPLIER = 2.0
#: EuroSAT's 8-bit RGB JPEGs saturate near raw 2750: value x 2750 / 255 gives raw units
#: (fitted on the patches present in both EuroSAT products, ../shared/models/README.md).
EUROSAT_RGB_SCALE = 2750.0 / 255.0
#: The month the publisher uses when none is known.
DEFAULT_MONTH = 6

# Parameters of the published encoder for inputs this one does not take: Sentinel-1 and
# NDVI (space-time), SRTM / Dynamic World / WorldCereal (space only), ERA5 / TerraClimate /
# VIIRS (time only), LandScan / location / static DW and WC (static), and the channel
# embeddings of the last three kinds. They change no S2 token; loading ignores exactly
# these names and fails on any other key it does not know.
_OTHER_INPUTS = {
    "space_time_embed": (("S1", "NDVI"), ("proj.weight", "proj.bias")),
    "space_embed": (("SRTM", "DW", "WC"), ("proj.weight", "proj.bias")),
    "time_embed": (("ERA5", "TC", "VIIRS"), ("weight", "bias")),
    "static_embed": (("LS", "location", "DW_static", "WC_static"), ("weight", "bias")),
}
IGNORED_KEYS = frozenset(
    [f"{kind}.{g}.{p}" for kind, (gs, ps) in _OTHER_INPUTS.items() for g in gs for p in ps]
    + ["sp_channel_embed", "t_channel_embed", "st_channel_embed"]
)

#: ``weights/galileo`` at the repository root: the published nano encoder, unchanged.
GALILEO_DIR = Path(__file__).resolve().parents[1] / "weights" / "galileo"
NANO_SHA256 = "eab6acacf527886a508a555bc24efe4b4a2cf91b162e84cd1c4a1807e942180c"


def normalise(raw: torch.Tensor) -> torch.Tensor:
    """Raw bands ``(..., 3 or 10, H, W)`` (reflectance x 10000) -> the encoder's input scale.

    ``(raw - (mean - 2 std)) / (4 std)`` per band with :data:`S2_MEAN` and :data:`S2_STD`;
    three bands are taken as B2, B3, B4.
    """
    bands = raw.shape[-3] if raw.ndim >= 3 else 0
    if not raw.is_floating_point():
        raw = raw.to(torch.float32)
    if bands not in (len(RGB_BANDS), len(S2_BANDS)):
        raise InvalidInput(
            f"expected (..., bands, H, W) with 3 bands ({', '.join(RGB_BANDS)}) or 10 "
            f"({', '.join(S2_BANDS)}), got shape {tuple(raw.shape)}"
        )
    mean = torch.tensor(S2_MEAN[:bands], dtype=torch.float64)
    std = torch.tensor(S2_STD[:bands], dtype=torch.float64)
    shift = (mean - STD_MULTIPLIER * std).to(raw)[:, None, None]
    div = (2 * STD_MULTIPLIER * std).to(raw)[:, None, None]
    return (raw - shift) / div


def eurosat_rgb_to_raw(rgb: torch.Tensor) -> torch.Tensor:
    """8-bit EuroSAT RGB ``(..., 3, H, W)`` -> raw B2, B3, B4 (reflectance x 10000, float32).

    The JPEG holds red, green, blue; the encoder takes blue first, so the bands are reversed.
    """
    if rgb.ndim < 3 or rgb.shape[-3] != 3:
        raise InvalidInput(f"expected (..., 3, H, W) RGB, got shape {tuple(rgb.shape)}")
    return rgb.flip(-3).to(torch.float32) * EUROSAT_RGB_SCALE


def _is_int(value) -> bool:
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _sincos(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """``(N,)`` positions -> ``(N, dim)`` sinusoids.

    Sines then cosines of ``pos * 10000^(-k / (2 dim))``, ``k < dim / 2``: the publisher's
    frequencies (half the exponent of MAE's).
    """
    k = torch.arange(dim // 2, dtype=torch.float64)
    angle = pos.to(torch.float64)[:, None] * 10000.0 ** (-k / (2 * dim))
    return torch.cat([angle.sin(), angle.cos()], dim=1)


@cache
def _kernel_resize_pinv(src: int, dst: int) -> torch.Tensor:
    """``(dst*dst, src*src)``: an ``src`` patch kernel -> the ``dst`` kernel (FlexiViT).

    The ``dst`` kernel's response to a bicubically (antialiased) resized patch best matches,
    in least squares, the ``src`` kernel's response to the original patch.
    """
    basis = torch.eye(src * src, dtype=torch.float64).reshape(src * src, 1, src, src)
    resized = F.interpolate(basis, size=(dst, dst), mode="bicubic", antialias=True)
    return torch.linalg.pinv(resized.reshape(src * src, dst * dst))


class _PatchEmbed(nn.Module):
    """One channel group's patch projection: an ``size`` kernel, resized for smaller patches."""

    def __init__(self, bands: int, dim: int, size: int):
        super().__init__()
        self.size = size
        self.proj = nn.Conv2d(bands, dim, size, stride=size)

    def forward(self, x: torch.Tensor, patch_size: int) -> torch.Tensor:
        weight = self.proj.weight
        if patch_size != self.size:
            out_ch, in_ch = weight.shape[:2]
            pinv = _kernel_resize_pinv(self.size, patch_size).to(weight)
            flat = weight.reshape(out_ch, in_ch, -1) @ pinv.T
            weight = flat.reshape(out_ch, in_ch, patch_size, patch_size)
        return F.conv2d(x, weight, self.proj.bias, stride=patch_size)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GalileoEncoder(nn.Module):
    """The Galileo encoder over Sentinel-2 channel groups (module docstring).

    Parameter names are the publisher's, so its state dict loads as it is
    (:meth:`from_state_dict`).
    """

    def __init__(
        self,
        embedding_size: int = 128,
        depth: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        max_sequence_length: int = 24,
        max_patch_size: int = 8,
    ):
        super().__init__()
        if embedding_size % 16:  # four encodings, the position one two sine-cosine halves
            raise ValueError(f"embedding_size must be a multiple of 16, got {embedding_size}")
        self.embedding_size = embedding_size
        self.max_patch_size = max_patch_size
        quarter = embedding_size // 4
        self.space_time_embed = nn.ModuleDict(
            {g: _PatchEmbed(len(b), embedding_size, max_patch_size) for g, b in S2_GROUPS.items()}
        )
        # Learned per group (7 rows: the publisher's space-time groups, see _CHANNEL_ROW).
        self.s_t_channel_embed = nn.Parameter(torch.zeros(len(S2_GROUPS) + 2, quarter))
        # Fixed sinusoids, stored in the published state dict: time step and month.
        steps = torch.arange(max_sequence_length)
        self.pos_embed = nn.Parameter(_sincos(steps, quarter).float(), requires_grad=False)
        month = 2 * math.pi * torch.arange(12, dtype=torch.float64) / 12
        month_table = torch.cat([month.sin()[:, None], month.cos()[:, None]], dim=1)
        self.month_embed = nn.Embedding.from_pretrained(
            month_table.repeat_interleave(quarter // 2, dim=1).float(), freeze=True
        )
        self.blocks = nn.ModuleList(
            [_Block(embedding_size, num_heads, mlp_ratio) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embedding_size)

    @classmethod
    def from_config(cls, config: Mapping) -> GalileoEncoder:
        """The encoder a published ``config.json`` (its ``model.encoder`` entry) describes."""
        enc = dict(config.get("model", {}).get("encoder", config))
        return cls(
            embedding_size=enc["embedding_size"],
            depth=enc["depth"],
            num_heads=enc["num_heads"],
            mlp_ratio=enc["mlp_ratio"],
            max_sequence_length=enc["max_sequence_length"],
            max_patch_size=enc["max_patch_size"],
        )

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], config: Mapping) -> GalileoEncoder:
        """The encoder of ``config`` with the published ``state`` loaded strictly.

        Keys in :data:`IGNORED_KEYS` (other modalities) are dropped; every other key must
        match a parameter of this module and every parameter must be given.

        Raises:
            CheckpointMismatch: a missing, unknown or wrongly shaped key, named.
        """
        model = cls.from_config(config)
        kept = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
        try:
            model.load_state_dict(kept, strict=True)
        except RuntimeError as err:
            raise CheckpointMismatch(f"Galileo state dict does not fit: {err}") from err
        return model.eval()

    def groups_for(self, bands: int) -> tuple[str, ...]:
        """The groups ``bands`` input bands (3 or 10) can make, in the publisher's order."""
        return ("S2_RGB",) if bands == len(RGB_BANDS) else tuple(S2_GROUPS)

    def _check(self, x: torch.Tensor, patch_size: int, groups, month: int) -> tuple[str, ...]:
        if x.ndim != 4 or x.shape[1] not in (len(RGB_BANDS), len(S2_BANDS)):
            raise InvalidInput(
                f"expected (B, bands, H, W) with 3 bands ({', '.join(RGB_BANDS)}) or 10 "
                f"({', '.join(S2_BANDS)}), got shape {tuple(x.shape)}"
            )
        if not _is_int(patch_size) or patch_size not in range(1, self.max_patch_size + 1):
            raise InvalidInput(f"patch_size must be 1-{self.max_patch_size}, got {patch_size!r}")
        height, width = x.shape[-2:]
        if height % patch_size or width % patch_size or not height:
            raise InvalidInput(
                f"image size {height}x{width} is not a positive multiple of patch_size {patch_size}"
            )
        if not _is_int(month) or month not in range(12):
            raise InvalidInput(f"month must be 0-11, got {month!r}")
        if not torch.isfinite(x).all():
            raise InvalidInput("input holds NaN or infinite values")
        available = self.groups_for(x.shape[1])
        chosen = available if groups is None else tuple(groups)
        unknown = [g for g in chosen if g not in available]
        if unknown or not chosen or len(set(chosen)) != len(chosen):
            raise InvalidInput(
                f"groups {list(chosen)} must be distinct and among {list(available)} for "
                f"{x.shape[1]}-band input"
            )
        return tuple(g for g in available if g in chosen)

    def encodings(self, groups: Sequence[str], h: int, w: int, patch_size: int, month: int):
        """``(h, w, G, D)``: channel, time step, month and position encodings of each token."""
        quarter = self.embedding_size // 4
        rows = [_CHANNEL_ROW[g] for g in groups]
        channel = self.s_t_channel_embed[rows]  # (G, D/4)
        time = self.pos_embed[0].expand(len(groups), quarter)
        mon = self.month_embed.weight[month].expand(len(groups), quarter)
        per_group = torch.cat([channel, time, mon], dim=1)  # (G, 3 D/4)
        col = _sincos(torch.arange(w) * patch_size, quarter // 2)  # (w, D/8)
        row = _sincos(torch.arange(h) * patch_size, quarter // 2)  # (h, D/8)
        space = torch.cat([col[None].expand(h, w, -1), row[:, None].expand(h, w, -1)], dim=-1)
        space = space.to(per_group)[:, :, None].expand(h, w, len(groups), quarter)
        return torch.cat([per_group.expand(h, w, -1, -1), space], dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        patch_size: int = 4,
        groups: Sequence[str] | None = None,
        month: int = DEFAULT_MONTH,
    ) -> torch.Tensor:
        """Raw bands ``(B, 3 or 10, H, W)`` -> tokens ``(B, H/p * W/p * G, D)``.

        Args:
            x: L1C reflectance x 10000 (any real dtype), bands in :data:`S2_BANDS` order
                (3: B2, B3, B4).
            patch_size: 1 to ``max_patch_size`` pixels; H and W must be multiples of it.
            groups: the groups to encode (default: all the bands allow); the others are
                absent, as if masked. Tokens follow :data:`S2_GROUPS`' order whatever the
                order given.
            month: month of acquisition, 0-11.

        Raises:
            InvalidInput: a wrong band count, size, patch size, month or group, or NaN.
        """
        tokens = self.embed(x, patch_size, groups, month)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def embed(
        self,
        x: torch.Tensor,
        patch_size: int = 4,
        groups: Sequence[str] | None = None,
        month: int = DEFAULT_MONTH,
    ) -> torch.Tensor:
        """The tokens that enter the first block, ``(B, N, D)``: :meth:`forward` before it.

        Apart so that a model can run part of the blocks itself (the NEC adapter on it,
        :mod:`nec_models.galileo_nec`). Same arguments and errors as :meth:`forward`.
        """
        chosen = self._check(x, patch_size, groups, month)
        x = normalise(x.to(self.norm.weight))
        patches = [self.space_time_embed[g](x[:, _BAND_SLICE[g]], patch_size) for g in chosen]
        tokens = torch.stack(patches, dim=-1).permute(0, 2, 3, 4, 1)  # (B, h, w, G, D)
        b, h, w = tokens.shape[:3]
        tokens = tokens + self.encodings(chosen, h, w, patch_size, month)
        return tokens.reshape(b, h * w * len(chosen), self.embedding_size)


def load_galileo_nano(folder: Path | None = None) -> GalileoEncoder:
    """The published Galileo-nano encoder from ``folder`` (default :data:`GALILEO_DIR`).

    Raises:
        InvalidInput: missing files, or an ``encoder.pt`` whose SHA-256 is not the
            published one.
    """
    folder = Path(folder) if folder else GALILEO_DIR
    weights, config = folder / "encoder.pt", folder / "config.json"
    for path in (weights, config):
        if not path.is_file():
            raise InvalidInput(f"Galileo weights: {path} is missing (is this a full checkout?)")
    got = sha256_file(weights)
    if got != NANO_SHA256:
        raise InvalidInput(f"{weights}: SHA-256 {got}, the published nano encoder is {NANO_SHA256}")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return GalileoEncoder.from_state_dict(state, json.loads(config.read_text()))


@register_model("galileo_nano")
def galileo_nano(pretrained: bool = True) -> GalileoEncoder:
    """Galileo-nano (128 wide, 4 blocks, 8 heads): the published weights, or random ones."""
    return load_galileo_nano() if pretrained else GalileoEncoder()


@register_model("galileo_test")
def galileo_test() -> GalileoEncoder:
    """Tiny randomly initialised test variant of :func:`galileo_nano`."""
    return GalileoEncoder(embedding_size=32, depth=1, num_heads=2, mlp_ratio=2.0)
