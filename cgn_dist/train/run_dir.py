"""What a training run says about itself: refusing a resume whose settings changed, the lines log.txt
holds (start, progress, result), one summary.json whichever launcher ran the loop, and no half-started
run directories left behind."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from cgn_dist.config import Config, ConfigError, config_to_dict, upgrade_config_dict
from cgn_dist.distributed.engine import resolve_train_precision
from cgn_dist.distributed.env import agree_with_rank0
from cgn_dist.precision import CHOICES, LAYOUTS, resolve_layout, resolve_precision

CKPT_DIR = "checkpoints"  # <run_dir>/checkpoints/step_0001234/

log = logging.getLogger("cgn_dist")

SUMMARY_NAME = "summary.json"
# Keys that may change between the runs of one training run: where it runs, how often it reports, how long
# it trains (extending a finished run is a legitimate resume), and other subcommands' sections.
_FREE_KEYS = {"name", "out_dir", "train.max_steps", "train.epochs", "train.log_every", "train.sample_every",
              "train.checkpoint_every", "train.keep_last", "train.resume", "train.progress", "train.device",
              "train.allow_config_change", "data.root", "data.download", "imagenet.cache_dir",
              "mnist.target_gram_cache_gb",
              "invariant.layout"}  # a layout changes rounding only, as train.device does: free to differ
_FREE_SECTIONS = ("generate.", "mnist_classifier.", "mnist_pipeline.", "ray.", "distributed.", "shards.")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every training setting that differs (the other task's section ignored)."""
    a, b = _flat(upgrade_config_dict(old)), _flat(new)  # a run saved under the old section names
    other = "imagenet." if b.get("task") == "mnist" else "mnist."
    return [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in _FREE_KEYS and not k.startswith(_FREE_SECTIONS + (other,))]


def check_config_change(cfg: Config, run_dir: Path, resuming: bool, is_main: bool) -> None:
    """Resuming with other training settings than the run's config.yaml: refused with the diff, unless
    train.allow_config_change=true, which keeps the earlier file as config.<time>.yaml beside the new one."""
    saved = run_dir / "config.yaml"
    if not (resuming and saved.is_file()):
        return
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return
    changes = config_changes(old, config_to_dict(cfg))
    if not changes:
        return
    if not cfg.train.allow_config_change:
        raise ConfigError(f"{run_dir} was trained with other settings; resuming would mix them: "
                          + "; ".join(changes) + ". Use the run's settings, another name=, or "
                          "train.allow_config_change=true to resume with the new ones")
    if is_main:
        kept = run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        shutil.copyfile(saved, kept)
        log.warning("resuming %s with changed settings (%s); the earlier config is kept as %s", run_dir,
                    "; ".join(changes), kept.name)


def recorded_setting(cfg: Config, key: str) -> Any:
    """The value dotted ``key`` has in the run's saved config.yaml when this start resumes it, else None:
    what ``auto`` resolved to in an earlier part of the run is kept, so a resume on another machine
    gives the same bytes as an uninterrupted run."""
    saved = cfg.run_dir / "config.yaml"
    if not (cfg.train.resume and saved.is_file()):
        return None
    try:
        return _flat(yaml.safe_load(saved.read_text()) or {}).get(key)
    except (OSError, yaml.YAMLError):
        return None


