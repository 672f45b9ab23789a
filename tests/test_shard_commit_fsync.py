"""A local shard commit costs two fsyncs (the tar, then its folder), both before the commit marker exists;
the marker is not fsynced, so a crash may leave it empty or partial: such a marker reads as not committed,
`cgn-dist verify` names it, and a rerun redoes that shard with the bytes of a clean run."""
import json
import os
from pathlib import Path

import pytest

from cgn_dist.sharding.manifest import verify_output
from cgn_dist.sharding.plan import ShardSpec
from cgn_dist.sharding.run import generate_dataset
from cgn_dist.sharding.toy import ToySamplerFactory
from cgn_dist.sharding.verify import verify_folder
from cgn_dist.sharding.writer import stats_path, tar_path, verify_shard, write_shard

FACTORY = ToySamplerFactory(image_size=8)
N, SHARD, SEED = 12, 3, 99  # 4 shards


def _fd_target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")  # Linux: the path the descriptor is open on


@pytest.fixture
def calls(monkeypatch):
    """Every os.fsync and os.replace, in order, as (kind, path); both still do their work."""
    seen: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        seen.append(("fsync", _fd_target(fd)))
        return real_fsync(fd)

    def replace(src, dst, *a, **kw):
        seen.append(("replace", str(dst)))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def test_a_committed_shard_costs_two_fsyncs_and_its_tar_is_durable_before_its_marker(tmp_path, calls):
    out = tmp_path / "run"
    for sid in range(3):
        calls.clear()
        spec = ShardSpec(sid, 4, SEED)
        write_shard(FACTORY(), spec, out, batch_size=2)
        tar, marker, folder = str(tar_path(out, sid)), str(stats_path(out, sid)), str(out)
        assert [k for k, _ in calls].count("fsync") == 2, calls
        # the tar's data, its rename, the folder (the rename made durable), then the marker's rename
        assert [k for k, _ in calls] == ["fsync", "replace", "fsync", "replace"], calls
        assert calls[0][1].startswith(str(out / ".tmp-shard-")), calls  # the tar under its temporary name
        assert calls[1] == ("replace", tar)
        assert calls[2] == ("fsync", folder)
        assert calls[3] == ("replace", marker)
        assert verify_shard(out, spec).ok


def test_the_manifest_and_index_stay_durable(tmp_path, calls):
    # 4 shards x 2, plus plan.json, manifest.json, index.json at 2 each (file and folder)
    generate_dataset(FACTORY, tmp_path, N, SHARD, SEED, batch_size=2, progress=False)
    fsynced = [p for k, p in calls if k == "fsync"]
    for name in ("manifest.json", "index.json"):
        i = next(i for i, (k, p) in enumerate(calls) if k == "replace" and Path(p).name == name)
        assert calls[i - 1][0] == "fsync" and calls[i + 1][0] == "fsync", (name, calls[i - 1:i + 2])
    assert len(fsynced) == 4 * 2 + 3 * 2, calls


def _tars(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.tar"))}


@pytest.mark.parametrize("damage", ["empty", "half"])
def test_a_torn_marker_is_reported_and_redone_with_the_clean_bytes(tmp_path, damage):
    clean, run = tmp_path / "clean", tmp_path / "run"
    generate_dataset(FACTORY, clean, N, SHARD, SEED, batch_size=2, progress=False)
    generate_dataset(FACTORY, run, N, SHARD, SEED, batch_size=2, progress=False)
    marker = stats_path(run, 2)
    text = marker.read_bytes()
    json.loads(text)  # whole before the damage
    marker.write_bytes(b"" if damage == "empty" else text[:len(text) // 2])  # as a crash may leave it

    check = verify_shard(run, ShardSpec(2, SHARD, SEED))
    assert check.status == "corrupt" and "unreadable stats file" in check.reason
    problems = verify_folder(run)["problems"]
    assert [p.name for p in problems] == ["shard-000002.tar"]
    assert "commit marker shard-000002_stats.json: unreadable stats file" in problems[0].what

    redone: list[int] = []
    generate_dataset(FACTORY, run, N, SHARD, SEED, batch_size=2, progress=False,
                     on_shard_done=lambda st: redone.append(st["shard_id"]))
    assert redone == [2]
    assert _tars(run) == _tars(clean)
    assert (run / "index.json").read_bytes() == (clean / "index.json").read_bytes()
    assert json.loads(marker.read_bytes())["sha256"] == json.loads(stats_path(clean, 2).read_bytes())["sha256"]
    assert verify_output(run) == [] and verify_folder(run)["problems"] == []
    assert not list(run.glob(".tmp-*"))
