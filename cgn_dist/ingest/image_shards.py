"""Real images (ILSVRC-2012 or any ImageFolder tree) into WebDataset shards, through the generation engine.

The tree is listed once (cgn_dist.ingest.image_tree), in sorted or seeded-shuffled order, into
``sources.tsv`` + ``sources.json`` in the output folder; sample (shard, index) is line
``offsets[shard] + index`` of that list. The sampler below reads and checks those files, so the engine's
plan, atomic commit, stats marker, resume, manifest, wids index and local/Ray backends do all the rest.

Each file is decoded before it is written (a JPEG with a broken tail opens fine: only decoding finds it;
a JPEG kept as it is decodes at 1/8 scale, which reads every entropy-coded block but skips most of the work):
- a clean RGB JPEG keeps its original bytes (``resize == 0``);
- CMYK, grayscale (and other non-RGB modes) and non-JPEG data behind an image name (a PNG named .JPEG)
  are converted to RGB and re-encoded as JPEG, and noted (json ``converted``, stats/manifest ``notes``);
- unreadable (permissions, a directory or dangling link named like an image), empty, truncated or corrupt
  files are rejected with their path and reason (stats/manifest ``rejects``). Listed = written + rejected.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cgn_dist.ingest.image_tree import SourceFile, TreeListing
from cgn_dist.data.shards import json_text, write_json_atomic
from cgn_dist.errors import InputNotFound, SetupError
from cgn_dist.sharding.plan import SampleRef, ShardSpec
from cgn_dist.storage import Store

log = logging.getLogger(__name__)

SOURCES_TSV, SOURCES_JSON = "sources.tsv", "sources.json"
LISTING_FORMAT = "cgn_dist.image-sources/v1"


# --- the listing in the output folder -----------------------------------------------------------------------

def order_files(files: Sequence[SourceFile], shuffle: bool, seed: int) -> list[SourceFile]:
    files = sorted(files, key=lambda f: f.path)
    if shuffle:  # classes mixed within every shard: a streaming shuffle buffer cannot mix class-sorted shards
        perm = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1A6E])).permutation(len(files))
        files = [files[i] for i in perm]
    return files


def plan_shards(files: Sequence[SourceFile], shard_size: int, shard_bytes: int, seed: int) -> list[ShardSpec]:
    """Shards of at most ``shard_size`` files and (when ``shard_bytes`` > 0) at most ``shard_bytes`` source
    bytes; a single larger file gets a shard of its own."""
    sizes, n, nbytes = [], 0, 0
    for f in files:
        if n and (n == shard_size or (shard_bytes > 0 and nbytes + f.size > shard_bytes)):
            sizes.append(n)
            n, nbytes = 0, 0
        n += 1
        nbytes += f.size
    if n:
        sizes.append(n)
    return [ShardSpec(shard_id=i, n=k, seed=int(seed)) for i, k in enumerate(sizes)]


def write_listing(out_dir: str | os.PathLike, listing: TreeListing, files: Sequence[SourceFile],
                  shards: Sequence[ShardSpec]) -> str:
    """Write sources.tsv (path, label, wnid in plan order) and sources.json; returns the tsv's sha256.

    A rerun that lists the same tree writes the same bytes; the sha256 is part of the sampler factory, so
    the engine refuses to mix shards of two different listings in one folder.
    """
    store = Store(out_dir)  # a folder or a bucket prefix: workers read the listing from there
    store.makedirs()
    tsv = "".join(f"{f.path}\t{f.label}\t{f.wnid}\n" for f in files).encode("utf-8")
    sha = hashlib.sha256(tsv).hexdigest()
    old = store.read_bytes(SOURCES_TSV)
    if old is None or hashlib.sha256(old).hexdigest() != sha:
        store.write_bytes(SOURCES_TSV, tsv)
    meta = {
        "format": LISTING_FORMAT, "root": listing.root, "layout": listing.layout, "labels": listing.labels,
        "n_listed": len(files), "sources_sha256": sha, "shard_sizes": [s.n for s in shards],
        "classes": listing.classes, "class_names": listing.class_names, "ignored": listing.ignored}
    if store.remote:
        store.write_bytes(SOURCES_JSON, json_text(meta).encode())
    else:
        write_json_atomic(Path(out_dir) / SOURCES_JSON, meta)
    return sha


# --- the sampler --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageTreeSamplerFactory:
    """Builds an ImageTreeSampler in each worker (a frozen dataclass: pickles to workers, rebuilds from a
    manifest). Paths must be absolute and visible to every worker (a shared file system on a cluster)."""

    root: str  # the image tree
    listing: str  # folder holding sources.tsv / sources.json
    sources_sha256: str  # which listing (the engine compares factories between runs)
    resize: int = 0  # short side to resize to (never up), re-encoding; 0 = original bytes
    jpeg_quality: int = 95  # for conversions and resizes

    def __call__(self) -> "ImageTreeSampler":
        return ImageTreeSampler(self)


class ImageTreeSampler:
    coverage_keys = ("label",)

    def __init__(self, cfg: ImageTreeSamplerFactory):
        self.cfg = cfg
        store = Store(cfg.listing)
        data = store.read_bytes(SOURCES_TSV)
        if data is None:
            raise InputNotFound(f"{cfg.listing}/{SOURCES_TSV} is missing: every worker must see the output folder")
        if hashlib.sha256(data).hexdigest() != cfg.sources_sha256:
            raise SetupError(f"{cfg.listing}/{SOURCES_TSV} changed since this run was planned; rerun the command "
                             "that planned it (it lists the tree again) or use a new output folder")
        meta = json.loads(store.read_bytes(SOURCES_JSON))
        self.lines = data.decode("utf-8").splitlines()
        self.offsets = np.concatenate([[0], np.cumsum(meta["shard_sizes"])]).astype(np.int64)
        self.class_names = meta["class_names"]

    def info(self) -> dict[str, Any]:
        return {"sampler": "image_tree", "resize": self.cfg.resize, "jpeg_quality": self.cfg.jpeg_quality,
                "sources_sha256": self.cfg.sources_sha256}

    def sample(self, refs: list[SampleRef]) -> list[dict[str, Any]]:
        return [self._one(ref) for ref in refs]

    def _one(self, ref: SampleRef) -> dict[str, Any]:
        rel, label, wnid = self.lines[int(self.offsets[ref.shard_id]) + ref.index].split("\t")
        label = int(label)
        data, result = read_and_check(os.path.join(self.cfg.root, rel), self.cfg.resize, self.cfg.jpeg_quality)
        if isinstance(result, str):
            log.warning("rejected %s: %s", rel, result)
            return {"__reject__": result, "__source__": rel}
        meta = {"label": label, "wnid": wnid, "class_name": self.class_names[label].split(",")[0].strip(),
                "source": rel, **result}
        sample: dict[str, Any] = {"jpg": data, "cls": label, "json": meta}
        if "converted" in result:
            log.info("converted %s: %s", rel, result["converted"])
            sample["__note__"] = f"{rel}: {result['converted']}"
        return sample


def read_and_check(path: str, resize: int = 0, jpeg_quality: int = 95) -> tuple[bytes, dict[str, Any] | str]:
    """(bytes to store, json fields) for a good image, or (b"", reason) for a bad one."""
    from PIL import Image, ImageFile

    # Truncated files must fail to decode here; some libraries switch PIL to padding them with grey.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:  # permission, a directory named like an image, a dangling link
        return b"", f"unreadable: {type(e).__name__}: {e.strerror or e}"
    if not data:
        return b"", "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt, mode, size = img.format, img.mode, img.size
            keep = fmt == "JPEG" and mode == "RGB" and not (resize and min(size) > resize)
            if keep:
                # Kept bytes only need checking: at 1/8 scale libjpeg still entropy-decodes every block of the
                # stream (so truncation and broken Huffman data still fail) but skips most of the IDCT.
                img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            img.load()  # raises on truncated or corrupt data
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad data
        return b"", f"cannot decode: {type(e).__name__}: {e}"
    fields: dict[str, Any] = {"width": size[0], "height": size[1]}
    fixes = []
    if fmt != "JPEG":
        fixes.append(f"{fmt} data under a JPEG name" if path.lower().endswith((".jpeg", ".jpg")) else f"{fmt} file")
    if mode != "RGB":
        fixes.append(f"{mode} to RGB")
    short = min(size)
    if resize and short > resize:
        w, h = size
        new = (resize, max(1, round(h * resize / w))) if w == short else (max(1, round(w * resize / h)), resize)
        img = img.convert("RGB").resize(new, Image.BICUBIC, reducing_gap=None)
        fields.update(resized_from=[w, h], width=new[0], height=new[1])
    elif not fixes:
        return data, fields  # the original bytes, untouched
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=jpeg_quality)
    if fixes:
        fields["converted"] = ", ".join(fixes) + f", re-encoded as JPEG q{jpeg_quality}"
    return buf.getvalue(), fields
