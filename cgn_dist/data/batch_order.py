"""The CGN-MNIST training stream's batch order, defined once for the per-item and the tensor paths: a seeded
permutation per epoch (seed * 100003 + epoch), split over ranks; batch k of an epoch is fixed by (seed,
epoch, k), so a resumed or re-sharded run draws the same batches."""
from __future__ import annotations

import functools

import torch


def batches_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    return max(1, (n // world) // batch_size)


def batch_indices(k: int, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                  ) -> tuple[int, torch.Tensor]:
    """(epoch, dataset indices) of batch ``k`` of this rank's stream."""
    epoch, j = divmod(k, batches_per_epoch(n, batch_size, world))
    perm = _epoch_permutation(n, seed, epoch)[rank::world]
    return epoch, perm[j * batch_size:(j + 1) * batch_size].clone()  # the cached permutation stays unchanged


@functools.lru_cache(maxsize=2)  # an update asks for its batch's indices more than once (the batch, its Grams)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g)


class BatchStream:
    """Batch k of a per-item dataset (``ds[i] -> (image, label)``) in the stream's order."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.ds, self.bs, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        self.batches_per_epoch = batches_per_epoch(len(dataset), batch_size, world)

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, idx = batch_indices(k, len(self.ds), self.bs, self.seed, self.rank, self.world)
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)  # train-time jitter/crops depend on (data seed, epoch, index)
        xs, ys = zip(*(self.ds[i] for i in idx.tolist()))
        return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)
