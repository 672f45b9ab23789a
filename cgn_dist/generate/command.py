"""``cgn-dist generate`` and ``cgn-dist regenerate``: a config in, a counterfactual data set out.

- ``run_generate(cfg)``: picks the sampler (task mnist: the MNIST counterfactual sampler; task imagenet:
  the ImageNet one), checks every input it can before any model is built, then
  * ``generate.dry_run``: times a short batch and prints what the run would cost (shards, time, disk);
  * ``generate.mode=interpolation`` (ImageNet): writes ``<run_dir>/interpolation/`` (no shards);
  * otherwise: generates ``<out_dir>/<name>/`` (shards, manifest.json, index.json, plan.json, tb/), locally
    or on Ray, exactly once, resumable: rerunning the same command after any interruption completes it.
- ``regenerate(run_dir, key)``: one stored sample computed afresh from the run's manifest.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from cgn_dist.config import Config, config_to_dict, save_config
from cgn_dist.errors import InputError
from cgn_dist.sharding.plan import make_plan
from cgn_dist.storage import Store, is_remote, join, staging_dir

log = logging.getLogger(__name__)

IMAGENET_MODES = ("random", "best_classes", "fixed_classes", "interpolation")


# --- sampler factories from the config ------------------------------------------------------------------

def _abs(path: str) -> str:
    """Absolute form of a file path (workers and regenerate may run elsewhere); a weights file name becomes
    its cached file's path when present; other names (biggan-deep-256: build_biggan looks it up) pass through."""
    from cgn_dist import weights

    if weights.is_name(path) and not weights.get(path).subdir and weights.path_of(path).is_file():
        path = str(weights.path_of(path))
    return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path


def _checkpoint(value: str) -> str:
    """generate.checkpoint: a weights name (cgn-imagenet, cgn-mnist-colored, ...) or a path."""
    from cgn_dist import weights

    return weights.resolve(value, "generate.checkpoint")


def image_format(cfg: Config) -> str:
    """generate.image_format with "auto" decided: jpg for ImageNet, png for MNIST."""
    if cfg.generate.image_format != "auto":
        return cfg.generate.image_format
    return "png" if cfg.task == "mnist" else "jpg"


def imagenet_factory(cfg: Config):
    """The ImageNet counterfactual sampler factory for ``cfg`` (checkpoint resolved now, once)."""
    from cgn_dist.generate.imagenet.factory import ImagenetCounterfactualFactory
    from cgn_dist.generate.imagenet.weights import resolve_cgn_checkpoint

    g, ic = cfg.generate, cfg.imagenet
    if g.mode not in IMAGENET_MODES:
        raise InputError(f"generate.mode={g.mode!r} is not an ImageNet mode; accepted: {', '.join(IMAGENET_MODES)}")
    # A run directory means its latest checkpoint NOW: every worker must load the same one.
    checkpoint = str(resolve_cgn_checkpoint(_checkpoint(g.checkpoint)).resolve()) if g.checkpoint else ""
    mode = "random" if g.mode == "interpolation" else g.mode
    return ImagenetCounterfactualFactory(
        checkpoint=checkpoint, biggan=_abs(ic.biggan), u2net=_abs(ic.u2net), cache_dir=_abs(ic.cache_dir),
        u2net_align_corners=ic.u2net_align_corners,
        model_seed=cfg.seed, mode=mode, classes=list(g.classes) if mode == "fixed_classes" else [],
        truncation=g.truncation, image_format=image_format(cfg), jpeg_quality=g.jpeg_quality, normalize=g.normalize,
        save_layers=g.save_layers, forward_batch=g.forward_batch, device=g.device, num_threads=g.num_threads,
        precision=g.precision, channels_last=g.channels_last, blocks=g.blocks, compile=g.compile, overlap=g.overlap,
        encode_threads=g.encode_threads, jpeg_encoder=g.jpeg_encoder)


def mnist_factory(cfg: Config):
    """The MNIST counterfactual sampler factory for ``cfg``."""
    from cgn_dist.generate.mnist import MnistCounterfactualFactory, resolve_generator_file

    g = cfg.generate
    if g.mode == "interpolation":
        raise InputError("generate.mode=interpolation exists for task=imagenet only")
    if g.precision not in ("auto", "fp32") or g.compile or g.jpeg_encoder != "pil":
        raise InputError("generate.precision, generate.compile and generate.jpeg_encoder apply to task=imagenet; "
                         "the MNIST generator runs in fp32 with Pillow: leave them at fp32 / false / pil")
    if g.image_format == "jpg":
        raise InputError("generate.image_format=jpg: MNIST counterfactuals are stored as lossless png (the "
                         "classifiers read back exact values); set generate.image_format=png or auto")
    if not g.checkpoint:
        raise InputError("generate.checkpoint is empty: pass an MNIST training run directory, a checkpoint, or "
                         "the authors' cgn_<dataset>_MNIST.pth")
    # Resolved now (a clear error here, not in a worker); a run directory means its latest checkpoint NOW.
    checkpoint = str(resolve_generator_file(_checkpoint(g.checkpoint)).resolve())
    # g.device as given: "auto" is resolved by each worker (a CPU driver must not send GPU workers to CPU).
    factory = MnistCounterfactualFactory(checkpoint=checkpoint, no_cfs=g.no_cfs, device=g.device,
                                         num_threads=g.num_threads, save_layers=g.save_layers)
    if g.shard_size % factory.group_len:
        log.warning("generate.shard_size=%d is not a multiple of %d (group_size x no_cfs): the last group of each "
                    "shard is computed whole and cut", g.shard_size, factory.group_len)
    return factory


