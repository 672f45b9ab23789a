"""The local backend with several workers: own worker processes, each pinned to its own GPU where the
machine has GPUs (worker i -> GPU i % n_gpus, see workers.assign_devices).

Own processes rather than a ProcessPoolExecutor: when one dies, the executor breaks and fails every shard in
flight; here only the dead worker's shard is retried, on a replacement process pinned to the same GPU.
Each worker reports its sampler's provenance as soon as it is built; one that differs from the first stops
the run before it writes anything (workers.check_same_provenance).
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
from typing import Any, Callable, Iterator

from cgn_dist import interrupts
from cgn_dist.sharding.plan import ShardSpec
from cgn_dist.sharding.sampler import close_sampler, sampler_info
from cgn_dist.sharding.workers import (check_same_provenance, format_assignment, local_device_plan,
                                       pin_visible_device, provenance_difference)
from cgn_dist.sharding.writer import StopGeneration, give_up, must_stop, write_shard
from cgn_dist.storage import storage_env

log = logging.getLogger(__name__)


def _process_main(factory: Callable[[], Any], conn: Any, visible: str | None = None,
                  storage: dict[str, str] | None = None, expected: dict[str, Any] | None = None) -> None:
    """Body of one worker process: pin its GPU, build the sampler once, report its provenance, then write
    the shards sent over ``conn``. ``expected``: the committed shards' provenance; a sampler that differs
    writes nothing (the driver, told its provenance, stops the run with the difference)."""
    import os
    import traceback

    from cgn_dist.storage import STORAGE_ENV
    # The forkserver keeps the environment of the moment it started (often an earlier run in this process):
    # the driver's storage settings of now are handed over explicitly.
    for key in STORAGE_ENV:
        if storage and key in storage:
            os.environ[key] = storage[key]
        else:
            os.environ.pop(key, None)
    import signal

    # A terminal's Ctrl-C reaches every process of its group: the driver alone decides (it stops this one).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pin_visible_device(visible)
        sampler = factory()
        info = sampler_info(sampler)
    except BaseException:
        conn.send(("fatal", traceback.format_exc(limit=5)))
        return
    try:
        conn.send(("ready", info))
        if expected is not None and provenance_difference(expected, info):
            return
        while (msg := conn.recv()) is not None:
            spec, out_dir, batch_size, attempt = msg
            try:
                conn.send(("ok", write_shard(sampler, spec, out_dir, batch_size, attempt=attempt, info=info)))
            except Exception as e:
                conn.send(("stop", str(e)) if must_stop(e) else ("error", repr(e)))
    finally:
        close_sampler(sampler)


class _WorkerProcess:
    def __init__(self, ctx: Any, factory: Callable[[], Any], slot: int, visible: str | None = None,
                 expected: dict[str, Any] | None = None):
        self.slot, self.visible, self.expected = slot, visible, expected
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_process_main, args=(factory, child, visible, storage_env(), expected),
                                   daemon=True)
        self.process.start()
        child.close()
        self.spec: ShardSpec | None = None

    def stop(self, timeout: float = 10.0) -> None:
        try:
            if self.process.is_alive():
                self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _worker_context() -> Any:
    # Not fork: a forked child of a process holding CUDA, Ray or torch threads can hang. forkserver forks
    # workers from a clean server process that imported this module (and so numpy, PIL, torch...) once:
    # a replacement worker starts in milliseconds instead of re-importing everything as spawn would.
    # Neither start method carries CUDA state into the child, so its GPU can still be pinned there.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def run_process_pool(factory, todo, out_dir, batch_size, num_workers, max_retries,
                     devices: list[str | None] | None = None, seen: list | None = None) -> Iterator[dict[str, Any]]:
    """Write the shards of ``todo`` with ``num_workers`` processes; yields each shard's stats.
    ``devices``: CUDA_VISIBLE_DEVICES per worker (default: this machine's GPUs, round-robin)."""
    from multiprocessing.connection import wait as wait_ready

    ctx = _worker_context()
    pending = collections.deque(todo)
    attempts: collections.Counter = collections.Counter()
    seen = [] if seen is None else seen  # (who, provenance): the committed shards', then each worker's
    n = min(num_workers, len(todo))
    devices = local_device_plan(n) if devices is None else devices
    if any(d is not None for d in devices):
        log.info("local workers: %s", format_assignment(devices))

    def retry(spec: ShardSpec, error: str) -> None:
        if attempts[spec.shard_id] > max_retries:
            raise give_up(spec, attempts[spec.shard_id], error)
        log.warning("shard %d attempt %d failed (%s); retrying", spec.shard_id, attempts[spec.shard_id], error)
        pending.appendleft(spec)

    expected = seen[0][1] if seen else None  # the committed shards' provenance, on a rerun
    workers = [_WorkerProcess(ctx, factory, i, devices[i], expected) for i in range(n)]
    try:
        while pending or any(w.spec is not None for w in workers):
            for w in workers:
                if w.spec is None and pending:
                    w.spec = pending.popleft()
                    attempts[w.spec.shard_id] += 1
                    w.conn.send((w.spec, str(out_dir), batch_size, attempts[w.spec.shard_id]))
            busy = [w for w in workers if w.spec is not None]
            wait_ready([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=0.5)
            interrupts.check()  # the finally below stops the workers; their half-written tars are removed
            for i, w in enumerate(workers):
                if w.spec is None:
                    continue
                spec, msg = w.spec, None
                if w.conn.poll():  # a result sent just before dying still counts
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                if msg is not None and msg[0] == "ready":  # its shard is still running
                    check_same_provenance(seen, f"local worker {w.slot}", msg[1])
                elif msg is not None and msg[0] == "ok":
                    w.spec = None
                    yield msg[1]
                elif msg is not None and msg[0] == "stop":
                    raise StopGeneration(f"{msg[1]} (shard {spec.shard_id})")
                elif msg is not None and msg[0] == "error":
                    w.spec = None
                    retry(spec, msg[1])
                elif msg is not None or not w.process.is_alive():
                    reason = msg[1].strip().splitlines()[-1] if msg else f"exit code {w.process.exitcode}"
                    w.spec = None
                    w.stop(timeout=1.0)
                    workers[i] = _WorkerProcess(ctx, factory, w.slot, w.visible, w.expected)
                    retry(spec, f"worker process died ({reason})")
    finally:
        # After an interrupt a busy worker is not waited for: its shard is abandoned, not committed.
        hurry = interrupts.requested() is not None
        for w in workers:
            w.stop(timeout=0.0 if hurry and w.spec is not None else 10.0)
