"""Importer of the authors' CGN-ImageNet checkpoint (cgn.pth)."""
import json

import pytest
import torch

from cgn_dist.models.biggan import BigGAN, biggan_deep_256_config, class_vector, truncated_noise
from cgn_dist.models.cgn_imagenet import CGNImageNet, build_cgn_imagenet
from cgn_dist.models.original_imagenet import (
    convert_original_state_dict,
    load_original_cgn_imagenet,
    load_original_state_dict,
    to_original_state_dict,
)
from cgn_dist.models.u2net import U2Net, check_state_dict


@pytest.fixture(scope="module")
def ref_keys(shared_ref):
    return json.loads((shared_ref / "original_cgn_imagenet_keys.json").read_text())


def test_mapping_covers_every_released_key_at_full_size(ref_keys):
    # Full layout; one BigGAN instance in all four slots is enough for names and shapes.
    g = BigGAN(biggan_deep_256_config())
    cgn = CGNImageNet(g, g, g, g, U2Net())
    fake = {"module." + k: torch.empty(v, device="meta") for k, v in ref_keys.items()}
    mapped = convert_original_state_dict(fake)
    check_state_dict(cgn, mapped, "released key list")  # raises on any mismatch
    assert len(mapped) == len(ref_keys) == 3206
    assert {k: list(v.shape) for k, v in to_original_state_dict(cgn).items()} == ref_keys


def test_a_hand_written_file_in_the_authors_layout_loads_into_the_right_places(tmp_path):
    # The authors' layout, written without our exporter: their top-level names (biggan_GT, f_shape,
    # f_text, f_bg, u2net; cgn_spec §2.2), a DataParallel "module." prefix, a distinct value per tensor.
    ours_to_theirs = {"biggan_gt.": "biggan_GT.", "mechanisms.f_shape.": "f_shape.",
                      "mechanisms.f_text.": "f_text.", "mechanisms.f_bg.": "f_bg.", "u2net.": "u2net."}
    layout = build_cgn_imagenet("tiny", "tiny", seed=0).state_dict()
    theirs = {}
    for i, (k, v) in enumerate(layout.items()):
        prefix = next(p for p in ours_to_theirs if k.startswith(p))
        theirs["module." + ours_to_theirs[prefix] + k[len(prefix):]] = (
            torch.full_like(v, i) if v.is_floating_point() else v.clone())
    torch.save(theirs, tmp_path / "cgn.pth")
    dst = load_original_cgn_imagenet(tmp_path / "cgn.pth", cgn=build_cgn_imagenet("tiny", "tiny", seed=5))
    got = dst.state_dict()
    assert torch.equal(got["biggan_gt.embeddings.weight"], theirs["module.biggan_GT.embeddings.weight"])
    assert torch.equal(dst.f_text.embeddings.weight, theirs["module.f_text.embeddings.weight"])
    assert torch.equal(dst.f_bg.generator.gen_z.weight_orig, theirs["module.f_bg.generator.gen_z.weight_orig"])
    assert torch.equal(dst.u2net.side6.weight, theirs["module.u2net.side6.weight"])
    for k, v in theirs.items():
        name = k[len("module."):]
        prefix = next(t for t in ours_to_theirs.values() if name.startswith(t))
        ours = {t: o for o, t in ours_to_theirs.items()}[prefix] + name[len(prefix):]
        assert torch.equal(got[ours], v), k


def test_tiny_roundtrip_through_original_format(tmp_path):
    # Consistency of our exporter with our importer (the layout itself is checked above and against the
    # released key list).
    src = build_cgn_imagenet("tiny", "tiny", seed=0)
    with torch.no_grad():  # make the mechanisms differ from the teacher
        src.f_bg.embeddings.weight.mul_(-1)
    torch.save({"module." + k: v for k, v in to_original_state_dict(src).items()}, tmp_path / "cgn.pth")
    dst = load_original_cgn_imagenet(tmp_path / "cgn.pth", cgn=build_cgn_imagenet("tiny", "tiny", seed=5))
    assert not dst.training
    src.eval()
    u, y = truncated_noise(2, 16, 0.5, seed=0), class_vector([2], 10)
    with torch.no_grad():
        assert torch.equal(src.generate(u, y, y, y, 0.5), dst.generate(u, y, y, y, 0.5))
        assert torch.equal(src(u, y, 0.5)["x_gt"], dst(u, y, 0.5)["x_gt"])


def test_not_a_checkpoint(tmp_path):
    cgn = build_cgn_imagenet("tiny", "tiny")
    with pytest.raises(FileNotFoundError, match="cgn.pth"):
        load_original_cgn_imagenet(tmp_path / "missing.pth", cgn=cgn)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="it is a text file .*, not a checkpoint"):
        load_original_cgn_imagenet(tmp_path / "junk.pth", cgn=cgn)
    torch.save({"G_shape.fc.weight": torch.zeros(2)}, tmp_path / "mnist.pth")
    with pytest.raises(ValueError, match="not a CGN-ImageNet checkpoint"):
        load_original_cgn_imagenet(tmp_path / "mnist.pth", cgn=cgn)
    sd = to_original_state_dict(cgn)
    del sd["f_text.embeddings.weight"]
    with pytest.raises(ValueError, match="missing keys.*mechanisms.f_text.embeddings.weight"):
        load_original_state_dict(cgn, sd)


@pytest.mark.slow
def test_full_size_random_checkpoint_loads(ref_keys):
    # ~280M floats on each side (model + state dict): ~2.3 GB, no forward.
    # A distinct constant per tensor: cheap to fill, and a wrong mapping shows up.
    state = {k: torch.full(v, float(i)) for i, (k, v) in enumerate(ref_keys.items())}
    cgn = load_original_state_dict(build_cgn_imagenet("random-256", "random"), state)
    assert torch.equal(cgn.f_shape.generator.gen_z.weight_orig, state["f_shape.generator.gen_z.weight_orig"])
    assert torch.equal(cgn.biggan_gt.embeddings.weight, state["biggan_GT.embeddings.weight"])
    assert torch.equal(cgn.u2net.side6.weight, state["u2net.side6.weight"])
    assert cgn.trainable_state_dict().keys() == {
        k[len("mechanisms."):] for k in cgn.state_dict() if k.startswith("mechanisms.")}