def build_factory(cfg: Config):
    """The sampler factory for ``cfg``, validated (files exist, class ids fit the model) without building it."""
    if cfg.task == "mnist":
        return mnist_factory(cfg)
    factory = imagenet_factory(cfg)
    factory.validate()
    g = cfg.generate
    if g.mode == "interpolation":
        n = factory.num_classes(factory.checkpoint_kind())
        if g.classes and len(g.classes) != 3:
            raise InputError(f"generate.classes for an interpolation is the start [shape, texture, background], "
                             f"got {g.classes}")
        if not -1 <= g.interp_target < n:
            raise InputError(f"generate.interp_target={g.interp_target} is out of range for this model "
                             f"({n} classes; -1 = random)")
        if g.midpoints < 0:
            raise InputError(f"generate.midpoints must be >= 0, got {g.midpoints}")
        from cgn_dist.generate.imagenet.labels import check_classes

        check_classes("fixed_classes", g.classes, n)
    return factory


def _check_same_run(run_dir: str | Path, factory: Any, cfg: Config) -> None:
    """A clearer message than the engine's when a rerun into ``run_dir`` changed what defines the samples."""
    from cgn_dist.sharding.sampler import describe_factory

    data = Store(run_dir).read_bytes("plan.json")
    if data is None:
        return
    old = json.loads(data)
    old_kwargs = old.get("sampler_factory", {}).get("kwargs", {})
    new_kwargs = json.loads(json.dumps(describe_factory(factory).get("kwargs", {})))
    changed = sorted(k for k in set(old_kwargs) | set(new_kwargs) if old_kwargs.get(k) != new_kwargs.get(k))
    if old.get("run_seed") != cfg.seed:
        changed.insert(0, "seed")
    if old.get("shard_size") != cfg.generate.shard_size:
        changed.insert(0, "generate.shard_size")
    if changed:
        raise InputError(f"{run_dir} holds a generation run made with other settings ({', '.join(changed)}: "
                         f"before {[old_kwargs.get(k, old.get(k)) for k in changed]}); rerun with the same "
                         "settings to complete it, or give this run another name / out_dir")


def _upload_run_files(local: Path, target: str) -> None:
    """log.txt and tb/ of a run whose outputs live in a bucket (uploaded again at every rerun)."""
    store = Store(target)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.put_file(path, path.relative_to(local).as_posix())


class _ProbeSampler:
    """What a dry run times: each call computes exactly the refs it is given (no group cache), so the probe
    measures real forward passes of the probe's size."""

    def __init__(self, sampler: Any):
        self.sampler = sampler

    def sample(self, refs):
        if hasattr(self.sampler, "sample_as_batch"):
            return self.sampler.sample_as_batch(refs)
        cache = getattr(self.sampler, "_cache", None)  # the MNIST sampler caches its groups
        if cache is not None:
            cache.clear()
        return self.sampler.sample(refs)


# --- generate ---------------------------------------------------------------------------------------------

def run_generate(cfg: Config) -> dict[str, Any]:
    """Generate (or dry-run, or interpolate) what ``cfg`` describes; returns a summary dict."""
    g = cfg.generate
    factory = build_factory(cfg)
    run_dir = cfg.run_dir
    if g.dry_run:
        return _dry_run(cfg, factory)
    if cfg.task == "imagenet" and g.mode == "interpolation":
        return run_interpolation(cfg, factory)
    # On a bucket the shards, manifest and index go there directly; config, log and TensorBoard files are
    # written in a local folder and uploaded (TensorBoard writes only local files without TensorFlow).
    target = cfg.run_location
    remote = is_remote(target)
    _check_same_run(target, factory, cfg)
    # a folder this run makes (or finds empty) goes again if the run fails before its first committed shard
    fresh = not remote and not (run_dir.is_dir() and any(run_dir.iterdir()))
    try:
        return _generate(cfg, factory, run_dir, target, remote)
    except BaseException:
        if fresh:
            _discard_unstarted(run_dir)
        raise


