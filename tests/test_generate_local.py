"""The generation engine on the local backends: same bytes whatever the batching or the workers, exactly
once through kills and corruption, and a manifest from which any sample can be regenerated."""
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cgn_dist.data.shards import read_sample
from cgn_dist.data.shard_index import shard_urls
from cgn_dist.sharding.writer import GenerationError
from cgn_dist.sharding.run import describe_plan, format_plan, generate_dataset
from cgn_dist.sharding.manifest import load_manifest, verify_output
from cgn_dist.sharding.plan import make_plan
from cgn_dist.sharding.regenerate import regenerate_sample
from cgn_dist.sharding.toy import ToySamplerFactory

REPO = Path(__file__).resolve().parents[1]
N, SHARD, SEED = 22, 5, 1234  # 5 shards, the last one of 2 samples
FACTORY = ToySamplerFactory(image_size=8)


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def webdataset_keys(out: Path) -> list[str]:
    import webdataset as wds
    return [s["__key__"] for s in wds.WebDataset(shard_urls(out / "index.json"), shardshuffle=False)]


def expected_keys() -> list[str]:
    return [f"{s.shard_id:06d}_{i:06d}" for s in make_plan(N, SHARD, SEED) for i in range(s.n)]


def assert_same_dataset(out: Path, ref: Path) -> None:
    assert tars(out) == tars(ref)
    assert (out / "index.json").read_bytes() == (ref / "index.json").read_bytes()
    assert webdataset_keys(out) == expected_keys()
    assert not list(out.glob(".tmp-*")), "temporary files left behind"
    assert verify_output(out) == []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    generate_dataset(FACTORY, out, N, SHARD, SEED, batch_size=1, progress=False, config={"note": "ref"})
    return out


def test_bytes_do_not_depend_on_batch_size(reference, tmp_path):
    generate_dataset(FACTORY, tmp_path, N, SHARD, SEED, batch_size=3, progress=False)
    assert_same_dataset(tmp_path, reference)


