"""The RVQ family at run time: its manifest section and its registration (no PyTorch).

The EO4EU Sentinel-2 compressor: a convolutional autoencoder whose latent a residual
vector quantizer codes with 1-8 codebooks per request (the rate knob ``codebooks``), one
static categorical table per codebook, decoded to georeferenced GeoTIFF bands. Its
PyTorch side is :mod:`nec_export.families.rvq`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nec_serve.contract import (
    CATEGORICAL,
    DataType,
    FamilyParams,
    GraphRole,
    Manifest,
    ModelFamily,
    Trainer,
    check_not_empty,
    check_positive,
    register_family,
)
from nec_serve.errors import InvalidInput, ManifestError

__all__ = ["RvqParams", "RVQ"]


def _check_downscale(value: int) -> str | None:
    return None if value in (1, 2, 4) else "must be 1, 2 or 4"


@dataclass(frozen=True)
class RvqParams(FamilyParams):
    """``family_params`` of the RVQ Sentinel-2 compressor.

    Attributes:
        levels: codebooks the export holds; a request codes the first 1..levels.
        codebook_size: entries per codebook (K).
        latent_channels: length of a codebook vector.
        downscale: latent resolution is ``img_size / downscale`` per side.
        tokens: latent positions per tile, ``(img_size / downscale) ** 2``.
        band_names: the bands the encoder takes and the decoder returns, in order.
        reflectance_scale: raw pixel values are reflectance times this (any dtype);
            :class:`InputSpec` ``mean``/``std`` standardise ``raw / reflectance_scale``.
        output_dtype: the decoded GeoTIFF's pixel type (values rounded and clipped).
    """

    levels: int = field(metadata={"check": check_positive})
    codebook_size: int = field(metadata={"check": check_positive})
    latent_channels: int = field(metadata={"check": check_positive})
    downscale: int = field(metadata={"check": _check_downscale})
    tokens: int = field(metadata={"check": check_positive})
    band_names: tuple[str, ...] = field(metadata={"check": check_not_empty})
    reflectance_scale: float = 10000.0
    output_dtype: str = "uint16"

    def __post_init__(self) -> None:
        """Keep the band names in a tuple."""
        object.__setattr__(self, "band_names", tuple(self.band_names))

    @property
    def channels(self) -> int:
        """Rows of a tile's symbol array: one per codebook level."""
        return self.levels

    def describe(self) -> str:
        """What a tile codes to, in words."""
        return (
            f"{self.levels} codebooks x {self.codebook_size} entries, "
            f"{self.tokens} latent positions per tile"
        )

    def pixel_scale(self) -> float:
        """Raw pixels are reflectance times :attr:`reflectance_scale`, whatever the dtype."""
        return self.reflectance_scale

    def admit(self, name: str, raw: np.ndarray) -> None:
        """Refuse negative reflectance (NaN and inf are refused by the readers)."""
        if raw.dtype.kind in "if":
            negative = raw < 0
            if negative.any():
                flat = int(np.argmax(negative))
                first = tuple(int(i) for i in np.unravel_index(flat, raw.shape))
                raise InvalidInput(
                    f"image {name!r}: {int(negative.sum())} negative reflectance value(s); "
                    f"first is {raw[first]} at (band, row, col) = {first}: reflectance x "
                    f"{self.reflectance_scale:g} is >= 0"
                )

    def output_bands(self) -> tuple[tuple[str, ...], str]:
        """The reconstructed bands' names and pixel type."""
        return self.band_names, self.output_dtype

    def check(self, manifest: Manifest, source: str) -> None:
        """Encoder ``(bands, S, S)`` -> int32 ``(levels, tokens)``; decoder the reverse."""
        inp = manifest.input
        side, rest = divmod(inp.img_size, self.downscale)
        problems = []
        if rest or side * side != self.tokens:
            problems.append(
                f"family_params.tokens {self.tokens} is not (input.img_size / downscale)^2 "
                f"= ({inp.img_size} / {self.downscale})^2"
            )
        if len(self.band_names) != inp.in_chans:
            problems.append(
                f"family_params.band_names has {len(self.band_names)} names for "
                f"{inp.in_chans} input bands"
            )
        if self.output_dtype not in ("uint16",):
            problems.append(f"family_params.output_dtype {self.output_dtype!r} is not uint16")
        sym = (DataType.TYPE_INT32, (self.levels, self.tokens))
        enc = manifest.graphs[GraphRole.ENCODER]
        if enc.inputs[0].dims != (inp.in_chans, inp.img_size, inp.img_size):
            problems.append(f"graphs.encoder.inputs[0].dims {list(enc.inputs[0].dims)} disagree")
        if (enc.outputs[0].data_type, enc.outputs[0].dims) != sym:
            problems.append(f"graphs.encoder.outputs[0] is not TYPE_INT32 {list(sym[1])}")
        dec = manifest.graphs.get(GraphRole.RECONSTRUCTION)
        if dec is not None and (dec.inputs[0].data_type, dec.inputs[0].dims) != sym:
            problems.append(f"graphs.reconstruction.inputs[0] is not TYPE_INT32 {list(sym[1])}")
        if problems:
            raise ManifestError(f"{source}: " + "; ".join(problems))


#: The EO4EU Sentinel-2 compressor: convolutional autoencoder, residual VQ, 1-8 codebooks.
RVQ = register_family(
    ModelFamily(
        name="rvq",
        graph_names={
            GraphRole.ENCODER: "rvq_encoder",
            GraphRole.RECONSTRUCTION: "rvq_decoder",
        },
        entropy_kinds=(CATEGORICAL.kind,),
        params=RvqParams,
        rate="codebooks",
        rate_help="RVQ family: codebook levels to code, 1..8 (the rate; default all the export "
        "has)",
        default_output=GraphRole.RECONSTRUCTION.output,
        georeferenced=True,
        shared_streams=True,
        trainers={
            "rvq": Trainer(
                "nec_models.train_rvq:RVQConfig",
                "nec_models.train_rvq:train_rvq",
                "the RVQ Sentinel-2 compressor (1-8 codebooks), resumable",
                {
                    "data": "ssl4eo_s12, eurosat_ms and/or bigearthnet folders (10 bands are "
                    "taken from each)",
                    "out": "run folder: split.csv, log.csv, checkpoint",
                    "model": "registered RVQ model",
                    "crop": "training crop size in pixels",
                    "beta": "commitment loss weight",
                    "train_codebooks": "codebooks per sample: 0 draws 1..levels per sample "
                    "(one model, every rate)",
                    "split_seed": "the train/val/test split by group",
                },
            ),
        },
    )
)
