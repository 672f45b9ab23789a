"""ImageNet evaluations against independent references: the published 22.1 % shape bias of ResNet-50's
decisions, real cue-conflict stimuli and real photos scored by models whose logits the test chooses,
hand-counted top-k, a hand-computed Inception Score, and 2 processes equal to 1."""
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from cgn_dist.classifier.imagenet.eval_accuracy import evaluate_topk, topk_correct
from cgn_dist.classifier.imagenet.eval_in9 import evaluate_in9
from cgn_dist.classifier.imagenet.eval_shape_bias import evaluate_shape_bias, shape_bias_from_decisions_csv
from cgn_dist.classifier.imagenet.inception_score import evaluate_samples, inception_score
from cgn_dist.data.shards import encode_jpeg, encode_png, write_tar


# --------------------------------------------------------------------------- helpers


class FingerprintModel(torch.nn.Module):
    """Logits chosen per image by the test: each image is recognised by the sum of its preprocessed pixels."""

    def __init__(self, table: dict[str, list[tuple[float, int]]]):
        super().__init__()
        self.table = table  # output name -> [(fingerprint, favoured ImageNet index)]

    def forward(self, x):
        keys = x.double().flatten(1).sum(1)
        out = {}
        for name, entries in self.table.items():
            fps = torch.tensor([f for f, _ in entries], dtype=torch.float64)
            logits = torch.zeros(len(x), 1000)
            for i, k in enumerate(keys):
                j = int((fps - k).abs().argmin())
                assert abs(float(fps[j] - k)) < 1e-3, "image not in the test's table"
                logits[i, entries[j][1]] = 20.0
            out[name] = logits
        return out


def _fingerprint(img: Image.Image, tf) -> float:
    return float(tf(img.convert("RGB")).double().sum())


# --------------------------------------------------------------------------- shape bias


def test_published_resnet50_decisions_give_22_1_percent(shared_ref):
    r = shape_bias_from_decisions_csv(shared_ref / "cue_conflict_sample" / "resnet50_decisions.csv")
    assert r["n"] == 1200 and r["excluded_same"] == 80
    assert round(100 * r["shape_bias"], 1) == 22.1


def test_shipped_mappings_equal_the_reference(shared_ref):
    from importlib import resources

    for name in ("shape_bias_16class_imagenet_indices.json", "in_to_in9.json", "in9_classes.txt"):
        shipped = resources.files("cgn_dist.classifier").joinpath(f"resources/{name}").read_text()
        assert shipped == (shared_ref / "eval" / name).read_text()


def test_shape_bias_end_to_end_on_real_stimuli(shared_ref):
    root = shared_ref / "cue_conflict_sample"
    cats = json.loads((shared_ref / "eval" / "shape_bias_16class_imagenet_indices.json").read_text())
    # the spec's preprocessing, written out here independently of the package
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    table = {"shape": [], "texture": [], "bg": [], "half": []}
    files = sorted(root.glob("*/*.png"))
    assert len(files) == 32
    for k, f in enumerate(files):
        shape, texture = re.match(r"([a-z]+)\d+-([a-z]+)\d+", f.name).groups()
        other = next(c for c in sorted(cats) if c not in (shape, texture))
        fp = _fingerprint(Image.open(f), tf)
        table["shape"].append((fp, cats[shape][0]))
        table["texture"].append((fp, cats[texture][-1]))
        table["bg"].append((fp, cats[other][0]))  # neither cue: no hits at all
        table["half"].append((fp, cats[shape if k % 2 else texture][0]))
    res = evaluate_shape_bias(FingerprintModel(table), root, batch_size=5)["per_output"]
    assert res["shape"]["shape_bias"] == 1.0 and res["shape"]["n"] == 32
    assert res["texture"]["shape_bias"] == 0.0
    assert res["bg"]["shape_bias"] is None and res["bg"]["shape_hits"] + res["bg"]["texture_hits"] == 0
    assert res["half"]["shape_bias"] == 0.5


# --------------------------------------------------------------------------- IN-9


IN9_NORM = ([0.4717, 0.4499, 0.3837], [0.2600, 0.2516, 0.2575])


