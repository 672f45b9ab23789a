"""One call for a whole generation run, and a dry run that says what it would cost."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from cgn_dist.data.shards import encode_sample
from cgn_dist.errors import InputError
from cgn_dist.sharding.backends import run_shards
from cgn_dist.sharding.manifest import (INDEX_NAME, build_manifest, build_plan_doc, check_or_write_plan,
                                        write_outputs)
from cgn_dist.sharding.plan import ShardSpec, make_plan, sample_refs, shard_name
from cgn_dist.sharding.workers import auto_worker_count
from cgn_dist.sharding.writer import stats_name
from cgn_dist.sharding.sampler import describe_factory
from cgn_dist.storage import Store

log = logging.getLogger(__name__)


def generate_dataset(sampler_factory: Callable[[], Any], out_dir: str | os.PathLike, n_samples: int,
                     shard_size: int, run_seed: int, *, batch_size: int = 16, backend: str = "local",
                     num_workers: int = 1, ray_address: str | None = None, max_retries: int = 3,
                     progress: bool = True, on_shard_done: Callable[[dict[str, Any]], None] | None = None,
                     config: dict[str, Any] | None = None, verify: str = "sha256",
                     shard_timeout_s: float | None = None, worker_resources: dict[str, float] | None = None,
                     shards: Sequence[ShardSpec] | None = None) -> dict[str, Any]:
    """Plan, generate (skipping committed shards), then write manifest.json and index.json; returns the
    manifest. Rerunning the same call after any interruption completes the run with identical bytes.

    ``shards``: a ready plan of shards of varying sizes (e.g. sized by bytes) instead of
    ``make_plan(n_samples, shard_size, run_seed)``; ids 0..len-1, each with ``n <= shard_size``."""
    if shards is None:
        shards = make_plan(n_samples, shard_size, run_seed)
    elif [s.shard_id for s in shards] != list(range(len(shards))) or any(not 1 <= s.n <= shard_size for s in shards):
        raise ValueError("shards must have ids 0..len-1 in order and sizes within 1..shard_size")
    store = Store(out_dir)  # a local folder or an object-store prefix (s3://, gs://)
    if store.remote:
        store.check_writable()  # a wrong bucket or missing credentials: one line, before any work
    out_dir = store.root if store.remote else Path(out_dir)
    store.makedirs()
    plan_doc = build_plan_doc(run_seed, shard_size, describe_factory(sampler_factory))
    check_or_write_plan(out_dir, plan_doc)
    sampler_factory = _keep_recorded_settings(sampler_factory, store, shards)
    planned = {f"{shard_name(s.shard_id)}.tar" for s in shards}
    extra = [name for name in store.list("shard-*.tar") if name not in planned]
    if extra:
        log.warning("%s holds shards outside this plan, left out of the manifest: %s", out_dir, extra[:5])
    stats = run_shards(sampler_factory, shards, out_dir, backend=backend, num_workers=num_workers,
                       batch_size=batch_size, ray_address=ray_address, max_retries=max_retries,
                       progress=progress, on_shard_done=on_shard_done, verify=verify,
                       shard_timeout_s=shard_timeout_s, worker_resources=worker_resources)
    manifest = build_manifest(shards, stats, plan_doc, batch_size=batch_size, config=config)
    write_outputs(out_dir, manifest)
    return manifest


def _keep_recorded_settings(factory: Callable[[], Any], store: Store, shards: Sequence[ShardSpec]):
    """A factory whose ``auto`` settings resolve per machine (e.g. generate.precision) continues a folder
    as its committed shards were made: ``factory.with_recorded(provenance)`` pins them (the plan's
    description, with ``auto``, is unchanged), so a rerun elsewhere gives the bytes of an uninterrupted
    run instead of being refused for a provenance it did not choose."""
    pin = getattr(factory, "with_recorded", None)
    if pin is None:
        return factory
    for spec in shards:
        raw = store.read_bytes(stats_name(spec.shard_id))
        if raw is None:
            continue
        try:
            doc = json.loads(raw)
        except ValueError:
            continue  # a damaged marker (e.g. torn by a crash): verify_shard redoes that shard; look at the next
        if not isinstance(doc, dict):
            continue
        info = doc.get("sampler_info") or {}
        return pin(info)
    return factory


def _tar_bytes(members: Sequence[tuple[str, bytes]]) -> int:
    # One 512-byte header per member, data padded to 512.
    return sum(512 + -(-len(data) // 512) * 512 for _, data in members)


def describe_plan(shards: Sequence[ShardSpec], sampler: Any, batch_size: int = 16, num_workers: int = 1,
                  probe_size: int | None = None) -> dict[str, Any]:
    """Dry run: time one batch of real samples of the plan and extrapolate time and disk.

    A first single sample warms the sampler up (lazy init, kernel selection) and is not timed. The estimate
    assumes ``num_workers`` equally fast workers and ignores start-up.
    """
    if not shards:
        raise ValueError("the plan has no shards")
    if num_workers == 0:  # auto, as the run would resolve it on this machine (local workers)
        num_workers = auto_worker_count(len(shards), getattr(sampler, "num_threads", 1) or 1)[0]
    n_samples = sum(s.n for s in shards)
    probe_size = min(probe_size or batch_size, shards[0].n)
    sampler.sample(sample_refs(shards[0], 0, 1))
    refs = sample_refs(shards[0], 0, probe_size)
    t0 = time.perf_counter()
    samples = sampler.sample(refs)
    seconds = time.perf_counter() - t0
    n_timed = len(refs)
    kept = [(r, s) for r, s in zip(refs, samples) if "__reject__" not in s]
    if not kept:
        raise InputError(f"every one of the {len(refs)} probed samples was rejected: {samples[0]['__reject__']}")
    refs, samples = [r for r, _ in kept], [s for _, s in kept]
    tar_bytes = sum(_tar_bytes(encode_sample(r.key, s)) for r, s in zip(refs, samples))
    per_sample_s, member_bytes = seconds / n_timed, tar_bytes / len(refs)
    # Per shard: the members, two end-of-archive blocks, then padding up to a whole 10 KiB tar record
    # (tarfile's RECORDSIZE): a sizeable part of small shards.
    record = 20 * 512
    est_bytes = sum(-(-int(member_bytes * s.n + 1024) // record) * record for s in shards)
    per_sample_bytes = est_bytes / n_samples
    return {
        "n_shards": len(shards),
        "n_samples": n_samples,
        "shard_size": max(s.n for s in shards),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "probe_samples": n_timed,
        "seconds_per_sample": per_sample_s,
        "samples_per_second_per_worker": (1.0 / per_sample_s) if per_sample_s > 0 else float("inf"),
        "est_seconds": per_sample_s * n_samples / num_workers,
        "bytes_per_sample": per_sample_bytes,  # on disk: tar headers, end blocks and record padding included
        "member_bytes_per_sample": member_bytes,  # the sample's files alone
        "est_bytes": est_bytes,
        "extensions": sorted(k for k in samples[0] if not k.startswith("_")),
    }


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e3:.1f} kB"


def format_plan(desc: dict[str, Any]) -> str:
    """describe_plan's dict as a few lines for a terminal."""
    secs = desc["est_seconds"]
    hours, rem = divmod(int(round(secs)), 3600)
    return "\n".join([
        f"plan: {desc['n_samples']} samples in {desc['n_shards']} shards of <= {desc['shard_size']} "
        f"(batch {desc['batch_size']}, {desc['num_workers']} worker(s))",
        f"speed: {desc['samples_per_second_per_worker']:.2f} samples/s per worker "
        f"(timed on {desc['probe_samples']} samples)",
        f"time: ~{hours}h{rem // 60:02d}m{rem % 60:02d}s",
        f"disk: ~{_size(desc['est_bytes'])} ({desc['bytes_per_sample'] / 1e3:.1f} kB/sample with tar "
        f"overhead; fields {', '.join(desc['extensions'])})",
        f"output: {shard_name(0)}.tar .. {shard_name(desc['n_shards'] - 1)}.tar + manifest.json + {INDEX_NAME}",
    ])
