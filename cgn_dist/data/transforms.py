"""Decoding and the classifier's image transforms, run per sample in the DataLoader workers.

train: RandomResizedCrop(224, scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip;
val:   Resize(256) (short side) + CenterCrop(224);
then ImageNet mean/std, applied to a whole batch at once (``normalize_images``).

Three decoders give the same kind of output (a 3xHxW uint8 tensor):
- ``pil``: PIL decodes the full image;
- ``pil_draft``: PIL's JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale (DCT scaling, much less work)
  whenever the region the transform keeps still has at least the target's pixels at that scale; the crop
  is drawn first on the full-size geometry (read from the header), so the draw is the same as ``pil``'s;
- ``torchvision``: ``torchvision.io.decode_image`` (libjpeg-turbo / libpng inside torchvision) to a tensor,
  then tensor resizes with antialiasing.

The crop and flip are drawn from a ``random.Random`` the caller seeds, never from torch's global generator,
so a stream's augmentations follow from (seed, epoch, rank, worker) and do not disturb the training RNG.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

DECODERS = ("pil", "pil_draft", "torchvision")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ImageTransform:
    """What happens to one stored image. ``train``: random crop + flip; else resize + center crop."""

    train: bool = True
    size: int = 224  # output side
    resize: int = 256  # val: short side before the center crop
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    decoder: str = "pil"

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")

    def __call__(self, data: bytes, rng: random.Random):
        """Stored image bytes -> 3 x size x size uint8 tensor."""
        if self.decoder == "torchvision":
            return self._tensor_path(data, rng)
        return self._pil_path(data, rng)

    # --- geometry (shared by all decoders) --------------------------------------------------------------

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip) of the region to keep, in full-size pixels."""
        if not self.train:
            # Resize(256) then CenterCrop(224) keeps the central size/resize fraction of the short side.
            short = min(width, height)
            side = short * self.size / self.resize
            h = w = side
            return int(round((height - h) / 2)), int(round((width - w) / 2)), int(round(h)), int(round(w)), False
        top, left, h, w = random_resized_crop_box(width, height, rng, self.scale, self.ratio)
        return top, left, h, w, rng.random() < 0.5

    # --- PIL ------------------------------------------------------------------------------------------------

    def _pil_path(self, data: bytes, rng: random.Random):
        import torch
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        full_w, full_h = img.size
        top, left, h, w, flip = self.crop_box(full_w, full_h, rng)
        scale = 1
        if self.decoder == "pil_draft" and img.format == "JPEG":
            # Largest reduction that still leaves the kept region >= the output size in both sides.
            need = self.size if self.train else self.resize
            target = min(h, w) if self.train else min(full_w, full_h)
            while scale < 8 and target / (scale * 2) >= need:
                scale *= 2
            if scale > 1:
                img.draft("RGB", (math.ceil(full_w / scale), math.ceil(full_h / scale)))
                scale_x, scale_y = full_w / img.size[0], full_h / img.size[1]
                top, left = top / scale_y, left / scale_x
                h, w = h / scale_y, w / scale_x
        if img.mode != "RGB":  # (an RGB image needs no converted copy)
            img = img.convert("RGB")
        if self.train:
            box = (left, top, left + w, top + h)
            out = img.resize((self.size, self.size), Image.BILINEAR, box=box, reducing_gap=None)
            if flip:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            iw, ih = img.size
            short = min(iw, ih)
            nw, nh = (self.resize, max(1, round(ih * self.resize / iw))) if iw == short else \
                (max(1, round(iw * self.resize / ih)), self.resize)
            img = img.resize((nw, nh), Image.BILINEAR)
            x0, y0 = int(round((nw - self.size) / 2)), int(round((nh - self.size) / 2))
            out = img.crop((x0, y0, x0 + self.size, y0 + self.size))
        return torch.from_numpy(_np_array(out)).permute(2, 0, 1).contiguous()

    # --- torchvision.io -------------------------------------------------------------------------------------

    def _tensor_path(self, data: bytes, rng: random.Random):
        import warnings

        import torch
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2 import functional as F

        # torchvision 0.29 warns on every decode that its decoders move to torchcodec; they still work.
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)

        x = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        _, full_h, full_w = x.shape
        # torch's antialiased uint8 resize has a vectorised kernel for channels-last images (about 2x faster)
        x = x.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        if self.train:
            top, left, h, w, flip = self.crop_box(full_w, full_h, rng)
            x = F.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
            if flip:
                x = F.horizontal_flip(x)
            return x[0]
        x = F.resize(x, [self.resize], antialias=True)
        return F.center_crop(x, [self.size, self.size])[0]


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Inception-style crop: area fraction uniform in ``scale``, aspect log-uniform in ``ratio``; ten tries,
    then the largest centred crop within ``ratio``. Returns (top, left, h, w)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _np_array(img):
    import numpy as np
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only buffers


def normalize_images(images, mean=IMAGENET_MEAN, std=IMAGENET_STD, out=None):
    """uint8 N x 3 x H x W (any device) -> float32, ImageNet mean/std normalised (into ``out`` if given)."""
    import torch
    scale = 1.0 / (torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255.0)
    shift = -torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) / \
        torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    # One allocation, then in place: fresh 40 MB temporaries per op cost more (page faults) than the math.
    if out is None:
        return images.float().mul_(scale).add_(shift)
    out.copy_(images)
    return out.mul_(scale).add_(shift)


def image_bytes(sample: dict) -> bytes:
    """The stored image of a WebDataset sample (first of jpg, jpeg, png, webp)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"sample {sample.get('__key__')} of {sample.get('__url__')} has no image "
                   f"(looked for {', '.join(IMAGE_EXTS)}; it has {sorted(k for k in sample if not k.startswith('_'))})")