def _in9_folder(tmp_path: Path) -> tuple[Path, dict]:
    """3 variants x 9 classes of real photos (scikit-image samples), 224 x 224; 11 images per variant."""
    import skimage.data as sk

    photos = [sk.astronaut(), sk.coffee(), sk.chelsea(), sk.rocket(), np.stack([sk.camera()] * 3, -1),
              sk.immunohistochemistry()]
    classes = ["00_dog", "01_bird", "02_wheeled vehicle", "03_reptile", "04_carnivore", "05_insect",
               "06_musical instrument", "07_primate", "08_fish"]
    mapping = {}
    rng = np.random.default_rng(0)
    for v, variant in enumerate(("mixed_rand", "mixed_same", "original")):
        for n in range(11):
            label = n % 9
            src = photos[(n + v) % len(photos)]
            y0, x0 = rng.integers(0, src.shape[0] - 224), rng.integers(0, src.shape[1] - 224)
            d = tmp_path / variant / "val" / classes[label]
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"img_{n:02d}.JPEG"
            Image.fromarray(src[y0:y0 + 224, x0:x0 + 224]).save(path, format="PNG")  # lossless: exact fingerprints
            mapping[(variant, n)] = (path, label)
    return tmp_path, mapping


def test_in9_accuracies_bg_gap_and_exact_denominators(tmp_path, shared_ref):
    root, files = _in9_folder(tmp_path)
    in_to_in9 = {int(k): v for k, v in json.loads((shared_ref / "eval" / "in_to_in9.json").read_text()).items()}
    some_index = {c: min(i for i, v in in_to_in9.items() if v == c) for c in range(9)}
    unmapped = min(i for i, v in in_to_in9.items() if v == -1)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*IN9_NORM)])
    # correct images per variant (of 11): mixed_rand 4, mixed_same 7, original 10
    n_right = {"mixed_rand": 4, "mixed_same": 7, "original": 10}
    table = {"shape_texture": [], "bg": []}
    for (variant, n), (path, label) in files.items():
        fp = _fingerprint(Image.open(path), tf)
        if n < n_right[variant]:
            choice = some_index[label]
        elif n % 2:
            choice = unmapped  # unmapped classes count as wrong
        else:
            choice = some_index[(label + 1) % 9]
        table["shape_texture"].append((fp, choice))
        table["bg"].append((fp, unmapped))
    res = evaluate_in9(FingerprintModel(table), root, batch_size=4)  # 11 = 4 + 4 + 3: a partial last batch
    for v, k in n_right.items():
        assert res["accuracy"][v]["shape_texture"]["images"] == 11
        assert res["accuracy"][v]["shape_texture"]["correct"] == k
        assert res["accuracy"][v]["shape_texture"]["accuracy"] == pytest.approx(100 * k / 11)
        assert res["accuracy"][v]["bg"]["correct"] == 0
    assert res["bg_gap"] == pytest.approx(100 * (7 - 4) / 11)
    assert res["variants"] == ["original", "mixed_same", "mixed_rand"]


def test_in9_refuses_resized_images(tmp_path):
    for c in range(9):
        d = tmp_path / "original" / "val" / f"0{c}_x"
        d.mkdir(parents=True)
        Image.new("RGB", (256, 256)).save(d / "a.png")
    with pytest.raises(ValueError, match="not resized"):
        evaluate_in9(torch.nn.Identity(), tmp_path)


# --------------------------------------------------------------------------- top-k


def test_topk_against_a_hand_count():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0, -1],        # target 0: rank 1
                           [0.0, 1, 2, 3, 4, 5, 6],         # target 1: five larger values -> rank 6
                           [1.0, 0, 0.1, 0.2, 0.3, 0.4, 9],  # target 2: 9, 1, .4, .3, .2 larger -> rank 6
                           [0.0, 9, 8, 7, 6, 5, 4]])        # target 5: 9, 8, 7, 6 larger -> rank 5
    target = torch.tensor([0, 1, 2, 5])
    assert topk_correct(logits, target, ks=(1, 5, 6, 7)) == {1: 1, 5: 2, 6: 4, 7: 4}


