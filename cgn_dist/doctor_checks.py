"""The doctor's verdicts: every node's probe (cgn_dist/distributed/node_probe.py) turned into ok/FAIL lines."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cgn_dist.config import Config

SHARED_FIX = ("mount shared storage at the same path on every node (launch/ray_cluster.yaml mounts /shared) "
              "or write to a bucket (out_dir=s3://...; README \"Outputs in a bucket\", cgn_dist/storage.py)")
DOWNLOADED_INPUTS = ("data.root",)  # fetched by the run itself when absent
TORCH_FIX = ("install the torch build for this driver (README \"torch builds per driver\": cu130 needs "
             "driver >= 580, CUDA 12.x builds older ones) and check CUDA_VISIBLE_DEVICES")


@dataclass
class Line:
    check: str
    ok: bool
    detail: str
    fix: str = ""

    def __str__(self) -> str:
        return f"ok   {self.check}: {self.detail}" if self.ok else f"FAIL {self.check}: {self.detail}; fix: {self.fix}"


def _where(r: dict, many: bool) -> str:
    return f" [node {r['node_id']} {r['host']}]" if many else ""


def _wants_cuda(cfg: Config) -> bool:
    return cfg.distributed.use_gpu or "cuda" in (cfg.train.device, cfg.generate.device)


def software_lines(cfg: Config, reports: list[dict], many: bool) -> list[Line]:
    out = []
    for r in reports:
        s, at = r["software"], _where(r, many)
        smi = s["nvidia_smi"]
        out.append(Line(f"torch{at}", True, f"torch {s['torch']} (CUDA build {s['torch_cuda'] or 'none'}), "
                        f"python {s['python']}, driver {smi[0].split(',')[-1].strip() if smi else 'none'}"))
        seen, listed = len(s["torch_gpus"]), len(smi or [])
        cvd = s["cuda_visible_devices"]
        if cvd is not None and smi:  # CUDA_VISIBLE_DEVICES hides GPUs on purpose: compare with what it leaves
            listed = min(listed, len([d for d in cvd.split(",") if d.strip()]))
        if seen < listed:
            out.append(Line(f"gpus{at}", False, f"nvidia-smi lists {len(smi)} GPU(s) ({smi[0].split(',')[0]}), "
                            f"torch sees {seen}" + (f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else ""),
                            TORCH_FIX))
        elif seen == 0 and _wants_cuda(cfg):
            out.append(Line(f"gpus{at}", False, "the config asks for CUDA (use_gpu / device=cuda) and torch sees "
                            "no GPU" + (" (no nvidia-smi here)" if smi is None else ""),
                            "run on a GPU node, or set train.device=cpu generate.device=cpu distributed.use_gpu=false"))
        else:
            out.append(Line(f"gpus{at}", True, f"torch sees {seen} GPU(s)" + (f": {', '.join(s['torch_gpus'])}"
                                                                              if seen else " (CPU run)")))
        if s["cuda_available"] and not s["nccl"]:
            out.append(Line(f"nccl{at}", False, "torch has CUDA but no NCCL: multi-GPU training cannot start",
                            "install a torch CUDA wheel from download.pytorch.org (they ship NCCL)"))
        else:
            out.append(Line(f"nccl{at}", True, f"NCCL {s['nccl_version']}" if s["nccl_version"] else
                            ("NCCL built in (no GPU to use it)" if s["nccl"] else "not needed (CPU: gloo)")))
        c = s["caps"]
        units = [u for u in ("amx", "avx512_bf16", "avx2") if c[u]] or ["none"]
        picked = "; ".join(f"{dev} precision=auto: {p} ({why})" for dev, (p, why) in s["picked"].items())
        out.append(Line(f"matrix units{at}", True, f"{', '.join(units)} (torch ISA {c['torch_isa']}"
                        + (f", ONEDNN_MAX_CPU_ISA={c['isa_cap']}" if c["isa_cap"] else "") + f"); {picked}"))
    return out


def output_lines(request: dict[str, Any], reports: list[dict], uri_lines: list[Line]) -> list[Line]:
    """Every node read the driver's token where the run writes, and wrote beside it."""
    out = list(uri_lines)
    keys = list(request["outputs"]) + (["weights cache"] if request["cache_marker"] else [])
    for key in keys:
        bad = []
        for r in reports:
            o = r["outputs"][key]
            if o["token"] != request["token"]:
                bad.append(f"node {r['node_id']} ({r['host']}) looks in {o['anchor']} and does not see the marker "
                           f"the driver wrote in {request['driver_anchor'][key]}"
                           + (f" ({o['read_error']})" if o.get("read_error") else ""))
            elif not o["writable"]:
                bad.append(f"node {r['node_id']} ({r['host']}) cannot write in {o['anchor']} ({o['write_error']})")
        path = request["driver_paths"][key]  # as the driver names it
        name = f"path {key}" if key != "weights cache" else "path weights cache (CGN_DIST_CACHE)"
        if bad:
            fix = SHARED_FIX if key != "weights cache" else (
                "point CGN_DIST_CACHE at one shared folder on every node (launch/ray_cluster.yaml: /shared/cache) "
                "and fetch the weights there once")
            out.append(Line(name, False, "; ".join(bad), fix))
        else:
            out.append(Line(name, True, f"{path}: marker seen and writable from {len(reports)} node(s)"))
    return out


