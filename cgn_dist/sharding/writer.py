"""Writing one shard exactly once, and checking whether a shard on disk is committed.

Commit protocol (img2dataset-style, made atomic):
1. ``shard-XXXXXX.tar`` is written batch by batch to a hidden temporary name in the same folder,
   fsynced, then renamed into place (os.replace is atomic within a file system);
2. ``shard-XXXXXX_stats.json`` is written last, atomically too. It is the commit marker: a tar without it,
   or whose size / sha256 disagree with it, is not committed and gets redone.
Two fsyncs per shard: the tar, then its folder (the rename), both before the marker exists, so a marker
never outlives a tar lost in a crash. The marker itself is not fsynced: a crash may lose it or leave it
empty or partial, which reads as not committed (verify_shard: missing / corrupt) and costs a redo of
that shard, with the same bytes.
On an object store (``out_dir`` an s3:// / gs:// URL) the tar is written to a local staging folder, then
uploaded whole (an object appears only when its upload completes), then the marker is uploaded last.
"""
from __future__ import annotations

import json
import logging
import numbers
import os
import shutil
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgn_dist import interrupts
from cgn_dist.data.shards import AtomicTarWriter, json_text, write_json_atomic
from cgn_dist.errors import MACHINE_ERRNOS, UserError
from cgn_dist.sharding.plan import ShardSpec, batch_bounds, sample_refs, shard_name
from cgn_dist.sharding.sampler import coverage_keys, sampler_info
from cgn_dist.storage import Store, staging_dir

log = logging.getLogger(__name__)

STATS_FORMAT = "cgn_dist.shard-stats/v1"


class GenerationError(UserError, RuntimeError):
    """A shard could not be generated (after its retries), or the output folder is inconsistent."""


class StopGeneration(GenerationError):
    """A shard hit an error that retrying cannot fix (disk full, read-only, no permission)."""


# Errors of the machine, not of the attempt: retrying only fills the log (a full disk stays full).
STOP_ERRNOS = MACHINE_ERRNOS


def must_stop(e: BaseException | None) -> bool:
    return isinstance(e, OSError) and e.errno in STOP_ERRNOS


def give_up(spec: ShardSpec, attempts: int, error: str) -> GenerationError:
    return GenerationError(f"shard {spec.shard_id} failed {attempts} time(s); last error: {error}")


def tar_name(shard_id: int) -> str:
    return f"{shard_name(shard_id)}.tar"


def stats_name(shard_id: int) -> str:
    return f"{shard_name(shard_id)}_stats.json"


def tar_path(out_dir: str | os.PathLike, shard_id: int) -> Path:
    return Path(out_dir) / tar_name(shard_id)


def stats_path(out_dir: str | os.PathLike, shard_id: int) -> Path:
    return Path(out_dir) / stats_name(shard_id)


def _class_of(sample: dict[str, Any], key: str) -> Any:
    meta = sample.get("json")
    if isinstance(meta, (bytes, bytearray)):
        meta = json.loads(meta)
    if isinstance(meta, dict) and key in meta:
        value = meta[key]
        # numpy ints count as Integral too: a sampler may put them in its dict unconverted
        return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    return None