def test_topk_from_shards_counts_every_image(tmp_path):
    rng = np.random.default_rng(1)
    labels = [3, 7, 3, 1, 3, 0, 2]
    samples = [(f"{i:06d}", {"png": encode_png(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)),
                             "json": {"label": labels[i]}})
               for i in range(len(labels))]
    write_tar(tmp_path / "val-000000.tar", samples[:4])
    write_tar(tmp_path / "val-000001.tar", samples[4:])
    cf = [(f"{i:06d}", {"png": encode_png(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)),
                        "json": {"shape_cls": s, "texture_cls": t, "bg_cls": b}})
          for i, (s, t, b) in enumerate([(3, 3, 0), (3, 1, 3), (2, 3, 3)])]
    write_tar(tmp_path / "cf-000000.tar", cf)

    class Constant(torch.nn.Module):  # same logits for every image: class 3 first, then 1, 0, 2, ...
        def forward(self, x):
            row = torch.tensor([8.0, 9, 7, 10, 6, 5, 4, 3, 2, 1])
            return {"shape": row.expand(len(x), -1), "texture": row.expand(len(x), -1),
                    "bg": row.expand(len(x), -1)}

    real = evaluate_topk(Constant(), [str(tmp_path / "val-000000.tar"), str(tmp_path / "val-000001.tar")],
                         "real", batch_size=3, image_size=32)["per_output"]["shape"]
    assert real["images"] == 7 and real["top1_hits"] == 3 and real["top5_hits"] == 6  # label 7 is 8th
    cfr = evaluate_topk(Constant(), str(tmp_path / "cf-000000.tar"), "counterfactual", batch_size=2,
                        image_size=32)["per_output"]
    assert (cfr["shape"]["top1_hits"], cfr["texture"]["top1_hits"], cfr["bg"]["top1_hits"]) == (2, 2, 2)


# --------------------------------------------------------------------------- Inception Score


def test_inception_score_by_hand():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])
    # split 1: p(y) = (1/2, 1/2), KL = log 2 for both -> IS 2; split 2: KL 0 -> IS 1
    assert inception_score(p, splits=2) == pytest.approx((1.5, 0.5))
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(7) * 0.3, size=40)
    want = []
    for part in np.array_split(q, 4):
        py = part.mean(0)
        want.append(math.exp(np.mean([sum(a * math.log(a / b) for a, b in zip(row, py) if a > 0) for row in part])))
    assert inception_score(q, splits=4) == pytest.approx((np.mean(want), np.std(want)), rel=1e-9)


def test_samples_give_is_and_mask_mean(tmp_path):
    rng = np.random.default_rng(2)
    masks = [0.2, 0.4, 0.9, 0.1]
    write_tar(tmp_path / "shard-000000.tar",
              [(f"000000_{i:06d}", {"jpg": encode_jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                                    "json": {"mask_mean": m}}) for i, m in enumerate(masks)])

    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x), 10), 0.1)

    r = evaluate_samples(Uniform(), [str(tmp_path / "shard-000000.tar")], splits=2, batch_size=3)
    assert r["samples"] == 4 and r["mask_mean"] == pytest.approx(0.4)
    assert r["inception_score"] == pytest.approx(1.0)  # identical predictions: KL 0


# --------------------------------------------------------------------------- distributed


class _Constant(torch.nn.Module):
    """Same logits for every image (class 3 first, then 1, 0, 2, ...)."""

    def forward(self, x):
        row = torch.tensor([8.0, 9, 7, 10, 6, 5, 4, 3, 2, 1])
        return {h: row.expand(len(x), -1) for h in ("shape", "texture", "bg")}


def _val_tars(d: Path) -> list[str]:
    rng = np.random.default_rng(1)
    labels = [3, 7, 3, 1, 3, 0, 2]
    samples = [(f"{i:06d}", {"png": encode_png(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)),
                             "json": {"label": labels[i]}})
               for i in range(len(labels))]
    d.mkdir(parents=True, exist_ok=True)
    write_tar(d / "val-000000.tar", samples[:4])
    write_tar(d / "val-000001.tar", samples[4:])
    write_tar(d / "val-000002.tar", samples[6:])
    return [str(d / f"val-00000{i}.tar") for i in range(3)]


class _ColourProbs(torch.nn.Module):
    """Class probabilities from the mean colour: different per image, fixed weights."""

    def forward(self, x):
        w = torch.linspace(-3, 3, 30).view(3, 10)
        return torch.softmax(x.mean(dim=(2, 3)) @ w * 5, dim=1)


def _generated_tars(d: Path) -> list[str]:
    rng = np.random.default_rng(4)
    d.mkdir(parents=True, exist_ok=True)
    for s in range(3):
        write_tar(d / f"shard-{s:06d}.tar",
                  [(f"{s:06d}_{i:06d}", {"jpg": encode_jpeg(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)),
                                         "json": {"mask_mean": float(rng.random())}}) for i in range(4 + s)])
    return [str(d / f"shard-{s:06d}.tar") for s in range(3)]


