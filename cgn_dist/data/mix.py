"""Real + counterfactual batches per step.

Each step pairs a real batch of ``b`` with a counterfactual batch of ``int(cf_ratio * b)``. The real stream
sets the epoch: ``steps`` full batches per rank. The counterfactual stream is sized to match: its epoch is
``steps * cf_b * world`` samples of a virtual stream of counterfactual shards in a fresh (seed, epoch) order,
tiled when the counterfactual set is smaller, a different subset each epoch when it is larger (the spec's
"resampled every epoch"). Both are split over ranks and DataLoader workers as in ``cgn_dist.data.stream``.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

from cgn_dist.data.stream import CF_LABELS, REAL_LABELS, StreamLoader, load_shard_set, make_loader

log = logging.getLogger(__name__)


class MixedLoader:
    """Iterates ``(real_batch, cf_batch)`` pairs, ``len(self)`` of them per epoch on every rank.

    With ``cf_ratio == 0`` (or no counterfactual shards) ``cf_batch`` is None. ``counts`` holds the last
    epoch's real and counterfactual sample counts and the realised ratio.
    """

    def __init__(self, real: StreamLoader, cf: StreamLoader | None):
        self.real, self.cf = real, cf
        self.counts: dict[str, Any] = {}

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Before each epoch; ``start_step`` resumes both streams after that many steps."""
        self.real.set_epoch(epoch, start_step)
        if self.cf is not None:
            self.cf.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.real)

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
        n_real = n_cf = steps = 0
        cf_iter = iter(self.cf) if self.cf is not None else None
        for real_batch in self.real:
            cf_batch = None
            if cf_iter is not None:
                cf_batch = next(cf_iter, None)
                if cf_batch is None:  # cannot happen when both streams are sized as built by make_mixed_loader
                    raise RuntimeError("the counterfactual stream ended before the real one")
                n_cf += len(cf_batch["__key__"])
            n_real += len(real_batch["__key__"])
            steps += 1
            yield real_batch, cf_batch
        self.counts = {"epoch": self.real.epoch, "steps": steps, "real": n_real, "cf": n_cf,
                       "ratio": (n_cf / n_real) if n_real else 0.0}
        log.info("epoch %d: %d steps, %d real + %d counterfactual samples (ratio %.3f)", self.real.epoch, steps,
                 n_real, n_cf, self.counts["ratio"])


def make_mixed_loader(real_shards: Any, cf_shards: Any | None, batch_size: int, cf_ratio: float = 1.0, *,
                      rank: int | None = None, world_size: int | None = None, num_workers: int = 0,
                      seed: int = 0, epoch: int = 0, train: bool = True, **stream_kw: Any) -> MixedLoader:
    """Real loader of ``batch_size`` + counterfactual loader of ``int(cf_ratio * batch_size)`` per step.

    ``stream_kw`` (decoder, image_size, shuffle_buffer, normalize, ...) go to both streams. The two streams
    draw from different seeds (seed and seed + 1) so their orders are unrelated.
    """
    if cf_ratio < 0:
        raise ValueError(f"cf_ratio must be >= 0, got {cf_ratio}")
    real = make_loader(real_shards, batch_size, train=train, rank=rank, world_size=world_size,
                       num_workers=num_workers, seed=seed, epoch=epoch, labels=REAL_LABELS, drop_last=True,
                       **stream_kw)
    cf_b = int(cf_ratio * batch_size)
    if cf_shards is None or cf_b == 0:
        return MixedLoader(real, None)
    steps = len(real)
    world = real.stream.world_size
    cf = make_loader(load_shard_set(cf_shards), cf_b, train=train, rank=real.stream.rank, world_size=world,
                     num_workers=num_workers, seed=seed + 1, epoch=epoch, labels=CF_LABELS, drop_last=True,
                     samples_per_epoch=steps * cf_b * world, **stream_kw)
    return MixedLoader(real, cf)
