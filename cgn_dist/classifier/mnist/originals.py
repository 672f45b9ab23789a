"""The original train and test sets of an MNIST variant, dumped once as shards.

The data sets draw their colours and textures from seeds (cgn_dist.data.mnist), so a dump is a pure
function of (data set, split, digit source, root, textures, seed). Dumping them once through the same
deterministic writer as the counterfactuals freezes them (as the original froze its test set by saving a
tensor) and lets every classifier read one format: ``png`` (uint8 = round((x + 1) * 127.5), the fixed
mapping of cgn_dist.generate.mnist) and ``json`` {label, shape_cls, index, split}. Training images are the
epoch-0 draw of the training set.

Layout: ``<out_dir>/train/`` and ``<out_dir>/test/``, each a generation output folder (shards, plan.json,
manifest.json, index.json). Sample i of the data set is index i % shard_size of shard i // shard_size.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgn_dist.data.shards import encode_png
from cgn_dist.sharding.manifest import MANIFEST_NAME, load_manifest, verify_output
from cgn_dist.sharding.plan import SampleRef
from cgn_dist.sharding.run import generate_dataset
from cgn_dist.data.pixels import encode_uint8

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class OriginalSetFactory:
    """Builds an OriginalSetSampler; frozen and JSON-able (pickles to workers, rebuilds from a manifest)."""

    dataset: str  # colored | double_colored | wildlife
    split: str  # train | test
    shard_size: int  # maps (shard, index) to the data set index
    source: str = "auto"
    root: str = "data/mnist"
    textures: str = ""  # "" = the procedural default textures
    seed: int = 0  # the data set's seed (colours, jitter, texture crops)
    download: bool = True

    def __call__(self) -> "OriginalSetSampler":
        return OriginalSetSampler(self)


def build_original_dataset(f: OriginalSetFactory):
    from cgn_dist.data.mnist import build_mnist_dataset

    return build_mnist_dataset(f.dataset, f.split, source=f.source, root=f.root, seed=f.seed,
                               textures_dir=f.textures or None, download=f.download)


class OriginalSetSampler:
    coverage_keys = ("label",)

    def __init__(self, cfg: OriginalSetFactory):
        self.cfg = cfg
        self.dataset = build_original_dataset(cfg)

    def info(self) -> dict[str, Any]:
        c = self.cfg
        return {"sampler": "mnist_original", "dataset": c.dataset, "split": c.split, "seed": c.seed,
                "n": len(self.dataset)}

    def sample(self, refs: list[SampleRef]) -> list[dict[str, Any]]:
        out = []
        for ref in refs:
            index = ref.shard_id * self.cfg.shard_size + ref.index
            x, y = self.dataset[index]
            out.append({"png": encode_png(encode_uint8(x).numpy()),
                        "json": {"label": int(y), "shape_cls": int(y), "index": index, "split": self.cfg.split}})
        return out


def _is_complete(split_dir: Path, factory: OriginalSetFactory, seed: int, limit: int | None) -> bool:
    """A finished dump of exactly this configuration (plan and manifest agree, every shard's size checks)."""
    if not (split_dir / MANIFEST_NAME).is_file():
        return False
    from dataclasses import asdict

    manifest = load_manifest(split_dir)
    if (manifest.get("sampler_factory", {}).get("kwargs") != asdict(factory)
            or manifest.get("run_seed") != seed or manifest.get("shard_size") != factory.shard_size
            or manifest.get("config", {}).get("limit") != limit):
        return False
    return not verify_output(split_dir, check_hash=False)


def dump_original_sets(dataset: str, source: str, root: str | os.PathLike, textures: str | os.PathLike | None,
                       seed: int, out_dir: str | os.PathLike, shard_size: int = 5000, *, download: bool = True,
                       splits: tuple[str, ...] = SPLITS, progress: bool = True, num_workers: int = 1,
                       limit: int | None = None) -> dict[str, Path]:
    """Write the original train and test sets of ``dataset`` as shards; returns {split: folder}.

    ``limit``: dump only the first ``limit`` samples of each split (smoke runs and tests).

    A split whose dump already finished with the same configuration is skipped (sizes checked, no
    hashing); an interrupted one is completed; a folder holding another configuration raises
    GenerationError (choose another out_dir).
    """
    out_dir = Path(out_dir)
    folders = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        factory = OriginalSetFactory(dataset=dataset, split=split, shard_size=shard_size, source=str(source),
                                     root=str(root), textures=str(textures or ""), seed=int(seed),
                                     download=bool(download))
        split_dir = out_dir / split
        folders[split] = split_dir
        if _is_complete(split_dir, factory, seed, limit):
            log.info("original %s/%s already dumped in %s", dataset, split, split_dir)
            continue
        n = len(build_original_dataset(factory))
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1 or None, got {limit}")
            n = min(n, limit)
        generate_dataset(factory, split_dir, n_samples=n, shard_size=shard_size, run_seed=int(seed),
                         batch_size=min(shard_size, 500), num_workers=num_workers, progress=progress,
                         config={"dataset": dataset, "split": split, "limit": limit})
    return folders


__all__ = ["OriginalSetFactory", "OriginalSetSampler", "dump_original_sets", "build_original_dataset"]
