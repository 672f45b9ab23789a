"""What one node sees: versions, GPUs, matrix units, the config's paths and weights files, free disk.

``probe_node(request)`` runs on the node itself (here, or as a Ray task pinned to it), so every answer is
that node's own view: its environment decides where the weights cache is (CGN_DIST_CACHE, TORCH_HOME),
its mounts decide what a path holds. ``probe_every_node`` runs it once on each alive Ray node
(NodeAffinitySchedulingStrategy, no CPU reserved, so busy nodes answer too). The doctor
(cgn_dist/doctor.py) turns the answers into ok/FAIL lines.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

MARKER_PREFIX = ".cgn_dist_doctor"


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` or its closest ancestor that exists: where a run would create its folders."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def fingerprint(path: str | os.PathLike) -> str | None:
    """A short digest of what ``path`` holds as seen here (a file's size; a folder's sorted entry names),
    None where it does not exist: two nodes that see the same storage give the same digest."""
    p = Path(path)
    try:
        if p.is_file():
            return f"file:{p.stat().st_size}"
        if p.is_dir():
            names = sorted(e.name for e in os.scandir(p))
            return f"dir:{len(names)}:" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    except OSError as e:
        return f"unreadable:{e.__class__.__name__}"
    return None


def nvidia_smi_gpus() -> list[str] | None:
    """GPU names nvidia-smi lists (None: no nvidia-smi here; [] when it fails, e.g. no driver)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def _software() -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from cgn_dist.precision import decide_precision, device_capabilities

    cuda = torch.cuda.is_available()
    caps = {**device_capabilities("cpu"), "torch_isa": torch.backends.cpu.get_cpu_capability()}
    # what precision=auto picks here (cgn_dist/precision.py): on the GPU when there is one, else the CPU
    picked = {"cpu": decide_precision("auto", caps)}
    if cuda:
        picked["cuda"] = decide_precision("auto", device_capabilities("cuda"))
    return {"picked": picked, "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": cuda,
            "torch_gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "nvidia_smi": nvidia_smi_gpus(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "nccl": bool(dist.is_available() and dist.is_nccl_available()),
            "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            "caps": caps, "python": platform.python_version()}


def _output(path: str, marker: str, token: str, node: str) -> dict[str, Any]:
    """Read the driver's marker where the run would write, and prove this node can write there too."""
    anchor = nearest_existing(path)
    out: dict[str, Any] = {"anchor": str(anchor)}
    try:
        out["token"] = (anchor / marker).read_text().strip()
    except OSError as e:
        out["token"], out["read_error"] = None, f"{e.__class__.__name__}: {e.strerror or e}"
    probe = anchor / f"{marker}.{node}"
    try:
        probe.write_text(node)
        probe.unlink()
        out["writable"] = True
    except OSError as e:
        out["writable"], out["write_error"] = False, f"{e.__class__.__name__}: {e.strerror or e}"
    try:
        out["free_bytes"] = shutil.disk_usage(anchor).free
    except OSError:
        out["free_bytes"] = None
    return out


def _weights(names: list[str], hash_files: bool) -> dict[str, Any]:
    from cgn_dist import weights

    out = {}
    for name in names:
        p = weights.path_of(name)
        entry: dict[str, Any] = {"path": str(p), "present": p.is_file()}
        if entry["present"]:
            entry["size"] = p.stat().st_size
            if hash_files:
                from cgn_dist.data.shards import sha256_file

                entry["sha256"] = sha256_file(p)
        out[name] = entry
    return out


def probe_node(request: dict[str, Any]) -> dict[str, Any]:
    """This node's answers to ``request`` (built by cgn_dist.doctor.build_request)."""
    from cgn_dist import weights

    node = request.get("node_id") or socket.gethostname()
    token, marker = request["token"], request["marker"]
    report: dict[str, Any] = {"node_id": node, "host": socket.gethostname(), "outputs": {}, "inputs": {}}
    if request.get("software", True):
        report["software"] = _software()
    for key, path in request.get("outputs", {}).items():
        report["outputs"][key] = {"path": path, **_output(path, marker, token, node)}
    if request.get("cache_marker"):  # the weights cache as THIS node's environment names it
        report["outputs"]["weights cache"] = {"path": str(weights.cache_dir()),
                                              **_output(str(weights.cache_dir()), marker, token, node)}
    for key, path in request.get("inputs", {}).items():
        report["inputs"][key] = {"path": path, "fingerprint": fingerprint(path)}
    report["weights"] = _weights(request.get("weights", []), request.get("hash", True))
    return report


def _node_id_here() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _probe_remote(request: dict[str, Any]) -> dict[str, Any]:
    return probe_node({**request, "node_id": _node_id_here()[:8]})


def probe_every_node(request: dict[str, Any], timeout_s: float = 600.0) -> tuple[list[dict], list[dict]]:
    """``probe_node`` once on every alive node of the connected Ray cluster; returns (reports, nodes) where
    nodes are ray.nodes() entries of the alive nodes. A node that does not answer within ``timeout_s``
    gets {"node_id": ..., "error": ...}."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=0, max_retries=0)(_probe_remote)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(request)
            for n in nodes]
    reports = []
    for n, ref in zip(nodes, refs):
        try:
            reports.append(ray.get(ref, timeout=timeout_s))
        except Exception as e:  # a node that cannot run the probe is itself a finding, not a crash
            reports.append({"node_id": n["NodeID"][:8], "host": n.get("NodeManagerAddress", "?"),
                            "error": f"{e.__class__.__name__}: {str(e).strip().splitlines()[-1][:300]}"})
    return reports, nodes
