"""ImageNet counterfactual sampler on tiny random models: schema, modes, byte identity, weights, interpolation."""
import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cgn_dist.data.shards import read_tar_samples, sha256_file
from cgn_dist.generate.class_lists import BEST_BACKGROUND_CLASSES, BEST_SHAPE_CLASSES, BEST_TEXTURE_CLASSES
from cgn_dist.generate.imagenet.weights import CGNCheckpointError, build_generation_model, resolve_cgn_checkpoint
from cgn_dist.generate.imagenet.factory import ImagenetCounterfactualFactory
from cgn_dist.generate.imagenet.labels import class_name, draw_classes, imagenet_classes
from cgn_dist.data.pixels import to_uint8
from cgn_dist.generate.imagenet.interp import write_interpolation
from cgn_dist.generate.imagenet.interp import interpolation_sheet
from cgn_dist.sharding.plan import make_plan, sample_refs
from cgn_dist.sharding.run import generate_dataset
from cgn_dist.sharding.sampler import build_factory, describe_factory

TINY = dict(biggan="tiny", u2net="tiny", model_seed=0, forward_batch=4, truncation=0.5)


def _image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def tiny_random():
    return ImagenetCounterfactualFactory(**TINY, save_layers=True)()


def test_class_names_ship_with_the_package(shared_ref):
    rows = imagenet_classes()
    ref = [line.split(" ", 1) for line in (shared_ref / "eval" / "categories.txt").read_text().splitlines()]
    assert [list(r) for r in rows] == ref
    assert class_name(0) == "tench" and class_name(999) == "toilet tissue" and class_name(207) == "golden retriever"


def test_random_mode_schema_and_layers(tiny_random):
    spec = make_plan(8, 8, run_seed=3)[0]
    refs = sample_refs(spec)
    samples = tiny_random.sample(refs)
    triples = set()
    for ref, s in zip(refs, samples):
        assert set(s) == {"jpg", "json", "mask.png", "fg.jpg", "bg.jpg"}
        assert _image(s["jpg"]).shape == (32, 32, 3)
        assert _image(s["mask.png"]).shape == (32, 32)
        m = s["json"]
        assert set(m) == {"shape_cls", "texture_cls", "bg_cls", "shape_name", "texture_name", "bg_name", "mode",
                          "truncation", "seed", "mask_mean", "checkpoint_sha256", "cgn_dist_version"}
        for k in ("shape", "texture", "bg"):
            assert 0 <= m[f"{k}_cls"] < 10 and m[f"{k}_name"] == class_name(m[f"{k}_cls"])
        assert m["seed"] == ref.seed and m["truncation"] == 0.5 and m["mode"] == "random"
        assert 0 < m["mask_mean"] < 1 and m["checkpoint_sha256"] is None
        # the stored mask is the one the mean was taken of (uint8 rounding: within 1/255)
        assert abs(_image(s["mask.png"]).mean() / 255 - m["mask_mean"]) < 2 / 255
        json.dumps(m)
        triples.add((m["shape_cls"], m["texture_cls"], m["bg_cls"]))
    assert len(triples) > 4  # independent classes per sample
    info = tiny_random.info()
    assert info["sampler"] == "imagenet_counterfactual" and info["n_classes"] == 10 and info["forward_batch"] == 4


def test_fixed_classes_and_png():
    sampler = ImagenetCounterfactualFactory(**TINY, mode="fixed_classes", classes=[1, 2, 3], image_format="png")()
    samples = sampler.sample(sample_refs(make_plan(3, 3, run_seed=0)[0]))
    assert all(set(s) == {"png", "json"} for s in samples)
    assert {(s["json"]["shape_cls"], s["json"]["texture_cls"], s["json"]["bg_cls"]) for s in samples} == {(1, 2, 3)}
    assert samples[0]["json"]["texture_name"] == "great white shark"
    assert len({s["png"] for s in samples}) == 3  # the noise still differs per sample


def test_best_classes(tmp_path):
    # The curated lists are ImageNet ids: a 10-class model is refused with a clear error...
    with pytest.raises(ValueError, match="best_classes .* 1000-class"):
        ImagenetCounterfactualFactory(**TINY, mode="best_classes").validate()
    with pytest.raises(ValueError, match="best_classes"):
        ImagenetCounterfactualFactory(**TINY, mode="best_classes")()
    # ...a 1000-class (tiny-sized) BigGAN, loaded from a local directory, draws from the lists.
    from cgn_dist.models.biggan import BigGAN, refresh_spectral_weights, save_biggan_dir, tiny_biggan_config

    config = tiny_biggan_config()
    config.num_classes = 1000
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BigGAN(config)
        torch.nn.init.ones_(model.generator.bn.weight)
        torch.nn.init.zeros_(model.generator.bn.bias)
        refresh_spectral_weights(model, power_iterations=10)
    save_biggan_dir(model, tmp_path / "biggan1000")
    factory = ImagenetCounterfactualFactory(**dict(TINY, biggan=str(tmp_path / "biggan1000")), mode="best_classes")
    factory.validate()
    samples = factory().sample(sample_refs(make_plan(6, 6, run_seed=1)[0]))
    for s in samples:
        m = s["json"]
        assert m["shape_cls"] in BEST_SHAPE_CLASSES and m["texture_cls"] in BEST_TEXTURE_CLASSES
        assert m["bg_cls"] in BEST_BACKGROUND_CLASSES and m["shape_name"] == _class_file_name(m["shape_cls"])


