"""Run directories and checkpoints.

A checkpoint is a directory ``checkpoints/step_0001234/`` with one file set per
engine (model + optimizer), one RNG file per rank, ``extra.pt`` (loop state)
and ``meta.json`` (step, config, engine names). It is
written under a temporary name and renamed when complete, so a crash never
leaves a half-written checkpoint that looks finished; resume reads meta.json,
never a parsed file name.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cgn_dist.config import Config, ConfigError, config_to_dict, save_config
from cgn_dist.distributed.env import rank_world
from cgn_dist.errors import InputError, InputNotFound
from cgn_dist.train.run_dir import CKPT_DIR, check_config_change, resolve_run_precisions


def prepare_run_dir(cfg: Config, is_main: bool = True, device: Any = "cpu") -> Path:
    """Create ``<out_dir>/<name>/`` with samples/, tb/, checkpoints/ and the resolved config (``auto``
    precisions resolved for ``device``). Resuming with other training settings than the run's config.yaml
    is refused (see run_dir.check_config_change)."""
    run_dir = cfg.run_dir
    resolve_run_precisions(cfg, device)
    check_config_change(cfg, run_dir, cfg.train.resume and latest_checkpoint(run_dir) is not None, is_main)
    if is_main:
        for sub in ("samples", "tb", CKPT_DIR):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    return run_dir


# --------------------------------------------------------------------------- RNG


def get_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(s: Any) -> tuple:
    # Saved as lists (weights_only loading takes no nested tuples); random.setstate wants tuples.
    return (s[0], tuple(s[1]), s[2])


def _rng_to_saveable(state: dict) -> dict:
    out = dict(state)
    py = state["python"]
    out["python"] = [py[0], list(py[1]), py[2]]
    np_state = state["numpy"]
    out["numpy"] = [np_state[0], torch.from_numpy(np.asarray(np_state[1])), int(np_state[2]), int(np_state[3]), float(np_state[4])]
    return out


def _rng_from_saved(state: dict) -> dict:
    out = dict(state)
    n = state["numpy"]
    out["numpy"] = (n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4])
    return out


# --------------------------------------------------------------------------- save / load


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:07d}"


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(run_dir: Path, step: int, engines: dict[str, Any], extra: dict[str, Any] | None = None,
                    cfg: Config | None = None, keep_last: int = 3, rank: int = 0,
                    extra_meta: dict | None = None) -> Path:
    """Write every engine (``save(dir, name)``), this rank's RNG, ``extra`` and meta.json; keep the last N.

    All ranks call this together: each engine writes its own shards, then rank 0
    writes meta.json and renames the directory, so only complete checkpoints exist.
    """
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    for name, engine in engines.items():
        engine.save(tmp, name)
    torch.save(_rng_to_saveable(get_rng_state()), tmp / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        torch.save(dict(extra or {}), tmp / "extra.pt")
        meta = {"step": step, "time": time.time(), "engines": sorted(engines), "world_size": _world_size(),
                "config": config_to_dict(cfg) if cfg is not None else None}
        meta.update(extra_meta or {})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(run_dir, keep_last)
    _barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints (those with meta.json), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    found = []
    if root.is_dir():
        for d in root.iterdir():
            meta = d / "meta.json"
            if d.is_dir() and not d.name.endswith(".tmp") and meta.is_file():
                try:
                    found.append((int(json.loads(meta.read_text())["step"]), d))
                except (ValueError, KeyError, json.JSONDecodeError):
                    continue
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def find_resume_checkpoint(run_dir: Path, reporter=None) -> Path | None:
    """What to resume from: the launcher's pick (Ray Train's latest after a worker restart), else the run
    dir's latest."""
    return (reporter.resume_checkpoint() if reporter is not None else None) or latest_checkpoint(run_dir)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for _, d in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(path: Path, engines: dict[str, Any], rank: int = 0, restore_rng: bool = True) -> dict:
    """Restore engines (``load(dir, name)``) and this rank's RNG; returns ``extra`` plus ``step`` and ``meta``."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise InputNotFound(f"{path} is not a cgn_dist checkpoint directory (no meta.json)")
    meta = json.loads(meta_file.read_text())
    check_world_size(meta, _world_size(), path)
    missing = set(engines) - set(meta.get("engines", []))
    if missing:
        raise InputError(f"checkpoint {path} holds {meta.get('engines')}, not {sorted(missing)}")
    for name, engine in engines.items():
        engine.load(path, name)
    rng_file = path / f"rng_rank{rank}.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(_rng_from_saved(torch.load(rng_file, weights_only=True)))
    extra = torch.load(path / "extra.pt", weights_only=True) if (path / "extra.pt").is_file() else {}
    extra["step"] = meta["step"]
    extra["meta"] = meta
    return extra


def _world_size() -> int:
    return rank_world()[1]


def check_world_size(meta: dict, world_size: int, path: Path) -> None:
    """DeepSpeed ZeRO >= 1 keeps the optimizer state in one partition per process; a checkpoint of N
    processes cannot be loaded by another number of them (DeepSpeed fails deep inside, or silently mixes)."""
    train = (meta.get("config") or {}).get("train", {})
    saved = int(meta.get("world_size", world_size))
    if train.get("engine") == "deepspeed" and int(train.get("zero_stage", 0)) >= 1 and saved != world_size:
        raise ConfigError(
            f"{path} was saved by {saved} processes with DeepSpeed ZeRO stage {train['zero_stage']}, whose optimizer "
            f"state is split per process; this run has {world_size}. Resume with {saved} processes "
            f"(distributed.num_workers={saved}, or torchrun --nproc_per_node={saved}), or start a new run (name=)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
