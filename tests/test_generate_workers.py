"""Per-worker devices and provenance: each local worker on its own GPU, "auto" resolved in the worker, and a
worker whose sampler differs caught when it starts (real worker processes and real shards)."""
import io
import json
import os
import tarfile
from dataclasses import dataclass

import pytest
import torch

from cgn_dist.sharding.writer import GenerationError
from cgn_dist.sharding.plan import make_plan
from cgn_dist.sharding.pool import run_process_pool
from cgn_dist.sharding.run import generate_dataset
from cgn_dist.sharding.toy import ToySamplerFactory
from cgn_dist.sharding.workers import assign_devices, auto_worker_count, check_same_provenance, resolve_device


def test_assign_devices_round_robin_over_the_visible_gpus():
    assert assign_devices(4, 4) == ["0", "1", "2", "3"]  # not all on GPU 0
    assert assign_devices(5, 2) == ["0", "1", "0", "1", "0"]  # more workers than GPUs: shared evenly
    assert assign_devices(3, 0) == [None, None, None]  # CPU machine: environment left alone
    assert assign_devices(3, 2, env="6, 7") == ["6", "7", "6"]  # a run given GPUs 6,7 stays on them
    with pytest.raises(ValueError, match="n_workers >= 1"):
        assign_devices(0, 2)