def _dist_worker(rank, world, port, root, in9_root, table_sb, table_in9, out, tars=None, gen=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sb = evaluate_shape_bias(FingerprintModel(table_sb), root, batch_size=3)
        in9 = evaluate_in9(FingerprintModel(table_in9), in9_root, batch_size=4)
        topk = evaluate_topk(_Constant(), tars, "real", batch_size=3, image_size=32)
        is_ = evaluate_samples(_ColourProbs(), gen, splits=3, batch_size=2)
        if rank == 0:
            torch.save({"sb": sb, "in9": in9, "topk": topk, "is": is_}, out)
    finally:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_processes_equal_one(tmp_path, shared_ref):
    from cgn_dist.distributed.env import free_port

    root = shared_ref / "cue_conflict_sample"
    cats = json.loads((shared_ref / "eval" / "shape_bias_16class_imagenet_indices.json").read_text())
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    rng = np.random.default_rng(3)
    names = sorted(cats)
    table_sb = {"shape": [(_fingerprint(Image.open(f), tf), cats[names[rng.integers(16)]][0])
                          for f in sorted(root.glob("*/*.png"))]}
    in9_root, files = _in9_folder(tmp_path / "in9")
    tf9 = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*IN9_NORM)])
    table_in9 = {"logits": [(_fingerprint(Image.open(p), tf9), int(rng.integers(1000))) for p, _ in files.values()]}
    tars, gen = _val_tars(tmp_path / "val"), _generated_tars(tmp_path / "gen")
    one = {"sb": evaluate_shape_bias(FingerprintModel(table_sb), root, batch_size=7),
           "in9": evaluate_in9(FingerprintModel(table_in9), in9_root, batch_size=5),
           "topk": evaluate_topk(_Constant(), tars, "real", batch_size=2, image_size=32),
           "is": evaluate_samples(_ColourProbs(), gen, splits=3, batch_size=5)}
    out = tmp_path / "two.pt"
    torch.multiprocessing.spawn(_dist_worker, nprocs=2, join=True,
                                args=(2, free_port(), root, in9_root, table_sb, table_in9, out, tars, gen))
    two = torch.load(out, weights_only=False)
    assert two["sb"]["per_output"] == one["sb"]["per_output"]
    assert two["sb"]["decisions"] == one["sb"]["decisions"]
    assert two["in9"]["accuracy"] == one["in9"]["accuracy"] and two["in9"]["bg_gap"] == one["in9"]["bg_gap"]
    assert two["topk"]["per_output"] == one["topk"]["per_output"]
    assert one["is"]["samples"] == 15 and one["is"]["inception_score"] > 1.0
    assert two["is"] == one["is"]
    assert one["topk"]["per_output"]["shape"]["images"] == 8  # 3 shards, 2 ranks: 2 + 1 shards
    assert one["sb"]["per_output"]["shape"]["n"] == 32


def test_cli_eval_writes_tables_beside_the_paper(tmp_path, shared_ref):
    from cgn_dist.cli import main

    in9_root, _ = _in9_folder(tmp_path / "in9")
    rc = main(["eval", "all", f"out_dir={tmp_path}", "eval.model=torchvision:resnet18",
               "eval.weights=random", f"eval.cue_conflict={shared_ref / 'cue_conflict_sample'}",
               f"eval.decisions_csv={shared_ref / 'cue_conflict_sample' / 'resnet50_decisions.csv'}",
               f"eval.in9={in9_root}", "eval.batch_size=16", "eval.image_size=64"])
    assert rc == 0
    out = tmp_path / "eval" / "resnet18-random-all"  # named after what was evaluated
    for name in ("shape_bias", "in9"):
        for ext in ("json", "csv", "txt", "png"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
    doc = json.loads((out / "shape_bias.json").read_text())
    csv_row = next(r for r in doc["rows"] if r["model"].startswith("published decisions: resnet50"))
    assert csv_row["shape_bias_%"] == 22.07
    # random weights were asked for: every measured row says so and no paper figure appears anywhere
    assert "random weights" in doc["title"]
    assert all(r.get("paper_%") is None for r in doc["rows"])
    in9 = json.loads((out / "in9.json").read_text())
    assert {r["model"] for r in in9["rows"]} == {"ours, random weights"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert round(metrics["shape_bias/decisions_csv"], 2) == 22.07 and "in9/original/logits" in metrics
