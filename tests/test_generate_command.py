"""``cgn-dist generate`` / ``cgn-dist regenerate`` end to end on the tiny ImageNet config and on released MNIST."""
import json

import pytest

from cgn_dist.cli import main
from cgn_dist.data.shards import read_sample, read_tar_samples

TINY = "configs/debug/imagenet_tiny.yaml"


@pytest.fixture(autouse=True)
def _repo_cwd(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)  # the config paths are relative to the repository


def _json_out(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def _generate(tmp_path, *overrides):
    return main(["generate", TINY, f"out_dir={tmp_path}", "generate.n_samples=8", "generate.shard_size=4",
                 "generate.forward_batch=4", "generate.batch_size=3", *overrides])


def test_dry_run_then_run_then_regenerate(tmp_path, capsys):
    assert _generate(tmp_path, "name=cf", "generate.dry_run=true") == 0
    out = capsys.readouterr().out
    assert "plan: 8 samples in 2 shards of <= 4 (batch 4, 1 worker(s))" in out
    assert "samples/s per worker" in out and "disk: ~" in out and "fields jpg, json" in out
    assert not (tmp_path / "cf").exists()  # a dry run writes nothing

    assert _generate(tmp_path, "name=cf", "generate.grid_every=1", "generate.save_layers=true") == 0
    result = _json_out(capsys)
    run = tmp_path / "cf"
    assert result["n_samples"] == 8 and result["n_shards"] == 2 and result["images_per_s"] > 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["sampler_info"]["sampler"] == "imagenet_counterfactual"
    assert manifest["sampler_factory"]["kwargs"]["forward_batch"] == 4
    assert set(manifest["class_counts"]) == {"bg_cls", "shape_cls", "texture_cls"}
    assert list((run / "tb").glob("events.out.tfevents.*"))
    samples = read_tar_samples(run / "shard-000001.tar")
    assert [s["__key__"] for s in samples] == [f"000001_{i:06d}" for i in range(4)]
    assert set(samples[0]) >= {"jpg", "json", "mask.png", "fg.jpg", "bg.jpg"}

    # a sample recomputed from the manifest alone equals the stored bytes, image written to --out
    assert main(["regenerate", str(run), "000001_000002", "--out", str(tmp_path / "x.jpg")]) == 0
    report = _json_out(capsys)
    assert report["identical"] and report["members"] == ["bg.jpg", "fg.jpg", "jpg", "json", "mask.png"]
    assert (tmp_path / "x.jpg").read_bytes() == read_sample(run / "shard-000001.tar", "000001_000002")["jpg"]
    assert main(["regenerate", str(run), "000005_000000"]) == 2  # not in the plan
    assert "not in this run's plan" in capsys.readouterr().err

    # a rerun with another batch size completes nothing new and keeps the bytes; other settings are refused
    before = (run / "shard-000000.tar").read_bytes()
    assert _generate(tmp_path, "name=cf", "generate.save_layers=true", "generate.batch_size=1") == 0
    assert (run / "shard-000000.tar").read_bytes() == before
    capsys.readouterr()
    assert _generate(tmp_path, "name=cf", "generate.save_layers=true", "generate.truncation=0.7") == 2
    assert "other settings (truncation" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["generate.truncation=0"], "truncation must lie in (0, 1]"),
    (["generate.truncation=1.5"], "truncation must lie in (0, 1]"),
    (["generate.mode=fixed_classes", "generate.classes=[1,2]"], "three class ids"),
    (["generate.mode=fixed_classes", "generate.classes=[1,2,12]"], "out of range for this model (10 classes"),
    (["generate.mode=best_classes"], "needs a 1000-class model"),
    (["generate.checkpoint=/no/such/run"], "does not exist"),
    (["imagenet.u2net=/no/such/u2net.pth"], "U²-Net weights"),
    (["generate.mode=interpolation", "generate.interp_target=10"], "interp_target=10 is out of range"),
])
def test_bad_inputs_are_clear_errors(tmp_path, capsys, overrides, message):
    assert _generate(tmp_path, "name=bad", *overrides) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_interpolation_sheet(tmp_path, capsys):
    assert _generate(tmp_path, "name=interp", "generate.mode=interpolation", "generate.classes=[1,2,3]",
                     "generate.interp_target=5", "generate.midpoints=2", "generate.interp_mechanism=bg",
                     "generate.image_format=png") == 0
    result = _json_out(capsys)
    out = tmp_path / "interp" / "interpolation"
    assert result["steps"] == 4 and result["start"] == [1, 2, 3] and result["target"] == 5
    assert (out / "sheet.png").is_file() and len(list(out.glob("frame_*.png"))) == 4
    doc = json.loads((out / "interpolation.json").read_text())
    assert doc["mechanism"] == "bg" and doc["alphas"][0] == 0.0 and doc["alphas"][-1] == 1.0
    assert not list((tmp_path / "interp").glob("shard-*"))


def test_mnist_generate_from_the_released_checkpoint(tmp_path, capsys, shared_ref):
    ckp = shared_ref / "original_mnist_checkpoints" / "cgn_colored_MNIST.pth"
    args = ["generate", "configs/debug/mnist_tiny.yaml", f"out_dir={tmp_path}", "name=mnist",
            f"generate.checkpoint={ckp}", "generate.n_samples=200", "generate.shard_size=100",
            "generate.no_cfs=1", "generate.grid_every=0"]
    assert main(args) == 0
    result = _json_out(capsys)
    assert result["n_samples"] == 200 and result["sampler_info"]["sampler"] == "mnist_counterfactual"
    sample = read_sample(tmp_path / "mnist" / "shard-000001.tar", "000001_000042")
    meta = json.loads(sample["json"])
    assert meta["label"] == meta["shape_cls"] and set(sample) == {"png", "json"}
    assert main(["regenerate", str(tmp_path / "mnist"), "000001_000042", "--out", str(tmp_path / "r.png")]) == 0
    assert _json_out(capsys)["identical"]
    assert (tmp_path / "r.png").read_bytes() == sample["png"]
