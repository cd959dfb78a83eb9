"""Load the official NEC checkpoints as they are.

Official checkpoints are ``{"model": state_dict, ...}`` saved by ``torch.save``. They are
read with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler, so a
checkpoint cannot run code. Two CompressAI generations name the bottleneck's density
parameters differently (1.2.4: ``_matrix0``, ``_bias0``, ``_factor0``; 1.2.6 and later:
``matrices.0``, ``biases.0``, ``factors.0``); both load. Entropy-model buffers
(``_quantized_cdf``, ``_offset``, ``_cdf_length``) are resized to the checkpoint's shapes
first, and position embeddings trained at another resolution are interpolated bicubically
(224 px to 256 or 512 px) as the official fine-tuning code does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from torch import nn

from nec_serve.errors import CheckpointMismatch

__all__ = ["load_checkpoint", "read_checkpoint", "read_state_dict", "remap_compressai_keys"]

_OLD_KEY = re.compile(r"^(?P<prefix>.*)\._(?P<kind>matrix|bias|factor)(?P<index>\d+)$")
_NEW_NAME = {"matrix": "matrices", "bias": "biases", "factor": "factors"}
_ENTROPY_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length")
_MAX_LISTED = 8


def read_checkpoint(path: str | Path) -> Mapping:
    """Load a checkpoint file with PyTorch's restricted unpickler (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointMismatch(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for bad or unsafe files
        raise CheckpointMismatch(
            f"cannot read checkpoint {path}: {err}. Only torch.save files of tensors are "
            "accepted (weights_only=True); pickled code is refused."
        ) from err
    if not isinstance(ckpt, Mapping):
        raise CheckpointMismatch(f"checkpoint {path} is not a dict but {type(ckpt).__name__}")
    return ckpt


def read_state_dict(source: str | Path | Mapping) -> dict[str, torch.Tensor]:
    """Return the state dict of a checkpoint path or an already loaded checkpoint."""
    ckpt = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    if isinstance(ckpt, Mapping) and "model" in ckpt and isinstance(ckpt["model"], Mapping):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, Mapping) or not all(isinstance(k, str) for k in ckpt):
        raise CheckpointMismatch("checkpoint is neither {'model': state_dict} nor a state dict")
    return dict(ckpt)


def remap_compressai_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename CompressAI 1.2.4 bottleneck keys (``_matrix0``) to the current ones."""
    out = {}
    for key, value in state.items():
        m = _OLD_KEY.match(key)
        if m:
            key = f"{m['prefix']}.{_NEW_NAME[m['kind']]}.{m['index']}"
        out[key] = value
    return out


def _resize_entropy_buffers(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    # The buffers start empty and are sized by update(); load_state_dict needs equal shapes.
    for name, module in model.named_modules():
        if not isinstance(module, (EntropyBottleneck, GaussianConditional)):
            continue
        names = list(_ENTROPY_BUFFERS)
        if isinstance(module, GaussianConditional):
            names.append("scale_table")
        for buf in names:
            key = f"{name}.{buf}" if name else buf
            if key in state:
                module.register_buffer(buf, torch.zeros_like(state[key]))


def _interpolate_pos_embed(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, target in model.state_dict().items():
        if not key.endswith("pos_embed") or key not in state:
            continue
        src = state[key]
        if src.shape == target.shape or src.ndim != 3 or src.shape[-1] != target.shape[-1]:
            continue
        extra = 1  # the CLS token's slot is kept as it is
        old = int(round((src.shape[1] - extra) ** 0.5))
        new = int(round((target.shape[1] - extra) ** 0.5))
        if old * old + extra != src.shape[1] or new * new + extra != target.shape[1]:
            continue
        grid = src[:, extra:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
        state[key] = torch.cat([src[:, :extra], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f" (+{more} more)" if more > 0 else "")


def load_checkpoint(model: nn.Module, source: str | Path | Mapping) -> nn.Module:
    """Load an official NEC checkpoint into ``model``, strictly.

    Args:
        model: a model from :func:`nec_models.create_model`.
        source: a checkpoint path, a loaded checkpoint or a state dict.

    Returns:
        ``model``, in eval mode.

    Raises:
        CheckpointMismatch: unreadable file, or keys/shapes that do not fit the model;
            the message names missing, unexpected and mis-shaped keys.
    """
    state = remap_compressai_keys(read_state_dict(source))
    _interpolate_pos_embed(model, state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if k.split(".")[-1] not in _ENTROPY_BUFFERS + ("scale_table",)
        and state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        name = getattr(model, "registry_name", type(model).__name__)
        parts = [f"checkpoint does not match model {name!r}"]
        if missing:
            parts.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listed(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_listed(shapes)}")
        raise CheckpointMismatch("; ".join(parts))
    _resize_entropy_buffers(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval()
