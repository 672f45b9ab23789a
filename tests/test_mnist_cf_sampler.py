"""Counterfactual MNIST sampler: byte-identical shards, the sample schema, checkpoint loading."""
import collections
import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cgn_dist.data.pixels import decode_uint8, encode_uint8
from cgn_dist.data.shards import read_tar_samples, sha256_file
from cgn_dist.generate.mnist import (GeneratorCheckpointError, MnistCounterfactualFactory, checkpoint_sha256,
                                     load_mnist_generator, resolve_generator_file)
from cgn_dist.sharding.plan import make_plan, sample_refs
from cgn_dist.sharding.regenerate import regenerate_sample
from cgn_dist.sharding.run import generate_dataset
from cgn_dist.sharding.sampler import build_factory, describe_factory
from cgn_dist.models.cgn_mnist import CGNMnist


@pytest.fixture(scope="module")
def colored_ckp(shared_ref):
    return str(shared_ref / "original_mnist_checkpoints" / "cgn_colored_MNIST.pth")


def _tars(folder):
    return {p.name: sha256_file(p) for p in sorted(folder.glob("shard-*.tar"))}


def test_shards_identical_whatever_batch_size_and_workers(tmp_path, colored_ckp):
    # group = 10 labels x 3 redraws = 30 images; shard 45 cuts a group, the last shard is partial
    factory = MnistCounterfactualFactory(colored_ckp, no_cfs=3, group_size=10)
    a = generate_dataset(factory, tmp_path / "a", n_samples=100, shard_size=45, run_seed=7, batch_size=7,
                         progress=False)
    b = generate_dataset(factory, tmp_path / "b", n_samples=100, shard_size=45, run_seed=7, batch_size=64,
                         num_workers=2, progress=False)
    hashes = _tars(tmp_path / "a")
    assert len(hashes) == 3
    assert hashes == _tars(tmp_path / "b")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    # another seed: other samples
    generate_dataset(factory, tmp_path / "c", n_samples=100, shard_size=45, run_seed=8, batch_size=7,
                     progress=False)
    assert set(_tars(tmp_path / "c").values()).isdisjoint(hashes.values())
    # one sample recomputed alone from the manifest (factory rebuilt from it) gives the stored bytes
    stored = {s["__key__"]: s for s in read_tar_samples(tmp_path / "a" / "shard-000001.tar")}
    again = regenerate_sample(tmp_path / "a", "000001_000033", whole_batch=False)
    assert again["png"] == stored["000001_000033"]["png"]
    assert again["json"] == stored["000001_000033"]["json"]


