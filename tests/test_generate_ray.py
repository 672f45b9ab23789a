"""The Ray backend on real Ray: an embedded loopback cluster, and two simulated nodes on 127.0.0.1.

Same bytes as the local backend, and a worker dying mid-shard costs only a retry. Every Ray call has a
timeout; the cluster is one per module and is shut down at the end.
"""
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cgn_dist.data.shard_index import shard_urls
from cgn_dist.sharding.run import generate_dataset
from cgn_dist.sharding.plan import make_plan
from cgn_dist.sharding.manifest import verify_output
from cgn_dist.sharding.toy import ToySamplerFactory

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
N, SHARD, SEED = 14, 4, 99  # 4 shards, the last one of 2 samples
FACTORY = ToySamplerFactory(image_size=8)


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def assert_same_dataset(out: Path, ref: Path) -> None:
    import webdataset as wds
    assert tars(out) == tars(ref)
    keys = [s["__key__"] for s in wds.WebDataset(shard_urls(out / "index.json"), shardshuffle=False)]
    assert keys == [f"{s.shard_id:06d}_{i:06d}" for s in make_plan(N, SHARD, SEED) for i in range(s.n)]
    assert not list(out.glob(".tmp-*"))
    assert verify_output(out) == []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    generate_dataset(FACTORY, out, N, SHARD, SEED, batch_size=1, progress=False)
    return out


_EMBEDDED = """
import json, os, sys
os.environ["HTTPS_PROXY"] = "http://127.0.0.1:8"  # the caller's own (dead, loopback) proxy setting
import ray
from cgn_dist.distributed.ray_utils import init_ray
from cgn_dist.sharding.run import generate_dataset
from cgn_dist.sharding.toy import ToySamplerFactory

init_ray(num_cpus=2)
nodes = [n["NodeManagerAddress"] for n in ray.nodes()]

@ray.remote(num_cpus=0.1)
def worker_env():
    return os.environ.get("HTTPS_PROXY")

result = dict(nodes=nodes, worker_proxy=ray.get(worker_env.remote(), timeout=120),
              driver_proxy=os.environ.get("HTTPS_PROXY"))
generate_dataset(ToySamplerFactory(image_size=8), sys.argv[1], {n}, {shard}, {seed}, batch_size=3,
                 backend="ray", num_workers=1, progress=False, shard_timeout_s=120)
ray.shutdown()
print("RESULT", json.dumps(result))
""".format(n=N, shard=SHARD, seed=SEED)


def test_embedded_loopback_ray_matches_local(reference, tmp_path):
    # A fresh process: the embedded cluster is started by init_ray itself, beside the module's cluster.
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _EMBEDDED, str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert set(result["nodes"]) == {"127.0.0.1"}
    # Ray's daemons ran behind the dead proxy; the workers and the driver keep the caller's setting.
    assert result["worker_proxy"] == result["driver_proxy"] == "http://127.0.0.1:8"
    assert_same_dataset(out, reference)


@pytest.fixture(scope="module")
def two_nodes():
    from cgn_dist.distributed.ray_utils import LoopbackCluster, patched_environ
    # The workers unpickle factories defined in this file: they need its folder on their path.
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    with patched_environ({"PYTHONPATH": path}):
        cluster = LoopbackCluster(num_nodes=2, cpus_per_node=1).start()
    try:
        cluster.connect()
        yield cluster
    finally:
        cluster.shutdown()


@dataclasses.dataclass(frozen=True)
class _BarrierFactory:
    """The toy sampler, whose first batch in each worker waits until ``n`` workers have begun one: a worker
    that took a shard then holds it until the other has one too, so each node writes however fast the toy
    shards are (a barrier at build time was not enough: one worker wrote all four shards in the ~50 ms before
    the other reported ready)."""

    barrier_dir: str
    n: int

    def __call__(self):
        return _BarrierSampler(FACTORY(), self.barrier_dir, self.n)


class _BarrierSampler:
    def __init__(self, inner, barrier_dir: str, n: int):
        self.inner, self.barrier_dir, self.n, self.waited = inner, barrier_dir, n, False

    def info(self):
        return self.inner.info()

    def sample(self, refs):
        if not self.waited:
            self.waited = True
            Path(self.barrier_dir, str(os.getpid())).touch()
            deadline = time.monotonic() + 100
            while len(list(Path(self.barrier_dir).iterdir())) < self.n and time.monotonic() < deadline:
                time.sleep(0.05)
        return self.inner.sample(refs)


