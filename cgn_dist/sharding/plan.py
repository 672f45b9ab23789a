"""The generation plan: shards, sample keys and per-sample seeds, all derived from the run seed.

Nothing here is coordinated between workers: a sample's key and seed follow from (run seed, shard id,
index within the shard) alone, so any worker, in any order, on any machine, produces the same sample
(img2dataset's compute_key; DiT's per-rank sample indices).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

from cgn_dist.errors import InputError

KEY_FORMAT = "{shard_id:06d}_{index:06d}"
SHARD_NAME_FORMAT = "shard-{shard_id:06d}"
SEED_DERIVATION = "numpy.random.SeedSequence([run_seed, shard_id, index]).generate_state(2, uint32) as uint64 >> 1"


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: shard ``shard_id`` holds ``n`` samples, all derived from run seed ``seed``."""

    shard_id: int
    n: int
    seed: int  # the run seed; with shard_id and the index it fixes every sample of the shard

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardSpec":
        return cls(shard_id=int(d["shard_id"]), n=int(d["n"]), seed=int(d["seed"]))


@dataclass(frozen=True)
class SampleRef:
    """What a sampler is given for one sample. Everything random about the sample must come from ``seed``
    (or, for groups of samples that deliberately share a draw, from ``sample_seed(run_seed, shard_id, g)``
    for a group index ``g`` computed from ``index``)."""

    key: str
    shard_id: int
    index: int  # position within the shard, 0-based
    seed: int  # sample_seed(run_seed, shard_id, index): 63-bit non-negative int
    run_seed: int


def _check_seed(run_seed: int) -> int:
    if isinstance(run_seed, bool) or not isinstance(run_seed, (int, np.integer)) or run_seed < 0:
        raise ValueError(f"run seed must be a non-negative int, got {run_seed!r}")
    return int(run_seed)


def sample_seed(run_seed: int, shard_id: int, index: int) -> int:
    """The seed of one sample, a 63-bit int hashed from (run seed, shard id, index).

    SeedSequence mixes its inputs, so neighbouring (shard, index) pairs give unrelated streams. 63 bits keeps
    the value valid for torch.Generator.manual_seed, numpy, int64 columns and JSON.
    """
    words = np.random.SeedSequence([_check_seed(run_seed), int(shard_id), int(index)]).generate_state(2, np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) >> 1


def sample_key(shard_id: int, index: int) -> str:
    """``000012_000345``: sortable, and free of dots, which WebDataset would take as an extension split."""
    if shard_id < 0 or index < 0:
        raise ValueError(f"shard id and index must be non-negative, got {shard_id}, {index}")
    return KEY_FORMAT.format(shard_id=shard_id, index=index)


def parse_key(key: str) -> tuple[int, int]:
    """``"000012_000345"`` -> (12, 345)."""
    try:
        shard, index = key.split("_")
        return int(shard), int(index)
    except ValueError:
        raise InputError(f"{key!r} is not a sample key of the form {KEY_FORMAT}") from None


def shard_name(shard_id: int) -> str:
    return SHARD_NAME_FORMAT.format(shard_id=shard_id)


def make_plan(n_samples: int, shard_size: int, run_seed: int) -> list[ShardSpec]:
    """Split ``n_samples`` into shards of ``shard_size`` (the last one may be smaller)."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if not 1 <= shard_size <= 999_999:
        raise ValueError(f"shard_size must lie in 1..999999 (six-digit sample index), got {shard_size}")
    run_seed = _check_seed(run_seed)
    n_shards = -(-n_samples // shard_size)
    return [ShardSpec(shard_id=i, n=min(shard_size, n_samples - i * shard_size), seed=run_seed)
            for i in range(n_shards)]


def sample_refs(shard: ShardSpec, start: int = 0, stop: int | None = None) -> list[SampleRef]:
    """The SampleRefs of ``shard`` for indices ``start..stop-1`` (all by default)."""
    stop = shard.n if stop is None else min(stop, shard.n)
    return [SampleRef(key=sample_key(shard.shard_id, i), shard_id=shard.shard_id, index=i,
                      seed=sample_seed(shard.seed, shard.shard_id, i), run_seed=shard.seed)
            for i in range(start, stop)]


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches within a shard: [0, b), [b, 2b), ... Fixed by the shard and batch size alone, so a sample is
    always computed together with the same neighbours, whatever the worker (what regenerate relies on)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def plan_to_dicts(shards: Iterable[ShardSpec]) -> list[dict[str, int]]:
    return [s.to_dict() for s in shards]
