"""An export directory as the coder sees it: the manifest, the verified tables, the codec."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nec_serve.codec import LatentCodec
from nec_serve.contract import FrozenTables, GraphRole, Manifest
from nec_serve.fingerprint import code_fingerprint
from nec_serve.imagery import Normalisation

__all__ = ["ModelBundle"]


@dataclass(frozen=True)
class ModelBundle:
    """An export directory as the coder sees it: manifest, verified tables, codec.

    ``tables`` and ``codec`` are what the manifest's entropy model kind loads (for
    ``factorized``: :class:`~nec_serve.tables.EntropyTables` and
    :class:`~nec_serve.codec.FactorizedCodec`).
    """

    root: Path
    manifest: Manifest
    tables: FrozenTables
    codec: LatentCodec

    @classmethod
    def load(cls, root: str | Path) -> ModelBundle:
        """Load ``root`` (written by ``nec-serve export``) and verify its table hash."""
        root = Path(root)
        manifest = Manifest.load(root)
        tables, codec = manifest.entropy.load(root)
        return cls(root, manifest, tables, codec)

    @property
    def img_size(self) -> int:
        """Tile size in pixels the encoder takes."""
        return self.manifest.input.img_size

    @property
    def in_chans(self) -> int:
        """Bands the encoder takes."""
        return self.manifest.input.in_chans

    @property
    def tokens(self) -> int:
        """Tokens per tile."""
        return self.manifest.family_params.tokens

    @property
    def channels(self) -> int:
        """Latent channels."""
        return self.manifest.family_params.channels

    def graph_path(self, role: GraphRole) -> Path:
        """Path of the exported ONNX graph of ``role``."""
        return self.root / self.manifest.graph(role).file

    def normalisation(self, dtype: Any) -> Normalisation:
        """How raw pixels of ``dtype`` become this model's input.

        The scale comes from the family's parameters
        (:meth:`~nec_serve.contract.FamilyParams.pixel_scale`) or else from the dtype
        (:meth:`Normalisation.for_dtype`); the per-band mean and std from the manifest.
        """
        inp = self.manifest.input
        scale = self.manifest.family_params.pixel_scale()
        if scale is None:
            scale = Normalisation.for_dtype(dtype, inp.in_chans).scale
        return Normalisation(scale, inp.mean, inp.std)

    @property
    def code_sha256(self) -> str:
        """The code fingerprint format 3 containers record (:mod:`nec_serve.fingerprint`).

        Made from the verified tables' hash and the manifest's ``code_extras`` (for an
        RVQ export, its codebooks; an export that predates them is named by its tables).
        """
        return code_fingerprint(
            family=self.family,
            entropy_kind=self.manifest.entropy.kind,
            tables_sha256=self.tables.sha256,
            channels=self.channels,
            tokens=self.tokens,
            extras=self.manifest.entropy.code_extras,
        )

    @property
    def family(self) -> str:
        """The export's model family's name."""
        return self.manifest.family
