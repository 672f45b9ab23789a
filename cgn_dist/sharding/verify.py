"""``cgn-dist verify DIR``: check a shard folder (``cgn-dist generate`` or ``cgn-dist make-shards``) against
what its writer recorded, and say how to rebuild what is wrong.

Per shard of manifest.json: the tar exists, its size and sha256 equal the manifest's, it reads to the end
(a truncated or corrupt tar fails), it holds the manifest's number of samples, every key belongs to that
shard's plan (once, in order) and every sample has the folder's set of files; its ``_stats.json`` commit
marker is there and was made for that plan (writer.verify_shard). Also index.json against the manifest,
and tars that the manifest does not list. Works on a local folder or an object-store prefix (s3://).

The fix is always the same: delete the bad shards' files and rerun the command that made the folder; it
resumes, remaking only the shards that are not committed, with the same bytes.
"""
from __future__ import annotations

import json
import os
import shlex
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgn_dist.data.shards import ShardFormatError, iter_tar_samples
from cgn_dist.sharding.manifest import INDEX_NAME, MANIFEST_NAME, load_manifest
from cgn_dist.sharding.plan import ShardSpec, sample_refs
from cgn_dist.sharding.writer import stats_name, tar_name, verify_shard
from cgn_dist.storage import Store, is_remote, join


@dataclass(frozen=True)
class Problem:
    name: str  # the file at fault (a shard tar, index.json)
    what: str  # one line: what is wrong
    remove: tuple[str, ...] = ()  # the names to delete before the rerun


def _check_tar(store: Store, entry: dict[str, Any], spec: ShardSpec, exts: list[set[str]]) -> list[str]:
    """What is wrong with one listed shard (empty when nothing is). ``exts``: the folder's file set, found
    on the first good sample and shared between calls."""
    name = tar_name(spec.shard_id)
    size = store.size(name)
    if size is None:
        return [f"missing (manifest: {entry['count']} samples, {entry['bytes']:,} bytes)"]
    issues = []
    try:
        samples = list(iter_tar_samples(store.path(name)))
    except (tarfile.TarError, ShardFormatError, EOFError) as e:
        issues.append(f"truncated or corrupt tar ({size:,} of {entry['bytes']:,} bytes): {e}")
        samples = None
    if size != entry["bytes"] and samples is not None:
        issues.append(f"{size:,} bytes, manifest says {entry['bytes']:,}")
    if not issues and store.sha256(name) != entry["sha256"]:
        issues.append("sha256 differs from manifest.json (the bytes changed after it was written)")
    if samples is None:
        return issues
    if len(samples) != entry["count"]:
        issues.append(f"{len(samples)} samples, manifest says {entry['count']}")
    planned = [r.key for r in sample_refs(spec)]
    order = {k: i for i, k in enumerate(planned)}
    keys = [s["__key__"] for s in samples]
    foreign = [k for k in keys if k not in order]
    if foreign:
        issues.append(f"unexpected keys {foreign[:3]}{' ...' if len(foreign) > 3 else ''} (this shard's plan: "
                      f"{planned[0]} .. {planned[-1]})")
    elif [order[k] for k in keys] != sorted(order[k] for k in keys):
        issues.append("keys out of plan order")
    for s in samples:
        files = {k for k in s if k != "__key__"}
        if not exts:
            exts.append(files)
        elif files != exts[0]:
            issues.append(f"sample {s['__key__']} has files {sorted(files)}, the others {sorted(exts[0])}")
            break
    return issues


