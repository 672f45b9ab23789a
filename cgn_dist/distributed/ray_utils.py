"""Starting or joining Ray, with an embedded cluster that stays on 127.0.0.1.

By default a local ``ray.init()`` finds its address with a UDP probe to a public resolver, and its API
server probes cloud metadata addresses even with usage stats off. An embedded (single-machine) cluster
needs none of that, so ``init_ray()`` without an address turns it off: Ray's single-machine mode (node IP
127.0.0.1), no usage stats, no dashboard, and (``loopback_only``, the default) a dead loopback HTTP proxy
for Ray's own processes, so the metadata probes fail at once. The proxy is set only while Ray starts: pip
and downloads in this process are unaffected, and the workers that run our code get the original settings.

With an address (``"auto"``, ``"ray://head:10001"``, ``"10.0.0.1:6379"``) nothing is changed: the
cluster's own settings apply. Workers there must be able to import cgn_dist: install the package on every
node (the cluster YAML does), or pass ``ship_code=True`` to upload it with the job.

Ray is imported lazily everywhere: importing this module does not import Ray.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from cgn_dist.errors import InputError

LOOPBACK = "127.0.0.1"

# Ray's settings for a single-machine cluster that talks to nothing but loopback.
LOOPBACK_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-machine mode: node IP 127.0.0.1, no address probe
    "RAY_USAGE_STATS_ENABLED": "0",
}
# A dead proxy on loopback: cloud-metadata probes of Ray's API server fail at once instead of leaving.
LOOPBACK_PROXY_ENV = {
    "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": "127.0.0.1,localhost,::1", "NO_PROXY": "127.0.0.1,localhost,::1",
}


# Ray's own lines that say nothing to a cgn_dist user, per Ray worker process: the Ray Train placement-group
# cleaner warns once a second that the State API (served by the dashboard, which cgn_dist leaves off) is not
# there, and every worker prints each report as a TrainingReport(...) dump. Set by every worker of our jobs
# (runtime_env's worker_process_setup_hook); Ray keeps them in its session's log files.
QUIET_LOGGERS = {"ray.train.v2._internal.execution.controller.placement_group_cleaner": "ERROR",
                 "ray.train.v2._internal.execution.context": "WARNING"}
SETUP_HOOK = "cgn_dist.distributed.ray_utils.quiet_ray_worker"


def quiet_ray_worker() -> None:
    import importlib.util
    import logging

    # Ray's State API in a worker looks for "the" local Ray instance; with two on the machine (another user's,
    # another job's) it finds both and the placement-group cleaner dies with a traceback. It is this one.
    try:
        import ray

        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - a quieter log is not worth failing a worker for
        pass

    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
        try:  # some Ray modules name their logger by file path (logging.getLogger(__file__))
            origin = importlib.util.find_spec(name).origin
        except (ImportError, AttributeError, ValueError):
            continue
        if origin:
            logging.getLogger(origin).setLevel(level)


def quiet_driver_output() -> None:
    """What the driver prints of its workers: no ANSI colour codes in a file or a pipe, and Ray's
    deduplication of repeated lines on (both only where the user has not said otherwise)."""
    import sys

    from cgn_dist.progress import on_terminal

    if not on_terminal(sys.stderr):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def package_root() -> Path:
    """The folder that holds the cgn_dist package (what PYTHONPATH needs for workers to import it)."""
    return Path(__file__).resolve().parents[2]  # <root>/cgn_dist/distributed/ray_utils.py


@contextlib.contextmanager
def patched_environ(values: dict[str, str], override: bool = True) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the previous values."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if override or k not in os.environ:
                os.environ[k] = v
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


def _force_single_machine_mode() -> None:
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; if it was imported before the variable
    # was set, its constant must follow too, or the driver would still probe for a routable address.
    import ray._private.ray_constants as rc
    rc.ENABLE_RAY_CLUSTER = False


def _pythonpath_with_package(existing: str | None) -> str:
    root = str(package_root())
    parts = [p for p in (existing or "").split(os.pathsep) if p]
    return os.pathsep.join([root] + [p for p in parts if p != root])


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             loopback_only: bool = True, ship_code: bool = False,
             runtime_env: dict[str, Any] | None = None, **init_kwargs: Any) -> dict[str, Any]:
    """Start an embedded loopback Ray (``address=None``) or connect to a cluster; returns ray.init's address
    info. A no-op returning {} if this process is already connected.

    Embedded: single-machine mode, no usage stats, no dashboard; with ``loopback_only`` (the default) Ray's
    own processes get a dead loopback proxy so their cloud-metadata probes never leave the machine, while
    the workers that run our code get this process's proxy settings back (through the job's runtime_env),
    so a sampler can still download what it needs. Existing cluster: nothing is changed.
    """
    if address is None:
        for k, v in LOOPBACK_RAY_ENV.items():
            os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return {}
    runtime_env = dict(runtime_env or {})
    quiet_driver_output()
    runtime_env.setdefault("worker_process_setup_hook", SETUP_HOOK)
    # Ray's own INFO lines of the driver ("Started a local Ray instance") add nothing to cgn_dist's
    init_kwargs.setdefault("logging_level", "WARNING")
    if address is None:
        if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
            _force_single_machine_mode()
        # Workers of an embedded cluster are children of the Ray processes started here: a PYTHONPATH entry
        # in their inherited environment lets them import cgn_dist even when it is not installed.
        env = {"PYTHONPATH": _pythonpath_with_package(os.environ.get("PYTHONPATH"))}
        if loopback_only:
            env.update(LOOPBACK_PROXY_ENV)
            # An empty *_proxy variable means "no proxy" to urllib/requests/curl, as an unset one does.
            env_vars = {k: os.environ.get(k, "") for k in LOOPBACK_PROXY_ENV}
            env_vars.update(runtime_env.get("env_vars", {}))
            runtime_env["env_vars"] = env_vars
        kwargs: dict[str, Any] = dict(include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus,
                                      _node_ip_address=LOOPBACK, runtime_env=runtime_env or None)
        kwargs.update(init_kwargs)
        with patched_environ(env):
            ctx = ray.init(**kwargs)
    else:
        if num_cpus is not None or num_gpus is not None:
            raise InputError("num_cpus / num_gpus size an embedded cluster only; an existing cluster "
                             f"({address}) keeps its own resources")
        if ship_code:
            runtime_env.setdefault("py_modules", []).append(str(package_root() / "cgn_dist"))
        ctx = ray.init(address=address, runtime_env=runtime_env or None, **init_kwargs)
    return dict(ctx.address_info) if hasattr(ctx, "address_info") else {}


def start_ray_here(address: str = "", num_cpus: int = 0) -> bool:
    """Join the cluster at ``address`` (a config's ray.address), or start an embedded one of ``num_cpus``
    (loopback only, init_ray's default), unless Ray is already up. True when this call started it, so the
    caller knows to shut it down."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        init_ray(address=address)
    else:
        init_ray(num_cpus=num_cpus or None)
    return True


def shutdown_ray() -> None:
    import ray
    if ray.is_initialized():
        ray.shutdown()


def cluster_gpus() -> float:
    import ray
    return float(ray.cluster_resources().get("GPU", 0.0))


def default_worker_resources(num_workers: int) -> dict[str, float]:
    """One GPU per worker where the cluster has GPUs; otherwise a CPU share small enough that all workers
    fit at once (whole CPUs per actor on a 2-CPU machine have been seen to starve other Ray work)."""
    import ray
    if cluster_gpus() >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return {"num_cpus": max(0.01, round(min(1.0, cpus / max(1, num_workers)), 2))}


class LoopbackCluster:
    """A multi-node Ray cluster simulated on this machine (``ray.cluster_utils.Cluster``), all on 127.0.0.1.

    For tests and rehearsals of node loss: each node is its own raylet with its own resources. The proxy
    settings apply to the Ray processes started here, never to this process after ``start``.
    """

    def __init__(self, num_nodes: int = 2, cpus_per_node: float = 1, object_store_mb: int = 80):
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.num_nodes, self.cpus_per_node, self.object_store_mb = num_nodes, cpus_per_node, object_store_mb
        self.cluster = None
        self.nodes: list[Any] = []

    def start(self) -> "LoopbackCluster":
        with patched_environ(self._env()):
            from ray.cluster_utils import Cluster
            _force_single_machine_mode()
            self.cluster = Cluster(initialize_head=True,
                                   head_node_args=dict(self._node_args(), include_dashboard=False))
            self.nodes = [self.cluster.head_node]
        for _ in range(self.num_nodes - 1):
            self.add_node(wait=False)
        self.cluster.wait_for_nodes()
        return self

    def _node_args(self) -> dict[str, Any]:
        return dict(num_cpus=self.cpus_per_node, node_ip_address=LOOPBACK,
                    object_store_memory=self.object_store_mb * 1024 * 1024)

    def _env(self) -> dict[str, str]:
        return {**LOOPBACK_RAY_ENV, **LOOPBACK_PROXY_ENV,
                "PYTHONPATH": _pythonpath_with_package(os.environ.get("PYTHONPATH"))}

    def add_node(self, wait: bool = True) -> Any:
        """Start one more worker node (e.g. the replacement for a lost one); returns it. Main thread only:
        Ray installs signal handlers for the node."""
        if self.cluster is None:
            raise RuntimeError("the cluster is not started")
        with patched_environ(self._env()):
            node = self.cluster.add_node(**self._node_args())
        self.nodes.append(node)
        if wait:
            self.cluster.wait_for_nodes()
        return node

    @property
    def address(self) -> str:
        if self.cluster is None:
            raise RuntimeError("the cluster is not started")
        return self.cluster.address

    def connect(self, **init_kwargs: Any) -> None:
        init_ray(address=self.address, **init_kwargs)

    def remove_node(self, node: Any) -> None:
        """Lose a whole node: its raylet, object store and every worker process on it."""
        self.cluster.remove_node(node)
        self.nodes.remove(node)

    def shutdown(self) -> None:
        shutdown_ray()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None

    def __enter__(self) -> "LoopbackCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def stop_ray_under(temp_dir: str | os.PathLike, timeout_s: float = 10.0) -> list[int]:
    """Stop the Ray daemons whose command line names ``temp_dir`` (what RAY_TMPDIR pointed at when they
    started); returns their pids. Unlike ``ray stop``, the other Ray instances on the machine are left alone.
    Their workers exit on their own once their raylet is gone."""
    import psutil

    needle = str(Path(temp_dir).resolve())
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(needle in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in found:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(found, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return [p.pid for p in found]