def write_shard(sampler: Any, spec: ShardSpec, out_dir: str | os.PathLike, batch_size: int,
                attempt: int = 1, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate the samples of ``spec`` with ``sampler``, write and commit the shard; returns its stats."""
    t0 = time.perf_counter()
    store = Store(out_dir)
    store.makedirs()
    info = sampler_info(sampler) if info is None else info
    cov_keys = coverage_keys(sampler)
    # Unmark first: from here until the new marker lands, the shard counts as not committed.
    store.remove(stats_name(spec.shard_id))
    local_dir = staging_dir() if store.remote else Path(out_dir)
    try:
        stats = _write_tar(sampler, spec, local_dir, batch_size, cov_keys, info, attempt, t0)
        if store.remote:  # the tar whole, then the marker: the marker stays the only proof of a commit
            store.put_file(tar_path(local_dir, spec.shard_id), tar_name(spec.shard_id))
            stats["durations_s"]["total"] = round(time.perf_counter() - t0, 4)
            store.write_bytes(stats_name(spec.shard_id), json_text(stats).encode())
        else:
            # not durable: the tar's commit() has made the tar and its name durable already (see above)
            write_json_atomic(stats_path(out_dir, spec.shard_id), stats, durable=False)
    finally:
        if store.remote:
            shutil.rmtree(local_dir, ignore_errors=True)
    return stats


def _write_tar(sampler: Any, spec: ShardSpec, out_dir: Path, batch_size: int, cov_keys: Any,
               info: dict[str, Any], attempt: int, t0: float) -> dict[str, Any]:
    begin = getattr(sampler, "begin_shard", None)
    if callable(begin):  # lets a sampler prepare (e.g. compute ahead) within this shard
        begin(spec)
    class_counts: dict[str, Counter] = {k: Counter() for k in cov_keys}
    sample_s = 0.0
    rejects: list[dict[str, str]] = []
    notes: list[dict[str, str]] = []
    with AtomicTarWriter(tar_path(out_dir, spec.shard_id)) as writer:
        for start, stop in batch_bounds(spec.n, batch_size):
            interrupts.check()  # in this process only (workers take no signals): the tar is dropped
            refs = sample_refs(spec, start, stop)
            ts = time.perf_counter()
            samples = sampler.sample(refs)
            sample_s += time.perf_counter() - ts
            if len(samples) != len(refs):
                raise GenerationError(f"{type(sampler).__name__}.sample returned {len(samples)} samples for "
                                      f"{len(refs)} refs (shard {spec.shard_id}, indices {start}..{stop - 1})")
            for ref, sample in zip(refs, samples):
                if "__note__" in sample:  # e.g. a source image converted before writing
                    notes.append({"key": ref.key, "note": str(sample["__note__"])})
                if "__reject__" in sample:  # a bad input: not written, listed with its reason
                    rejects.append({"key": ref.key, "source": str(sample.get("__source__", "")),
                                    "reason": str(sample["__reject__"])})
                    continue
                writer.add(ref.key, sample)
                for k in cov_keys:
                    c = _class_of(sample, k)
                    if c is not None:
                        class_counts[k][str(c)] += 1
        sha, nbytes = writer.commit()
        keys = writer.keys

    stats = {
        "format": STATS_FORMAT,
        "shard_id": spec.shard_id,
        "n": spec.n,
        "seed": spec.seed,
        "url": tar_path(out_dir, spec.shard_id).name,
        "count": len(keys),
        "sha256": sha,
        "bytes": nbytes,
        "first_key": keys[0] if keys else None,
        "last_key": keys[-1] if keys else None,
        "batch_size": batch_size,
        "sampler_info": info,
        "class_counts": {k: dict(sorted(v.items())) for k, v in class_counts.items() if v},
        "rejects": rejects,
        "notes": notes,
        "attempt": attempt,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "durations_s": {"sample": round(sample_s, 4), "total": round(time.perf_counter() - t0, 4)},
    }
    return stats


@dataclass(frozen=True)
class ShardCheck:
    """Outcome of verify_shard. status: committed | missing | uncommitted | corrupt | stale."""

    shard_id: int
    status: str
    reason: str = ""
    stats: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "committed"


def read_stats(out_dir: str | os.PathLike, shard_id: int) -> dict[str, Any] | None:
    data = Store(out_dir).read_bytes(stats_name(shard_id))
    return None if data is None else json.loads(data)


def verify_shard(out_dir: str | os.PathLike, spec: ShardSpec, check_hash: bool = True,
                 tar_size: int | None = None) -> ShardCheck:
    """Is shard ``spec`` committed in ``out_dir``? Checks the marker, the plan it was made for, the tar's size
    and (unless ``check_hash=False``) its sha256. On an object store the sha256 re-reads the whole object:
    ``verify=size`` is the cheap resume there."""
    sid = spec.shard_id
    store = Store(out_dir)
    tar = tar_name(sid)
    try:
        stats = read_stats(out_dir, sid)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        return ShardCheck(sid, "corrupt", f"unreadable stats file: {e}")
    if stats is None:
        if store.exists(tar):
            return ShardCheck(sid, "uncommitted", f"{tar} has no stats file (interrupted before commit)")
        return ShardCheck(sid, "missing")
    if not isinstance(stats, dict) or stats.get("format") != STATS_FORMAT:
        return ShardCheck(sid, "corrupt", "stats file of an unknown format")
    made_for = (stats.get("shard_id"), stats.get("n"), stats.get("seed"))
    if made_for != (sid, spec.n, spec.seed):
        return ShardCheck(sid, "stale", f"made for (shard, n, seed)={made_for}, plan wants {(sid, spec.n, spec.seed)}",
                          stats)
    size = store.size(tar) if tar_size is None else tar_size  # tar_size: from a listing taken just before
    if size is None:
        return ShardCheck(sid, "corrupt", f"{tar} is missing but its stats exist", stats)
    if size != stats.get("bytes"):
        return ShardCheck(sid, "corrupt", f"{tar} has {size} bytes, its stats say {stats.get('bytes')}", stats)
    if check_hash and store.sha256(tar) != stats.get("sha256"):
        return ShardCheck(sid, "corrupt", f"{tar} sha256 differs from its stats", stats)
    return ShardCheck(sid, "committed", "", stats)