def verify_folder(location: str | os.PathLike) -> dict[str, Any]:
    """Check the folder; returns {"problems": [Problem], "shards", "samples", "bytes", "command"}."""
    manifest = load_manifest(location)  # FileNotFoundError (one line) for an unfinished or foreign folder
    store = Store(location)
    by_id = {e["shard_id"]: e for e in manifest["shards"]}
    problems: list[Problem] = []
    exts: list[set[str]] = []
    for d in manifest["plan"]:
        spec = ShardSpec.from_dict(d)
        entry = by_id[spec.shard_id]
        files = (tar_name(spec.shard_id), stats_name(spec.shard_id))
        issues = _check_tar(store, entry, spec, exts)
        if not issues:  # the tar is right; is its commit marker? (a rerun would otherwise remake it)
            marker = verify_shard(location, spec, check_hash=False)
            if not marker.ok:
                issues.append(f"commit marker {stats_name(spec.shard_id)}: {marker.reason or marker.status}")
        if issues:
            problems.append(Problem(files[0], "; ".join(issues), files))
    problems += _check_index(store, manifest)
    listed = {tar_name(i) for i in by_id}
    for extra in store.list("shard-*.tar"):
        if extra not in listed:
            problems.append(Problem(extra, "not in manifest.json (left from another plan; loaders never read it)",
                                    (extra, extra.removesuffix(".tar") + "_stats.json")))
    return {"location": store.root, "problems": problems, "shards": len(by_id),
            "samples": manifest["total_samples"], "bytes": manifest["total_bytes"],
            "command": rebuild_command(store, manifest)}


def _check_index(store: Store, manifest: dict[str, Any]) -> list[Problem]:
    data = store.read_bytes(INDEX_NAME)
    if data is None:
        return [Problem(INDEX_NAME, "missing (loaders read the shard list from it)", (MANIFEST_NAME,))]
    try:
        listed = {Path(e["url"]).name: e for e in json.loads(data)["shardlist"]}
    except (ValueError, KeyError, TypeError) as e:
        return [Problem(INDEX_NAME, f"unreadable: {e}", (INDEX_NAME, MANIFEST_NAME))]
    wrong = [e["url"] for e in manifest["shards"]
             if (listed.get(Path(e["url"]).name) or {}).get("nsamples") != e["count"]
             or (listed.get(Path(e["url"]).name) or {}).get("sha256", e["sha256"]) != e["sha256"]]
    if wrong or len(listed) != len(manifest["shards"]):
        return [Problem(INDEX_NAME, f"disagrees with manifest.json on {wrong[:3] or 'the shard list'}",
                        (INDEX_NAME, MANIFEST_NAME))]
    return []


def rebuild_command(store: Store, manifest: dict[str, Any]) -> str:
    """The command that made the folder, pointed at this folder (it resumes)."""
    ingested = "ImageTreeSampler" in str(manifest.get("sampler_factory", {}).get("target", ""))
    cmd = "make-shards" if ingested else "generate"
    root = store.root
    if is_remote(root):
        parent, name = root.rsplit("/", 1)
        config = f"<{join(root, 'config.yaml')}, copied here>"
    else:
        path = Path(root).resolve()
        parent, name = str(path.parent), path.name
        config = str(path / "config.yaml") if (path / "config.yaml").is_file() else "<the config that made it>"
    target = f"shards.out={root if is_remote(root) else Path(root).resolve()}" if ingested \
        else f"out_dir={parent} name={name}"
    return f"cgn-dist {cmd} {shlex.quote(config) if not config.startswith('<') else config} {target}"


def format_report(result: dict[str, Any]) -> str:
    loc, problems = result["location"], result["problems"]
    if not problems:
        return (f"{loc}: {result['shards']} shards, {result['samples']} samples, {result['bytes']:,} bytes: "
                "every shard matches manifest.json (size, sha256, samples, keys)")
    lines = [f"{join(loc, p.name)}: {p.what}" for p in problems]
    remove = sorted({n for p in problems for n in p.remove})
    paths = [join(loc, n) for n in remove]
    if is_remote(loc):
        fix = f"delete {' '.join(paths)}, then rerun: {result['command']}"
    else:
        fix = f"rm -f {' '.join(shlex.quote(p) for p in paths)} && {result['command']}"
    lines.append(f"{len(problems)} problem(s) in {loc} ({result['shards']} shards); rebuild (resumes, remaking "
                 f"only these): {fix}")
    return "\n".join(lines)


__all__ = ["verify_folder", "format_report", "rebuild_command", "Problem"]
