"""The wids-style shard index (index.json beside the shards): its entries and their sample counts, read
from a local folder or an object-store prefix."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from cgn_dist.data.shards import ShardFormatError
from cgn_dist.errors import InputNotFound
from cgn_dist.storage import is_remote, read_text

WIDS_KIND = "wids-shard-index-v1"


def build_wids_index(shards: Iterable[Mapping[str, Any]], name: str | None = None) -> dict[str, Any]:
    """A shard index in the format of the ``wids`` package (``wids.ShardListDataset`` reads it).

    Each entry needs ``url`` (relative URLs resolve against the index file's directory) and ``nsamples``;
    ``filesize`` and ``sha256`` are extra fields that wids ignores and our loaders may check.
    """
    shardlist = []
    for s in shards:
        entry = {"url": str(s["url"]), "nsamples": int(s["nsamples"])}
        for extra in ("filesize", "sha256"):
            if extra in s:
                entry[extra] = s[extra]
        shardlist.append(entry)
    index: dict[str, Any] = {"__kind__": WIDS_KIND, "wids_version": 1, "shardlist": shardlist}
    if name:
        index["name"] = name
    return index


def load_shard_index(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Entries of a wids-style index with ``url`` made absolute (relative to the index file's folder)."""
    if is_remote(path):  # an index in a bucket: relative shard names resolve against its prefix
        try:
            index = json.loads(read_text(str(path)))
        except FileNotFoundError:
            raise InputNotFound(f"no shard index at {path}; generation writes index.json beside the shards") \
                from None
        base = str(path).rsplit("/", 1)[0]
        return [dict(e, url=e["url"] if "://" in e["url"] else f"{base}/{e['url']}") for e in _shardlist(index, path)]
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"no shard index at {path}; generation writes index.json beside the shards")
    index = json.loads(path.read_text())
    out = []
    for entry in _shardlist(index, path):
        entry = dict(entry)
        url = entry["url"]
        if "://" not in url and not os.path.isabs(url):
            entry["url"] = str(path.parent / url)
        out.append(entry)
    return out


def _shardlist(index: Any, path: Any) -> list[dict[str, Any]]:
    if not isinstance(index, dict) or index.get("wids_version") != 1 or not isinstance(index.get("shardlist"), list):
        raise ShardFormatError(f"{path} is not a wids shard index (needs wids_version 1 and a shardlist)")
    return index["shardlist"]


def shard_urls(index_path: str | os.PathLike) -> list[str]:
    """Shard paths listed in an index, in order: the ``urls`` argument of ``webdataset.WebDataset``."""
    return [e["url"] for e in load_shard_index(index_path)]


def count_samples(index_path: str | os.PathLike) -> int:
    """Total samples listed in an index (no tar is opened)."""
    return sum(int(e["nsamples"]) for e in load_shard_index(index_path))


def shard_urls_of(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Tar paths of a generation output folder (its index.json), an index.json, a tar, or a list of tars."""
    if isinstance(source, (list, tuple)):
        return [str(s) for s in source]
    p = Path(source)
    if p.is_dir():
        if (p / "index.json").is_file():
            p = p / "index.json"
        else:
            tars = sorted(p.glob("shard-*.tar"))
            if not tars:
                raise InputNotFound(f"{p} holds no index.json and no shard-*.tar files")
            return [str(t) for t in tars]
    if not p.is_file():
        raise InputNotFound(f"no shards at {p}")
    if p.suffix == ".tar":
        return [str(p)]
    from cgn_dist.data.shard_index import shard_urls

    return shard_urls(p)
