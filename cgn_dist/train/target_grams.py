"""The style loss's target Grams of fixed real images, computed once instead of at every update.

The CGN-MNIST style loss compares the Grams of the generated batch with those of the real batch through a
frozen VGG16. Where the real images are fixed tensors (colored MNIST: the LNTL recipe colours each digit
once, when the set is built), the real side's VGG pass and its Grams depend only on the image: the same
numbers every epoch. On a CPU without AMX that pass is a fifth of the fast fp32 update (VGG convolutions
run near the core's fp32 peak there, so no layout makes them cheaper; not running them is the saving).

Memory bounds it: colored MNIST's three weighted layers (64, 128, 256 channels) hold 86,016 floats per image
(344 KB in fp32; half in bf16), 1.43 GB for the 4,167 offline digits and 20.6 GB for the full 60,000.
``TargetGrams`` caches the first ``capacity`` images of the set that fit in the budget, filled at start in
batches of 64, and computes the rest per batch as before. Same math: the cached Grams are those the update
would compute (same VGG copy, layout and precision), up to the batch-size-dependent rounding of the
convolutions (fp32 rounding; tests compare with the plain perceptual loss). double_colored and wildlife draw
their colours and texture crops per batch: nothing to cache there.
"""
from __future__ import annotations

from typing import Sequence

import torch

from cgn_dist.losses import _last_used_layer, gram

FILL_BATCH = 64


class TargetGrams:
    """Target Grams of ``images[:capacity]`` (fixed real images), looked up by dataset index."""

    def __init__(self, vgg, images: torch.Tensor, weights: Sequence[float], autocast, budget_bytes: int):
        # autocast: a callable giving the context the update computes its target features under
        self.vgg, self.autocast = vgg, autocast
        self.weights = list(weights)[:_last_used_layer(weights)]
        self.n_images = len(images)
        self.grams: list[torch.Tensor | None] = []
        with torch.no_grad():
            probe = self._compute(images[:1])
        per = sum(g.numel() * g.element_size() for g in probe if g is not None)
        self.bytes_per_image = per
        self.capacity = min(self.n_images, int(budget_bytes // per)) if per else 0
        for g in probe:
            self.grams.append(None if g is None else g.new_empty((self.capacity, *g.shape[1:])))
        with torch.no_grad():
            for s in range(0, self.capacity, FILL_BATCH):
                e = min(s + FILL_BATCH, self.capacity)
                for store, g in zip(self.grams, self._compute(images[s:e])):
                    if store is not None:
                        store[s:e] = g

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_image

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """What style_loss(fast=True) computes for its target side (VGG under the update's autocast, Gram with
        fold_scale), for the layers with a non-zero weight."""
        with self.autocast():
            feats = self.vgg(x.contiguous(memory_format=torch.channels_last), num_outputs=len(self.weights))
            return [gram(f, fold_scale=True) if w != 0 else None for f, w in zip(feats, self.weights)]

    def lookup(self, index: torch.Tensor, images: torch.Tensor) -> list[torch.Tensor | None]:
        """Target Grams of the batch (``images`` = the real batch, rows ``index`` of the set): cached rows
        read, the others computed."""
        store = next((g for g in self.grams if g is not None), None)
        index = index.to(store.device if store is not None else images.device)
        hit = index < self.capacity
        if bool(hit.all()):
            return [None if g is None else g[index] for g in self.grams]
        with torch.no_grad():
            computed = self._compute(images[(~hit).to(images.device)])
        if not bool(hit.any()):
            return computed
        out = []
        for store, fresh in zip(self.grams, computed):
            if store is None:
                out.append(None)
                continue
            full = store.new_empty((len(index), *store.shape[1:]))
            full[hit] = store[index[hit]]
            full[~hit] = fresh
            out.append(full)
        return out

    def describe(self, budget_gb: float) -> str:
        gb = self.bytes_per_image * self.n_images / 1e9
        if self.capacity == self.n_images:
            return (f"target Grams cached for all {self.n_images:,} real images ({self.nbytes / 1e9:.2f} GB, "
                    f"mnist.target_gram_cache_gb={budget_gb:g}): the style loss skips the VGG pass over the real batch")
        return (f"target Grams cached for {self.capacity:,} of {self.n_images:,} real images ({self.nbytes / 1e9:.2f} GB); "
                f"mnist.target_gram_cache_gb={gb * 1.01:.1f} would cache all")


__all__ = ["TargetGrams", "FILL_BATCH"]