def test_two_ray_nodes_give_the_local_bytes(reference, two_nodes, tmp_path):
    import ray
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    (tmp_path / "barrier").mkdir()
    done = []
    generate_dataset(_BarrierFactory(str(tmp_path / "barrier"), 2), tmp_path / "out", N, SHARD, SEED,
                     batch_size=3, backend="ray", num_workers=2, progress=False, on_shard_done=done.append,
                     shard_timeout_s=120)
    assert sorted(s["shard_id"] for s in done) == [0, 1, 2, 3]
    assert len({s["ray_node_id"] for s in done}) == 2, "both nodes should have written shards"
    assert_same_dataset(tmp_path / "out", reference)
    assert ray.is_initialized()  # run_shards leaves a connection it did not make


def test_ray_worker_killed_mid_shard_is_retried(reference, two_nodes, tmp_path):
    marker = tmp_path / "crashed"
    out = tmp_path / "out"
    factory = ToySamplerFactory(image_size=8, crash_on_key="000003_000001", crash_marker=str(marker))
    done = []
    generate_dataset(factory, out, N, SHARD, SEED, batch_size=1, backend="ray", num_workers=2,
                     progress=False, on_shard_done=done.append, shard_timeout_s=120, max_retries=2)
    assert marker.exists(), "the worker never crashed: the test did not test the retry"
    assert json.loads((out / "shard-000003_stats.json").read_text())["attempt"] == 2
    assert sorted(s["shard_id"] for s in done) == [0, 1, 2, 3]
    assert_same_dataset(out, reference)


class _BrokenFactory:
    def __call__(self):
        raise RuntimeError("checkpoint not found")


def test_ray_workers_that_cannot_start_fail_the_run_clearly(two_nodes, tmp_path):
    from cgn_dist.sharding.writer import GenerationError
    from cgn_dist.sharding.backends import run_shards
    with pytest.raises(GenerationError, match="checkpoint not found"):
        run_shards(_BrokenFactory(), make_plan(4, 2, 0), tmp_path, backend="ray", num_workers=2, max_retries=1,
                   progress=False, shard_timeout_s=60)


@dataclasses.dataclass(frozen=True)
class _OddBarrierFactory:
    """Two toy workers held at their first batch until both have begun one; the first one built reports
    another provenance (as a worker whose torch.compile failed would)."""

    barrier_dir: str
    odd_marker: str

    def __call__(self):
        return _BarrierSampler(ToySamplerFactory(image_size=8, odd_info_marker=self.odd_marker)(),
                               self.barrier_dir, 2)


def test_a_ray_worker_with_another_sampler_stops_the_run_at_start(two_nodes, tmp_path):
    from cgn_dist.sharding.writer import GenerationError
    (tmp_path / "barrier").mkdir()
    factory = _OddBarrierFactory(str(tmp_path / "barrier"), str(tmp_path / "odd"))
    t0 = time.monotonic()
    with pytest.raises(GenerationError, match=r"the sampler of the Ray worker on node \w+ \(pid \d+\) differs "
                                              r"from that of the Ray worker .*\(forward: .*compile failed"):
        generate_dataset(factory, tmp_path / "out", N, SHARD, SEED, batch_size=3, backend="ray", num_workers=2,
                         progress=False, shard_timeout_s=120)
    assert (tmp_path / "odd").exists()
    assert not list((tmp_path / "out").glob("shard-*_stats.json"))  # caught before any shard was committed
    assert time.monotonic() - t0 < 100  # not after the barrier's time-out


def test_each_actor_has_its_next_shard_queued_and_the_bytes_stay(reference, two_nodes, tmp_path):
    """One actor, four shards: when it returns shard 0, shard 1 is already queued at it (it starts at once,
    no round trip to the driver); the shard's time limit counts from then; the bytes are the local ones."""
    from cgn_dist.sharding.ray_backend import RayShardRun

    out = tmp_path / "out"
    out.mkdir()
    todo = make_plan(N, SHARD, SEED)
    run = RayShardRun(FACTORY, todo, out, batch_size=3, num_workers=1, max_retries=0, shard_timeout_s=120,
                      worker_resources={"num_cpus": 0.5}, seen=[])
    results = run.results()
    try:
        first = next(results)
        assert first["shard_id"] == 0
        queued = [spec.shard_id for _, spec, _ in run.inflight.values()]
        assert queued == [1], queued  # handed out before shard 0 came back
        (_, spec, started), = run.running().values()
        assert spec.shard_id == 1 and started >= run.last_done[next(iter(run.last_done))] - 1e-6
        rest = list(results)
    finally:
        run.close()
    from cgn_dist.sharding.manifest import build_manifest, build_plan_doc, write_outputs
    from cgn_dist.sharding.sampler import describe_factory

    stats = sorted([first, *rest], key=lambda s: s["shard_id"])
    assert [s["shard_id"] for s in stats] == [0, 1, 2, 3]
    write_outputs(out, build_manifest(todo, stats, build_plan_doc(SEED, SHARD, describe_factory(FACTORY)), 3))
    assert_same_dataset(out, reference)