def _class_file_name(class_id: int) -> str:
    # Read the class-name file directly (line = id, first synonym), not through the code under test.
    from importlib.resources import files
    lines = files("cgn_dist.data").joinpath("imagenet_categories.txt").read_text().splitlines()
    return lines[class_id].split(" ", 1)[1].split(",")[0].strip()


def test_class_names_are_the_imagenet_ones():
    # Known ImageNet names, by hand: the first and last classes and the two names that occur twice.
    assert [class_name(i) for i in (0, 1, 134, 517, 638, 639, 999)] == [
        "tench", "goldfish", "crane", "crane", "maillot", "maillot", "toilet tissue"]

def test_class_draws_depend_on_the_seed_alone_and_are_uniform():
    seeds = list(range(3000))
    first = {s: draw_classes("best_classes", s, 1000) for s in seeds}
    # Another order, with the global RNGs disturbed in between: a pure function of the seed.
    for s in reversed(seeds):
        np.random.rand(3)
        torch.rand(3)
        assert draw_classes("best_classes", s, 1000) == first[s]
    # Each list member equally likely (chi-square, 5 sigma), the three positions independent of each other.
    for pos, lst in enumerate((BEST_SHAPE_CLASSES, BEST_TEXTURE_CLASSES, BEST_BACKGROUND_CLASSES)):
        counts = np.array([sum(t[pos] == c for t in first.values()) for c in lst])
        exp = len(seeds) / len(lst)
        chi2, dof = float(((counts - exp) ** 2 / exp).sum()), len(lst) - 1
        assert counts.sum() == len(seeds) and chi2 < dof + 5 * (2 * dof) ** 0.5, (pos, chi2)
    rand = np.array([draw_classes("random", s, 10) for s in seeds])
    for pos in range(3):
        counts = np.bincount(rand[:, pos], minlength=10)
        assert (((counts - 300) ** 2 / 300).sum()) < 9 + 5 * 18 ** 0.5
    assert 0.85 < (rand[:, 0] != rand[:, 1]).mean() < 0.95  # independent: equal one time in ten
    assert draw_classes("fixed_classes", 5, 1000, (7, 8, 9)) == (7, 8, 9)


def _tars(folder):
    return {p.name: sha256_file(p) for p in sorted(folder.glob("shard-*.tar"))}


def test_bytes_do_not_depend_on_batch_size_or_workers(tmp_path, tiny_random):
    factory = ImagenetCounterfactualFactory(**TINY)
    kw = dict(n_samples=10, shard_size=5, run_seed=7, progress=False)
    generate_dataset(factory, tmp_path / "b1", batch_size=1, **kw)
    generate_dataset(factory, tmp_path / "b4", batch_size=4, num_workers=2, **kw)
    assert len(_tars(tmp_path / "b1")) == 2
    assert _tars(tmp_path / "b1") == _tars(tmp_path / "b4")
    # one sample asked for alone, or within any batch, gives the stored bytes
    stored = {s["__key__"]: s for s in read_tar_samples(tmp_path / "b1" / "shard-000001.tar")}
    sampler = factory()
    spec = make_plan(10, 5, run_seed=7)[1]
    alone = sampler.sample(sample_refs(spec, 3, 4))[0]
    assert alone["jpg"] == stored["000001_000003"]["jpg"]
    sampler.clear_cache()
    batch = sampler.sample(sample_refs(spec, 1, 5))
    assert [b["jpg"] for b in batch] == [stored[f"000001_{i:06d}"]["jpg"] for i in range(1, 5)]


def test_factory_pickles_and_rebuilds_from_its_description():
    factory = ImagenetCounterfactualFactory(**TINY, mode="fixed_classes", classes=(4, 5, 6))
    assert pickle.loads(pickle.dumps(factory)) == factory
    desc = json.loads(json.dumps(describe_factory(factory)))
    assert desc["kwargs"]["classes"] == [4, 5, 6]
    assert build_factory(desc) == factory


