"""Wildlife-MNIST textures: 10 object and 10 background textures, one per class.

Two sources:

* A folder in the layout of the original release: `<dir>/object/<cls>_*.jpg` and
  `<dir>/background/<cls>_*.jpg` for cls = 0..9 (DTD "striped" objects and "veined"
  backgrounds). `load_texture_folder` reads them.
* A procedural default that needs no file and no download (`make_procedural_textures`),
  deterministic on every machine, 150 x 150 RGB:
  - object (striped), class c: sinusoidal stripes at angle 18°·c with period 7 + 2.5·(c mod 5)
    px, slightly wavy, sharpened into bands of a light colour of hue c/10 and a dark colour of
    the opposite hue, plus faint grain from numpy's default_rng(1000 + c);
  - background (veined), class c: marble veins |sin(2π·(x·cos φ + y·sin φ)/Q + 5·turbulence)|
    with φ = 25° + 31°·c, Q = 38 + 5·c and turbulence = four octaves of bicubically
    upsampled value noise from default_rng(2000 + c); thin dark veins of hue (c/10 + 0.55) over
    a pale base of hue (c/10 + 0.05).
  Hue, orientation and scale differ per class, so every class has a distinct texture.
  They stand in for the DTD images offline; they are not those images.

Per-sample transform: resize to 150 x 150 (NEAREST, done once by
`prepare_texture`), random 32 x 32 crop with 3 px reflect padding, scale to [-1, 1]
(`random_texture_crop`, offsets drawn from a numpy Generator).
"""

from __future__ import annotations

import colorsys
import functools
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cgn_dist.errors import InputError, InputNotFound

N_CLASSES = 10
TEXTURE_SIZE = 150
CROP_SIZE = 32
CROP_PADDING = 3
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class Textures(NamedTuple):
    """Per-class textures, index = class. Each entry: uint8 tensor 3 x H x W."""

    object: list[torch.Tensor]
    background: list[torch.Tensor]


# --- folder ---------------------------------------------------------------------------------

def _read_rgb(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _class_files(folder: Path, n_classes: int) -> list[Path]:
    if not folder.is_dir():
        raise InputNotFound(f"texture folder {folder} does not exist (expected "
                            f"'object/' and 'background/' with <cls>_*.jpg files)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    out = []
    for c in range(n_classes):
        matches = [p for p in files if p.name.startswith(f"{c}_")]
        if len(matches) != 1:
            found = [p.name for p in matches] or "none"
            raise InputError(f"{folder}: need exactly one image named '{c}_*.jpg' for class {c}, "
                             f"found {found}")
        out.append(matches[0])
    return out


def load_texture_folder(path: str | os.PathLike, n_classes: int = N_CLASSES) -> Textures:
    """Read `<path>/object/<cls>_*.jpg` and `<path>/background/<cls>_*.jpg`, cls = 0..n-1."""
    root = Path(path)
    obj = [_read_rgb(p) for p in _class_files(root / "object", n_classes)]
    bg = [_read_rgb(p) for p in _class_files(root / "background", n_classes)]
    return Textures(obj, bg)


# --- procedural -----------------------------------------------------------------------------

def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float64)


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random cells x cells grid upsampled bicubically."""
    grid = torch.from_numpy(rng.random((1, 1, cells, cells)))
    up = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)
    return up[0, 0].numpy()


def _striped(c: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + c)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = np.deg2rad(18.0 * c)
    period = 7.0 + 2.5 * (c % 5)
    wobble = 1.5 * np.sin(2 * np.pi * (x * np.sin(theta) - y * np.cos(theta)) / 53.0 + c)
    s = np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta) + wobble) / period)
    s = np.clip(2.5 * s, -1, 1) * 0.5 + 0.5  # sharpen the sinusoid into bands
    light, dark = _hsv(c / 10, 0.75, 0.95), _hsv(c / 10 + 0.5, 0.8, 0.25)
    img = s[..., None] * light + (1 - s[..., None]) * dark
    img += rng.normal(0.0, 0.03, img.shape)
    return img


def _veined(c: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(2000 + c)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    turb = sum(_value_noise(rng, size, cells) / (2 ** k) for k, cells in enumerate((4, 8, 16, 32)))
    phi = np.deg2rad(25.0 + 31.0 * c)
    q = 38.0 + 5.0 * c
    v = np.abs(np.sin(2 * np.pi * (x * np.cos(phi) + y * np.sin(phi)) / q + 5.0 * turb))
    vein = (1.0 - v) ** 10  # thin lines where the sine crosses zero
    base, vein_col = _hsv(c / 10 + 0.05, 0.3, 0.85), _hsv(c / 10 + 0.55, 0.7, 0.3)
    shade = 0.9 + 0.1 * _value_noise(rng, size, 6)[..., None]
    img = shade * ((1 - vein[..., None]) * base + vein[..., None] * vein_col)
    return img


def _to_uint8_chw(img: np.ndarray) -> torch.Tensor:
    arr = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@functools.lru_cache(maxsize=4)
def _procedural(size: int, n_classes: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    obj = tuple(_to_uint8_chw(_striped(c, size)) for c in range(n_classes))
    bg = tuple(_to_uint8_chw(_veined(c, size)) for c in range(n_classes))
    return obj, bg


def make_procedural_textures(size: int = TEXTURE_SIZE, n_classes: int = N_CLASSES) -> Textures:
    """Deterministic striped object and veined background textures (see module docstring).
    Cached per process: treat the tensors as read-only."""
    obj, bg = _procedural(size, n_classes)
    return Textures(list(obj), list(bg))


def load_textures(textures_dir: str | os.PathLike | None = None) -> Textures:
    """The folder's textures, or the procedural default when textures_dir is None."""
    return make_procedural_textures() if textures_dir is None else load_texture_folder(textures_dir)


# --- transform ------------------------------------------------------------------------------

def prepare_texture(tex: torch.Tensor, size: int = TEXTURE_SIZE) -> torch.Tensor:
    """uint8 3 x H x W -> float 3 x size x size in [0, 1], NEAREST resize.

    'nearest-exact' samples pixel centres like PIL's NEAREST (which the original used);
    torch's plain 'nearest' picks different source pixels.
    """
    x = tex.float().div(255.0)[None]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="nearest-exact")
    return x[0]


def random_texture_crop(tex: torch.Tensor, rng: np.random.Generator, crop: int = CROP_SIZE,
                        padding: int = CROP_PADDING) -> torch.Tensor:
    """Random crop x crop window of a prepared texture after `padding` px of reflect
    padding, scaled to [-1, 1]. Offsets uniform over every valid position."""
    padded = F.pad(tex[None], (padding,) * 4, mode="reflect")[0]
    h, w = padded.shape[-2:]
    i = int(rng.integers(0, h - crop + 1))
    j = int(rng.integers(0, w - crop + 1))
    return padded[:, i:i + crop, j:j + crop] * 2.0 - 1.0


__all__ = ["Textures", "load_texture_folder", "make_procedural_textures", "load_textures",
           "prepare_texture", "random_texture_crop", "TEXTURE_SIZE"]
