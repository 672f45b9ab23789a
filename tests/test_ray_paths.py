"""Paths made absolute in the driver before a Ray launch (workers run in a Ray session folder)."""
import os

from cgn_dist.config import load_config
from cgn_dist.distributed.paths import absolute_config, is_uri


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
