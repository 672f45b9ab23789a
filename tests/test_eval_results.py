"""`cgn-dist eval` as a user runs it: no random-weight fallback, every figure in metrics.json and on stdout,
a folder of its own per evaluation (never overwritten), a published figure only beside its own model."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from cgn_dist.cli import main
from cgn_dist.data.shards import encode_jpeg, write_tar

REPO = Path(__file__).resolve().parents[1]


def _cli(args, cwd, torch_home):
    """The console script in a fresh process, offline (conftest's dead proxy) with an empty torch cache."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_HOME": str(torch_home)}
    return subprocess.run([sys.executable, "-m", "cgn_dist.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:") or ln.startswith("config error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _csv_shape_bias(path: Path) -> float:
    """Independent count over Geirhos' decision file: shape / (shape + texture) hits, shape != texture."""
    shape = texture = 0
    for row in csv.DictReader(open(path)):
        s, t = re.search(r"([a-z]+)\d+-([a-z]+)\d+\.png$", row["imagename"]).groups()
        if s != t:
            shape += row["object_response"] == s
            texture += row["object_response"] == t
    return 100 * shape / (shape + texture)


@pytest.mark.parametrize("weights", [None, "auto", "imagenet"])
def test_unavailable_weights_stop_the_eval(tmp_path, shared_ref, weights):
    over = [f"eval.weights={weights}"] if weights else []
    r = _cli(["eval", "shape-bias", "eval.model=torchvision:resnet18", f"out_dir={tmp_path / 'runs'}",
              f"eval.cue_conflict={shared_ref / 'cue_conflict_sample'}", *over], tmp_path, tmp_path / "torch")
    assert r.returncode == 2, r.stderr
    line = _error_line(r.stderr)
    assert line.startswith(f"error: eval.weights={weights or 'imagenet'}: resnet18 weights") and \
        "eval.weights=random" in line
    assert "shape_bias" not in r.stdout and not (tmp_path / "runs" / "eval").exists()  # nothing half-written


def _samples(d: Path) -> Path:
    rng = np.random.default_rng(0)
    d.mkdir(parents=True)
    for s in range(2):
        write_tar(d / f"shard-{s:06d}.tar",
                  [(f"{s:06d}_{i:06d}", {"jpg": encode_jpeg(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)),
                                         "json": {"mask_mean": 0.25}}) for i in range(3)])
    return d


def test_inception_score_refuses_random_then_labels_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    gen = _samples(tmp_path / "cf_small")
    base = ["eval", "inception", f"out_dir={tmp_path}", f"eval.samples={gen}", "eval.is_splits=2"]
    assert main(base) == 2
    line = _error_line(capsys.readouterr().err)
    assert "eval.inception_weights=imagenet" in line and "eval.inception_weights=random" in line
    assert main([*base, "eval.inception_weights=random"]) == 0
    printed = json.loads(capsys.readouterr().out)
    out = Path(printed["out"])
    assert out == tmp_path / "eval" / "cf_small-random-inception"
    doc = json.loads((out / "inception_score.json").read_text())
    assert "random weights" in doc["title"] and [r["model"] for r in doc["rows"]] == ["ours, random Inception weights"]
    assert "130.2" not in (out / "inception_score.txt").read_text()  # the paper's IS is not beside it
    assert json.loads((out / "metrics.json").read_text()) == printed["metrics"]
    assert printed["metrics"]["is/mask_mean"] == pytest.approx(0.25)


def test_decisions_csv_figures_in_metrics_and_stdout_never_overwritten(tmp_path, shared_ref, capsys):
    csv_path = shared_ref / "cue_conflict_sample" / "resnet50_decisions.csv"
    args = ["eval", "shape-bias", f"out_dir={tmp_path}", f"eval.decisions_csv={csv_path}"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    want = _csv_shape_bias(csv_path)
    assert first["metrics"]["shape_bias/decisions_csv"] == pytest.approx(want) and round(want, 1) == 22.1
    out1 = Path(first["out"])
    assert out1 == tmp_path / "eval" / "resnet50_decisions-shape-bias"
    assert json.loads((out1 / "metrics.json").read_text()) == first["metrics"]
    row = json.loads((out1 / "shape_bias.json").read_text())["rows"][0]
    assert row["model"].startswith("published decisions: resnet50") and row["paper_%"] == 22.1
    before = (out1 / "shape_bias.json").stat().st_mtime_ns

    assert main(args) == 0  # the same command again: a new folder, the first result untouched
    second = Path(json.loads(capsys.readouterr().out)["out"])
    assert second == tmp_path / "eval" / "resnet50_decisions-shape-bias-2"
    assert (out1 / "shape_bias.json").stat().st_mtime_ns == before

    fixed = [*args, f"eval.out={tmp_path / 'mine'}"]
    assert main(fixed) == 0
    capsys.readouterr()
    assert main(fixed) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"eval.out={tmp_path / 'mine'}" in line and "eval.overwrite=true" in line
    assert main([*fixed, "eval.overwrite=true"]) == 0


def _hub_file(torch_home: Path, arch: str, enum) -> None:
    """A stand-in for torchvision's ImageNet file in the hub cache (the eval cannot tell it apart)."""
    d = torch_home / "hub" / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), d / Path(enum.url).name)


def test_published_figure_only_beside_its_own_model(tmp_path, shared_ref, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _hub_file(tmp_path / "torch", "resnet50", torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    _hub_file(tmp_path / "torch", "resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    paper = {}
    for arch in ("resnet50", "resnet18"):
        assert main(["eval", "shape-bias", f"out_dir={tmp_path}", f"eval.model=torchvision:{arch}",
                     f"eval.cue_conflict={shared_ref / 'cue_conflict_sample'}", "eval.image_size=64",
                     "eval.batch_size=32"]) == 0
        out = Path(json.loads(capsys.readouterr().out)["out"])
        assert out.name == f"{arch}-shape-bias"
        doc = json.loads((out / "shape_bias.json").read_text())
        ours = next(r for r in doc["rows"] if r["model"] == "ours")
        assert ours["output"] == "logits" and "random" not in doc["title"]
        paper[arch] = ours["paper_%"]
    assert paper == {"resnet50": 22.1, "resnet18": None}


def test_the_default_folder_is_named_after_what_is_evaluated(tmp_path):
    from cgn_dist.classifier.imagenet.eval_out import choose_out
    from cgn_dist.config import load_config

    ckpt = tmp_path / "runs" / "inv" / "checkpoints" / "step_000100"
    ckpt.mkdir(parents=True)
    (tmp_path / "w.pt").write_bytes(b"")
    cases = {(f"eval.model={ckpt}", "all"): "inv-step_000100-all",
             (f"eval.model={tmp_path / 'runs' / 'inv'}", "in9"): "inv-in9",
             (f"eval.model={tmp_path / 'w.pt'}", "accuracy"): "w-accuracy",
             ("eval.model=torchvision:vgg16", "in9"): "vgg16-in9",
             (f"eval.decisions_csv={tmp_path / 'alexnet.csv'}", "shape-bias"): "alexnet-shape-bias",
             (f"eval.samples={tmp_path / 'cf_val'}", "inception"): "cf_val-inception"}
    for (over, what), name in cases.items():
        out, derived = choose_out(load_config(None, [f"out_dir={tmp_path}", over]), what)
        assert (out, derived) == (tmp_path / "eval" / name, True)
