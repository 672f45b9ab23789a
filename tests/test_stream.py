"""The streaming reader and the real + counterfactual mix on real WebDataset tars (2 ranks x 2 DataLoader
workers, shards of unequal sizes that divide evenly over nothing)."""
from __future__ import annotations

import collections
import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from cgn_dist.data.mix import make_mixed_loader
from cgn_dist.data.shards import encode_jpeg, write_json_atomic, write_tar
from cgn_dist.data.shard_index import build_wids_index
from cgn_dist.data.stream import CF_LABELS, load_shard_set, make_loader, steps_per_epoch
from cgn_dist.data.transforms import ImageTransform, random_resized_crop_box

SIZES = [7, 5, 9, 3, 6]  # 30 samples


def _make_shards(root, sizes, cf=False, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, k = [], 0
    for s, n in enumerate(sizes):
        samples = []
        for i in range(n):
            meta = {"label": k} if not cf else {"shape_cls": k, "texture_cls": k + 1000, "bg_cls": k + 2000}
            img = rng.integers(0, 256, (40 + 3 * i, 52, 3), dtype=np.uint8)
            samples.append((f"{s:06d}_{i:06d}", {"jpg": encode_jpeg(img), "json": meta}))
            k += 1
        name = f"shard-{s:06d}.tar"
        write_tar(root / name, samples)
        entries.append({"url": name, "nsamples": n})
    write_json_atomic(root / "index.json", build_wids_index(entries))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _make_shards(tmp_path_factory.mktemp("real"), SIZES)


def _epoch(shards, train, epoch, world=2, workers=2, batch=3, **kw):
    per_rank, lengths = [], []
    for rank in range(world):
        loader = make_loader(shards, batch, train=train, rank=rank, world_size=world, num_workers=workers,
                             seed=5, epoch=epoch, image_size=16, resize=20, **kw)
        batches = list(loader)
        lengths.append((len(batches), len(loader)))
        for b in batches:
            assert b["image"].shape[1:] == (3, 16, 16) and b["image"].dtype == torch.float32
            assert b["label"].dtype == torch.int64 and len(b["__key__"]) == len(b["label"])
        per_rank.append([x for b in batches for x in b["label"].tolist()])
    return per_rank, lengths


def test_eval_epoch_sees_every_sample_once_on_2_nodes_x_2_workers(shards):
    per_rank, lengths = _epoch(shards, train=False, epoch=0)
    seen = per_rank[0] + per_rank[1]
    assert sorted(seen) == list(range(sum(SIZES)))  # exactly once, nothing else
    assert all(n == length for n, length in lengths)
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 2  # at most one sample per worker apart


def test_train_epoch_exactly_once_same_steps_and_new_order_next_epoch(shards):
    orders = []
    for epoch in (0, 1):
        per_rank, lengths = _epoch(shards, train=True, epoch=epoch)
        steps = sum(SIZES) // (3 * 2)  # 5 full global batches: drop_last keeps 30 of 30
        assert [n for n, _ in lengths] == [steps, steps] and [m for _, m in lengths] == [steps, steps]
        seen = per_rank[0] + per_rank[1]
        assert len(seen) == len(set(seen)) == steps * 3 * 2
        orders.append(per_rank)
    assert orders[0] != orders[1]
    again, _ = _epoch(shards, train=True, epoch=1)  # and the same order when epoch 1 is replayed
    assert again == orders[1]


def test_train_drops_under_one_global_batch_and_a_different_set_each_epoch(shards):
    dropped = []
    for epoch in range(3):
        per_rank, lengths = _epoch(shards, train=True, epoch=epoch, batch=4)
        seen = per_rank[0] + per_rank[1]
        assert len(seen) == len(set(seen)) == (30 // 8) * 8  # 24 read, 6 left over
        dropped.append(frozenset(range(30)) - set(seen))
    assert len(set(dropped)) > 1


def test_crops_follow_the_shard_names_not_where_the_shards_are(tmp_path, shards):
    # a copy of the folder at another path (another mount, a bucket's staging) trains on the same crops and
    # flips; the crop RNG is seeded per sample, so any other draw differs at once
    import shutil

    moved = shutil.copytree(shards, tmp_path / "elsewhere" / "copy")

    def batches(root, seed=5):
        loader = make_loader(root, 3, train=True, num_workers=0, seed=seed, epoch=0, image_size=16, resize=20)
        return [(b["__key__"], b["image"]) for b in loader]

    here, there = batches(shards), batches(moved)
    assert [k for k, _ in here] == [k for k, _ in there]
    for (_, a), (_, b) in zip(here, there):
        assert torch.equal(a, b)
    other = batches(shards, seed=6)  # and the crops do depend on the seed
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(here, other))


def test_steps_per_epoch_formula():
    assert steps_per_epoch(1_281_167, 256, world=8, workers=8) == 1_281_167 // 2048
    # eval: partial batches per worker
    assert steps_per_epoch(10, 4, rank=0, world=1, workers=2, drop_last=False) == 4  # 5 + 5 -> 2 + 2


def test_resampled_stream_is_sized_and_draws_with_replacement(shards):
    loader = make_loader(shards, 4, rank=0, world_size=1, num_workers=0, resampled=True, samples_per_epoch=80,
                         image_size=16, resize=20)
    labels = [x for b in loader for x in b["label"].tolist()]
    assert len(loader) == 20 and len(labels) == 80
    assert max(collections.Counter(labels).values()) > 1


def test_mix_gives_the_asked_ratio_and_resamples_the_cf_stream(tmp_path, shards):
    cf = _make_shards(tmp_path / "cf", [4, 4], cf=True, seed=1)  # 8 cf samples: tiled to fill the epoch
    for ratio, cf_b in ((1.0, 4), (0.5, 2), (0.75, 3)):
        loader = make_mixed_loader(shards, cf, 4, ratio, rank=0, world_size=1, num_workers=2, seed=3,
                                   image_size=16, resize=20)
        pairs = list(loader)
        assert len(pairs) == len(loader) == 30 // 4
        for real_b, cf_batch in pairs:
            assert real_b["image"].shape[0] == 4 and cf_batch["image"].shape[0] == cf_b
            assert set(cf_batch) >= set(CF_LABELS)
            assert (cf_batch["texture_cls"] == cf_batch["shape_cls"] + 1000).all()
        assert loader.counts["real"] == 28 and loader.counts["cf"] == 7 * cf_b
        assert loader.counts["ratio"] == pytest.approx(cf_b / 4)
    zero = make_mixed_loader(shards, cf, 4, 0.0, rank=0, world_size=1, image_size=16, resize=20)
    assert all(c is None for _, c in zero)


def test_val_transform_matches_torchvision_resize_centercrop():
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    data = encode_jpeg(img)
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    ref = v2.Compose([v2.Resize(256), v2.CenterCrop(224), v2.PILToTensor()])(pil)
    ours = ImageTransform(train=False)(data, random.Random(0))
    assert torch.equal(ours, ref)
    tv = ImageTransform(train=False, decoder="torchvision")(data, random.Random(0))
    assert tv.shape == (3, 224, 224) and (tv.float() - ref.float()).abs().mean() < 3.0


def test_random_resized_crop_box_stays_inside_and_in_range():
    rng = random.Random(0)
    areas = []
    for _ in range(500):
        top, left, h, w = random_resized_crop_box(400, 350, rng)
        assert 0 <= top and top + h <= 350 and 0 <= left and left + w <= 400
        areas.append(h * w / (400 * 350))
    assert 0.07 < min(areas) and max(areas) <= 1.0 and 0.4 < np.mean(areas) < 0.7  # uniform(0.08, 1) ~ 0.54


def test_index_with_wrong_count_is_a_clear_error(tmp_path):
    root = _make_shards(tmp_path / "s", [3])
    from cgn_dist.data.shards import ShardFormatError

    with pytest.raises(ShardFormatError, match="index says 5 .*the index is stale"):
        list(make_loader([(str(root / "shard-000000.tar"), 5)], 5, train=False, rank=0, world_size=1,
                         image_size=16, resize=20))
    assert load_shard_set(root).n_samples == 3


def test_normalize_images_is_imagenet_mean_std():
    from cgn_dist.data.transforms import normalize_images

    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(normalize_images(x), (x.float() / 255 - mean) / std, atol=1e-5)


def test_resume_mid_epoch_gives_the_remaining_batches(shards):
    kw = dict(train=True, rank=1, world_size=2, num_workers=2, seed=9, epoch=4, image_size=16, resize=20)
    full = list(make_loader(shards, 2, **kw))
    assert len(full) == 7
    for start in (1, 3, 4):
        loader = make_loader(shards, 2, **kw)
        loader.set_epoch(4, start_step=start)
        rest = list(loader)
        assert [b["__key__"] for b in rest] == [b["__key__"] for b in full[start:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, full[start:]))
    with pytest.raises(ValueError, match="start_step"):
        make_loader(shards, 2, train=False, rank=0, world_size=1).set_epoch(0, start_step=1)


def test_mixed_loader_resumes_both_streams(tmp_path, shards):
    cf = _make_shards(tmp_path / "cf", [5, 6], cf=True, seed=2)
    kw = dict(rank=0, world_size=1, num_workers=2, seed=1, image_size=16, resize=20)
    full = list(make_mixed_loader(shards, cf, 4, 0.5, **kw))
    resumed = make_mixed_loader(shards, cf, 4, 0.5, **kw)
    resumed.set_epoch(0, start_step=2)
    rest = list(resumed)
    assert [(r["__key__"], c["__key__"]) for r, c in rest] == [(r["__key__"], c["__key__"]) for r, c in full[2:]]
    assert resumed.counts["steps"] == len(full) - 2


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_counterfactual_shards_of_the_generation_engine_stream_with_their_classes(tmp_path, fmt):
    from cgn_dist.data.shards import read_tar_samples
    from cgn_dist.sharding.run import generate_dataset
    from cgn_dist.sharding.toy import ToySamplerFactory

    out = tmp_path / "cf"
    generate_dataset(ToySamplerFactory(image_size=24, image_format=fmt), out, 10, 4, 0, progress=False)
    truth = {}
    for p in sorted(out.glob("shard-*.tar")):
        for s in read_tar_samples(p):
            m = json.loads(s["json"])
            truth[s["__key__"]] = (m["shape_cls"], m["texture_cls"], m["bg_cls"])
    got = {}
    for b in make_loader(out, 3, train=False, rank=0, world_size=1, num_workers=0, labels=CF_LABELS,
                         decoder="torchvision", image_size=16, resize=20):
        for i, key in enumerate(b["__key__"]):
            got[key] = tuple(int(b[k][i]) for k in CF_LABELS)
    assert got == truth


def test_pipe_urls_stream_like_local_paths(shards):
    local = load_shard_set(shards)
    piped = [(f"pipe:cat {u}", n) for u, n in zip(local.urls, local.counts)]
    kw = dict(train=False, rank=0, world_size=1, num_workers=0, image_size=16, resize=20)
    a = [x for b in make_loader(shards, 4, **kw) for x in b["label"].tolist()]
    b = [x for b in make_loader(piped, 4, **kw) for x in b["label"].tolist()]
    assert a == b and sorted(a) == list(range(sum(SIZES)))


def _ddp_rank(rank, world, init_file, shards, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        loader = make_loader(shards, 3, train=True, num_workers=2, seed=5, image_size=16, resize=20)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            labels = []
            for b in loader:
                labels += b["label"].tolist()
                step = torch.ones(1)
                dist.all_reduce(step)  # a collective every step, as DDP does: unequal step counts would hang here
            result[epoch] = labels
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"len": len(loader), **result}))
    finally:
        from cgn_dist.distributed.env import destroy_process_group

        destroy_process_group()  # a barrier first: without it one rank sometimes aborts at exit (SIGABRT)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_gloo_processes_x_two_workers_rank_from_torch_distributed(tmp_path, shards):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), str(shards), tmp_path), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["len"] == ranks[1]["len"] == 5
    for epoch in ("0", "1"):
        seen = ranks[0][epoch] + ranks[1][epoch]
        assert sorted(seen) == list(range(30))  # 30 samples, 5 steps x 3 x 2 ranks: every one once
    assert ranks[0]["0"] != ranks[0]["1"]


def test_batches_are_pinned_when_cuda_is_used(shards):
    # Without page-locked batches a .to(cuda, non_blocking=True) copy is synchronous.
    assert make_loader(shards, 2, train=False, rank=0, world_size=1).pin_memory == torch.cuda.is_available()
    assert make_loader(shards, 2, train=False, rank=0, world_size=1, pin_memory=False).pin_memory is False
    if not torch.cuda.is_available():
        pytest.skip("pinned host memory needs CUDA; the default above follows it")
    batch = next(iter(make_loader(shards, 2, train=False, rank=0, world_size=1, num_workers=1)))
    assert batch["image"].is_pinned()