def test_manifest_index_and_regeneration(reference):
    m = load_manifest(reference)
    assert (m["run_seed"], m["n_samples"], m["n_shards"], m["total_samples"]) == (SEED, N, 5, N)
    assert m["config"] == {"note": "ref"} and m["sampler_info"]["sampler"] == "toy"
    assert m["shard_pattern"] == "shard-{000000..000004}.tar"
    assert [e["count"] for e in m["shards"]] == [5, 5, 5, 5, 2]
    assert m["total_bytes"] == sum(len(b) for b in tars(reference).values())
    assert sum(m["class_counts"]["shape_cls"].values()) == N
    index = json.loads((reference / "index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert [e["nsamples"] for e in index["shardlist"]] == [5, 5, 5, 5, 2]
    stats = json.loads((reference / "shard-000004_stats.json").read_text())
    assert (stats["first_key"], stats["last_key"], stats["count"]) == ("000004_000000", "000004_000001", 2)
    for key in ("000000_000000", "000003_000004", "000004_000001"):
        stored = read_sample(reference / f"shard-{key[:6]}.tar", key)
        assert regenerate_sample(reference / "manifest.json", key) == stored  # factory rebuilt from manifest
        assert regenerate_sample(reference, key, FACTORY, whole_batch=False) == stored
    with pytest.raises(KeyError):
        regenerate_sample(reference, "000004_000002")


def test_rerun_skips_committed_shards(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    manifest_before = (out / "manifest.json").read_bytes()
    done = []
    generate_dataset(FACTORY, out, N, SHARD, SEED, batch_size=4, progress=True, on_shard_done=done.append,
                     config={"note": "ref"})
    assert done == []
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == before
    m_before, m_after = json.loads(manifest_before), load_manifest(out)
    assert {k: v for k, v in m_after.items() if k != "batch_size"} == \
        {k: v for k, v in m_before.items() if k != "batch_size"}  # the shards keep their own batch size


def test_corrupt_truncated_uncommitted_and_stray_files_are_redone(reference, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    t0 = out / "shard-000000.tar"
    t0.write_bytes(t0.read_bytes()[:-3000])  # truncated after commit
    t1 = out / "shard-000001.tar"
    data = bytearray(t1.read_bytes())
    data[700] ^= 0x01  # one flipped bit inside a member: same size
    t1.write_bytes(bytes(data))
    (out / "shard-000002_stats.json").unlink()  # written but never committed
    (out / "shard-000003_stats.json").write_text("{not json")
    stray = out / ".tmp-shard-000004.tar.4242.0123456789ab"
    stray.write_bytes(b"half a shard")
    assert sorted(c.shard_id for c in verify_output(out)) == [0, 1, 2, 3]
    assert verify_output(out, check_hash=False)[0].shard_id == 0  # a flipped bit needs the hash
    with caplog.at_level(logging.WARNING, logger="cgn_dist.generate"):
        done = []
        generate_dataset(FACTORY, out, N, SHARD, SEED, batch_size=2, progress=False, on_shard_done=done.append)
    assert sorted(s["shard_id"] for s in done) == [0, 1, 2, 3]
    assert not stray.exists()
    text = caplog.text
    for phrase in ("shard 0 is corrupt", "shard 1 is corrupt", "shard 2 is uncommitted", "shard 3 is corrupt",
                   stray.name):
        assert phrase in text
    assert_same_dataset(out, reference)


def test_another_run_in_the_same_folder_is_refused(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    with pytest.raises(GenerationError, match="run_seed"):
        generate_dataset(FACTORY, out, N, SHARD, SEED + 1, progress=False)
    with pytest.raises(GenerationError, match="sampler_factory"):
        generate_dataset(ToySamplerFactory(image_size=16), out, N, SHARD, SEED, progress=False)


class _FlakySampler:
    def __init__(self, fail_times):
        self.fail_times, self.inner = fail_times, FACTORY()

    def sample(self, refs):
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("transient failure")
        return self.inner.sample(refs)


def test_sampler_errors_are_retried_then_reported(reference, tmp_path):
    generate_dataset(lambda: _FlakySampler(2), tmp_path / "a", N, SHARD, SEED, max_retries=2, progress=False)
    assert tars(tmp_path / "a") == tars(reference)
    with pytest.raises(GenerationError, match="shard 0 failed 3 time"):
        generate_dataset(lambda: _FlakySampler(99), tmp_path / "b", N, SHARD, SEED, max_retries=2, progress=False)
    assert not list((tmp_path / "b").glob("shard-*")) and not list((tmp_path / "b").glob(".tmp-*"))


def test_process_pool_matches_and_survives_a_dead_worker(reference, tmp_path):
    marker = tmp_path / "crashed"
    factory = ToySamplerFactory(image_size=8, crash_on_key="000004_000001", crash_marker=str(marker))
    out = tmp_path / "out"
    generate_dataset(factory, out, N, SHARD, SEED, batch_size=2, num_workers=2, progress=False)
    assert marker.exists(), "the worker never crashed: the test did not test the retry"
    assert_same_dataset(out, reference)
    assert json.loads((out / "shard-000004_stats.json").read_text())["attempt"] == 2


_KILLED_RUN = """
import sys
from cgn_dist.sharding.run import generate_dataset
from cgn_dist.sharding.toy import ToySamplerFactory
generate_dataset(ToySamplerFactory(image_size=8, sleep_s=float(sys.argv[2])), sys.argv[1], {n}, {shard}, {seed},
                 batch_size=2, progress=False)
""".format(n=N, shard=SHARD, seed=SEED)


def test_run_killed_from_outside_then_rerun(reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(out), "0.05"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / "shard-000001_stats.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never committed shard 1"
        time.sleep(0.02)
    # Kill while shard 2 is half written: its temporary tar exists and its marker does not.
    while not list(out.glob(".tmp-shard-000002.tar.*")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never started shard 2"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert list(out.glob(".tmp-shard-000002.tar.*")), "shard 2 finished before the kill landed"
    assert not (out / "shard-000002_stats.json").exists(), "the kill did not land mid-shard"
    assert not (out / "manifest.json").exists()
    generate_dataset(ToySamplerFactory(image_size=8, sleep_s=0.05), out, N, SHARD, SEED, batch_size=2,
                     progress=False)
    assert_same_dataset(out, reference)
    assert not list(out.glob(".tmp-*")), "the rerun left the killed run's temporary tar"


def test_describe_plan_estimates_disk_and_time(reference):
    desc = describe_plan(make_plan(N, SHARD, SEED), FACTORY(), batch_size=4, num_workers=2)
    assert (desc["n_shards"], desc["n_samples"], desc["probe_samples"]) == (5, N, 4)
    actual = load_manifest(reference)["total_bytes"]
    assert 0.5 * actual < desc["est_bytes"] < 2 * actual
    assert desc["est_seconds"] > 0 and desc["extensions"] == ["json", "mask.png", "png"]
    assert "5 shards" in format_plan(desc)


def test_grid_callback_logs_images(reference, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from cgn_dist.sharding.progress import grid_callback
    writer = SummaryWriter(str(tmp_path / "tb"))
    hook = grid_callback(writer, every=2, max_images=4)
    for sid in range(4):
        hook({"path": str(reference / f"shard-{sid:06d}.tar"), "durations_s": {"total": 0.1}})
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Images("generate/samples")
    assert [e.step for e in events] == [1, 2, 4]
    assert (events[0].width, events[0].height) == (2 + 4 * (8 + 2), 2 + 8 + 2)


def test_a_second_run_into_a_busy_folder_stops(tmp_path):
    import fcntl

    from cgn_dist.sharding.backends import LOCK_NAME
    with open(tmp_path / LOCK_NAME, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # as a first run holds it
        with pytest.raises(GenerationError, match="another generation run"):
            generate_dataset(FACTORY, tmp_path, N, SHARD, SEED, progress=False)
    assert not list(tmp_path.glob("shard-*"))