def resolve_run_precisions(cfg: Config, device: Any) -> None:
    """Replace every ``auto`` precision of a training run by what this device runs fastest (bf16 on CUDA and
    on AMX CPUs, where a timed probe says so on AVX-512 BF16 CPUs, else fp32: cgn_dist.precision), or by what
    the run being resumed recorded, before the run's config.yaml is written: the bytes of a run depend on
    it. The invariant classifier's ``invariant.layout`` the same way (it changes rounding). Every rank of a
    process group takes rank 0's answers."""
    # the invariant classifier's bf16 is autocast over fp32 weights under either engine (fp32 gradients)
    resolve_train_precision(cfg.train, device, recorded_setting(cfg, "train.precision"),
                            autocast=cfg.task == "invariant")
    if cfg.task == "mnist" and cfg.mnist.fast_update:
        cfg.mnist.precision = resolve_precision(cfg.mnist.precision, device, "mnist.precision",
                                                recorded_setting(cfg, "mnist.precision"))
    mine = [cfg.train.precision, cfg.mnist.precision]
    agreed = agree_with_rank0(mine, CHOICES)
    if agreed != mine:
        log.warning("precision: this rank resolved train/mnist to %s, rank 0 to %s; all ranks use rank 0's",
                    mine, agreed)
    cfg.train.precision, cfg.mnist.precision = agreed
    if cfg.task == "invariant":  # every rank in one layout, as in one precision
        layout = resolve_layout(cfg.invariant.layout, device, cfg.train.precision,
                                recorded_setting(cfg, "invariant.layout"))
        (cfg.invariant.layout,) = agree_with_rank0([layout], LAYOUTS)


def checkpoint_step(path: Path) -> int:
    """The update a checkpoint directory holds (its meta.json), without loading it."""
    return int(json.loads((Path(path) / "meta.json").read_text())["step"])


def discard_unstarted(run_dir: Path, existed: bool) -> None:
    """After a failed run: remove a run directory this run created when no checkpoint made it into it,
    so the next run starts fresh instead of looking like a resume."""
    run_dir = Path(run_dir)
    if existed or not run_dir.is_dir():
        return
    ckpts = run_dir / CKPT_DIR
    if ckpts.is_dir() and any(p.is_dir() and not p.name.endswith(".tmp") for p in ckpts.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)


# --- lines for the console and log.txt -------------------------------------------------------------------------

def start_line(cfg: Config, world: int, total: int, start: int, device: Any) -> str:
    t = cfg.train
    what = f"CGN-MNIST {cfg.data.dataset}" if cfg.task == "mnist" else f"CGN-ImageNet (BigGAN {cfg.imagenet.biggan})"
    state = f"resuming at update {start}" if start else "starting at update 0"
    if cfg.task == "mnist" and cfg.mnist.fast_update:  # the precision auto resolved to, said where it matters
        state = f"fast update in {cfg.mnist.precision}, {torch.get_num_threads()} torch thread(s); {state}"
    return (f"{what} -> {cfg.run_dir}: {total} updates of {t.micro_batch_size * t.grad_accum * world} samples "
            f"(micro batch {t.micro_batch_size} x accumulation {t.grad_accum} x {world} process(es)), "
            f"engine {t.engine} {t.precision}, device {device}, seed {cfg.seed}; {state}")


def progress_line(done: int, total: int, logs: dict[str, float]) -> str:
    parts = [f"{k} {v:.4g}" for k, v in logs.items() if k.startswith(("loss/", "mask/"))]
    if "perf/samples_per_s" in logs:
        parts.append(f"{logs['perf/samples_per_s']:.1f} samples/s")
    return f"update {done}/{total}: " + ", ".join(parts)


def complete_line(run_dir: Path, step: int) -> str:
    return (f"{run_dir} is complete (update {step} of {step}): nothing to do. Train longer with a larger "
            "train.max_steps, or start another run with name=...")


# --- the summary ------------------------------------------------------------------------------------------------

def build_summary(run_dir: Path, steps: int, step: int, checkpoint: Path | None, logs: dict) -> dict[str, Any]:
    return {"run_dir": str(Path(run_dir).resolve()), "steps": steps, "step": step,
            "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            **{k: float(v) for k, v in logs.items()}}


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    tmp = Path(run_dir) / (SUMMARY_NAME + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(Path(run_dir) / SUMMARY_NAME)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / SUMMARY_NAME
    return json.loads(p.read_text()) if p.is_file() else None
