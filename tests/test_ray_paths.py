"""Paths made absolute in the driver before a Ray launch (workers run in a Ray session folder)."""
import os
from pathlib import Path

import pytest

from cgn_dist.config import load_config
from cgn_dist.distributed.paths import absolute_config, is_uri

TINY = Path(__file__).resolve().parents[1] / "configs" / "debug" / "mnist_tiny.yaml"


def test_relative_paths_absolute_uris_and_names_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "G.pth").write_bytes(b"x")
    cfg = load_config(None, ["out_dir=runs", "ray.storage_path=s3://bucket/x", "invariant.cf_shards=cf/train",
                             "eval.val_shards=../val", "imagenet.biggan=biggan-deep-256", "mnist.init_from=G.pth",
                             "eval.model=torchvision:resnet50", "mnist.vgg_weights=random", "shards.out=out"])
    a = absolute_config(cfg)
    here = os.path.realpath(tmp_path)
    # Hand-written expectations: <cwd>/<value> for paths, the value itself for URIs and names.
    assert a.out_dir == f"{here}/runs" and a.shards.out == f"{here}/out"
    assert a.ray.storage_path == "s3://bucket/x"
    assert a.invariant.cf_shards == f"{here}/cf/train"
    assert a.eval.val_shards == f"{os.path.dirname(here)}/val"
    assert a.mnist.init_from == f"{here}/G.pth"  # a bare name that exists here is a file
    assert a.imagenet.biggan == "biggan-deep-256" and a.eval.model == "torchvision:resnet50"
    assert a.mnist.vgg_weights == "random"
    assert cfg.out_dir == "runs"  # the caller's config is not changed


def test_is_uri():
    assert is_uri("s3://b/x") and is_uri("gs://b") and is_uri("file:///tmp/x")
    assert not is_uri("/tmp/x") and not is_uri("runs") and not is_uri("torchvision:resnet50")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_train_from_another_directory_relative_out_dir_and_file_uri_storage(tmp_path, monkeypatch):
    from cgn_dist.launchers.ray_train import train_with_ray

    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(TINY, ["out_dir=runs", "name=rel", f"ray.storage_path=file://{tmp_path}/store",
                             "train.engine=deepspeed", "distributed.num_workers=1", "distributed.cpus_per_worker=0.5",
                             "train.max_steps=2", "train.checkpoint_every=2", "ray.num_cpus=1"])
    out = train_with_ray(cfg)
    assert out["step"] == 2
    assert (work / "runs" / "rel" / "checkpoints").is_dir()  # relative to the driver's cwd, not the worker's
    assert (tmp_path / "store" / "rel").is_dir()  # the URI's own folder
    assert not (work / "file:").exists()  # not resolved as a local path under the cwd


def test_cuda_training_on_ray_workers_without_use_gpu_is_refused_before_ray_starts(tmp_path):
    # Without distributed.use_gpu Ray Train gives its workers no GPU and the loop runs on their CPUs: a run
    # that asked train.device=cuda must stop with the fix, not train quietly on CPUs.
    from cgn_dist.config import ConfigError
    from cgn_dist.launchers.ray_train import check_worker_device, train_with_ray

    base = ["configs/debug/mnist_tiny.yaml"]
    cfg = load_config(base[0], ["distributed.num_workers=2", "train.device=cuda", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"train.device=cuda .*distributed.use_gpu=true"):
        train_with_ray(cfg)
    assert not (tmp_path / "ray").exists()  # nothing started, nothing written
    for ok in (["train.device=cpu"], ["train.device=auto"], ["train.device=cuda", "distributed.use_gpu=true"]):
        check_worker_device(load_config(base[0], ["distributed.num_workers=2", *ok]))
