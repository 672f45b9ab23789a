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


# A worker node of a LoopbackCluster in a process of its own, as Cluster.add_node builds one (loopback only).
_NODE_MAIN = """
import signal, sys, time
import ray._private.node, ray._private.parameter
from cgn_dist.distributed.ray_utils import LOOPBACK, _force_single_machine_mode
_force_single_machine_mode()
gcs, redis = sys.argv[1], sys.argv[2] or None
p = ray._private.parameter.RayParams(num_cpus=1, num_gpus=0, object_store_memory=80 * 1024 * 1024,
    min_worker_port=0, max_worker_port=0, node_ip_address=LOOPBACK, gcs_address=gcs, redis_address=redis,
    include_log_monitor=False, node_manager_port=0)
p.dashboard_agent_listen_port = None
node = ray._private.node.Node(p, head=False, shutdown_at_exit=True, spawn_reaper=True)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))  # exit runs Ray's atexit: the node's processes stop
print("node started", flush=True)
while True:
    time.sleep(1)
"""


@contextlib.contextmanager
def node_with_own_mounts(cluster, hidden: Path, log: Path):
    """One more node whose processes live in their own mount namespace, with an empty tmpfs over ``hidden``:
    a node on which a shared folder is a local, empty one (``unshare -m``: root or CAP_SYS_ADMIN)."""
    import signal
    import subprocess
    import sys

    import ray

    from cgn_dist.distributed.ray_utils import LOOPBACK_PROXY_ENV, LOOPBACK_RAY_ENV, _pythonpath_with_package

    env = {**os.environ, **LOOPBACK_RAY_ENV, **LOOPBACK_PROXY_ENV,
           "PYTHONPATH": _pythonpath_with_package(os.environ.get("PYTHONPATH"))}
    c = cluster.cluster
    script = f'mount -t tmpfs none "$0" && exec "$1" -c "$2" "$3" "$4"'
    before = sum(n["Alive"] for n in ray.nodes())
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(hidden),
                             sys.executable, _NODE_MAIN, c.gcs_address, c.redis_address or ""], env=env,
                            start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while sum(n["Alive"] for n in ray.nodes()) <= before:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the namespaced node did not join: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
