"""Normalisation of raw pixels to model input and back (NumPy only).

:class:`Normalisation` maps raw pixels shaped ``(..., bands, H, W)`` to float32 model
input, ``(raw / scale - mean) / std`` per band, and inverts it; :data:`IMAGENET_MEAN`
and :data:`IMAGENET_STD` are its defaults for three-band (RGB) input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nec_serve.errors import InvalidInput

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Normalisation"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _float_tuple(value: Any, field: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise InvalidInput(f"normalisation {field} must be a sequence of numbers, got {value!r}")
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise InvalidInput(f"normalisation {field} must hold numbers, got {value!r}") from err
    if not out:
        raise InvalidInput(f"normalisation {field} is empty; give one value per band")
    if not all(math.isfinite(v) for v in out):
        raise InvalidInput(f"normalisation {field} must be finite, got {out}")
    return out


@dataclass(frozen=True)
class Normalisation:
    """Maps raw pixels to model input: ``(raw / scale - mean) / std`` per band.

    Attributes:
        scale: raw values are divided by it to land in about ``[0, 1]`` (255 for uint8,
            10000 for Sentinel-2 L2A reflectance).
        mean: per-band mean of the ``[0, 1]`` data, one value per band.
        std: per-band standard deviation of the ``[0, 1]`` data, one positive value per band.
    """

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float, np.number)):
            raise InvalidInput(f"normalisation scale must be a number, got {self.scale!r}")
        scale = float(self.scale)
        if not math.isfinite(scale) or scale <= 0:
            raise InvalidInput(f"normalisation scale must be finite and > 0, got {scale}")
        mean = _float_tuple(self.mean, "mean")
        std = _float_tuple(self.std, "std")
        if len(mean) != len(std):
            raise InvalidInput(
                f"normalisation has {len(mean)} mean value(s) but {len(std)} std value(s); "
                "give one of each per band"
            )
        if any(s <= 0 for s in std):
            raise InvalidInput(f"normalisation std must be > 0 for every band, got {std}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def bands(self) -> int:
        """Number of bands this normalisation is for."""
        return len(self.mean)

    @classmethod
    def for_dtype(cls, dtype: Any, bands: int) -> Normalisation:
        """Default normalisation for raw data of ``dtype`` with ``bands`` bands.

        uint8 is scaled by 255, uint16 by 10000 (Sentinel-2 L2A reflectance; products of
        processing baseline 04.00 and later carry a +1000 offset that this does not remove),
        floats by 1. Three bands get the ImageNet mean and std (the NEC ViT's RGB input);
        any other band count gets mean 0 and std 1.

        Args:
            dtype: NumPy dtype (or anything ``np.dtype`` accepts) of the raw pixels.
            bands: number of bands.

        Returns:
            The normalisation.

        Raises:
            InvalidInput: for other dtypes (pass a :class:`Normalisation` explicitly) or a
                band count below 1.
        """
        if isinstance(bands, bool) or not isinstance(bands, (int, np.integer)) or bands < 1:
            raise InvalidInput(f"band count must be a positive integer, got {bands!r}")
        try:
            dt = np.dtype(dtype)
        except TypeError as err:
            raise InvalidInput(f"not a NumPy dtype: {dtype!r}") from err
        if dt == np.uint8:
            scale = 255.0
        elif dt == np.uint16:
            scale = 10000.0
        elif dt.kind == "f":
            scale = 1.0
        else:
            raise InvalidInput(
                f"no default normalisation for dtype {dt}; expected uint8, uint16 or float, "
                "or construct a Normalisation with an explicit scale"
            )
        if bands == 3:
            return cls(scale, IMAGENET_MEAN, IMAGENET_STD)
        return cls(scale, (0.0,) * int(bands), (1.0,) * int(bands))

    def _per_band(self, x: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        if x.ndim < 3:
            raise InvalidInput(
                f"{what} must be shaped (..., bands, H, W), got shape {tuple(x.shape)}"
            )
        if x.shape[-3] != self.bands:
            raise InvalidInput(
                f"{what} has {x.shape[-3]} band(s) but the normalisation is for "
                f"{self.bands}; select bands or use a matching normalisation"
            )
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return mean, std

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Raw pixels to model input.

        Args:
            raw: array shaped ``(..., bands, H, W)`` of any real dtype.

        Returns:
            float32 array of the same shape.

        Raises:
            InvalidInput: for a wrong rank or band count, or a non-numeric dtype.
        """
        raw = np.asarray(raw)
        if raw.dtype.kind not in "uif":
            raise InvalidInput(f"cannot normalise pixels of dtype {raw.dtype}")
        mean, std = self._per_band(raw, "raw image")
        x = raw.astype(np.float32)
        x /= np.float32(self.scale)
        x -= mean
        x /= std
        return x

    def invert(self, x: np.ndarray) -> np.ndarray:
        """Model-space values back to raw units (float32; not rounded or clipped).

        Args:
            x: array shaped ``(..., bands, H, W)``.

        Returns:
            float32 array of the same shape, in raw units.

        Raises:
            InvalidInput: for a wrong rank or band count, or a non-numeric dtype.
        """
        x = np.asarray(x)
        if x.dtype.kind not in "uif":
            raise InvalidInput(f"cannot invert normalisation of dtype {x.dtype}")
        mean, std = self._per_band(x, "normalised image")
        out = x.astype(np.float32)
        out *= std
        out += mean
        out *= np.float32(self.scale)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: ``{"scale": float, "mean": [...], "std": [...]}``."""
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalisation:
        """Inverse of :meth:`to_dict`; validates keys and values.

        Args:
            d: mapping with exactly the keys ``scale``, ``mean`` and ``std``.

        Returns:
            The normalisation.

        Raises:
            InvalidInput: for missing or unknown keys or invalid values.
        """
        if not isinstance(d, Mapping):
            raise InvalidInput(f"normalisation must be a mapping, got {type(d).__name__}")
        keys = set(d)
        if keys != {"scale", "mean", "std"}:
            missing = sorted({"scale", "mean", "std"} - keys)
            unknown = sorted(map(str, keys - {"scale", "mean", "std"}))
            raise InvalidInput(
                f"normalisation needs keys scale, mean, std (missing {missing}, unknown {unknown})"
            )
        return cls(d["scale"], d["mean"], d["std"])
