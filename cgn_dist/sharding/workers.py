"""What each generation worker gets and what all of them must agree on.

- ``resolve_device``: "auto" becomes "cuda" or "cpu" where the sampler is BUILT (the worker process or Ray
  actor), never on the driver: a CPU-only head node must not make GPU workers generate on CPU, nor a GPU
  driver send "cuda" to CPU-only workers.
- ``assign_devices``: the GPU each local pool worker sees (``CUDA_VISIBLE_DEVICES`` set in the child before
  CUDA starts there), round-robin, so N workers on N GPUs do not all land on GPU 0. (Ray already gives
  each actor its own GPU through its resources.)
- ``check_same_provenance``: every worker's sampler provenance against the first one seen, when the worker
  starts: a sampler that differs on one machine (torch.compile failed there and it fell back to eager,
  another torch...) stops the run at once instead of when the manifest is written hours later; on a
  rerun the committed shards' provenance comes first (a rerun elsewhere, where precision=auto resolved
  otherwise, is refused before it writes).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from cgn_dist.errors import InputError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str, cuda_available: bool | None = None) -> str:
    """"cpu" or "cuda" for ``requested`` in THIS process (``cuda_available`` defaults to torch's answer here)."""
    if requested not in DEVICES:
        raise InputError(f"generate.device must be one of {DEVICES}, got {requested!r}")
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise InputError("generate.device=cuda but this worker has no GPU; use generate.device=auto or cpu")
    return requested


def visible_gpus(n_gpus: int, env: str | None = None) -> list[str]:
    """The GPU ids a child may be pinned to: the parent's CUDA_VISIBLE_DEVICES entries when set (so a run
    given GPUs 2,3 stays on them), else 0..n_gpus-1."""
    if env is not None and env.strip():
        ids = [d.strip() for d in env.split(",") if d.strip()]
        return ids[:n_gpus]
    return [str(i) for i in range(n_gpus)]


def assign_devices(n_workers: int, n_gpus: int, env: str | None = None) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES value of each of ``n_workers`` pool workers: worker i gets GPU i % n_gpus.
    None (leave the environment alone) when there is no GPU.

    More workers than GPUs is allowed, not refused: two processes per GPU pay off when the CPU side (Pillow
    encoding, tar writing) is as slow as the forward, as for MNIST; the round robin spreads them evenly."""
    if n_workers < 1 or n_gpus < 0:
        raise ValueError(f"need n_workers >= 1 and n_gpus >= 0, got {n_workers}, {n_gpus}")
    ids = visible_gpus(n_gpus, env)
    if not ids:
        return [None] * n_workers
    return [ids[i % len(ids)] for i in range(n_workers)]


def local_device_plan(n_workers: int) -> list[str | None]:
    """assign_devices for this machine's GPUs (counted without creating a CUDA context here)."""
    import torch
    return assign_devices(n_workers, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def pin_visible_device(visible: str | None) -> None:
    """In a fresh worker process, before the sampler is built: show CUDA only ``visible``."""
    if visible is None:
        return
    import torch
    if torch.cuda.is_initialized():  # the variable is read once, when CUDA starts: too late to pin
        raise RuntimeError("CUDA was initialised in this worker before its GPU was assigned")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible


def provenance_difference(first: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """'key: other vs first' for every provenance key whose value differs (missing keys included); compared
    as JSON holds them (a committed shard's stats were read back from JSON: tuples came back as lists)."""
    first, other = (json.loads(json.dumps(d, sort_keys=True, default=str)) for d in (first, other))
    keys = sorted(set(first) | set(other))
    return [f"{k}: {other.get(k, '<absent>')!r} vs {first.get(k, '<absent>')!r}" for k in keys
            if first.get(k, "<absent>") != other.get(k, "<absent>")]


def check_same_provenance(seen: list[tuple[str, dict[str, Any]]], who: str, info: dict[str, Any]) -> None:
    """Record ``who``'s sampler provenance; GenerationError when it differs from the first one in ``seen``."""
    from cgn_dist.sharding.writer import GenerationError

    if not seen:
        seen.append((who, info))
        return
    first_who, first = seen[0]
    diff = provenance_difference(first, info)
    if diff:
        raise GenerationError(
            f"the sampler of {who} differs from that of {first_who} ({'; '.join(diff)}): one output folder "
            f"holds the bytes of one sampler only. Fix the cause on that worker (its log says why, e.g. a "
            f"torch.compile failure; or set generate.compile=false) and rerun")
    seen.append((who, info))


def auto_worker_count(n_todo: int, threads_per_worker: int = 1, worker_gb: float = 1.0,
                      gpus: int | None = None, cpus: int | None = None,
                      available_gb: float | None = None) -> tuple[int, str]:
    """(workers, why) for num_workers=0 ("auto") on this machine: one per GPU where there are GPUs, else as
    many as the cores hold at ``threads_per_worker`` each and the free memory at ``worker_gb`` each (a
    worker holds its own model); never more than the shards left. The bytes do not depend on the count."""
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        n, why = gpus, f"one per GPU ({gpus})"
    else:
        if cpus is None:  # the cores this process may run on (a container's or taskset's share)
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if available_gb is None:
            import psutil

            available_gb = psutil.virtual_memory().available / 2**30
        by_cpu = max(1, cpus // max(1, threads_per_worker))
        by_mem = max(1, int(available_gb * 0.8 // max(worker_gb, 1e-3)))
        n = min(by_cpu, by_mem)
        why = (f"{cpus} cores / {max(1, threads_per_worker)} thread(s) per worker" if by_cpu <= by_mem else
               f"{available_gb:.0f} GiB free / ~{worker_gb:g} GiB per worker")
    n = max(1, min(n, n_todo))
    return n, why + (f", at most the {n_todo} shard(s) to write" if n == n_todo and n_todo > 1 else "")


def format_assignment(devices: Sequence[str | None]) -> str:
    return ", ".join(f"worker {i} -> GPU {d}" for i, d in enumerate(devices) if d is not None)
