"""The toy family at run time: a 2x2 average pool of each band, scalar-quantized.

A tile of ``bands x S x S`` pixels codes to ``bands x (S/2)^2`` indices of a uniform
scalar quantizer, one categorical table per band; decoding gives the bands back at the
tile size. No rate knob, not georeferenced, decoded to GeoTIFF bands.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nec_serve.contract import (
    CATEGORICAL,
    FamilyParams,
    GraphRole,
    Manifest,
    ModelFamily,
    check_not_empty,
    check_positive,
    register_family,
)
from nec_serve.errors import ManifestError


@dataclass(frozen=True)
class ToyParams(FamilyParams):
    """``family_params`` of the toy family."""

    channels: int = field(metadata={"check": check_positive})
    tokens: int = field(metadata={"check": check_positive})
    entries: int = field(metadata={"check": check_positive})
    band_names: tuple[str, ...] = field(metadata={"check": check_not_empty})

    def __post_init__(self) -> None:
        """Keep the band names in a tuple."""
        object.__setattr__(self, "band_names", tuple(self.band_names))

    def describe(self) -> str:
        """What a tile codes to, in words."""
        return f"{self.channels} bands x {self.tokens} pooled pixels, {self.entries} levels"

    def check(self, manifest: Manifest, source: str) -> None:
        """One channel per input band, ``(img_size / 2)^2`` tokens."""
        inp = manifest.input
        if self.channels != inp.in_chans or self.tokens != (inp.img_size // 2) ** 2:
            raise ManifestError(f"{source}: family_params disagree with input")

    def pixel_scale(self) -> float:
        """Pixels are reflectance x 10000, whatever their dtype."""
        return 10000.0

    def output_bands(self) -> tuple[tuple[str, ...], str]:
        """The reconstructed bands, as 16-bit pixels."""
        return self.band_names, "uint16"


TOY = register_family(
    ModelFamily(
        name="toy",
        graph_names={GraphRole.ENCODER: "toy_encoder", GraphRole.RECONSTRUCTION: "toy_decoder"},
        entropy_kinds=(CATEGORICAL.kind,),
        params=ToyParams,
    )
)
