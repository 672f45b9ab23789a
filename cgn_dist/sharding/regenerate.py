"""Reproducing one stored sample from its key and the run's manifest, byte for byte."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

from cgn_dist.data.shards import encode_sample
from cgn_dist.sharding.manifest import load_manifest
from cgn_dist.sharding.plan import ShardSpec, batch_bounds, parse_key, sample_refs
from cgn_dist.sharding.sampler import build_factory, close_sampler, sampler_info

log = logging.getLogger(__name__)


def regenerate_sample(manifest_path: str | os.PathLike, key: str,
                      sampler_factory: Callable[[], Any] | None = None, whole_batch: bool = True,
                      sampler: Any = None) -> dict[str, bytes]:
    """The stored bytes of sample ``key`` (``ext -> bytes``, as in the shard), computed afresh.

    ``sampler_factory`` defaults to the one described in the manifest (a dataclass factory rebuilds from
    its fields); pass ``sampler`` to reuse a loaded model for many keys. With ``whole_batch`` the sample is
    computed within the same batch as in the run (the shard's batch size, fixed batch bounds), so even
    numerics that vary with the batch give the same bytes; without it, alone (faster, exact for samplers
    that keep the per-sample contract, like all of ours on CPU).
    """
    manifest = load_manifest(manifest_path)
    shard_id, index = parse_key(key)
    plan = {d["shard_id"]: ShardSpec.from_dict(d) for d in manifest["plan"]}
    if shard_id not in plan or not 0 <= index < plan[shard_id].n:
        raise KeyError(f"sample {key} is not in this run's plan ({manifest['n_shards']} shards)")
    spec = plan[shard_id]
    batch_size = next(e["batch_size"] for e in manifest["shards"] if e["shard_id"] == shard_id)
    if whole_batch:
        start, stop = next((a, b) for a, b in batch_bounds(spec.n, batch_size) if a <= index < b)
    else:
        start, stop = index, index + 1

    own = sampler is None
    if own:
        factory = sampler_factory if sampler_factory is not None else build_factory(manifest["sampler_factory"])
        pin = getattr(factory, "with_recorded", None)  # settings auto resolved when the run was made
        factory = pin(manifest.get("sampler_info", {})) if pin else factory
        sampler = factory()
    try:
        info = sampler_info(sampler)
        if info != manifest.get("sampler_info", {}):
            log.warning("sampler provenance differs from the run's: %s vs %s; bytes may differ",
                        info, manifest.get("sampler_info"))
        samples = sampler.sample(sample_refs(spec, start, stop))
    finally:
        if own:
            close_sampler(sampler)
    member_bytes = encode_sample(key, samples[index - start])
    return {name.split(".", 1)[1]: data for name, data in member_bytes}
