"""``cgn-dist doctor [CONFIG]``: a preflight before a long job, on this machine or every node of a Ray cluster.

One line per check, ``ok   <check>: <detail>`` or ``FAIL <check>: <problem>; fix: <fix>``:
torch / CUDA / driver and whether torch sees every GPU nvidia-smi lists; NCCL; the CPU's matrix units and
the precision they favour; every path the config names, seen the same from every node (the driver writes
a marker with a random token where the run will write, and every node must read that token back and write
beside it; input folders must look the same everywhere); every weights file present everywhere with one
size and sha256; free disk; the workers' resource request against the nodes'.

With ``ray.address`` set the probes run as one Ray task per node; otherwise on this machine only (an
embedded Ray cluster is this machine). ``preflight`` is the cheap part (paths + resources, no hashing) that
train / generate / make-shards run before starting on Ray.
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

from cgn_dist.config import Config
from cgn_dist.doctor_checks import Line
from cgn_dist.errors import UserError
from cgn_dist.distributed.node_probe import MARKER_PREFIX, fingerprint, nearest_existing, probe_node
from cgn_dist.distributed.paths import INPUT_KEYS, OUTPUT_KEYS, _get, absolute, is_uri

# Config sections a task reads; other sections keep defaults that name files this run never opens.
TASK_SECTIONS = {"mnist": ("data.", "mnist.", "generate.", "pipeline."), "imagenet": ("imagenet.", "generate."),
                 "invariant": ("invariant.", "eval.", "imagenet_pipeline.")}
WEIGHT_KEYS = ("mnist.vgg_weights", "mnist.init_from", "imagenet.biggan", "imagenet.u2net", "imagenet.vgg_weights",
               "imagenet.init_from", "generate.checkpoint", "invariant.weights", "eval.weights",
               "eval.inception_weights")
MIN_FREE_BYTES = 1 << 30
# Rough bytes per generated sample, for the disk check of a generation config (a dry run measures it).
BYTES_PER_SAMPLE = {"imagenet": 60_000, "mnist": 1_500}


class PreflightError(UserError, ValueError):
    """A cluster that cannot run this job as configured (one doctor line, with its fix)."""


def _relevant(cfg: Config, key: str) -> bool:
    return "." not in key or key.startswith(("ray.", "shards.")) or key.startswith(TASK_SECTIONS[cfg.task])


def config_weights(cfg: Config) -> list[str]:
    """The registry weights (names) this config's task loads."""
    from cgn_dist import weights

    names = []
    for key in WEIGHT_KEYS:
        value = _get(cfg, key)
        if _relevant(cfg, key) and isinstance(value, str) and weights.is_name(value) and value not in names:
            names.append(value)
    return names


def config_locations(cfg: Config) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(outputs, inputs, uris): the local paths the run writes, the local paths it reads (absolute, as the
    driver hands them to every worker), and the object-store URIs it names."""
    outputs, inputs, uris = {}, {}, {}
    for key in OUTPUT_KEYS + INPUT_KEYS:
        value = _get(cfg, key)
        if not (isinstance(value, str) and value and _relevant(cfg, key)):
            continue
        if value.startswith("file://"):  # a local folder spelled as a URI (Ray's storage_path accepts both)
            value = value[len("file://"):]
        elif is_uri(value):
            uris[key] = value
            continue
        path = absolute(value, always=key in OUTPUT_KEYS)
        if os.path.isabs(path):
            (outputs if key in OUTPUT_KEYS else inputs)[key] = path
    return outputs, inputs, uris


def uses_ray(cfg: Config, command: str) -> bool:
    if command == "train":
        return cfg.distributed.num_workers > 0
    if command == "generate":
        return cfg.generate.backend == "ray" and not cfg.generate.dry_run
    if command == "make-shards":
        return cfg.shards.backend == "ray" and not cfg.shards.dry_run
    return bool(cfg.ray.address) or cfg.distributed.num_workers > 0 or "ray" in (cfg.generate.backend,
                                                                                   cfg.shards.backend)


def build_request(cfg: Config, full: bool = True) -> dict[str, Any]:
    outputs, inputs, _ = config_locations(cfg)
    return {"token": secrets.token_hex(16), "marker": f"{MARKER_PREFIX}.{secrets.token_hex(4)}",
            "outputs": outputs, "inputs": inputs, "cache_marker": full and bool(config_weights(cfg)),
            "weights": config_weights(cfg) if full else [], "hash": full, "software": full}


def _write_markers(request: dict[str, Any]) -> list[Path]:
    """The token in the nearest existing folder of every output (and of the weights cache): where each node
    must read it back. Records each folder in request["driver_anchor"] for the verdicts."""
    from cgn_dist import weights

    places = {k: nearest_existing(p) for k, p in request["outputs"].items()}
    if request["cache_marker"]:
        places["weights cache"] = nearest_existing(weights.cache_dir())
    request["driver_anchor"] = {k: str(v) for k, v in places.items()}
    request["driver_paths"] = {**request["outputs"], "weights cache": str(weights.cache_dir())}
    written = []
    for anchor in dict.fromkeys(places.values()):
        try:
            (anchor / request["marker"]).write_text(request["token"])
            written.append(anchor / request["marker"])
        except OSError:
            pass  # every node's verdict (the driver's node among them) reports the unwritable place
    return written


def _cluster_nodes_here(cfg: Config) -> list[dict]:
    """The Ray nodes this process is connected to, else this machine as ray.nodes() would show an embedded
    cluster of ray.num_cpus (or every CPU)."""
    import torch

    ray = sys.modules.get("ray")  # never imported just to ask
    if ray is not None and ray.is_initialized():
        return [n for n in ray.nodes() if n.get("Alive")]

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    resources = {"CPU": float(cfg.ray.num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}
    return [{"NodeID": "local", "NodeManagerAddress": "this machine", "Resources": resources, "Alive": True}]


def run_probes(cfg: Config, request: dict[str, Any]) -> tuple[list[dict], list[dict], str]:
    """(reports, nodes, where): every node's probe, on Ray when ray.address is set, else here."""
    markers = _write_markers(request)
    try:
        if cfg.ray.address:
            from cgn_dist.distributed.node_probe import probe_every_node
            from cgn_dist.distributed.ray_utils import shutdown_ray, start_ray_here

            started = start_ray_here(cfg.ray.address)
            try:
                reports, nodes = probe_every_node(request)
            finally:
                if started:
                    shutdown_ray()
            return reports, nodes, f"Ray cluster {cfg.ray.address} ({len(nodes)} nodes)"
        return [probe_node({**request, "node_id": "local"})], _cluster_nodes_here(cfg), "this machine"
    finally:
        for m in markers:
            m.unlink(missing_ok=True)


