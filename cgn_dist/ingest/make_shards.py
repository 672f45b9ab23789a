"""``cgn-dist make-shards``: an image tree (ILSVRC-2012 train/val, any ImageFolder tree) into WebDataset shards.

Output folder: ``shard-XXXXXX.tar`` (+ ``_stats.json`` commit markers), ``sources.tsv`` / ``sources.json``
(the listing in plan order), ``plan.json``, ``config.yaml``, then ``index.json`` and ``manifest.json``
(with the reject list). Rerunning the same command after an interruption completes the run; the bytes are
the same whatever the backend or worker count.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from cgn_dist.config import Config, config_to_dict, save_config
from cgn_dist.ingest.image_shards import ImageTreeSamplerFactory, order_files, plan_shards, write_listing
from cgn_dist.ingest.image_tree import list_tree
from cgn_dist.errors import InputError, SetupError
from cgn_dist.storage import Store, is_remote, join

log = logging.getLogger(__name__)


def _listing_sha(out_dir: str | Path) -> str | None:
    plan = Store(out_dir).read_bytes("plan.json")
    if plan is None:
        return None
    return json.loads(plan).get("sampler_factory", {}).get("kwargs", {}).get("sources_sha256")


def run_make_shards(cfg: Config) -> dict[str, Any]:
    sh = cfg.shards
    if not sh.root:
        raise InputError("shards.root is empty: set it to the image tree, e.g. shards.root=/data/ILSVRC2012/train")
    t0 = time.perf_counter()
    listing = list_tree(sh.root, labels=sh.labels, val_labels=sh.val_labels, devkit_meta=sh.devkit_meta)
    if not listing.files:
        raise InputError(f"no image files under {listing.root} (extensions: .JPEG/.jpg/.png/...)")
    files = order_files(listing.files, sh.shuffle, cfg.seed)
    shards = plan_shards(files, sh.shard_size, sh.shard_bytes, cfg.seed)
    list_s = time.perf_counter() - t0
    totals = {"listed": len(files), "ignored": len(listing.ignored), "n_shards": len(shards),
              "n_classes_present": len({f.label for f in files}), "source_bytes": sum(f.size for f in files),
              "listing_s": round(list_s, 2)}
    print(f"listed {len(files)} images in {totals['n_classes_present']} classes under {listing.root} "
          f"({totals['source_bytes'] / 1e9:.3f} GB, {len(listing.ignored)} non-image files ignored) in {list_s:.1f} s")
    if sh.dry_run:
        return _dry_run(cfg, listing, files, shards, totals)

    target = sh.out or cfg.run_location
    out = target.rstrip("/") if is_remote(target) else Path(target).expanduser().resolve()
    if is_remote(out):
        Store(out).check_writable()  # a wrong bucket or missing credentials: one line, before any work
    with tempfile.TemporaryDirectory() as tmp:  # sha of the new listing, without touching out/ yet
        new_sha = write_listing(tmp, listing, files, shards)
    old_sha = _listing_sha(out)
    if old_sha is not None and old_sha != new_sha:
        raise InputError(f"{out} holds shards of another listing (the tree, shards.shuffle, shards.shard_size/"
                         "shard_bytes or seed changed); rerun with the same settings, or choose a new shards.out")
    write_listing(out, listing, files, shards)
    if is_remote(out):
        with tempfile.TemporaryDirectory() as tmp:
            save_config(cfg, Path(tmp) / "config.yaml")
            Store(out).put_file(Path(tmp) / "config.yaml", "config.yaml")
    else:
        save_config(cfg, out / "config.yaml")
    factory = ImageTreeSamplerFactory(root=listing.root, listing=str(out), sources_sha256=new_sha,
                                      resize=sh.resize, jpeg_quality=sh.jpeg_quality)
    started_ray = _start_ray(cfg)
    t1 = time.perf_counter()
    try:
        from cgn_dist.sharding.run import generate_dataset

        manifest = generate_dataset(factory, out, n_samples=len(files), shard_size=sh.shard_size, run_seed=cfg.seed,
                                    batch_size=sh.batch_size, backend=sh.backend, num_workers=sh.num_workers,
                                    ray_address=cfg.ray.address or None, max_retries=sh.max_retries,
                                    progress=cfg.train.progress, config=config_to_dict(cfg), shards=shards)
    finally:
        if started_ray:
            from cgn_dist.distributed.ray_utils import shutdown_ray

            shutdown_ray()
    seconds = time.perf_counter() - t1
    written, rejected = manifest["total_samples"], manifest["total_rejected"]
    if written + rejected != len(files):
        raise SetupError(f"listed {len(files)} but written {written} + rejected {rejected}: the output folder "
                         f"{out} is inconsistent; delete it and rerun")
    totals.update(written=written, rejected=rejected, converted=len(manifest["notes"]),
                  total_bytes=manifest["total_bytes"], seconds=round(seconds, 2),
                  images_per_s=round(len(files) / seconds, 1) if seconds > 0 else None)
    print(f"listed {len(files)} = written {written} + rejected {rejected} ({totals['converted']} converted to RGB "
          f"JPEG) in {len(shards)} shards, {manifest['total_bytes'] / 1e9:.3f} GB, {seconds:.1f} s")
    for r in manifest["rejects"][:20]:
        print(f"  rejected {r['source']}: {r['reason']}")
    if rejected > 20:
        print(f"  ... {rejected - 20} more in {join(out, 'manifest.json')} (rejects)")
    return {"out": str(out), "index": join(out, "index.json"), "manifest": join(out, "manifest.json"), **totals}


def _dry_run(cfg: Config, listing, files, shards, totals: dict[str, Any]) -> dict[str, Any]:
    from cgn_dist.sharding.run import describe_plan, format_plan

    sh = cfg.shards
    with tempfile.TemporaryDirectory() as tmp:
        sha = write_listing(tmp, listing, files, shards)
        sampler = ImageTreeSamplerFactory(root=listing.root, listing=tmp, sources_sha256=sha, resize=sh.resize,
                                          jpeg_quality=sh.jpeg_quality)()
        desc = describe_plan(shards, sampler, batch_size=sh.batch_size, num_workers=sh.num_workers,
                             probe_size=sh.dry_run_samples)
    if not sh.resize:  # original bytes: the disk is the sources' bytes plus tar headers, known exactly
        desc["est_bytes"] = totals["source_bytes"] + len(files) * 2048 + len(shards) * 6144
        desc["bytes_per_sample"] = desc["est_bytes"] / len(files)
    print(format_plan(desc))
    return {**totals, "dry_run": desc}


def _start_ray(cfg: Config) -> bool:
    if cfg.shards.backend != "ray":
        return False
    from cgn_dist.distributed.ray_utils import start_ray_here

    return start_ray_here(cfg.ray.address, cfg.ray.num_cpus)
