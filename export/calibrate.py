"""Fit a model's entropy bottleneck to real latents, the encoder frozen.

NEC trains the factorized prior together with the encoder. When no trained checkpoint is
at hand (as here, where no weights can be downloaded), or a checkpoint is moved to other
imagery, the prior can be fitted to the latents that the frozen encoder produces: the rate
term of NEC's loss, ``-log2 p(y + u)`` with uniform noise ``u``, minimised over the
bottleneck's density parameters only. The quantiles (and so the medians and table ranges)
are then set exactly by CompressAI's bisection search, and the tables are rebuilt with
``update(force=True)``. The encoder's weights do not change, so only the rate changes,
never the embeddings' quality.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from nec_models.nec import NECFactorized
from nec_serve.errors import InvalidInput
from nec_serve.imagery import Normalisation, tile_image

__all__ = ["CalibrationReport", "calibrate_bottleneck", "calibrate_from_inputs", "latents_of"]


@dataclass
class CalibrationReport:
    """What calibration did, in bits per latent symbol."""

    tiles: int
    symbols_per_channel: int
    steps: int
    bits_per_symbol_before: float
    bits_per_symbol_after: float
    seconds: float

    def as_dict(self) -> dict:
        """Plain dict for the manifest."""
        return asdict(self)


@torch.no_grad()
def latents_of(model: NECFactorized, images: np.ndarray, batch_size: int = 8) -> torch.Tensor:
    """Continuous latents ``(N, C, T)`` of normalised images ``(N, bands, S, S)``."""
    parts = [
        model.latent(torch.from_numpy(images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts)


def _bits(eb, samples: torch.Tensor) -> float:
    with torch.no_grad():
        _, lik = eb(samples, training=False)
    return float(-torch.log2(lik).mean())


def calibrate_bottleneck(
    model: NECFactorized,
    latents: torch.Tensor,
    steps: int = 150,
    lr: float = 3e-2,
    batch: int = 512,
    seed: int = 0,
) -> CalibrationReport:
    """Fit ``model``'s bottleneck density to ``latents`` ``(N, C, T)``; rebuild its tables.

    Each of ``steps`` Adam steps uses ``batch`` random token positions of every channel.
    """
    if latents.ndim != 3 or latents.shape[1] != model.embed_dim:
        raise ValueError(f"latents {tuple(latents.shape)} do not fit (N, {model.embed_dim}, T)")
    t0 = time.perf_counter()
    eb = model.bottleneck
    # (C, N*T) as a (1, C, N*T, 1) "image": one density per channel, as at inference.
    samples = latents.detach().permute(1, 0, 2).reshape(1, model.embed_dim, -1, 1)
    before = _bits(eb, samples)
    params = [p for n, p in eb.named_parameters() if n != "quantiles"]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    per_channel = samples.reshape(model.embed_dim, 1, -1)  # the layout _likelihood takes
    m = per_channel.shape[-1]
    for _ in range(steps):
        cols = torch.randint(0, m, (min(batch, m),), generator=gen)
        chunk = per_channel[:, :, cols]
        # Additive uniform noise stands in for rounding, as in training (Balle et al.).
        noisy = chunk + torch.rand(chunk.shape, generator=gen) - 0.5
        lik, _, _ = eb._likelihood(noisy)
        loss = -torch.log2(eb.likelihood_lower_bound(lik)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    eb.update(force=True, update_quantiles=True)
    after = _bits(eb, samples)
    return CalibrationReport(
        tiles=int(latents.shape[0]),
        symbols_per_channel=int(samples.shape[2]),
        steps=steps,
        bits_per_symbol_before=round(before, 4),
        bits_per_symbol_after=round(after, 4),
        seconds=round(time.perf_counter() - t0, 2),
    )


def calibrate_from_inputs(
    model: NECFactorized,
    inputs,
    max_tiles: int = 32,
    steps: int = 150,
) -> CalibrationReport:
    """Calibrate on up to ``max_tiles`` tiles of ``(name, (bands, H, W))`` raw images.

    Tiles are cut and normalised exactly as ``nec-serve compress`` does, so the fitted
    density is that of the latents the coder will see.
    """
    batches, n = [], 0
    for name, raw in inputs:
        if raw.shape[0] != model.in_chans:
            raise InvalidInput(
                f"calibration image {name!r} has {raw.shape[0]} bands, the model takes "
                f"{model.in_chans}: choose bands, e.g. --calibrate-bands 1,2,3"
            )
        tiles, _ = tile_image(raw, model.img_size)
        tiles = tiles[: max_tiles - n]
        batches.append(Normalisation.for_dtype(raw.dtype, raw.shape[0]).apply(tiles))
        n += len(tiles)
        if n >= max_tiles:
            break
    if not batches:
        raise InvalidInput("no calibration images")
    images = np.concatenate(batches).astype(np.float32)
    return calibrate_bottleneck(model, latents_of(model, images), steps=steps)
