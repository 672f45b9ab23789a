"""A training run whose run directory lives in a bucket (``out_dir=s3://...``, ``gs://...``).

The loop itself runs in a local mirror of the run directory (``CGN_DIST_STAGING``, else the temp dir) and knows
nothing of the bucket: before it starts, the bucket's config.yaml and its latest committed checkpoint are
downloaded into the mirror; every checkpoint the loop reports is uploaded file by file with its meta.json
last (the marker: a checkpoint folder in the bucket without it is not committed and is never resumed from);
older checkpoints are pruned there as on disk; log.txt, summary.json, samples/ and tb/ are uploaded with each
checkpoint and when the run ends. A killed run resumes on any machine from the bucket alone.

Scope: rank 0 uploads, so every checkpoint file must be on rank 0's disk: one node (any number of local
ranks writing into one folder), or several nodes with ZeRO stage 0, where rank 0 saves the whole model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from cgn_dist import interrupts
from cgn_dist.storage import Store, join, staging_root
from cgn_dist.train.run_dir import CKPT_DIR
from cgn_dist.train.common import NullReporter, Reporter

log = logging.getLogger(__name__)
_RUN_FILES = ("config.yaml", "log.txt", "summary.json")
_RUN_FOLDERS = ("samples", "tb")


def remote_checkpoints(store: Store) -> list[tuple[int, str]]:
    """Committed checkpoints in the bucket (those whose meta.json arrived), oldest first: (step, folder name)."""
    found = []
    for name in store.find(CKPT_DIR):
        parts = name.split("/")
        if len(parts) == 3 and parts[2] == "meta.json" and parts[1].startswith("step_"):
            try:
                found.append((int(json.loads(store.read_bytes(name))["step"]), parts[1]))
            except (TypeError, ValueError, KeyError):
                continue
    return sorted(found)


def pull_run(store: Store, local: Path) -> int | None:
    """Fill an empty local mirror from the bucket: the run files and the latest committed checkpoint."""
    if local.exists():
        shutil.rmtree(local)  # the bucket is the truth; a stale mirror of an earlier attempt is dropped
    (local / CKPT_DIR).mkdir(parents=True)
    for name in _RUN_FILES:
        data = store.read_bytes(name)
        if data is not None:
            (local / name).write_bytes(data)
    ckpts = remote_checkpoints(store)
    if not ckpts:
        return None
    step, folder = ckpts[-1]
    prefix = f"{CKPT_DIR}/{folder}/"
    for name in store.find(prefix.rstrip("/")):
        target = local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.read_bytes(name))
    return step


def push_checkpoint(store: Store, local_ckpt: Path, keep_last: int) -> None:
    """Upload one finished checkpoint folder, meta.json last; then drop the bucket's older ones."""
    folder = f"{CKPT_DIR}/{local_ckpt.name}"
    files = sorted(p for p in local_ckpt.rglob("*") if p.is_file())
    for p in [p for p in files if p.name != "meta.json"] + [local_ckpt / "meta.json"]:
        store.put_file(p, f"{folder}/{p.relative_to(local_ckpt).as_posix()}")
    for _, old in remote_checkpoints(store)[:-keep_last] if keep_last > 0 else []:
        names = store.find(f"{CKPT_DIR}/{old}")
        marker = f"{CKPT_DIR}/{old}/meta.json"
        for name in [marker] + [n for n in names if n != marker]:  # unmark first
            store.remove(name)


def push_run_files(store: Store, local: Path) -> None:
    for name in _RUN_FILES:
        if (local / name).is_file():
            store.put_file(local / name, name)
    for folder in _RUN_FOLDERS:
        for p in sorted((local / folder).rglob("*")) if (local / folder).is_dir() else []:
            if p.is_file():
                store.put_file(p, p.relative_to(local).as_posix())


class BucketReporter(Reporter):
    """Uploads each checkpoint the loop reports (rank 0), then hands it to the launcher's own reporter."""

    def __init__(self, store: Store, local: Path, keep_last: int, inner: Reporter | None = None):
        self.store, self.local, self.keep_last, self.inner = store, local, keep_last, inner or NullReporter()

    def resume_checkpoint(self) -> Path | None:
        return self.inner.resume_checkpoint()

    def stop_requested(self) -> int | None:
        return self.inner.stop_requested()

    def report(self, step: int, metrics: dict[str, float], checkpoint_dir: Path | None, is_main: bool) -> None:
        if is_main and checkpoint_dir is not None:
            push_checkpoint(self.store, Path(checkpoint_dir), self.keep_last)
            push_run_files(self.store, self.local)
        self.inner.report(step, metrics, checkpoint_dir, is_main)


def mirror_dir(url: str, name: str) -> Path:
    """A local mirror folder per bucket URL (stable within one machine's staging folder)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return staging_root() / f"cgn_dist_run_{digest}" / name


def train_in_bucket(cfg: Any, train_fn: Callable[..., dict], **kwargs: Any) -> dict:
    """Run ``train_fn(cfg', reporter=...)`` with cfg' pointing at a local mirror of the bucket's run dir."""
    url = cfg.run_location
    store = Store(url)
    store.check_writable()  # a wrong bucket or missing credentials: one line, before any work
    local = mirror_dir(url, cfg.name)
    step = pull_run(store, local)
    log.info("run dir %s (local mirror %s)%s", url, local, f"; resuming from step {step}" if step else "")
    local_cfg = replace(cfg, out_dir=str(local.parent))
    reporter = BucketReporter(store, local, cfg.train.keep_last, kwargs.pop("reporter", None))
    try:
        result = train_fn(local_cfg, reporter=reporter, **kwargs)
    except interrupts.Interrupted as e:  # its checkpoint was pushed (report): name it in the bucket
        raise e.kept(e.kind, e.done, e.total, join(url, CKPT_DIR, Path(e.where).name) if e.where else url) from None
    finally:
        push_run_files(store, local)
    return dict(result, run_dir=url)
