"""Pixel codecs shared by every sampler and reader: model outputs in [-1, 1] and masks in (0, 1) to the uint8
arrays that are stored, and back. A leaf module: the bytes of every shard depend on these lines alone."""
from __future__ import annotations

import numpy as np
import torch

NORMALIZE = ("fixed", "minmax")


def encode_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (... x C x H x W) -> uint8 (... x H x W x C): round((x + 1) * 127.5), clamped.

    A fixed mapping, not a per-image min-max rescale: the classifier reads the exact values back.
    """
    u8 = torch.round((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)
    return u8.movedim(-3, -1).contiguous()


def decode_uint8(u8: torch.Tensor) -> torch.Tensor:
    """uint8 (... x C x H x W) -> float in [-1, 1]; inverse of encode_uint8 up to 1/255."""
    return u8.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor, normalize: str = "fixed") -> np.ndarray:
    """B x 3 x H x W in [-1, 1] -> B x H x W x 3 uint8.

    "fixed": round((clamp(x, -1, 1) + 1) * 127.5), half to even. "minmax": each image stretched to its own
    min..max, as torchvision's ``save_image(normalize=True)`` does (the authors' files)."""
    return image_u8(x, normalize).cpu().numpy()


def minmax_uint8(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W -> B x H x W x 3 uint8, each image stretched to its own min..max (torchvision's
    make_grid(normalize=True), then save_image's mul(255).add_(0.5).clamp_(0, 255)), on x's device, all
    images at once: no per-image loop and no host copy before the uint8 conversion."""
    x = x.detach().float()
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    y = (x - low) / (high - low).clamp_min(1e-5)
    return y.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def mask_to_uint8(mask: torch.Tensor) -> np.ndarray:
    """B x 1 x H x W in (0, 1) -> B x H x W uint8 = round(m * 255)."""
    return mask_u8(mask).cpu().numpy()


def mask_u8(mask: torch.Tensor) -> torch.Tensor:
    return torch.round(mask.detach().float().clamp(0, 1) * 255).to(torch.uint8)[:, 0]


def image_u8(x: torch.Tensor, normalize: str) -> torch.Tensor:
    """to_uint8 as a tensor on x's device (converted there, copied to the host once, later)."""
    if normalize == "fixed":
        return encode_uint8(x)
    if normalize != "minmax":
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    return minmax_uint8(x)