def _discard_unstarted(run_dir: Path) -> None:
    """Remove a run folder without a committed shard (its lock, config, plan, log, tb/): a failed first run
    must not look like a run to resume. Its log file is closed first, so a later run opens a new one."""
    import fcntl
    import shutil

    from cgn_dist.sharding.backends import LOCK_NAME

    if not run_dir.is_dir() or list(run_dir.glob("shard-*_stats.json")):  # a commit marker: results to keep
        return
    with open(run_dir / LOCK_NAME, "a") as lock:
        try:  # another run started into the same empty folder holds it: its files stay
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        root = logging.getLogger("cgn_dist")
        for h in list(root.handlers):
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == run_dir.resolve():
                root.removeHandler(h)
                h.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _generate(cfg: Config, factory: Any, run_dir: Path, target: str, remote: bool) -> dict[str, Any]:
    """The run itself: config.yaml, log.txt and tb/ in ``run_dir``, then the shards, manifest and index."""
    g = cfg.generate
    if remote:
        Store(target).check_writable()
        run_dir = staging_dir("cgn_dist_run_")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if remote:
        Store(target).put_file(run_dir / "config.yaml", "config.yaml")
    from cgn_dist.train.metrics import setup_logging

    setup_logging(run_dir, True)  # log.txt beside the shards

    writer, grid = None, None
    if g.grid_every > 0:
        from torch.utils.tensorboard import SummaryWriter

        from cgn_dist.sharding.progress import grid_callback

        writer = SummaryWriter(str(run_dir / "tb"))
        grid = grid_callback(writer, every=g.grid_every)
    written = []

    def on_shard_done(stats):
        written.append(stats["shard_id"])
        if grid is not None:
            grid(stats)
    started_ray = _start_ray(cfg)
    t0 = time.perf_counter()
    try:
        from cgn_dist.sharding.run import generate_dataset

        manifest = generate_dataset(
            factory, target, n_samples=g.n_samples, shard_size=g.shard_size, run_seed=cfg.seed,
            batch_size=g.batch_size, backend=g.backend, num_workers=g.num_workers,
            ray_address=cfg.ray.address or None, max_retries=g.max_retries, progress=cfg.train.progress,
            on_shard_done=on_shard_done, config=config_to_dict(cfg),
            verify=g.verify if g.verify != "auto" else ("size" if remote else "sha256"))
    finally:
        if writer is not None:
            writer.close()
        if started_ray:
            from cgn_dist.distributed.ray_utils import shutdown_ray

            shutdown_ray()
        if remote:
            _upload_run_files(run_dir, target)
    seconds = time.perf_counter() - t0
    if not written:
        log.info("%s is complete: %d samples in %d shards, all committed and checked; nothing to generate",
                 target, manifest["total_samples"], manifest["n_shards"])
    else:
        log.info("%s: wrote %d of %d shards (%d samples in all)", target, len(written), manifest["n_shards"],
                 manifest["total_samples"])
    return {"run_dir": target, "complete_before": not written, "shards_written": len(written),
            "manifest": join(target, "manifest.json"),
            "n_samples": manifest["total_samples"], "n_shards": manifest["n_shards"],
            "total_bytes": manifest["total_bytes"], "seconds": round(seconds, 3),
            "images_per_s": round(manifest["total_samples"] / seconds, 3) if seconds > 0 else None,
            "sampler_info": manifest["sampler_info"]}


def _start_ray(cfg: Config) -> bool:
    """Start (or join) Ray here when the ray backend is asked for, so ray.num_cpus sizes an embedded cluster;
    an embedded cluster stays on loopback (init_ray's default). True when this call started it."""
    if cfg.generate.backend != "ray":
        return False
    from cgn_dist.distributed.ray_utils import start_ray_here

    return start_ray_here(cfg.ray.address, cfg.ray.num_cpus)


def _dry_run(cfg: Config, factory: Any) -> dict[str, Any]:
    from cgn_dist.sharding.run import describe_plan, format_plan
    from cgn_dist.sharding.sampler import close_sampler, sampler_info

    g = cfg.generate
    shards = make_plan(g.n_samples, g.shard_size, cfg.seed)
    forward = getattr(factory, "forward_batch", None) or getattr(factory, "group_len", g.batch_size)
    t0 = time.perf_counter()
    sampler = factory()
    build_s = time.perf_counter() - t0
    try:
        info = sampler_info(sampler)
        desc = describe_plan(shards, _ProbeSampler(sampler), batch_size=forward, num_workers=g.num_workers,
                             probe_size=g.dry_run_samples or forward)
    finally:
        close_sampler(sampler)
    lines = [f"dry run of {cfg.run_dir} ({cfg.task}, backend {g.backend}): nothing is written",
             f"model: {info.get('weights', info.get('checkpoint_sha256'))}, {info.get('image_size', '?')} px, "
             f"device {info.get('device')}, built in {build_s:.1f} s per worker",
             format_plan(desc)]
    print("\n".join(lines), flush=True)
    return {"dry_run": True, "run_dir": str(cfg.run_dir), "build_seconds": round(build_s, 3), **desc,
            "sampler_info": info}


