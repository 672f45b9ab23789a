"""The files beside the shards that make an output folder self-describing.

- ``plan.json``  written before any shard: run seed, shard size, sampler factory. A rerun into the same
  folder must agree with it (a different seed or model would otherwise mix two datasets in one folder).
- ``manifest.json`` written after the last shard: plan, per-shard counts / sha256 / sizes, totals, class
  coverage, config, code version, sampler provenance. No timings, so a rerun of a finished run rewrites
  the same bytes.
- ``index.json`` the shard list with sample counts in the ``wids`` format
  (``{"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": [{"url", "nsamples"}]}``), so
  loaders never rescan tars (``cgn_dist.data.shard_index.shard_urls`` / ``count_samples``, or
  ``wids.ShardListDataset("index.json")``).
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Sequence

from cgn_dist.data.shards import json_text, write_json_atomic
from cgn_dist.data.shard_index import build_wids_index
from cgn_dist.errors import InputError, InputNotFound
from cgn_dist.sharding.sampler import canonical_target
from cgn_dist.sharding.plan import KEY_FORMAT, SEED_DERIVATION, ShardSpec, plan_to_dicts, shard_name
from cgn_dist.sharding.writer import GenerationError, ShardCheck, verify_shard
from cgn_dist.storage import Store, is_remote

MANIFEST_FORMAT = "cgn_dist.generate-manifest/v1"
PLAN_FORMAT = "cgn_dist.generate-plan/v1"
MANIFEST_NAME, PLAN_NAME, INDEX_NAME = "manifest.json", "plan.json", "index.json"


def code_version() -> dict[str, Any]:
    """Package version and, when run from a git checkout, its commit (with a dirty flag)."""
    try:
        from cgn_dist import __version__ as version
    except ImportError:
        version = None
    out: dict[str, Any] = {"cgn_dist": version, "git": None}
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=5, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5, check=True).stdout.strip()
            out["git"] = sha + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return out


# --- plan.json ----------------------------------------------------------------------------------------------

def build_plan_doc(run_seed: int, shard_size: int, sampler_factory: dict[str, Any]) -> dict[str, Any]:
    return {"format": PLAN_FORMAT, "run_seed": run_seed, "shard_size": shard_size,
            "sampler_factory": sampler_factory, "key_format": KEY_FORMAT, "seed_derivation": SEED_DERIVATION}


def _factory_identity(desc: dict[str, Any]) -> Any:
    # A factory described only by repr() is compared by type: its repr may hold memory addresses.
    target = canonical_target(desc.get("target"))  # a factory whose module moved is still the same run
    return (target, desc.get("kwargs")) if "kwargs" in desc else (target,)


def check_or_write_plan(out_dir: str | os.PathLike, plan_doc: dict[str, Any]) -> None:
    """Write plan.json on the first run; on a rerun, refuse to go on if it disagrees with this one.

    n_samples may grow or shrink between runs (shards are checked one by one), batch size and backend may
    change (bytes do not depend on them); seed, shard size and sampler factory may not.
    """
    store = Store(out_dir)
    data = store.read_bytes(PLAN_NAME)
    if data is None:
        _write_json(out_dir, PLAN_NAME, plan_doc)
        return
    old = json.loads(data)
    diffs = [k for k in ("run_seed", "shard_size", "key_format", "seed_derivation") if old.get(k) != plan_doc.get(k)]
    if _factory_identity(old.get("sampler_factory", {})) != _factory_identity(plan_doc["sampler_factory"]):
        diffs.append("sampler_factory")
    if diffs:
        raise GenerationError(
            f"{out_dir} already holds shards of another run (differs in {', '.join(diffs)}: "
            f"{ {k: old.get(k) for k in diffs} }); choose a new output folder, or delete that one")


# --- manifest.json and index.json ---------------------------------------------------------------------------

def merge_class_counts(stats: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    merged: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for s in stats:
        for field, counts in s.get("class_counts", {}).items():
            merged[field].update(counts)
    return {f: dict(sorted(c.items(), key=lambda kv: (len(kv[0]), kv[0]))) for f, c in sorted(merged.items())}


def _single_sampler_info(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    infos = {json.dumps(s.get("sampler_info", {}), sort_keys=True) for s in stats}
    if len(infos) > 1:
        by_info = collections.defaultdict(list)
        for s in stats:
            by_info[json.dumps(s.get("sampler_info", {}), sort_keys=True)].append(s["shard_id"])
        raise GenerationError("shards were made by samplers with different provenance (sampler_info), e.g. "
                              f"two checkpoints: {dict(by_info)}; delete the shards of the wrong one and rerun")
    return json.loads(infos.pop()) if infos else {}


def shard_pattern(n_shards: int) -> str:
    """Brace pattern of all shards, e.g. ``shard-{000000..000009}.tar`` (webdataset / braceexpand)."""
    last = shard_name(n_shards - 1).split("-", 1)[1]
    return f"shard-{{000000..{last}}}.tar" if n_shards > 1 else f"{shard_name(0)}.tar"


def build_manifest(shards: Sequence[ShardSpec], stats: Sequence[dict[str, Any]], plan_doc: dict[str, Any],
                   batch_size: int, config: dict[str, Any] | None = None) -> dict[str, Any]:
    by_id = {s["shard_id"]: s for s in stats}
    entries = []
    for spec in shards:
        s = by_id[spec.shard_id]
        entries.append({"shard_id": spec.shard_id, "url": s["url"], "count": s["count"], "sha256": s["sha256"],
                        "bytes": s["bytes"], "first_key": s["first_key"], "last_key": s["last_key"],
                        "batch_size": s["batch_size"]})
    return {
        "format": MANIFEST_FORMAT,
        "run_seed": plan_doc["run_seed"],
        "n_samples": sum(s.n for s in shards),
        "shard_size": plan_doc["shard_size"],
        "n_shards": len(shards),
        "batch_size": batch_size,
        "key_format": plan_doc["key_format"],
        "seed_derivation": plan_doc["seed_derivation"],
        "shard_pattern": shard_pattern(len(shards)),
        "index": INDEX_NAME,
        "plan": plan_to_dicts(shards),
        "shards": entries,
        "total_samples": sum(e["count"] for e in entries),
        "total_bytes": sum(e["bytes"] for e in entries),
        "class_counts": merge_class_counts([by_id[s.shard_id] for s in shards]),
        "total_rejected": sum(len(by_id[s.shard_id].get("rejects", ())) for s in shards),
        "rejects": [r for s in shards for r in by_id[s.shard_id].get("rejects", ())],
        "notes": [n for s in shards for n in by_id[s.shard_id].get("notes", ())],
        "sampler_info": _single_sampler_info([by_id[s.shard_id] for s in shards]),
        "sampler_factory": plan_doc["sampler_factory"],
        "config": config or {},
        "code_version": code_version(),
    }


def write_outputs(out_dir: str | os.PathLike, manifest: dict[str, Any], name: str | None = None) -> None:
    """Write index.json then manifest.json (the manifest last: its presence means the run finished)."""
    index = build_wids_index(
        [{"url": e["url"], "nsamples": e["count"], "filesize": e["bytes"], "sha256": e["sha256"]}
         for e in manifest["shards"]], name=name)
    _write_json(out_dir, INDEX_NAME, index)
    _write_json(out_dir, MANIFEST_NAME, manifest)


def _write_json(out_dir: str | os.PathLike, name: str, obj: Any) -> None:
    if is_remote(out_dir):  # the same bytes as the local file
        Store(out_dir).write_bytes(name, json_text(obj).encode())
    else:
        write_json_atomic(Path(out_dir) / name, obj)


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read a manifest; ``path`` may be the file or the output folder holding it (or an object-store URL)."""
    if is_remote(path):
        folder = str(path)[: -len(MANIFEST_NAME)].rstrip("/") if str(path).endswith(".json") else str(path)
        store = Store(folder)
        data = store.read_bytes(MANIFEST_NAME)
        if data is None:
            state = "has not finished" if store.exists(PLAN_NAME) else "holds no generation run"
            raise InputNotFound(f"{folder} {state} (no {MANIFEST_NAME}): rerun `cgn-dist generate` with its "
                                "config to complete it")
        manifest = json.loads(data)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise InputError(f"{folder}/{MANIFEST_NAME} is not a generation manifest ({MANIFEST_FORMAT})")
        return manifest
    path = Path(path)
    folder = path if path.suffix != ".json" else path.parent
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        if not folder.is_dir():
            raise InputNotFound(f"no generation run at {folder}: the folder does not exist (a run's folder is "
                                "<out_dir>/<name> of its config)")
        if (folder / PLAN_NAME).is_file():
            raise InputNotFound(f"the generation run in {folder} has not finished (no {MANIFEST_NAME} yet): "
                                "rerun `cgn-dist generate` with its config to complete it")
        raise InputNotFound(f"{folder} is not a generation run folder (no {MANIFEST_NAME}, no {PLAN_NAME})")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path} is not a generation manifest ({MANIFEST_FORMAT})")
    return manifest


def verify_output(out_dir: str | os.PathLike, check_hash: bool = True) -> list[ShardCheck]:
    """Check every shard of a finished run against its stats and the manifest; returns the failures."""
    manifest = load_manifest(out_dir)
    by_id = {e["shard_id"]: e for e in manifest["shards"]}
    bad = []
    for d in manifest["plan"]:
        spec = ShardSpec.from_dict(d)
        check = verify_shard(out_dir, spec, check_hash=check_hash)
        if check.ok and check.stats["sha256"] != by_id[spec.shard_id]["sha256"]:
            check = ShardCheck(spec.shard_id, "corrupt", "stats and manifest disagree on sha256", check.stats)
        if not check.ok:
            bad.append(check)
    return bad
