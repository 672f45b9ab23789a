"""Streaming WebDataset shards to every node and DataLoader worker, exactly once per epoch.

One epoch is a *virtual stream*: the shards in an order drawn from (seed, epoch), concatenated (and, when
the epoch asks for more samples than the shards hold, followed by further permutations: the counterfactual
stream of the mix). The stream is cut into contiguous sample ranges, one per (rank, DataLoader worker):
nothing is coordinated at run time, each worker derives its range from (seed, epoch, rank, world,
worker, workers) and the shard counts of the wids index. A range may start or end inside a shard; the
worker then skips the samples before its start (read, not decoded), so shards need not divide evenly over
nodes x workers, and no sample is yielded twice in an epoch.

- ``drop_last=True`` (training): every rank yields the same number of full batches,
  ``steps = samples // (batch_size * world)``; the fewer than ``batch_size * world`` samples left over are
  a different set each epoch (the shard order changes).
- ``drop_last=False`` (evaluation): every sample exactly once; ranks differ by at most one sample per
  worker and the last batch of each worker may be partial.
- ``resampled=True``: each worker draws whole shards with replacement (in proportion to their sizes) from
  (seed, epoch, rank, worker): forever, or, with ``samples_per_epoch`` (over all ranks), its share of
  ``samples_per_epoch // (batch_size * world)`` full batches per rank.

Inside its range a worker shuffles with a buffer seeded by (seed, epoch, rank, worker), decodes and
transforms each sample (cgn_dist.data.transforms; crop and flip drawn from (seed, epoch, shard file name, key))
and batches: a batch is a dict with ``image`` (uint8 or
normalised float32, N x 3 x H x W), one int64 tensor per label field of the sample json, and ``__key__``.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from cgn_dist.data.shard_index import load_shard_index
from cgn_dist.data.shards import damaged_shard, tar_error_text
from cgn_dist.errors import InputError
from cgn_dist.storage import is_remote, register_stream_schemes
from cgn_dist.data.transforms import ImageTransform, image_bytes, normalize_images
from cgn_dist.distributed.env import rank_world

REAL_LABELS = ("label",)
CF_LABELS = ("shape_cls", "texture_cls", "bg_cls")


@dataclass(frozen=True)
class ShardSet:
    """Shard URLs (anything webdataset opens: paths, ``pipe:``, http) and their sample counts."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def n_samples(self) -> int:
        return sum(self.counts)


def load_shard_set(source: Any) -> ShardSet:
    """A ShardSet from a shard folder (holding index.json), an index.json, or (url, count) pairs."""
    if isinstance(source, ShardSet):
        return source
    if isinstance(source, (str, os.PathLike)) and is_remote(source):  # a bucket prefix or its index.json
        text = str(source).rstrip("/")
        entries = load_shard_index(text if text.endswith(".json") else f"{text}/index.json")
        pairs = [(e["url"], int(e["nsamples"])) for e in entries]
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / "index.json"
        entries = load_shard_index(path)
        pairs = [(e["url"], int(e["nsamples"])) for e in entries]
    else:
        pairs = [(str(u), int(n)) for u, n in source]
    if not pairs or sum(n for _, n in pairs) == 0:
        raise InputError(f"no samples in {source!r}: the shard index lists no shard or only empty ones")
    return ShardSet(tuple(u for u, _ in pairs), tuple(n for _, n in pairs))


def _seed(*words: int) -> int:
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def epoch_segments(counts: Sequence[int], seed: int, epoch: int, total: int) -> list[tuple[int, int]]:
    """The epoch's virtual stream as (shard index, count) segments, at least ``total`` samples long:
    permutation 0 of the shards, then permutation 1, ... each drawn from (seed, epoch, repeat)."""
    out, n, rep = [], 0, 0
    while n < total:
        perm = np.random.default_rng(_seed(seed, epoch, rep)).permutation(len(counts))
        for i in perm:
            if counts[i]:
                out.append((int(i), int(counts[i])))
                n += counts[i]
        rep += 1
    return out