def test_minmax_matches_torchvision_save_image(tmp_path):
    from torchvision.utils import save_image

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.4 - 0.9
    ours = to_uint8(x, "minmax")
    for i in range(2):
        save_image(x[i], tmp_path / "a.png", normalize=True)  # the authors' call, lossless here
        assert np.array_equal(_image((tmp_path / "a.png").read_bytes()), ours[i])


def test_fixed_mapping_hand_computed():
    # (x + 1) * 127.5 rounded half to even, clamped: -1 -> 0, -0.5 -> 63.75 -> 64, 0 -> 127.5 -> 128,
    # 0.5 -> 191.25 -> 191, 1 -> 255; outside [-1, 1] clamps; -0.996 -> 0.51 -> 1; 2/255 - 1 -> 1 exactly.
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, -2.0, -0.996, 2 / 255 - 1]).view(1, 1, 1, 9).repeat(1, 3, 1, 1)
    want = [0, 64, 128, 191, 255, 255, 0, 1, 1]
    out = to_uint8(x, "fixed")
    assert out.shape == (1, 1, 9, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == want and (out[..., 0] == out[..., 2]).all()


def _mechanisms_of(seed):
    model, _ = build_generation_model("", "tiny", "tiny", seed=seed)
    return model


def test_every_kind_of_checkpoint_loads(tmp_path):
    from cgn_dist.models.original_imagenet import to_original_state_dict

    source = _mechanisms_of(5)
    sd = source.trainable_state_dict()
    step = tmp_path / "run" / "checkpoints" / "step_0000003"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 3, "engines": ["mechanisms"]}))
    torch.save({"module": sd, "optimizer": {}}, step / "mechanisms.pt")
    ds_step = tmp_path / "ds" / "checkpoints" / "step_0000001"
    (ds_step / "mechanisms" / "mechanisms").mkdir(parents=True)
    (ds_step / "meta.json").write_text(json.dumps({"step": 1, "engines": ["mechanisms"]}))
    torch.save({"module": {k: v.to(torch.bfloat16) for k, v in sd.items()}},
               ds_step / "mechanisms" / "mechanisms" / "mp_rank_00_model_states.pt")
    torch.save({"module": sd, "kind": "cgn_imagenet"}, tmp_path / "imported.pt")
    torch.save(sd, tmp_path / "bare.pt")
    torch.save(to_original_state_dict(source), tmp_path / "cgn.pth")

    assert resolve_cgn_checkpoint(tmp_path / "run") == step / "mechanisms.pt"
    assert resolve_cgn_checkpoint(step) == step / "mechanisms.pt"
    for path in (tmp_path / "run", tmp_path / "imported.pt", tmp_path / "bare.pt", tmp_path / "cgn.pth"):
        model, file = build_generation_model(str(path), "tiny", "tiny", seed=0)
        assert file is not None
        for k, v in model.trainable_state_dict().items():
            assert torch.equal(v, sd[k]), (path, k)
    model, _ = build_generation_model(str(tmp_path / "ds"), "tiny", "tiny", seed=0)  # bf16 -> fp32
    assert torch.equal(model.trainable_state_dict()["f_bg.embeddings.weight"],
                       sd["f_bg.embeddings.weight"].to(torch.bfloat16).float())
    # the authors' file brings its own U^2-Net
    original, _ = build_generation_model(str(tmp_path / "cgn.pth"), "tiny", "tiny", seed=0)
    pairs = zip(original.u2net.state_dict().values(), source.u2net.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    sampler = ImagenetCounterfactualFactory(**dict(TINY, checkpoint=str(tmp_path / "bare.pt")))()
    assert sampler.info()["checkpoint_sha256"] == sha256_file(tmp_path / "bare.pt")

    mnist_step = tmp_path / "mnist" / "checkpoints" / "step_0000002"
    mnist_step.mkdir(parents=True)
    (mnist_step / "meta.json").write_text(json.dumps({"step": 2, "engines": ["generator", "discriminator"]}))
    with pytest.raises(CGNCheckpointError, match="task=mnist"):
        resolve_cgn_checkpoint(tmp_path / "mnist")
    torch.save({"module": {"label_emb.weight": torch.zeros(10, 10)}}, tmp_path / "generator.pt")
    with pytest.raises(CGNCheckpointError, match="task=mnist"):
        build_generation_model(str(tmp_path / "generator.pt"), "tiny", "tiny")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_cgn_checkpoint(tmp_path / "nowhere.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CGNCheckpointError, match="it is a text file .*, not a checkpoint"):
        build_generation_model(str(tmp_path / "junk.pt"), "tiny", "tiny")


def test_bad_inputs_fail_before_any_model_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ImagenetCounterfactualFactory(**dict(TINY, truncation=0.0))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ImagenetCounterfactualFactory(**dict(TINY, truncation=1.5))
    with pytest.raises(ValueError, match="three class ids"):
        ImagenetCounterfactualFactory(**TINY, mode="fixed_classes", classes=[1, 2])
    with pytest.raises(ValueError, match=r"out of range .*10 classes"):
        ImagenetCounterfactualFactory(**TINY, mode="fixed_classes", classes=[1, 2, 10]).validate()
    with pytest.raises(FileNotFoundError, match="U²-Net"):
        ImagenetCounterfactualFactory(**dict(TINY, u2net=str(tmp_path / "u2net.pth"))).validate()
    with pytest.raises(ValueError, match="checkpoint is empty"):
        ImagenetCounterfactualFactory(**dict(TINY, biggan="biggan-deep-256", u2net="tiny")).validate()
    with pytest.raises(FileNotFoundError):
        ImagenetCounterfactualFactory(**dict(TINY, checkpoint=str(tmp_path / "none.pth"))).validate()


def test_interpolation_moves_only_the_chosen_mechanism(tmp_path, tiny_random):
    res = tiny_random.interpolate([1, 2, 3], 7, mechanism="text", midpoints=3, seed=4)
    assert res["steps"] == 5 and res["composite"].shape == (5, 32, 32, 3) and res["alphas"][-1] == 1.0
    # shape and background keep their classes and the noise: their frames do not move
    assert np.abs(res["mask"].astype(int) - res["mask"][0].astype(int)).max() <= 1
    assert np.abs(res["bg"].astype(int) - res["bg"][0].astype(int)).max() <= 1
    assert np.abs(res["fg"][-1].astype(int) - res["fg"][0].astype(int)).max() > 1
    # the last frame's texture is the target class's
    fixed = ImagenetCounterfactualFactory(**TINY, mode="fixed_classes", classes=[1, 7, 3])()
    end = fixed.interpolate([1, 7, 3], 7, mechanism="text", midpoints=0, seed=4)
    assert np.abs(end["fg"][0].astype(int) - res["fg"][-1].astype(int)).max() <= 1

    out = write_interpolation(tmp_path, res, image_format="png", meta={"seed": 4})
    sheet = _image((out / "sheet.png").read_bytes())
    grid = interpolation_sheet(res, labels=False)
    assert grid.shape == (4 * 34 + 2, 5 * 34 + 2, 3)
    # the written sheet is that grid with a caption, step titles and row labels around it
    top = sheet.shape[0] - grid.shape[0]
    left = next(x for x in range(sheet.shape[1] - grid.shape[1] + 1)
                if np.array_equal(sheet[top:, x:x + grid.shape[1]], grid))  # unchanged, only moved
    assert top > 16 and left > 20
    dark = lambda a: int((a < 128).any(axis=-1).sum())  # noqa: E731 - black text on white
    assert dark(sheet[:top // 2]) > 0  # the caption
    assert all(dark(sheet[top // 2:top, left + 2 + c * 34:left + 2 + c * 34 + 32]) > 0 for c in range(5))
    assert all(dark(sheet[top + 2 + r * 34:top + 2 + r * 34 + 32, :left]) > 0 for r in range(4))
    doc = json.loads((out / "interpolation.json").read_text())
    assert doc["frames"] == [f"frame_{i:03d}.png" for i in range(5)] and doc["seed"] == 4
    assert doc["target_name"] == class_name(7)
    assert np.array_equal(_image((out / "frame_004.png").read_bytes()), res["composite"][4])
    write_interpolation(tmp_path, res, image_format="jpg")  # replaces the folder whole
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("frame"))[0] == "frame_000.jpg"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="out of range"):
        tiny_random.interpolate([1, 2, 3], 10)


def test_u2net_upsampling_option_reaches_the_generation_model():
    # Default: the CGN authors' U²-Net (align_corners=True); false: upstream's, recorded in the provenance.
    ours = ImagenetCounterfactualFactory(**TINY)()
    upstream = ImagenetCounterfactualFactory(**TINY, u2net_align_corners=False)()
    rsus = lambda s: [m for m in s.model.u2net.modules() if hasattr(m, "align_corners")]  # noqa: E731
    assert rsus(ours) and all(m.align_corners for m in rsus(ours))
    assert all(not m.align_corners for m in rsus(upstream))
    assert "u2net_align_corners" not in ours.info() and upstream.info()["u2net_align_corners"] is False
    refs = sample_refs(make_plan(4, 4, run_seed=1)[0])
    a, b = ours.sample(refs), upstream.sample(refs)
    assert [s["json"]["mask_mean"] for s in a] != [s["json"]["mask_mean"] for s in b]


def test_u2net_upsampling_option_from_the_config(tmp_path):
    from cgn_dist.config import load_config
    from cgn_dist.generate.command import imagenet_factory

    cfg = load_config("configs/debug/generate_tiny.yaml", [f"out_dir={tmp_path}", "imagenet.u2net_align_corners=false"])
    assert imagenet_factory(cfg).u2net_align_corners is False