# --- interpolation ----------------------------------------------------------------------------------------

def run_interpolation(cfg: Config, factory: Any = None) -> dict[str, Any]:
    """Class interpolation into ``<run_dir>/interpolation/`` (sheet.png, frames, json).

    Start classes: generate.classes, else a random triple from the run seed; target: generate.interp_target,
    else random from the run seed; noise: generate.interp_noise (used as stored), else drawn from the seed."""
    import numpy as np

    from cgn_dist.generate.imagenet.interp import load_noise, write_interpolation

    g = cfg.generate
    factory = factory if factory is not None else build_factory(cfg)
    sampler = factory()
    try:
        rng = np.random.default_rng([cfg.seed, 2])  # its own stream: not a sample's
        n = sampler.n_classes
        start = list(g.classes) if g.classes else [int(c) for c in rng.integers(0, n, 3)]
        target = g.interp_target if g.interp_target >= 0 else int(rng.integers(0, n))
        u = load_noise(g.interp_noise) if g.interp_noise else None
        result = sampler.interpolate(start, target, g.interp_mechanism, g.midpoints, u=u, seed=cfg.seed)
        meta = {"truncation": g.truncation, "seed": cfg.seed, "noise": g.interp_noise or "truncated_noise(seed)",
                "checkpoint_sha256": sampler.sha256, "normalize": g.normalize, "cgn_dist_version": sampler.version}
    finally:
        sampler.close()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    out = write_interpolation(cfg.run_dir, result, image_format=image_format(cfg), jpeg_quality=g.jpeg_quality,
                              meta=meta)
    return {"interpolation": str(out), "sheet": str(out / "sheet.png"), "start": result["start"],
            "target": result["target"], "mechanism": result["mechanism"], "steps": result["steps"]}


# --- regenerate -------------------------------------------------------------------------------------------

def _run_dir_of(cfg_or_run_dir: Config | str | Path) -> str | Path:
    if isinstance(cfg_or_run_dir, Config):
        return cfg_or_run_dir.run_location if is_remote(cfg_or_run_dir.out_dir) else cfg_or_run_dir.run_dir
    return str(cfg_or_run_dir) if is_remote(cfg_or_run_dir) else Path(cfg_or_run_dir)


def regenerate(cfg_or_run_dir: Config | str | Path, key: str) -> dict[str, bytes]:
    """Sample ``key`` of a finished run, computed afresh from its manifest: ``{ext: bytes}`` as stored."""
    from cgn_dist.sharding.regenerate import regenerate_sample

    run_dir = _run_dir_of(cfg_or_run_dir)
    try:
        return regenerate_sample(run_dir, key)
    except KeyError as e:
        raise InputError(str(e.args[0]) if e.args else f"no sample {key}") from None


def stored_sample(run_dir: str | Path, key: str) -> dict[str, bytes]:
    """The stored bytes of sample ``key`` (``{ext: bytes}``), read from its shard."""
    from cgn_dist.data.shards import read_sample
    from cgn_dist.sharding.plan import parse_key
    from cgn_dist.sharding.writer import tar_name

    shard_id, _ = parse_key(key)
    sample = read_sample(join(run_dir, tar_name(shard_id)), key)  # a folder or a bucket prefix
    return {k: v for k, v in sample.items() if not k.startswith("_")}


def run_regenerate(run_dir: str | Path, key: str, out: str | Path | None = None) -> dict[str, Any]:
    """For the CLI: regenerate ``key``, compare every member with the stored bytes, and write the image to
    ``out`` (default ``./<key>.<ext>``). ``identical`` says whether all bytes match."""
    run_dir = _run_dir_of(run_dir)
    fresh = regenerate(run_dir, key)
    stored = stored_sample(run_dir, key)
    differ = sorted(k for k in set(fresh) | set(stored) if fresh.get(k) != stored.get(k))
    image_ext = next((e for e in ("jpg", "png", "jpeg") if e in fresh), sorted(fresh)[0])
    out = Path(out) if out else Path(f"{key}.{image_ext}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(fresh[image_ext])
    tmp.replace(out)
    return {"key": key, "identical": not differ, "differing": differ, "members": sorted(fresh),
            "out": str(out), "bytes": len(fresh[image_ext])}


__all__ = ["run_generate", "run_interpolation", "regenerate", "run_regenerate", "stored_sample", "build_factory",
           "imagenet_factory", "mnist_factory"]
