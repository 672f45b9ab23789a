"""Ray pieces shared by the tests that lose a worker or a node: a two-node loopback cluster, and killing a
Ray Train worker of this test session's own Ray (never another Ray instance on the machine)."""
import contextlib
import os
import threading
import time
from pathlib import Path

import psutil

from cgn_dist.train.checkpoint import list_checkpoints


@contextlib.contextmanager
def two_node_cluster():
    from cgn_dist.distributed.ray_utils import LoopbackCluster, shutdown_ray

    shutdown_ray()
    cluster = LoopbackCluster(num_nodes=2, cpus_per_node=1, object_store_mb=200).start()
    try:
        cluster.connect()
        yield cluster
    finally:
        shutdown_ray()
        cluster.shutdown()


def is_ours(p: psutil.Process) -> bool:
    # The tests' Ray daemons run under the session's RAY_TMPDIR (tests/conftest.py): a worker is ours when an
    # ancestor's command line names it.
    tmp = os.environ["RAY_TMPDIR"]
    try:
        return any(tmp in part for a in p.parents() for part in a.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def kill_a_train_worker_after_first_checkpoint(run_dir: Path, killed: list, stop: threading.Event) -> None:
    """Poll until ``run_dir`` has a checkpoint, then kill one of our Ray Train workers (pid into ``killed``)."""
    while not stop.is_set():
        if list_checkpoints(run_dir):
            for p in psutil.process_iter(["cmdline"]):
                if any("RayTrainWorker" in part for part in (p.info["cmdline"] or [])) and is_ours(p):
                    p.kill()
                    killed.append(p.pid)
                    return
        time.sleep(0.05)
