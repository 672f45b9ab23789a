"""Running shards: one signature, three ways (img2dataset's distributors).

- ``backend="local", num_workers=1``: in this process; a Python error in the sampler is retried.
- ``backend="local", num_workers>1``: worker processes (forkserver, sharding.pool), each on its own GPU
  where there are GPUs (worker i -> GPU i % n_gpus) and building the sampler once; a process that dies
  takes only its own shard down: it is replaced and the shard retried.
- ``backend="ray"`` (sharding.ray_backend): one actor per worker (one GPU each where the cluster has GPUs), each building the
  sampler once and pulling the next shard when it finishes one, so fast workers take more shards. An actor
  lost with its process or node is replaced (Ray places it where resources are) and its shard retried.

Every backend writes through ``write_shard``, so the bytes are the same whatever the backend, the worker
count or the order; shards already committed are skipped, interrupted or corrupt ones are redone. A worker
whose sampler provenance differs from the first worker's stops the run as soon as it has started.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from cgn_dist import interrupts
from cgn_dist.data.shards import remove_temp_files
from cgn_dist.sharding.plan import ShardSpec
from cgn_dist.sharding.progress import make_progress
from cgn_dist.sharding.sampler import close_sampler, sampler_info
from cgn_dist.sharding.pool import run_process_pool
from cgn_dist.sharding.ray_backend import run_ray
from cgn_dist.sharding.workers import auto_worker_count, check_same_provenance
from cgn_dist.sharding.writer import (GenerationError, StopGeneration, give_up, must_stop, stats_name, tar_name,
                                     verify_shard, write_shard)
from cgn_dist.storage import Store, is_remote, join

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
LOCK_NAME = ".generate.lock"


def run_shards(sampler_factory: Callable[[], Any], shards: Iterable[ShardSpec], out_dir: str | os.PathLike,
               backend: str = "local", num_workers: int = 1, batch_size: int = 16,
               ray_address: str | None = None, max_retries: int = 3, progress: bool = True,
               on_shard_done: Callable[[dict[str, Any]], None] | None = None, *, verify: str = "sha256",
               shard_timeout_s: float | None = None, worker_resources: dict[str, float] | None = None,
               ) -> list[dict[str, Any]]:
    """Make sure every shard in ``shards`` is committed in ``out_dir``; returns their stats by shard id.

    ``sampler_factory``: picklable zero-argument callable building a sampler (see generate.sampler).
    ``max_retries``: further attempts per shard after a failure (error or lost worker).
    ``on_shard_done(stats)``: called here, in the driver, after each newly written shard (stats carry
    ``path``, the shard's file); not called for shards skipped as already committed.
    ``verify``: "sha256" (re-hash committed shards before skipping them) or "size" (cheaper).
    ``shard_timeout_s``: a shard running longer is abandoned and retried (ray only).
    ``worker_resources``: Ray actor resources, e.g. {"num_gpus": 1, "num_cpus": 4}; default
    ``ray_utils.default_worker_resources``. Only one run may write into ``out_dir`` at a time.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if num_workers < 0 or batch_size < 1 or max_retries < 0:
        raise ValueError(f"need num_workers >= 0 (0 = auto), batch_size >= 1, max_retries >= 0; got {num_workers}, "
                         f"{batch_size}, {max_retries}")
    if verify not in ("sha256", "size"):
        raise ValueError(f"verify must be 'sha256' or 'size', got {verify!r}")
    shards = sorted(shards, key=lambda s: s.shard_id)
    if len({s.shard_id for s in shards}) != len(shards):
        raise ValueError("shards holds a shard id twice")
    if is_remote(out_dir):
        out_dir = str(out_dir)
        # Object stores have no lock. Two runs on one prefix are still safe: each shard's bytes derive from
        # the plan, so racing uploads write the same object and the marker is uploaded after its tar.
        lock = contextlib.nullcontext()
    else:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = _exclusive(out_dir)
    with lock:
        return _run_locked(sampler_factory, shards, out_dir, backend, num_workers, batch_size, ray_address,
                           max_retries, progress, on_shard_done, verify, shard_timeout_s, worker_resources)


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """An advisory lock on the output folder: a second run started by mistake on the same machine stops at
    once instead of deleting the first one's temporary files. (Not reliable on every network file system:
    there, one driver per folder stays the rule.)"""
    import fcntl
    with open(out_dir / LOCK_NAME, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GenerationError(f"another generation run is writing into {out_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@interrupts.deferred()  # Ctrl-C / SIGTERM: stop the workers, keep what is committed, remove temporaries
def _run_locked(sampler_factory, shards, out_dir, backend, num_workers, batch_size, ray_address, max_retries,
                progress, on_shard_done, verify, shard_timeout_s, worker_resources) -> list[dict[str, Any]]:
    remote = is_remote(out_dir)  # an object store holds no temporaries: uploads are whole or absent
    for p in ([] if remote else remove_temp_files(out_dir)):
        log.warning("removed %s, left by an interrupted writer", p.name)

    done: dict[int, dict[str, Any]] = {}
    todo: list[ShardSpec] = []
    # One listing first: a shard with neither its tar nor its marker there is simply missing, with no request
    # of its own (on a bucket, two HEADs and two listings per shard). A listing that lagged behind a commit
    # only makes that shard be redone, with the same bytes.
    present = Store(out_dir).sizes("shard-*") if shards else {}
    for spec in shards:
        if stats_name(spec.shard_id) not in present and tar_name(spec.shard_id) not in present:
            todo.append(spec)
            continue
        check = verify_shard(out_dir, spec, check_hash=(verify == "sha256"),
                             tar_size=present.get(tar_name(spec.shard_id)))
        if check.ok:
            done[spec.shard_id] = check.stats
        else:
            if check.status != "missing":
                log.warning("shard %d is %s (%s): redoing it", spec.shard_id, check.status, check.reason)
            todo.append(spec)

    # the committed shards' sampler is the one every worker must match: a rerun on another machine, where
    # precision=auto or the device differ, is refused when its first worker starts, not after hours of shards
    seen: list[tuple[str, dict[str, Any]]] = []
    if done:
        first = min(done)
        seen.append((f"the committed shard {first}", done[first].get("sampler_info", {})))
    if todo and num_workers == 0 and backend == "local":
        num_workers, why = auto_worker_count(len(todo), getattr(sampler_factory, "num_threads", 1) or 1,
                                             getattr(sampler_factory, "worker_gb", 1.0))
        log.info("generation: %d local worker process(es) (num_workers=0: %s)", num_workers, why)
    bar = make_progress(total=sum(s.n for s in shards), initial=sum(s["count"] for s in done.values()),
                        n_shards=len(shards), shards_done=len(done), enabled=progress)
    try:
        if todo:
            if backend == "ray":
                results = run_ray(sampler_factory, todo, out_dir, batch_size, num_workers, max_retries,
                                  ray_address, shard_timeout_s, worker_resources, seen)
            elif num_workers == 1:
                results = _run_in_process(sampler_factory, todo, out_dir, batch_size, max_retries, seen)
            else:
                results = run_process_pool(sampler_factory, todo, out_dir, batch_size, num_workers, max_retries,
                                           seen=seen)
            with contextlib.closing(results):  # stops the workers at once if the caller's callback raises
                try:
                    for stats in results:
                        done[stats["shard_id"]] = stats
                        bar.update_shard(stats["count"])
                        if on_shard_done is not None:
                            on_shard_done(dict(stats, path=join(out_dir, tar_name(stats["shard_id"]))))
                        interrupts.check()
                except StopGeneration as e:
                    raise StopGeneration(
                        f"stopped: {e}. {len(done)} of {len(shards)} shards are committed in {out_dir} and kept "
                        f"(nothing half-written remains); free space there (or fix the folder's permissions) and "
                        f"rerun the same command: it writes only the missing shards") from None
    except interrupts.Interrupted as e:  # the workers are stopped: count what they committed, reported or not
        # Only the shards not reported as done are looked at, and only those the listing shows anything of:
        # a bucket pays one listing, not two requests per shard of the run.
        store = Store(out_dir)
        present = store.sizes("shard-*")
        checks = [verify_shard(out_dir, s, check_hash=False, tar_size=present.get(tar_name(s.shard_id)))
                  for s in shards if s.shard_id not in done
                  and (stats_name(s.shard_id) in present or tar_name(s.shard_id) in present)]
        for c in checks:  # a worker stopped between its tar and its marker (a killed Ray actor): not a shard,
            if c.status == "uncommitted":  # so no complete-looking tar is left for it; the rerun redoes it
                store.remove(tar_name(c.shard_id))
        committed = len(done) + sum(c.ok for c in checks)
        raise e.kept("generate", committed, len(shards), out_dir) from None
    finally:
        bar.close()
        # Temporary files of attempts killed during this run (their shards were redone by the retry).
        if not remote:
            remove_temp_files(out_dir)
    missing = [s.shard_id for s in shards if s.shard_id not in done]
    if missing:
        raise GenerationError(f"shards {missing} were not committed")
    return [done[s.shard_id] for s in shards]


# --- local, in this process ---------------------------------------------------------------------------------

def _run_in_process(factory, todo, out_dir, batch_size, max_retries, seen) -> Iterator[dict[str, Any]]:
    sampler = factory()
    info = sampler_info(sampler)
    try:
        check_same_provenance(seen, "this process", info)
        for spec in todo:
            for attempt in range(1, max_retries + 2):
                try:
                    yield write_shard(sampler, spec, out_dir, batch_size, attempt=attempt, info=info)
                    break
                except Exception as e:  # a sampler error: retried like a lost worker
                    if must_stop(e):
                        raise StopGeneration(f"{e} (shard {spec.shard_id})") from e
                    if attempt > max_retries:
                        raise give_up(spec, attempt, repr(e)) from e
                    log.warning("shard %d attempt %d failed (%r); retrying", spec.shard_id, attempt, e)
    finally:
        close_sampler(sampler)