def test_sample_schema_and_group_semantics(colored_ckp):
    factory = MnistCounterfactualFactory(colored_ckp, no_cfs=2, group_size=20)
    sampler = factory()
    spec = make_plan(80, 80, run_seed=3)[0]  # two groups of 40
    samples = sampler.sample(sample_refs(spec))
    sha = checkpoint_sha256(colored_ckp)
    metas = []
    for s in samples:
        assert set(s) == {"png", "json"}
        meta = s["json"]
        assert set(meta) == {"label", "shape_cls", "texture_cls", "bg_cls", "seed", "group", "cf_round", "slot",
                             "mask_mean", "checkpoint_sha256"}
        for k in ("label", "shape_cls", "texture_cls", "bg_cls", "seed", "group", "cf_round", "slot"):
            assert isinstance(meta[k], int) and not isinstance(meta[k], bool)
        assert meta["label"] == meta["shape_cls"]
        assert 0 <= min(meta["shape_cls"], meta["texture_cls"], meta["bg_cls"]) <= 9
        assert 1e-4 <= meta["mask_mean"] <= 0.9999
        assert meta["checkpoint_sha256"] == sha
        json.dumps(meta, allow_nan=False)
        metas.append(meta)
        img = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    # index i -> group i // 40, round (i % 40) // 20, slot i % 20
    assert [m["group"] for m in metas] == [i // 40 for i in range(80)]
    assert [m["cf_round"] for m in metas] == [(i % 40) // 20 for i in range(80)]
    assert [m["slot"] for m in metas] == [i % 20 for i in range(80)]
    by_round = collections.defaultdict(list)
    for m in metas:
        by_round[(m["group"], m["cf_round"])].append(m)
    for (g, r), ms in by_round.items():
        shapes = sorted(m["shape_cls"] for m in ms)
        # texture and background classes are permutations of the shape classes within the group
        assert sorted(m["texture_cls"] for m in ms) == shapes
        assert sorted(m["bg_cls"] for m in ms) == shapes
        assert len({m["seed"] for m in ms}) == 1
        # the mask is fixed per slot: same shape class and mask mean in every round
        other = by_round[(g, 1 - r)]
        assert [m["shape_cls"] for m in ms] == [m["shape_cls"] for m in other]
        assert [m["mask_mean"] for m in ms] == [m["mask_mean"] for m in other]
    assert metas[0]["seed"] != metas[40]["seed"]
    # redraws give different images of the same mask
    assert samples[0]["png"] != samples[20]["png"]
    assert sampler.info()["checkpoint_sha256"] == sha


def test_factory_pickles_and_rebuilds_from_description(colored_ckp):
    factory = MnistCounterfactualFactory(colored_ckp, no_cfs=4)
    assert pickle.loads(pickle.dumps(factory)) == factory
    assert build_factory(json.loads(json.dumps(describe_factory(factory)))) == factory
    assert factory.group_len == 400
    with pytest.raises(ValueError):
        MnistCounterfactualFactory(colored_ckp, no_cfs=0)


def test_uint8_mapping_is_fixed_and_invertible():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, -3.0]).view(1, 1, 7).expand(3, 1, 7)
    u8 = encode_uint8(x)
    assert u8.shape == (1, 7, 3) and u8.dtype == torch.uint8
    assert u8[0, :, 0].tolist() == [0, 64, 128, 191, 255, 255, 0]  # round((x+1)*127.5), half to even
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)
    assert torch.equal(encode_uint8(decode_uint8(levels)).movedim(-1, 0), levels)
    y = torch.rand(3, 8, 8) * 2 - 1
    assert (decode_uint8(encode_uint8(y).movedim(-1, 0)) - y).abs().max() <= 1 / 255 + 1e-6


def test_load_generator_from_every_kind_of_path(tmp_path, colored_ckp):
    from cgn_dist.config import TrainConfig
    from cgn_dist.distributed.engine import build_engine
    from cgn_dist.distributed.env import read_env
    from cgn_dist.train.checkpoint import save_checkpoint

    authors = load_mnist_generator(colored_ckp)
    assert isinstance(authors, CGNMnist) and not authors.training
    assert not any(p.requires_grad for p in authors.parameters())

    # a training run's checkpoint, written by the training loop's own machinery
    gen = CGNMnist(latent_dim=8, ngf=8, init_type=None)
    env = read_env("cpu")
    engine = build_engine(gen, torch.optim.Adam(gen.parameters()), TrainConfig(), env)
    run = tmp_path / "runs" / "tiny"
    for step in (5, 10):
        with torch.no_grad():
            gen.label_emb.weight.fill_(float(step))
        step_dir = save_checkpoint(run, step, {"generator": engine}, rank=0)
    for path in (run, step_dir, step_dir / "generator.pt"):
        loaded = load_mnist_generator(path)
        assert loaded.latent_dim == 8 and loaded.ngf == 8
        assert torch.equal(loaded.label_emb.weight, gen.label_emb.weight)  # the latest checkpoint
    assert resolve_generator_file(run) == step_dir / "generator.pt"
    assert checkpoint_sha256(run) == sha256_file(step_dir / "generator.pt")

    with pytest.raises(FileNotFoundError):
        load_mnist_generator(tmp_path / "nope.pth")
    empty_run = tmp_path / "runs" / "empty"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no completed checkpoint"):
        load_mnist_generator(empty_run)
    with pytest.raises(GeneratorCheckpointError, match="neither a run directory"):
        load_mnist_generator(tmp_path)
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(GeneratorCheckpointError, match="neither a cgn_dist generator checkpoint"):
        load_mnist_generator(other)
    not_torch = tmp_path / "junk.pth"
    not_torch.write_bytes(b"not a checkpoint")
    with pytest.raises(GeneratorCheckpointError):
        load_mnist_generator(not_torch)
