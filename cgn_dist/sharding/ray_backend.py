"""The Ray backend of the shard engine: one actor per worker builds its sampler once and writes the shards it
is handed; the driver hands shards only to actors that are up, keeps the next shard queued at each actor
(``QUEUED_PER_ACTOR``: an actor starts its next shard the moment it commits one, without waiting a round
trip to the driver), retries a shard whose attempt failed (the sampler raised, the actor or its node was
lost, or it ran past ``shard_timeout_s``, counted from when the actor started it), replaces lost actors and
stops every actor on the way out. Ray is imported here only, when a run asks for it."""
from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Callable, Iterator

from cgn_dist import interrupts
from cgn_dist.sharding.plan import ShardSpec
from cgn_dist.sharding.sampler import close_sampler, sampler_info
from cgn_dist.sharding.workers import check_same_provenance
from cgn_dist.sharding.writer import GenerationError, StopGeneration, give_up, must_stop, write_shard
from cgn_dist.storage import is_remote, storage_env

log = logging.getLogger("cgn_dist.sharding.backends")

WAIT_WARN_EVERY_S = 60.0  # how often to say that Ray has not placed the workers yet
QUEUED_PER_ACTOR = 2  # shards handed to one actor at a time: the one it writes and the next
KILL_WAIT_S = 30.0  # how long close() waits for killed workers on this host to exit


class ShardWorker:
    """Ray actor body: builds the sampler once, then writes whatever shards it is handed."""

    def __init__(self, factory: Callable[[], Any]):
        self.sampler = factory()
        self.info = sampler_info(self.sampler)

    def write(self, spec: ShardSpec, out_dir: str, batch_size: int, attempt: int) -> dict[str, Any]:
        import ray
        stats = write_shard(self.sampler, spec, out_dir, batch_size, attempt=attempt, info=self.info)
        return dict(stats, ray_node_id=ray.get_runtime_context().get_node_id())  # for the driver, not on disk

    def provenance(self) -> tuple[dict[str, Any], str, tuple[str, int]]:
        """(sampler provenance, node id, (host, pid)); answered once built, so it doubles as the "actor is up"
        signal; (host, pid) lets the driver wait for the process to be gone once it killed it."""
        import socket

        import ray
        return (self.info, f"{ray.get_runtime_context().get_node_id()[:12]} (pid {os.getpid()})",
                (socket.gethostname(), os.getpid()))

    def close(self) -> None:
        close_sampler(self.sampler)


