"""The MNIST train sets as whole tensors, with train-time randomness drawn per batch (vectorised).

`build_mnist_dataset` returns per-item datasets (numpy rng per item, one Python call per image): right for
dumping test sets and for the shards, but at batch 16 the Python per item costs as much as the small
generator's forward. For CGN training, `TensorBatches` holds the same images once as tensors and draws
a batch's colour jitter / texture crops in a handful of tensor ops:

  colored         the images are fixed (the LNTL recipe jitters once, when building the set): an index.
  double_colored  binarised digits x (palette[label] + N(0, 0.01)) over (palette[label] + N(0, 0.01)),
                  clipped to [0, 1], as DoubleColoredMNIST.
  wildlife        binarised digits over two 32 px crops (3 px reflect padding) of the class textures,
                  as WildlifeMNIST; crop offsets uniform over all valid positions.

Same distribution as the per-item sets, not the same draws: each batch's draws come from a generator
seeded with (seed, epoch, batch index), so a resumed run sees the same batches as an uninterrupted one.
The batch order (seeded permutation per epoch, split over ranks) is data/batch_order.py's, as for BatchStream.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cgn_dist.data.batch_order import batch_indices
from cgn_dist.data.mnist import (DOUBLE_JITTER_STD, IMG_SIZE, ColoredMNIST, DoubleColoredMNIST, WildlifeMNIST,
                                 _binarized_digit)
from cgn_dist.data.textures import CROP_PADDING, CROP_SIZE


def _all_items(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)


def _binarized_all(digits: torch.Tensor) -> torch.Tensor:
    x = digits.float().div(255.0)[:, None]
    x = F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode="nearest")
    return (x > 0.1).float()


class TensorBatches:
    """Batch k of the training stream as tensors: (B x 3 x 32 x 32 in [-1, 1], B labels)."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.bs, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.per_rank = len(dataset) // world
        self.batches_per_epoch = max(1, self.per_rank // batch_size)
        self.n = len(dataset)
        if isinstance(dataset, WildlifeMNIST):
            self.kind = "wildlife"
        elif isinstance(dataset, DoubleColoredMNIST):
            self.kind = "double_colored"
        elif isinstance(dataset, ColoredMNIST):
            self.kind = "colored"
        else:
            raise TypeError(f"TensorBatches needs a ColoredMNIST, DoubleColoredMNIST or WildlifeMNIST, "
                            f"got {type(dataset).__name__}")
        if self.kind == "colored":
            self.images, self.labels = _all_items(dataset)
            return
        if dataset.split != "train":
            raise ValueError("TensorBatches is for the train split (the test split's draws are per item)")
        self.labels = dataset.labels.clone()
        self.digits = _binarized_all(dataset.digits)  # N x 1 x 32 x 32 in {0, 1}
        assert self.digits.shape[1:] == _binarized_digit(dataset.digits[0]).shape
        if self.kind == "double_colored":
            self.obj_palette, self.bg_palette = dataset.obj_palette, dataset.bg_palette
        else:
            pad = (CROP_PADDING,) * 4
            self.obj_tex = F.pad(torch.stack(dataset.obj_textures), pad, mode="reflect")  # 10 x 3 x 156 x 156
            self.bg_tex = F.pad(torch.stack(dataset.bg_textures), pad, mode="reflect")

    def __len__(self) -> int:
        return self.n

    @property
    def fixed_images(self) -> torch.Tensor | None:
        """The whole set's images where they are the same every epoch (colored), in dataset-index order; None
        where a batch's colours / crops are drawn per batch."""
        return self.images if self.kind == "colored" else None

    def indices(self, k: int) -> tuple[int, torch.Tensor]:
        return batch_indices(k, self.n, self.bs, self.seed, self.rank, self.world)

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, idx = self.indices(k)
        y = self.labels[idx]
        if self.kind == "colored":
            return self.images[idx], y
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, 0x6D66, self.rank, epoch, k])
                                              .generate_state(1)[0]))
        d = self.digits[idx]
        if self.kind == "double_colored":
            jitter = torch.randn(len(idx), 2, 3, generator=g) * DOUBLE_JITTER_STD
            obj = (self.obj_palette[y] + jitter[:, 0]).clamp(0, 1)[:, :, None, None]
            bg = (self.bg_palette[y] + jitter[:, 1]).clamp(0, 1)[:, :, None, None]
            return (d * obj + (1 - d) * bg) * 2.0 - 1.0, y
        obj = _crops(self.obj_tex[y], g)
        bg = _crops(self.bg_tex[y], g)
        return d * obj + (1 - d) * bg, y


def _crops(tex: torch.Tensor, g: torch.Generator, crop: int = CROP_SIZE) -> torch.Tensor:
    """One random crop x crop window per padded texture (B x 3 x H x W), scaled to [-1, 1]."""
    b, _, h, w = tex.shape
    i = torch.randint(0, h - crop + 1, (b,), generator=g)
    j = torch.randint(0, w - crop + 1, (b,), generator=g)
    rows = (i[:, None] + torch.arange(crop))[:, None, :, None]  # B x 1 x crop x 1
    cols = (j[:, None] + torch.arange(crop))[:, None, None, :]  # B x 1 x 1 x crop
    out = tex[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    return out * 2.0 - 1.0


__all__ = ["TensorBatches"]
