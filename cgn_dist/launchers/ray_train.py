"""CGN training under Ray Train: the same loop in every worker, DeepSpeed or DDP inside.

Ray Train starts the workers and their process group (gloo on CPU, nccl on
GPU); our loop reads rank and world from it. Checkpoints are written to the
run directory as usual (pruned to ``train.keep_last``) and reported to Ray Train
as a POINTER: Ray keeps a few-byte ``checkpoint.json`` naming the run directory's
checkpoint, not a second copy of it (a CGN-ImageNet checkpoint with Adam state
is ~2 GB), and prunes its pointers to ``train.keep_last`` as well. When a worker
dies Ray restarts the group (up to ``distributed.max_failures`` times) and every
worker resumes from the checkpoint the latest pointer names. Starting a job
again with the same run name resumes as well.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

from cgn_dist import interrupts
from cgn_dist.config import Config, ConfigError, config_from_dict, config_to_dict
from cgn_dist.distributed.env import process_group_backend
from cgn_dist.train.common import Reporter

POINTER_FILE = "checkpoint.json"  # what Ray Train stores per checkpoint: {"path": ..., "step": ...}
POINTER_DIR = "ray_pointers"  # in the run directory: the pointer folders handed to Ray Train
# Ctrl-C reaches the driver only: it asks the workers to stop through the (shared) run directory, and rank 0
# answers with what it saved. Both files live only while a run is being stopped.
STOP_FILE = ".stop-requested"
STOPPED_FILE = ".stopped.json"


def checkpoint_from_pointer(directory: str | os.PathLike) -> Path:
    """The run directory's checkpoint that a Ray Train checkpoint folder points at (or the folder itself,
    for a full checkpoint)."""
    pointer = Path(directory) / POINTER_FILE
    if pointer.is_file():
        return Path(json.loads(pointer.read_text())["path"])
    return Path(directory)


def _write_pointer(checkpoint_dir: Path, step: int, keep_last: int) -> Path:
    root = checkpoint_dir.parent.parent / POINTER_DIR
    d = root / checkpoint_dir.name
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (POINTER_FILE + ".tmp")
    tmp.write_text(json.dumps({"path": str(checkpoint_dir.resolve()), "step": step}))
    tmp.replace(d / POINTER_FILE)
    for old in sorted(p for p in root.iterdir() if p.is_dir())[:-keep_last]:  # step_XXXXXXX sorts by step
        shutil.rmtree(old, ignore_errors=True)
    return d


class RayReporter(Reporter):
    """Hands a loop's checkpoints to Ray Train (as pointers) and, after a restart, the checkpoint Ray
    Train's latest pointer names back to the loop."""

    def __init__(self, keep_last: int = 3, run_dir: Path | None = None):
        self.keep_last = keep_last
        self.stop_file = Path(run_dir) / STOP_FILE if run_dir is not None else None

    def stop_requested(self) -> int | None:
        if self.stop_file is None or not self.stop_file.is_file():
            return None
        try:
            return int(self.stop_file.read_text() or 0) or None
        except (OSError, ValueError):  # being written: the next update reads it
            return None

    def resume_checkpoint(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        # Local or shared storage: the checkpoint is already a directory; remote storage downloads it.
        return checkpoint_from_pointer(ckpt.to_directory() if not os.path.isdir(ckpt.path) else ckpt.path)

    def report(self, step: int, metrics: dict, checkpoint_dir: Path | None, is_main: bool) -> None:
        # Every rank reports; only rank 0 attaches the checkpoint.
        import ray.train

        ckpt = None
        if checkpoint_dir and is_main:
            pointer = _write_pointer(Path(checkpoint_dir), step, self.keep_last)
            ckpt = ray.train.Checkpoint.from_directory(str(pointer))
        ray.train.report({"step": step, **{k.replace("/", "_"): float(v) for k, v in metrics.items()}},
                         checkpoint=ckpt)


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from cgn_dist.distributed.env import DistEnv

    cfg = config_from_dict(config)
    # Ray Train sends the root logger to the console too: cgn_dist's lines go through its own handler only
    # (train.metrics.setup_logging), or the driver would print each of them twice.
    logging.getLogger("cgn_dist").propagate = False
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.distributed.use_gpu else None
    import torch

    env = DistEnv(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(),
                  device if device is not None else torch.device("cpu"))
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))
    from cgn_dist.launchers.tasks import training_loop  # the launcher sits above the loops it runs

    try:
        training_loop(cfg.task)(cfg, env, reporter=RayReporter(cfg.train.keep_last, cfg.run_dir))
    except interrupts.Interrupted as e:  # the driver asked: saved and reported; a clean end, not a failure
        if env.rank == 0:
            (cfg.run_dir / STOPPED_FILE).write_text(json.dumps({"signum": e.signum, "done": e.done,
                                                                "total": e.total, "where": e.where}))


