"""Settings never silently ignored: key docs, configs from any directory, MNIST generation options."""
import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from cgn_dist.cli import main
from cgn_dist.config import config_to_dict, load_config
from cgn_dist.data.shards import read_tar_samples


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_config_doc_prints_every_key_with_its_doc(capsys):
    assert main(["config", "--doc", "configs/debug/mnist_tiny.yaml", "train.keep_last=5"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split(":", 1)[0]: ln for ln in out.splitlines() if ln and not ln.startswith("#")}
    keys = list(_leaves(config_to_dict(load_config())))
    assert sorted(lines) == sorted(keys)
    for key, line in lines.items():
        assert "  # " in line and line.split("  # ", 1)[1].strip(), f"{key} has no doc"
    assert lines["train.keep_last"].startswith("train.keep_last: 5") and line_doc(lines["train.keep_last"]) == \
        "checkpoints kept"
    # the multi-line comment of a field is read whole
    assert "does not depend on how the global batch is split" in lines["imagenet.spectral_norm_updates"]


def line_doc(line):
    return line.split("  # ", 1)[1].strip()


def test_configs_work_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "configs/debug/mnist_tiny.yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "mnist_tiny"
    assert main(["config", "configs/nowhere.yaml"]) == 2
    assert "project root" in capsys.readouterr().err


def test_mnist_generation_refuses_jpg(tmp_path, shared_ref, capsys):
    ckp = shared_ref / "original_mnist_checkpoints" / "cgn_colored_MNIST.pth"
    assert main(["generate", "configs/generate/mnist_colored.yaml", f"generate.checkpoint={ckp}",
                 f"out_dir={tmp_path}", "generate.image_format=jpg"]) == 2
    err = capsys.readouterr().err
    assert "generate.image_format=jpg" in err and "png" in err
    assert not (tmp_path / "cf_mnist_colored").exists()


def test_mnist_generation_saves_layers(tmp_path, shared_ref):
    ckp = shared_ref / "original_mnist_checkpoints" / "cgn_colored_MNIST.pth"
    assert main(["generate", "configs/generate/mnist_colored.yaml", f"generate.checkpoint={ckp}",
                 f"out_dir={tmp_path}", "generate.n_samples=200", "generate.shard_size=200", "generate.no_cfs=2",
                 "generate.save_layers=true", "generate.grid_every=0", "train.progress=false"]) == 0
    samples = list(read_tar_samples(tmp_path / "cf_mnist_colored" / "shard-000000.tar"))
    assert len(samples) == 200

    def img(b):
        return np.asarray(Image.open(io.BytesIO(b))).astype(np.float64)

    for s in samples[::37]:
        assert {"png", "json", "mask.png", "fg.png", "bg.png"} <= set(s)
        m = img(s["mask.png"])[..., None] / 255
        fg, bg = img(s["fg.png"]) / 127.5 - 1, img(s["bg.png"]) / 127.5 - 1
        x = img(s["png"]) / 127.5 - 1
        # the stored composite is m*f + (1-m)*b of the stored layers (each rounded to 8 bits)
        assert np.abs(m * fg + (1 - m) * bg - x).max() < 4 / 255
        assert abs(m.mean() - json.loads(s["json"])["mask_mean"]) < 1 / 255
    # the two counterfactual rounds of one slot share the fixed mask
    by_key = {s["__key__"]: s for s in samples}
    assert by_key["000000_000003"]["mask.png"] == by_key["000000_000103"]["mask.png"]


def test_the_table_prints_the_reference_reproduction_once():
    from cgn_dist.classifier.mnist.table import build_mnist_table, format_mnist_table

    acc = {"train_acc": 99.0, "test_acc": 50.0}
    results = {ds: {"results": {row: acc for row in ("original", "counterfactual", "combined")}}
               for ds in ("colored", "double_colored", "wildlife")}
    text = format_mnist_table(build_mnist_table(results))
    assert text.count("92.3") == 1 and text.count("62.8") == 1 and "spec" not in text