def slice_segments(segments: Sequence[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int, int]]:
    """Positions [start, stop) of the virtual stream as (shard index, first, end) in-shard ranges."""
    out, pos = [], 0
    for shard, n in segments:
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            out.append((shard, lo - pos, hi - pos))
        pos += n
        if pos >= stop:
            break
    return out


def worker_range(n_epoch: int, batch_size: int, rank: int, world: int, worker: int, workers: int,
                 drop_last: bool) -> tuple[int, int]:
    """The [start, stop) positions of the epoch's virtual stream that (rank, worker) reads."""
    if drop_last:
        steps = n_epoch // (batch_size * world)
        per_w = [steps // workers + (w < steps % workers) for w in range(workers)]  # batches per worker
        start = (rank * steps + sum(per_w[:worker])) * batch_size
        return start, start + per_w[worker] * batch_size
    r0, r1 = rank * n_epoch // world, (rank + 1) * n_epoch // world
    n_r = r1 - r0
    return r0 + worker * n_r // workers, r0 + (worker + 1) * n_r // workers


def steps_per_epoch(n_epoch: int, batch_size: int, rank: int = 0, world: int = 1, workers: int = 1,
                    drop_last: bool = True) -> int:
    """Batches one rank yields in an epoch of ``n_epoch`` samples (the same on every rank with drop_last)."""
    if drop_last:
        return n_epoch // (batch_size * world)
    total = 0
    for w in range(max(1, workers)):
        a, b = worker_range(n_epoch, batch_size, rank, world, w, max(1, workers), False)
        total += -(-(b - a) // batch_size)
    return total


def _tar_samples(url: str) -> Iterator[dict[str, Any]]:
    import tarfile

    from webdataset.tariterators import tarfile_samples
    if is_remote(url):
        register_stream_schemes()
    try:  # webdataset's own message ("unexpected end of data @ ...") says neither what to check nor how to fix
        yield from tarfile_samples([{"url": url}])
    except (tarfile.TarError, EOFError) as e:
        raise damaged_shard(url, tar_error_text(e)) from e


class ShardStream(torch.utils.data.IterableDataset):
    """An epoch of batches for one rank; DataLoader workers split it further (see the module doc).

    ``shards``: folder / index.json / (url, count) pairs / ShardSet. ``labels``: int fields of the sample
    json to return (REAL_LABELS for ImageNet shards, CF_LABELS for counterfactual shards).
    ``samples_per_epoch``: size of the epoch's virtual stream over all ranks (default: every sample once;
    larger tiles the shards with fresh permutations, smaller takes a different random subset each epoch).
    """

    def __init__(self, shards: Any, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, train: bool = True, drop_last: bool | None = None,
                 labels: Sequence[str] = REAL_LABELS, decoder: str = "pil", image_size: int = 224,
                 resize: int = 256, shuffle_buffer: int = 1000, normalize: bool = True,
                 samples_per_epoch: int | None = None, resampled: bool = False, num_workers: int = 0):
        super().__init__()
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, {rank}, {world_size}")
        self.shards = load_shard_set(shards)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.epoch = int(seed), int(epoch)
        self.drop_last = train if drop_last is None else drop_last
        self.labels = tuple(labels)
        self.transform = ImageTransform(train=train, size=image_size, resize=resize, decoder=decoder)
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.normalize = normalize
        self.samples_per_epoch = samples_per_epoch
        self.resampled = resampled
        self.start_step = 0
        self.num_workers = num_workers  # what __len__ assumes; the DataLoader's actual count wins in __iter__
        if self.drop_last and len(self) == 0 and not resampled:
            raise InputError(f"{self.n_epoch} samples per epoch give no full batch of {batch_size} on each of "
                             f"{world_size} ranks: lower the batch size or add shards")

    @property
    def n_epoch(self) -> int:
        return self.shards.n_samples if self.samples_per_epoch is None else int(self.samples_per_epoch)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Call before iterating an epoch (workers are re-created per epoch and copy this).

        ``start_step``: resume the epoch after that many of this rank's batches (training streams): the
        remaining batches are exactly those an uninterrupted epoch would have yielded from there on (the
        skipped samples are read and shuffled as before, but not decoded)."""
        if start_step and not (self.drop_last and not self.resampled):
            raise ValueError("start_step needs a training stream (drop_last=True, not resampled)")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __len__(self) -> int:
        if self.resampled and self.samples_per_epoch is None:
            raise TypeError("an endless (resampled) stream has no length")
        if self.resampled:
            return self.n_epoch // (self.batch_size * self.world_size)
        return steps_per_epoch(self.n_epoch, self.batch_size, self.rank, self.world_size, self.num_workers,
                               self.drop_last)

    # --- in the worker ---------------------------------------------------------------------------------

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def ranges(self, worker: int, workers: int) -> list[tuple[int, int, int]]:
        """(shard index, first, end) ranges this rank's ``worker`` reads this epoch."""
        start, stop = worker_range(self.n_epoch, self.batch_size, self.rank, self.world_size, worker, workers,
                                   self.drop_last)
        segments = epoch_segments(self.shards.counts, self.seed, self.epoch, stop)
        return slice_segments(segments, start, stop)

    def _read(self, ranges: Sequence[tuple[int, int, int]]) -> Iterator[dict[str, Any]]:
        for shard, first, end in ranges:
            url = self.shards.urls[shard]
            i = -1
            for i, sample in enumerate(_tar_samples(url)):
                if i >= end:
                    break
                if i >= first:
                    yield sample
            else:
                if i + 1 < end:
                    raise damaged_shard(url, f"it holds {i + 1} samples, its index says "
                                        f"{self.shards.counts[shard]} (the shard is cut short, or the index is stale)")

    def _resampled(self, rng: random.Random, per_worker: int | None) -> Iterator[dict[str, Any]]:
        counts = np.asarray(self.shards.counts, dtype=np.float64)
        cdf = np.cumsum(counts / counts.sum())  # shards drawn in proportion to their size: samples equally likely
        n = 0
        while per_worker is None or n < per_worker:
            shard = min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)
            for sample in _tar_samples(self.shards.urls[shard]):
                yield sample
                n += 1
                if per_worker is not None and n >= per_worker:
                    return

    def _samples(self, worker: int, workers: int, rng: random.Random) -> Iterator[dict[str, Any]]:
        if self.resampled:
            per_worker = None
            if self.samples_per_epoch is not None:
                steps = self.n_epoch // (self.batch_size * self.world_size)
                per_worker = (steps // workers + (worker < steps % workers)) * self.batch_size
            return self._resampled(rng, per_worker)
        return self._read(self.ranges(worker, workers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from webdataset.filters import _shuffle

        worker, workers = self._worker()
        if self.start_step:
            # The DataLoader takes batches from workers 0, 1, ..., W-1, 0, ... in turn, and in an epoch worker w
            # holds batches w, w + W, ... of the rank. Resumed at batch k, loader worker i plays worker
            # (i + k) % W, so the first batch again comes from the worker that holds batch k.
            worker = (worker + self.start_step) % workers
        rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, 0x5EED))
        samples = self._samples(worker, workers, rng)
        if self.shuffle_buffer > 1:
            samples = _shuffle(iter(samples), bufsize=self.shuffle_buffer,
                               initial=min(self.shuffle_buffer, 100), rng=rng)
        if self.start_step:  # of the first start_step batches, this many were this worker's: skip them
            k = self.start_step
            skip = (k // workers + (worker < k % workers)) * self.batch_size
            samples = iter(samples)
            for _ in range(skip):
                if next(samples, None) is None:
                    break
        batch: list[dict[str, Any]] = []
        for sample in samples:
            batch.append(self._decode(sample))
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch = []
        if batch and not (self.drop_last or self.resampled):
            yield self._collate(batch)

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        missing = [k for k in self.labels if k not in meta]
        if missing:
            raise KeyError(f"sample {sample['__key__']} of {sample.get('__url__')} has no {missing} in its json "
                           f"(it has {sorted(meta)}); real shards carry 'label', counterfactual shards "
                           "'shape_cls', 'texture_cls', 'bg_cls': pass labels= accordingly")
        # Crop and flip from (seed, epoch, shard file name, key): the same whatever the world size, worker count
        # or resume point, and wherever the shards are (the name, not the URL: copied to a bucket or another
        # mount, they train the same).
        shard_name = str(sample.get("__url__", "")).rstrip("/").rsplit("/", 1)[-1]
        rng = random.Random(f"{self.seed}/{self.epoch}/{shard_name}/{sample['__key__']}")
        out = {"image": self.transform(image_bytes(sample), rng), "__key__": sample["__key__"]}
        for k in self.labels:
            out[k] = int(meta[k])
        return out

    def _collate(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        shape = (len(batch), *batch[0]["image"].shape)
        in_worker = torch.utils.data.get_worker_info() is not None
        # In a worker, the batch goes straight into shared memory: the DataLoader then passes a handle
        # instead of copying the batch there (what its default collate does too).
        uint8 = torch.empty(shape, dtype=torch.uint8)
        if in_worker and not self.normalize:
            uint8.share_memory_()
        torch.stack([b["image"] for b in batch], out=uint8)
        images = uint8
        if self.normalize:
            dest = torch.empty(shape, dtype=torch.float32)
            images = normalize_images(uint8, out=dest.share_memory_() if in_worker else dest)
        out: dict[str, Any] = {"image": images, "__key__": [b["__key__"] for b in batch]}
        for k in self.labels:
            out[k] = torch.tensor([b[k] for b in batch], dtype=torch.int64)
        return out


class StreamLoader:
    """A DataLoader over a ShardStream, re-created each epoch so that workers see ``set_epoch``.

    ``len(loader)`` is the rank's step count for the epoch; iterate it like a DataLoader.
    """

    def __init__(self, stream: ShardStream, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = 2, multiprocessing_context: str | None = None):
        self.stream = stream
        self.num_workers = num_workers
        stream.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.stream.set_epoch(epoch, start_step)

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor, persistent_workers=False,
            multiprocessing_context=self.multiprocessing_context,
            worker_init_fn=_ignore_sigint if self.num_workers > 0 else None)
        return iter(loader)


def _ignore_sigint(worker_id: int) -> None:
    # A terminal's Ctrl-C reaches the loader's workers too; one that quit would fail the batch the training
    # loop still reads before it stops at its safe point. The workers end with the loop.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(shards: Any, batch_size: int, *, train: bool = True, rank: int | None = None,
                world_size: int | None = None, num_workers: int = 0, seed: int = 0, epoch: int = 0,
                pin_memory: bool | None = None, **stream_kw: Any) -> StreamLoader:
    """The reader in one call: a StreamLoader over ``shards`` for this rank (default: torch.distributed's).

    ``pin_memory`` (None = when CUDA is visible): batches in page-locked memory, without which a
    ``.to(cuda, non_blocking=True)`` copy is synchronous. ``stream_kw`` go to ShardStream (labels, decoder,
    image_size, resize, shuffle_buffer, normalize, samples_per_epoch, resampled, drop_last).
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if rank is None or world_size is None:
        r, w = rank_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    stream = ShardStream(shards, batch_size, rank=rank, world_size=world_size, seed=seed, epoch=epoch,
                         train=train, num_workers=num_workers, **stream_kw)
    return StreamLoader(stream, num_workers=num_workers, pin_memory=pin_memory)