def _worker_error(err: BaseException) -> BaseException:
    """The exception a worker raised, unwrapped from Ray Train's own (so a user's mistake in a worker reads
    as in-process: one line, the config key named); Ray's exception when there is none to unwrap."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if not type(e).__module__.startswith("ray") and e is not err:
            return e
        failures = getattr(e, "worker_failures", None) or {}
        todo += [failures[k] for k in sorted(failures)]
        todo += [getattr(e, a, None) for a in ("controller_failure", "cause", "__cause__")]
    return err


def _fit_stoppable(trainer, stop_file: Path):
    """``trainer.fit()`` in a thread of its own. In the main thread Ray Train takes SIGINT for itself and aborts
    the run, losing the update in progress; here the main thread keeps cgn_dist's handlers
    (interrupts.deferred) and turns the first signal into ``stop_file``, which every worker's loop reads after
    each update (RayReporter.stop_requested). A second signal raises at once, as everywhere."""
    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            box["error"] = e

    thread = threading.Thread(target=fit, name="cgn-dist-ray-train", daemon=True)
    with interrupts.deferred():
        thread.start()
        asked = False
        while thread.is_alive():
            thread.join(0.2)
            if not asked and (signum := interrupts.requested()) is not None:
                stop_file.parent.mkdir(parents=True, exist_ok=True)
                stop_file.write_text(str(signum))
                asked = True
    if "error" in box:
        raise box["error"]
    return box["result"]


def check_worker_device(cfg: Config) -> None:
    """Ray Train workers get a GPU only with distributed.use_gpu=true; without it they run on the CPU, so a
    run that asks train.device=cuda would quietly train on CPUs: refused with the fix instead."""
    if cfg.train.device == "cuda" and not cfg.distributed.use_gpu:
        raise ConfigError(f"train.device=cuda with distributed.num_workers={cfg.distributed.num_workers}: Ray "
                          "Train workers get a GPU only with distributed.use_gpu=true (one per worker); set it, "
                          "or train.device=cpu")


def train_with_ray(cfg: Config) -> dict:
    """Launch ``cfg`` on ``distributed.num_workers`` Ray Train workers; returns the final metrics."""
    check_worker_device(cfg)
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cgn_dist.distributed.ray_utils import init_ray

    # Started by us (no address): an embedded cluster that talks to loopback only.
    from cgn_dist.distributed.paths import absolute_config

    # Workers run in a Ray session folder: every path is made absolute here, in the driver's cwd.
    cfg = absolute_config(cfg)
    init_ray(cfg.ray.address or None, num_cpus=cfg.ray.num_cpus or None, loopback_only=not cfg.ray.address)
    if not cfg.ray.address:  # one machine: no preemption to watch (its actor only adds a C++ warning)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    storage = cfg.ray.storage_path or str(Path(cfg.out_dir) / "ray")  # a URI (s3://...) as given
    d = cfg.distributed
    resources = {"CPU": d.cpus_per_worker}
    if d.use_gpu:
        resources["GPU"] = 1
    # The run dir must be reachable by every worker: absolute, and on shared storage on a real cluster.
    config = config_to_dict(cfg)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend=process_group_backend("cuda" if d.use_gpu else "cpu")),
        scaling_config=ray.train.ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=cfg.name, storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
                                       # Ray Train's INFO lines (resources, worker group, every report's
                                       # TrainingReport(...)) stay in its log files under the Ray session
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_last)),
    )
    stop_file, stopped_file = cfg.run_dir / STOP_FILE, cfg.run_dir / STOPPED_FILE
    for f in (stop_file, stopped_file):  # left by a driver killed while stopping
        f.unlink(missing_ok=True)
    try:
        result = _fit_stoppable(trainer, stop_file)
    except Exception as e:  # Ray raises (or returns) the workers' errors wrapped in its own
        raise _worker_error(e) from e
    finally:
        stop_file.unlink(missing_ok=True)
    if stopped_file.is_file():
        note = json.loads(stopped_file.read_text())
        stopped_file.unlink()
        raise interrupts.Interrupted(note["signum"], "train", note["done"], note["total"], note["where"])
    if result.error:
        raise _worker_error(result.error) from result.error
    out = dict(result.metrics or {})
    ckpt = None
    if result.checkpoint:  # a pointer: local on shared storage, downloaded (a few bytes) from a bucket
        with result.checkpoint.as_directory() as pointer_dir:
            ckpt = checkpoint_from_pointer(pointer_dir)
    out["checkpoint"] = str(ckpt) if ckpt else None
    if ckpt and "step" not in out:  # resumed at the end: nothing new was reported
        out["step"] = json.loads((ckpt / "meta.json").read_text())["step"]
    out["run_dir"] = str(Path(config["out_dir"]) / cfg.name)
    from cgn_dist.train.run_dir import read_summary

    return read_summary(Path(out["run_dir"])) or out  # what rank 0 wrote: the keys any launcher gives