def test_resolve_device_answers_for_the_process_it_runs_in():
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    with pytest.raises(ValueError, match="generate.device=cuda but this worker has no GPU"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(ValueError, match="generate.device must be one of"):
        resolve_device("gpu")


@dataclass(frozen=True)
class _EnvFactory:
    """A sampler whose samples record what CUDA shows the worker that made them."""

    def __call__(self):
        return _EnvSampler()


class _EnvSampler:
    def __init__(self):
        self.seen = (os.environ.get("CUDA_VISIBLE_DEVICES"), resolve_device("auto"))

    def info(self):
        return {"sampler": "env"}

    def sample(self, refs):
        return [{"json": {"cuda_visible": self.seen[0], "device": self.seen[1], "shape_cls": 0, "texture_cls": 0,
                          "bg_cls": 0}} for _ in refs]


def _metas(path):
    with tarfile.open(path) as tar:
        return [json.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers()
                if m.name.endswith(".json")]


def test_each_pool_worker_gets_its_own_device(tmp_path):
    shards = make_plan(n_samples=16, shard_size=2, run_seed=1)
    stats = list(run_process_pool(_EnvFactory(), shards, tmp_path, 2, 2, 0, devices=["0", "1"]))
    assert len(stats) == 8
    seen = {m["cuda_visible"] for p in tmp_path.glob("shard-*.tar") for m in _metas(p)}
    assert seen == {"0", "1"}  # two workers, two GPUs: neither sees the other's


def test_auto_device_is_resolved_in_the_worker(tmp_path):
    # the driver may have a GPU; a worker pinned to none generates on CPU, so "auto" must reach it unresolved
    shards = make_plan(n_samples=4, shard_size=2, run_seed=1)
    list(run_process_pool(_EnvFactory(), shards, tmp_path, 2, 2, 0, devices=["", ""]))
    assert {m["device"] for p in tmp_path.glob("shard-*.tar") for m in _metas(p)} == {"cpu"}


def test_mnist_factory_leaves_auto_to_the_worker(repo_root, shared_ref, monkeypatch):
    from cgn_dist.config import load_config
    from cgn_dist.generate.command import mnist_factory

    monkeypatch.chdir(repo_root)
    ckp = shared_ref / "original_mnist_checkpoints" / "cgn_colored_MNIST.pth"
    cfg = load_config("configs/debug/mnist_tiny.yaml", [f"generate.checkpoint={ckp}", "generate.device=auto"])
    factory = mnist_factory(cfg)
    assert factory.device == "auto"  # not the driver's answer
    sampler = factory()
    assert sampler.info()["device"] == resolve_device("auto")


def test_provenance_check_names_the_differing_keys():
    seen = []
    check_same_provenance(seen, "worker 0", {"sampler": "x", "forward": "compiled"})
    check_same_provenance(seen, "worker 1", {"sampler": "x", "forward": "compiled"})
    with pytest.raises(GenerationError, match=r"the sampler of worker 2 differs from that of worker 0 \(forward: "
                                              r"'eager \(compile failed\)' vs 'compiled'\)"):
        check_same_provenance(seen, "worker 2", {"sampler": "x", "forward": "eager (compile failed)"})


def test_a_pool_worker_with_another_sampler_stops_the_run_at_start(tmp_path):
    marker = tmp_path / "odd"
    # slow shards: without the check at start, the run would finish and fail only at the manifest
    factory = ToySamplerFactory(image_size=8, sleep_s=0.05, odd_info_marker=str(marker))
    with pytest.raises(GenerationError, match=r"the sampler of local worker \d differs from that of local worker \d "
                                              r"\(forward: .*compile failed"):
        generate_dataset(factory, tmp_path / "out", 40, 4, 3, batch_size=2, num_workers=2, progress=False)
    assert marker.exists()
    assert len(list((tmp_path / "out").glob("shard-*_stats.json"))) < 10  # stopped early, not at the end


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_pool_worker_pinned_to_its_gpu_sees_only_it(tmp_path):
    n = torch.cuda.device_count()
    shards = make_plan(n_samples=4, shard_size=2, run_seed=1)
    list(run_process_pool(_EnvFactory(), shards, tmp_path, 2, 2, 0))  # this machine's own plan
    seen = {m["cuda_visible"] for p in tmp_path.glob("shard-*.tar") for m in _metas(p)}
    assert seen <= {str(i) for i in range(n)} and {m["device"] for p in tmp_path.glob("shard-*.tar")
                                                     for m in _metas(p)} == {"cuda"}


class _KindFactory:
    """A sampler whose provenance depends on the machine it is built on (as generate.precision=auto's does),
    not on the factory's description: ``kind`` stands for the machine."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self):
        return _KindSampler(self.kind)


class _KindSampler(_EnvSampler):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def info(self):
        return {"sampler": "kind", "kind": self.kind}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_rerun_whose_sampler_differs_from_the_committed_shards_stops_before_writing(tmp_path, workers):
    kw = dict(n_samples=8, shard_size=2, run_seed=1, progress=False, num_workers=workers)
    generate_dataset(_KindFactory("a"), tmp_path, **kw)
    for p in tmp_path.glob("shard-00000[23]*"):
        p.unlink()
    with pytest.raises(GenerationError, match=r"differs from that of the committed shard 0 \(kind: 'b' vs 'a'\)"):
        generate_dataset(_KindFactory("b"), tmp_path, **kw)
    assert not list(tmp_path.glob("shard-00000[23]*"))  # nothing of the other sampler was written


def test_auto_worker_count_fills_the_machine_within_its_memory():
    # GPUs: one worker each, never more than the shards left
    assert auto_worker_count(100, gpus=8)[0] == 8 and auto_worker_count(3, gpus=8)[0] == 3
    # CPUs: cores / threads per worker ...
    n, why = auto_worker_count(100, threads_per_worker=2, worker_gb=1.0, gpus=0, cpus=32, available_gb=512)
    assert n == 16 and "32 cores / 2 thread(s)" in why
    # ... unless the free memory holds fewer models (80 % of 20 GiB at 3.5 GiB each: 4)
    n, why = auto_worker_count(100, worker_gb=3.5, gpus=0, cpus=32, available_gb=20)
    assert n == 4 and "GiB free" in why
    assert auto_worker_count(100, worker_gb=64, gpus=0, cpus=32, available_gb=8)[0] == 1  # always one
    assert auto_worker_count(1, gpus=0, cpus=32, available_gb=512)[0] == 1


def test_num_workers_zero_runs_a_pool_with_the_bytes_of_one_process(tmp_path):
    kw = dict(n_samples=8, shard_size=2, run_seed=1, progress=False)
    generate_dataset(ToySamplerFactory(), tmp_path / "one", num_workers=1, **kw)
    generate_dataset(ToySamplerFactory(), tmp_path / "auto", num_workers=0, **kw)
    one, auto = (sorted(p.read_bytes() for p in (tmp_path / d).glob("shard-*.tar")) for d in ("one", "auto"))
    assert len(one) == 4 and one == auto
