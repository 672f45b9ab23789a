"""Generation straight into a bucket on a real S3 endpoint (moto server on 127.0.0.1): the same bytes as a
local run, exactly once through a SIGKILL, racing writers leave one copy, and a wrong bucket or missing
credentials end in one line that names what to set."""
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cgn_dist.sharding.run import generate_dataset
from cgn_dist.sharding.plan import make_plan
from cgn_dist.sharding.toy import ToySamplerFactory
from cgn_dist.sharding.writer import verify_shard, write_shard
from cgn_dist.storage import Store, StorageError

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import clear_fsspec_cache, list_keys, make_bucket, s3_env, s3_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N, SHARD, SEED = 22, 5, 1234  # 5 shards, the last one of 2 samples
FACTORY = ToySamplerFactory(image_size=8)


@pytest.fixture(scope="module")
def endpoint():
    with s3_server() as url:
        yield url


@pytest.fixture()
def s3(endpoint, monkeypatch):
    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    clear_fsspec_cache()
    yield endpoint
    clear_fsspec_cache()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    generate_dataset(FACTORY, out, N, SHARD, SEED, batch_size=2, progress=False)
    return out


def _local_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _assert_same_as_local(remote: dict[str, bytes], local: Path, same_factory: bool = True) -> None:
    ref = _local_files(local)
    tars = sorted(k for k in ref if k.endswith(".tar"))
    assert sorted(k for k in remote if k.endswith(".tar")) == tars  # no missing or extra shard
    for k in tars:
        assert remote[k] == ref[k], k
    assert remote["index.json"] == ref["index.json"]
    if same_factory:  # plan.json names the factory's arguments (a slowed-down toy differs there alone)
        assert remote["plan.json"] == ref["plan.json"]
    m_remote, m_local = json.loads(remote["manifest.json"]), json.loads(ref["manifest.json"])
    assert m_remote["shards"] == m_local["shards"] and m_remote["plan"] == m_local["plan"]
    assert not [k for k in remote if k.startswith(".")], "a probe or temporary object was left behind"


@pytest.mark.parametrize("workers", [1, 2])
def test_generation_into_a_bucket_gives_the_local_bytes(s3, local_reference, workers):
    bucket = make_bucket(s3)
    url = f"s3://{bucket}/cf/run1"
    manifest = generate_dataset(FACTORY, url, N, SHARD, SEED, batch_size=2, num_workers=workers, progress=False)
    assert manifest["n_samples"] == N
    _assert_same_as_local(list_keys(s3, bucket, "cf/run1"), local_reference)
    # A rerun finds every shard committed by its marker and rewrites none.
    done = []
    generate_dataset(FACTORY, url, N, SHARD, SEED, batch_size=2, progress=False, on_shard_done=done.append,
                     verify="size")
    assert done == []


_KILLED_RUN = """
import sys
from cgn_dist.sharding.run import generate_dataset
from cgn_dist.sharding.toy import ToySamplerFactory
generate_dataset(ToySamplerFactory(image_size=8, sleep_s=0.05), sys.argv[1], {n}, {shard}, {seed},
                 batch_size=2, progress=False)
""".format(n=N, shard=SHARD, seed=SEED)


def test_killed_mid_run_then_rerun_is_exactly_once(s3, local_reference):
    bucket = make_bucket(s3)
    url = f"s3://{bucket}/killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, url], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while "shard-000001_stats.json" not in list_keys(s3, bucket, "killed"):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never committed shard 1"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = list_keys(s3, bucket, "killed")
    assert "manifest.json" not in before and "shard-000004_stats.json" not in before, "finished before the kill"
    done = []
    generate_dataset(ToySamplerFactory(image_size=8, sleep_s=0.05), url, N, SHARD, SEED, batch_size=2,
                     progress=False, on_shard_done=done.append)
    redone = sorted(d["shard_id"] for d in done)
    committed_before = sorted(int(k[6:12]) for k in before if k.endswith("_stats.json"))
    assert set(redone).isdisjoint(committed_before) and len(redone) + len(committed_before) == 5
    _assert_same_as_local(list_keys(s3, bucket, "killed"), local_reference, same_factory=False)


def test_two_writers_racing_on_one_shard_leave_one_committed_copy(s3, local_reference):
    bucket = make_bucket(s3)
    url = f"s3://{bucket}/race"
    spec = make_plan(N, SHARD, SEED)[1]
    errors = []

    def write():
        try:
            write_shard(FACTORY(), spec, url, batch_size=2)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    keys = list_keys(s3, bucket, "race")
    assert sorted(keys) == ["shard-000001.tar", "shard-000001_stats.json"]
    assert keys["shard-000001.tar"] == (local_reference / "shard-000001.tar").read_bytes()
    assert verify_shard(url, spec).ok