def diagnose(cfg: Config, full: bool = True) -> tuple[list[Line], str]:
    """Every check's line for ``cfg`` (full=False: paths and resources only)."""
    from cgn_dist.doctor_checks import input_lines, output_lines, resource_lines, software_lines, weights_lines

    request = build_request(cfg, full)
    driver_inputs = {k: fingerprint(p) for k, p in request["inputs"].items()}
    reports, nodes, where = run_probes(cfg, request)
    lines = []
    for r in reports:
        if "error" in r:
            lines.append(Line(f"node {r['node_id']}", False, f"the probe did not run ({r['error']})",
                              "check the node's Ray logs; cgn_dist must be installed there (launch/ray_cluster.yaml)"))
    good = [r for r in reports if "error" not in r]
    if full:
        lines += software_lines(cfg, good, len(good) > 1)
    lines += output_lines(request, good, _uri_lines(cfg))
    lines += input_lines(cfg, driver_inputs, good)
    if full:
        lines += weights_lines(request["weights"], good)
    lines += resource_lines(cfg, nodes, good, disk_need_bytes(cfg))
    return lines, where


def _uri_lines(cfg: Config) -> list[Line]:
    from cgn_dist.storage import Store

    out = []
    for key, uri in config_locations(cfg)[2].items():
        if key.startswith("ray.") or key in OUTPUT_KEYS:
            try:
                Store(uri).check_writable()
                out.append(Line(f"path {key}", True, f"{uri} writable (a bucket: the same for every node)"))
            except Exception as e:
                out.append(Line(f"path {key}", False, f"{uri} not writable ({str(e).splitlines()[0][:200]})",
                                "check the bucket name and the credentials (README \"Outputs in a bucket\")"))
    return out


def disk_need_bytes(cfg: Config) -> int:
    """What the run's outputs take, roughly: a generation config's n_samples x a sample's size (the dry run,
    generate.dry_run=true, measures it); else the 1 GiB floor any run needs for logs and checkpoints."""
    if cfg.generate.checkpoint and cfg.task in BYTES_PER_SAMPLE:
        layers = 4 if cfg.generate.save_layers else 1
        return max(MIN_FREE_BYTES, cfg.generate.n_samples * BYTES_PER_SAMPLE[cfg.task] * layers)
    return MIN_FREE_BYTES


def run_doctor(cfg: Config) -> tuple[str, int]:
    """The doctor's report and exit status (1 when any check failed)."""
    lines, where = diagnose(cfg)
    bad = sum(not ln.ok for ln in lines)
    text = "\n".join([f"cgn-dist doctor: {cfg.name or 'run'} on {where}", *map(str, lines),
                      f"{len(lines) - bad} ok, {bad} failed"])
    return text, 1 if bad else 0


def preflight(cfg: Config, command: str) -> None:
    """The doctor's cheap checks before ``command`` starts on Ray: every path visible and writable from
    every node, and the workers' resources placeable. Raises PreflightError with the first failing line."""
    if not uses_ray(cfg, command) or os.environ.get("CGN_DIST_SKIP_PREFLIGHT"):
        return
    lines, _ = diagnose(cfg, full=False)
    bad = [ln for ln in lines if not ln.ok]
    if bad:
        more = f" (+{len(bad) - 1} more: cgn-dist doctor shows every check)" if len(bad) > 1 else ""
        raise PreflightError(f"preflight: {bad[0]}{more}")