def auto_actor_count(factory: Any, n_todo: int) -> int:
    """num_workers=0 on Ray: one actor per GPU of the cluster, else one per ``factory.num_threads`` CPUs."""
    import ray

    from cgn_dist.distributed.ray_utils import cluster_gpus

    gpus = int(cluster_gpus())
    threads = getattr(factory, "num_threads", 1) or 1
    n = max(1, min(n_todo, gpus or int(ray.cluster_resources().get("CPU", 1)) // threads))
    log.info("generation: %d Ray actor(s) (num_workers=0: one per %s of the cluster)", n,
             "GPU" if gpus else f"{threads} CPU(s)")
    return n


class RayShardRun:
    """The driver's state for one run's shards on Ray actors: ``results()`` yields each new shard's stats."""

    def __init__(self, factory, todo, out_dir, batch_size, num_workers, max_retries, shard_timeout_s,
                 worker_resources, seen):
        import ray

        from cgn_dist.distributed.ray_utils import default_worker_resources

        self.factory, self.out_dir, self.batch_size = factory, str(out_dir), batch_size
        self.max_retries, self.shard_timeout_s, self.seen = max_retries, shard_timeout_s, seen
        self.num_workers = num_workers or auto_actor_count(factory, len(todo))
        self.resources = dict(worker_resources or default_worker_resources(self.num_workers))
        if is_remote(out_dir) and storage_env():  # the bucket's endpoint and credentials, for every node's actors
            self.resources["runtime_env"] = {"env_vars": storage_env()}
        # max_restarts=0: a dead actor is replaced here, where the retry count lives too.
        # SPREAD: one worker per node first, so losing a node loses as few workers as possible.
        self.actor_cls = ray.remote(ShardWorker).options(max_restarts=0, max_task_retries=0,
                                                         scheduling_strategy="SPREAD", **self.resources)
        self.pending = collections.deque(todo)
        self.attempts: collections.Counter = collections.Counter()
        self.starting: dict[Any, Any] = {}  # provenance ref -> actor still being placed or loading its model
        self.idle: list[Any] = []  # one entry per free queue place: an actor is listed up to QUEUED_PER_ACTOR times
        self.inflight: dict[Any, tuple[Any, ShardSpec, float]] = {}  # ref -> (actor, shard, when handed out)
        self.last_done: dict[Any, float] = {}  # actor -> when it last returned a result
        self.dead: set[Any] = set()  # actors killed or lost: their other queued shards fail and are retried
        self.process: dict[Any, tuple[str, int]] = {}  # actor -> (host, pid), once it is up
        self.start_failures = 0
        self.last_progress = self.last_warned = time.monotonic()

    # --- actors and attempts ---------------------------------------------------------------------------------
    def start_actor(self) -> None:
        actor = self.actor_cls.remote(self.factory)
        self.starting[actor.provenance.remote()] = actor

    def replace(self, actor: Any) -> None:
        """Kill ``actor`` (once) and start another; its other queued shards come back as failures."""
        import ray
        if actor in self.dead:
            return
        self.dead.add(actor)
        self.idle = [a for a in self.idle if a != actor]
        ray.kill(actor, no_restart=True)
        self.start_actor()

    def free(self, actor: Any) -> None:
        if actor not in self.dead:
            self.idle.append(actor)

    def retry(self, spec: ShardSpec, error: str) -> None:
        if self.attempts[spec.shard_id] > self.max_retries:
            raise give_up(spec, self.attempts[spec.shard_id], error)
        log.warning("shard %d attempt %d failed (%s); retrying", spec.shard_id, self.attempts[spec.shard_id], error)
        self.pending.appendleft(spec)

    def dispatch(self) -> None:
        # Shards go only to actors that are up, so a shard's time limit never counts the wait for a node.
        while self.idle and self.pending:
            # the least loaded actor first, so a few shards spread over all actors instead of queueing at one
            load = collections.Counter(a for a, _, _ in self.inflight.values())
            actor = self.idle.pop(min(range(len(self.idle)), key=lambda i: load[self.idle[i]]))
            spec = self.pending.popleft()
            self.attempts[spec.shard_id] += 1
            ref = actor.write.remote(spec, self.out_dir, self.batch_size, self.attempts[spec.shard_id])
            self.inflight[ref] = (actor, spec, time.monotonic())

    # --- what came back ---------------------------------------------------------------------------------------
    def started(self, ref: Any) -> None:
        import ray
        from ray.exceptions import RayError

        actor = self.starting.pop(ref)
        try:
            info, where, self.process[actor] = ray.get(ref, timeout=60)
        except RayError as e:  # the factory raised, or the process died while loading
            self.start_failures += 1
            if self.start_failures > self.max_retries:
                raise GenerationError(f"workers fail to start ({self.start_failures} times); last error: {e}") from e
            log.warning("a worker failed to start (%s); starting another", type(e).__name__)
            self.replace(actor)
            return
        self.idle.extend([actor] * QUEUED_PER_ACTOR)  # stopped with the others in close() if it differs
        check_same_provenance(self.seen, f"the Ray worker on node {where}", info)

    def finished(self, ref: Any) -> dict[str, Any] | None:
        """The shard's stats, or None when its attempt failed (and was queued again)."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        actor, spec, _ = self.inflight.pop(ref)
        self.last_done[actor] = time.monotonic()  # its next queued shard starts now
        try:
            stats = ray.get(ref, timeout=60)
        except RayTaskError as e:  # the sampler raised: the actor itself is fine
            if must_stop(getattr(e, "cause", None)):
                raise StopGeneration(f"{e.cause} (shard {spec.shard_id})") from None
            self.free(actor)
            self.retry(spec, str(e).splitlines()[0] if str(e) else repr(e))
            return None
        except RayError as e:  # actor process or node lost (or killed here: replaced already)
            self.retry(spec, f"worker lost: {type(e).__name__}")
            self.replace(actor)
            return None
        self.free(actor)
        self.last_progress = time.monotonic()
        return stats

    def running(self) -> dict[Any, tuple[Any, ShardSpec, float]]:
        """ref -> (actor, shard, start) of the shard each live actor is writing now: its oldest queued one,
        started when the actor returned its previous result (or when it was handed out, if later)."""
        out: dict[Any, tuple[Any, ShardSpec, float]] = {}
        for ref, (actor, spec, t0) in self.inflight.items():  # dicts keep insertion order: oldest first
            if actor not in self.dead and all(a != actor for a, _, _ in out.values()):
                out[ref] = (actor, spec, max(t0, self.last_done.get(actor, t0)))
        return out

    def check_time(self, now: float) -> None:
        import ray

        if self.shard_timeout_s is not None:
            for ref, (actor, spec, started) in self.running().items():
                if now - started > self.shard_timeout_s:
                    self.inflight.pop(ref)
                    self.retry(spec, f"no result after {self.shard_timeout_s:.0f} s")
                    self.replace(actor)
            if not self.inflight and not self.idle and now - self.last_progress > max(self.shard_timeout_s, 60.0):
                raise GenerationError(
                    f"no worker could start within {self.shard_timeout_s:.0f} s: each needs {self.resources}, the "
                    f"cluster has {ray.available_resources()} free; lower num_workers or worker_resources")
        # nothing running: say so once a minute (not on every 1 s wake-up, nor never)
        waiting = not self.inflight and not self.idle and now - self.last_progress > WAIT_WARN_EVERY_S
        if waiting and now - self.last_warned >= WAIT_WARN_EVERY_S:
            self.last_warned = now
            log.warning("waiting for Ray to place workers needing %s (free: %s)", self.resources,
                        ray.available_resources())

    def results(self) -> Iterator[dict[str, Any]]:
        import ray

        for _ in range(min(self.num_workers, len(self.pending))):
            self.start_actor()
        while self.pending or self.inflight:
            self.dispatch()
            ready, _ = ray.wait(list(self.inflight) + list(self.starting), num_returns=1, timeout=1.0)
            interrupts.check()  # close() stops every actor
            for ref in ready:
                if ref in self.starting:
                    self.started(ref)
                    continue
                stats = self.finished(ref)
                if stats is not None:
                    yield stats
            self.check_time(time.monotonic())

    def close(self) -> None:
        import ray
        from ray.exceptions import RayError

        for actor, _, _ in self.inflight.values():
            ray.kill(actor, no_restart=True)
        for actor in self.starting.values():
            ray.kill(actor, no_restart=True)
        idle = list(set(self.idle))
        if idle:  # let idle samplers release what they hold, but never wait long for it
            try:
                ray.wait([a.close.remote() for a in idle], num_returns=len(idle), timeout=10)
            except RayError:
                pass
        for actor in set(self.idle):
            ray.kill(actor, no_restart=True)
        # ray.kill only asks: a killed actor may still write for a moment, even open its next queued shard's
        # temporary file. The caller sweeps temporaries and half-committed tars next, so wait for them to exit.
        wait_for_exit(list(self.process.values()), timeout_s=KILL_WAIT_S)


def wait_for_exit(processes: list[tuple[str, int]], timeout_s: float) -> None:
    """Wait until the processes on this host are gone (exited or zombies); those on other hosts cannot be
    watched from here: their temporaries are swept by the next run's start."""
    import socket

    here = socket.gethostname()
    pids = {pid for host, pid in processes if host == here and pid != os.getpid()}
    deadline = time.monotonic() + timeout_s
    while pids := {p for p in pids if _alive(p)}:
        if time.monotonic() > deadline:
            log.warning("Ray workers %s still running %.0f s after they were killed", sorted(pids), timeout_s)
            return
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as f:  # a zombie has exited (its files are closed), unreaped
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    try:  # no /proc (macOS): signal 0 says whether it exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_ray(factory, todo, out_dir, batch_size, num_workers, max_retries, ray_address, shard_timeout_s,
            worker_resources, seen) -> Iterator[dict[str, Any]]:
    """Write the shards of ``todo`` on Ray actors (starting Ray here when it is not up); yields their stats."""
    import ray

    from cgn_dist.distributed.ray_utils import init_ray

    started_here = not ray.is_initialized()
    if started_here:
        init_ray(address=ray_address)
    run = None
    try:
        run = RayShardRun(factory, todo, out_dir, batch_size, num_workers, max_retries, shard_timeout_s,
                          worker_resources, seen)
        yield from run.results()
    finally:
        if run is not None:
            run.close()
        if started_here:
            ray.shutdown()