def test_an_upload_that_never_completed_is_not_a_shard(s3, local_reference):
    # A tar object without its marker (the writer died between the two uploads) is redone, not trusted.
    bucket = make_bucket(s3)
    url = f"s3://{bucket}/half"
    spec = make_plan(N, SHARD, SEED)[0]
    Store(url).write_bytes("shard-000000.tar", b"half of a tar")
    assert verify_shard(url, spec).status == "uncommitted"
    generate_dataset(FACTORY, url, N, SHARD, SEED, batch_size=2, progress=False)
    _assert_same_as_local(list_keys(s3, bucket, "half"), local_reference)


def test_objects_committed_by_another_process_after_a_listing_are_seen(s3):
    # The driver lists a folder, a worker (another process: here boto3, not this fsspec instance) then commits
    # a shard there: every read path must see it, not answer from the listing taken before.
    import boto3

    from cgn_dist.storage import open_read

    bucket = make_bucket(s3)
    store = Store(f"s3://{bucket}/cf")
    store.write_bytes("plan.json", b"{}")
    assert store.list() == ["plan.json"] and not store.exists("shard-000000.tar")
    boto3.client("s3", endpoint_url=s3, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").put_object(Bucket=bucket, Key="cf/shard-000000.tar", Body=b"x" * 10)
    assert store.exists("shard-000000.tar") and store.size("shard-000000.tar") == 10
    assert store.read_bytes("shard-000000.tar") == b"x" * 10
    with open_read(store.path("shard-000000.tar")) as f:
        assert f.read() == b"x" * 10


def test_a_wrong_bucket_says_what_to_check(s3):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-here/x: .*AWS_ENDPOINT_URL.*bucket exists"):
        generate_dataset(FACTORY, "s3://no-such-bucket-here/x", N, SHARD, SEED, progress=False)


def test_missing_credentials_say_which_keys_to_set(s3, monkeypatch, tmp_path):
    bucket = make_bucket(s3)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe: loopback only
    clear_fsspec_cache()
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        generate_dataset(FACTORY, f"s3://{bucket}/x", N, SHARD, SEED, progress=False)


def test_the_reader_streams_from_the_bucket_every_sample_once_per_epoch(s3, local_reference):
    from cgn_dist.data.stream import CF_LABELS, load_shard_set, make_loader

    bucket = make_bucket(s3)
    url = f"s3://{bucket}/stream"
    generate_dataset(FACTORY, url, N, SHARD, SEED, batch_size=2, progress=False)
    remote_set = load_shard_set(url)
    assert remote_set.urls[0] == f"{url}/shard-000000.tar" and remote_set.counts == load_shard_set(local_reference).counts

    def epoch(source, rank, world, workers):
        kw = dict(train=False, rank=rank, world_size=world, num_workers=workers, labels=CF_LABELS,
                  image_size=8, resize=8)
        return [(k, tuple(int(b[c][i]) for c in CF_LABELS)) for b in make_loader(source, 3, **kw)
                for i, k in enumerate(b["__key__"])]

    local = epoch(local_reference, 0, 1, 0)
    assert epoch(url, 0, 1, 0) == local  # same samples, same order, same labels
    split = epoch(url, 0, 2, 2) + epoch(url, 1, 2, 2)  # 2 ranks x 2 loader workers, each its own slice
    assert sorted(split) == sorted(local) and len(split) == N


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_on_two_nodes_writes_the_local_bytes_into_the_bucket(endpoint, monkeypatch, local_reference):
    from ray_helpers import two_node_cluster

    # The nodes start before the credentials are set: the workers get them with the job, as on a cluster
    # whose nodes were started without them.
    with two_node_cluster():
        for k, v in s3_env(endpoint).items():
            monkeypatch.setenv(k, v)
        clear_fsspec_cache()
        bucket = make_bucket(endpoint)
        url = f"s3://{bucket}/ray"
        generate_dataset(FACTORY, url, N, SHARD, SEED, batch_size=2, backend="ray", num_workers=2,
                         worker_resources={"num_cpus": 1}, progress=False)
    _assert_same_as_local(list_keys(endpoint, bucket, "ray"), local_reference)


def test_cli_generate_into_a_bucket_writes_the_run_there(s3, tmp_path):
    from cgn_dist.cli import main

    bucket = make_bucket(s3)
    args = ["generate", "configs/debug/generate_tiny.yaml", "generate.n_samples=8", "generate.shard_size=4",
            "generate.grid_every=1", "train.progress=false"]
    assert main([*args, f"out_dir={tmp_path}"]) == 0
    assert main([*args, f"out_dir=s3://{bucket}/runs"]) == 0
    remote = list_keys(s3, bucket, "runs/gen_tiny")
    local = tmp_path / "gen_tiny"
    for name in ("shard-000000.tar", "shard-000001.tar", "index.json", "plan.json"):
        assert remote[name] == (local / name).read_bytes(), name
    assert "config.yaml" in remote and b"generate" in remote["log.txt"]
    assert any(k.startswith("tb/events.out.tfevents") for k in remote)  # the image sheets' event file


def test_make_shards_into_a_bucket_gives_the_local_shards(s3, tmp_path):
    from imagenet_fixture import make_imagenet_tree

    from cgn_dist.config import load_config
    from cgn_dist.ingest.make_shards import run_make_shards

    tree = make_imagenet_tree(tmp_path / "ILSVRC2012")
    bucket = make_bucket(s3)

    def cfg(out):
        return load_config(None, [f"shards.root={tree.train}", f"shards.out={out}", "shards.shard_size=5",
                                  "shards.batch_size=2", "train.progress=false", "seed=7"])

    local = tmp_path / "local"
    a = run_make_shards(cfg(local))
    b = run_make_shards(cfg(f"s3://{bucket}/train"))
    assert (a["written"], a["rejected"]) == (b["written"], b["rejected"]) and a["written"] > 0
    remote = list_keys(s3, bucket, "train")
    for p in sorted(local.iterdir()):
        if p.name.endswith(".tar") or p.name in ("index.json", "sources.tsv", "sources.json"):
            assert remote[p.name] == p.read_bytes(), p.name
    assert b["index"] == f"s3://{bucket}/train/index.json"


def test_mnist_training_in_a_bucket_killed_then_resumed_elsewhere_equals_uninterrupted(s3, tmp_path, monkeypatch):
    import io

    import torch

    from cgn_dist.cli import main

    bucket = make_bucket(s3)
    tiny = ["configs/debug/mnist_tiny.yaml", "train.max_steps=8", "train.checkpoint_every=2", "name=m"]
    assert main(["train", *tiny, f"out_dir={tmp_path / 'local'}"]) == 0
    url = f"s3://{bucket}/runs"
    monkeypatch.setenv("CGN_DIST_STAGING", str(tmp_path / "machine_a"))
    proc = subprocess.Popen([sys.executable, "-m", "cgn_dist.cli", "train", *tiny, f"out_dir={url}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while "checkpoints/step_0000002/meta.json" not in list_keys(s3, bucket, "runs/m"):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never committed a checkpoint to the bucket"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert "checkpoints/step_0000008/meta.json" not in list_keys(s3, bucket, "runs/m"), "finished before the kill"

    # Another machine (an empty staging folder) resumes from the bucket alone.
    monkeypatch.setenv("CGN_DIST_STAGING", str(tmp_path / "machine_b"))
    assert main(["train", *tiny, f"out_dir={url}"]) == 0
    keys = list_keys(s3, bucket, "runs/m")
    assert "resumed from" in keys["log.txt"].decode() and "summary.json" in keys
    steps = sorted({k.split("/")[1] for k in keys if k.startswith("checkpoints/")})
    assert steps[-1] == "step_0000008" and len(steps) <= 3  # keep_last pruned the bucket too
    local = tmp_path / "local" / "m" / "checkpoints" / "step_0000008"
    for name in ("generator", "discriminator"):
        a = torch.load(local / f"{name}.pt", weights_only=True)
        b = torch.load(io.BytesIO(keys[f"checkpoints/step_0000008/{name}.pt"]), weights_only=True)
        for k in a["module"]:
            assert torch.equal(a["module"][k], b["module"][k]), (name, k)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_train_with_its_storage_in_a_bucket(s3, tmp_path):
    from cgn_dist.config import load_config
    from cgn_dist.launchers.ray_train import train_with_ray
    from cgn_dist.distributed.ray_utils import shutdown_ray

    bucket = make_bucket(s3)
    cfg = load_config("configs/debug/mnist_tiny.yaml", [
        f"out_dir={tmp_path}", "name=rt", "distributed.num_workers=2", "distributed.cpus_per_worker=0.5",
        "train.max_steps=4", "train.checkpoint_every=2", f"ray.storage_path=s3://{bucket}/ray", "ray.num_cpus=2"])
    try:
        out = train_with_ray(cfg)
        assert out["step"] == 4
        pointers = [k for k in list_keys(s3, bucket, "ray/rt") if k.endswith("/checkpoint.json")]
        assert pointers, "Ray Train stored no checkpoint in the bucket"
        again = train_with_ray(cfg)  # a rerun of a finished run: it ends at once at the same step
        assert again["step"] == 4
    finally:
        shutdown_ray()


def test_regenerate_a_sample_of_a_run_in_a_bucket(s3, tmp_path):
    from cgn_dist.generate.command import run_regenerate

    bucket = make_bucket(s3)
    url = f"s3://{bucket}/regen"
    generate_dataset(FACTORY, url, N, SHARD, SEED, batch_size=2, progress=False)
    out = run_regenerate(url, "000003_000001", out=tmp_path / "one.png")
    assert out["identical"] and (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"


def test_pool_workers_see_the_storage_settings_of_now(s3, local_reference, monkeypatch, tmp_path):
    # The pool's forkserver may have started before the endpoint was set (an earlier run in this process):
    # its workers must still write to this endpoint.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    generate_dataset(FACTORY, tmp_path / "warm", N, SHARD, SEED, batch_size=2, num_workers=2, progress=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    clear_fsspec_cache()
    bucket = make_bucket(s3)
    generate_dataset(FACTORY, f"s3://{bucket}/late", N, SHARD, SEED, batch_size=2, num_workers=2, progress=False)
    _assert_same_as_local(list_keys(s3, bucket, "late"), local_reference)