def _seen(fp: str | None) -> str:
    """A probe's fingerprint in words."""
    if fp is None:
        return "nothing"
    kind, _, rest = fp.partition(":")
    if kind == "file":
        return f"a file of {int(rest):,} bytes"
    if kind == "dir":
        n, _, digest = rest.partition(":")
        return f"a folder of {n} entries (names digest {digest})"
    return fp


def input_lines(cfg: Config, driver: dict[str, str | None], reports: list[dict]) -> list[Line]:
    out = []
    for key, want in driver.items():
        path = reports[0]["inputs"][key]["path"] if reports else key
        if want is None:
            if key not in DOWNLOADED_INPUTS:
                out.append(Line(f"path {key}", False, f"{path} does not exist on the driver",
                                f"check {key}: a path on shared storage, or a URI"))
            continue
        bad = [f"node {r['node_id']} ({r['host']}) sees {_seen(r['inputs'][key]['fingerprint'])} at {path}"
               for r in reports if r["inputs"][key]["fingerprint"] != want]
        if bad:
            out.append(Line(f"path {key}", False, f"the driver sees {_seen(want)}; " + "; ".join(bad), SHARED_FIX))
        else:
            out.append(Line(f"path {key}", True, f"{path}: the same on {len(reports)} node(s)"))
    return out


def weights_lines(names: list[str], reports: list[dict]) -> list[Line]:
    from cgn_dist import weights

    out = []
    for name in names:
        entries = [(r, r["weights"][name]) for r in reports]
        missing = [f"node {r['node_id']} ({r['host']}): not at {e['path']}" for r, e in entries if not e["present"]]
        if missing:
            where = "TORCH_HOME" if weights.get(name).cache == "torch" else "CGN_DIST_CACHE"
            out.append(Line(f"weights {name}", False, "; ".join(missing),
                            f"`cgn-dist weights fetch {name}` with {where} on storage every node mounts, the "
                            f"same value on every node (offline: `cgn-dist weights` says which file to copy where)"))
            continue
        shas = {e.get("sha256") for _, e in entries}
        w, known = weights.get(name), weights.recorded_sha(name)
        wrong = [f"node {r['node_id']} ({r['host']}) has sha256 {e['sha256'][:12]}..., size {e['size']:,}"
                 for r, e in entries if (known and e["sha256"] != known) or
                 (w.sha256_prefix and not e["sha256"].startswith(w.sha256_prefix)) or (w.size and e["size"] != w.size)]
        if wrong or len(shas) > 1:
            out.append(Line(f"weights {name}", False, "; ".join(wrong) or f"the nodes hold different files ({len(shas)} "
                            "sha256 values)", f"`cgn-dist weights fetch {name} --force` into the shared cache"))
        else:
            e = entries[0][1]
            out.append(Line(f"weights {name}", True, f"{weights.path_of(name)}: {e['size']:,} bytes, sha256 "
                            f"{e['sha256'][:16]}... on {len(reports)} node(s)"))
    return out


def worker_request(cfg: Config) -> tuple[int, dict[str, float], str]:
    """(count, resources per worker, what): the Ray workers this config starts all at once."""
    d = cfg.distributed
    if d.num_workers > 0:
        return d.num_workers, {"CPU": d.cpus_per_worker, **({"GPU": 1.0} if d.use_gpu else {})}, "Ray Train workers"
    if cfg.generate.backend == "ray" and cfg.generate.device == "cuda":
        return 1, {"GPU": 1.0}, "generation actors (device=cuda: one GPU each)"
    return 0, {}, ""


def place(count: int, need: dict[str, float], nodes: list[dict]) -> int:
    """How many of ``count`` workers fit on ``nodes`` (first fit, each node's whole resources)."""
    free = [dict(n.get("Resources", {})) for n in nodes if n.get("Alive", True)]
    placed = 0
    for _ in range(count):
        for res in free:
            if all(res.get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
                for k, v in need.items():
                    res[k] = res.get(k, 0.0) - v
                placed += 1
                break
    return placed


def resource_lines(cfg: Config, nodes: list[dict], reports: list[dict], need_bytes: int) -> list[Line]:
    out = []
    count, need, what = worker_request(cfg)
    if count:
        fits = place(count, need, nodes)
        have = "; ".join(f"{n.get('NodeManagerAddress', '?')}: "
                         + ", ".join(f"{k} {n['Resources'].get(k, 0):g}" for k in ("CPU", "GPU")) for n in nodes)
        ask = ", ".join(f"{k} {v:g}" for k, v in need.items())
        if fits < count:
            out.append(Line("resources", False, f"{count} {what} of {{{ask}}} each: only {fits} fit on the "
                            f"nodes ({have}); Ray would wait for the rest forever",
                            "lower distributed.num_workers / distributed.cpus_per_worker, or add nodes "
                            "whose type fits (launch/ray_cluster.yaml)"))
        else:
            out.append(Line("resources", True, f"{count} {what} of {{{ask}}} each fit on {len(nodes)} node(s)"))
    for r in reports:
        for key, o in r["outputs"].items():
            free = o.get("free_bytes")
            if free is None or key == "weights cache":
                continue
            at = f" [node {r['node_id']}]" if len(reports) > 1 else ""
            if free < need_bytes:
                out.append(Line(f"disk {key}{at}", False, f"{free / 1e9:.1f} GB free at {o['anchor']}, the run needs "
                                f"about {need_bytes / 1e9:.1f} GB", "free space or point the key at a bigger disk"))
            else:
                out.append(Line(f"disk {key}{at}", True, f"{free / 1e9:.1f} GB free at {o['anchor']} "
                                f"(needs about {need_bytes / 1e9:.1f} GB)"))
    return out
