"""CGN-ImageNet wiring on the tiny config: forward, generate, freezing, checkpoints,
optimizer groups and a few training steps."""
import pytest
import torch

from cgn_dist.losses import VGG16Features
from cgn_dist.models.biggan import build_biggan, class_vector, clone_biggan, truncated_noise
from cgn_dist.models.cgn_imagenet import MASK_MAX, MASK_MIN, CGNImageNet, build_cgn_imagenet
from cgn_dist.models.u2net import build_u2net
from cgn_dist.train.imagenet_step import (
    ImagenetLossWeights,
    build_optimizer,
    imagenet_losses,
    imagenet_train_step,
    sample_inputs,
)

LOSS_KEYS = {"l1", "perceptual", "binary", "mask_area", "texture", "background", "total"}


@pytest.fixture(scope="module")
def vgg():
    return VGG16Features("random")


@pytest.fixture
def cgn():
    return build_cgn_imagenet("tiny", "tiny")


def _inputs(batch=2, cls=3, seed=0):
    return truncated_noise(batch, 16, 1.0, seed=seed), class_vector([cls], 10)


def test_forward_shapes_ranges_and_teacher(cgn):
    u, y = _inputs()
    out = cgn(u, y, 1.0)
    assert set(out) == {"x_gt", "premask", "mask", "foreground", "background", "bg_saliency", "composite"}
    for k in ("x_gt", "premask", "foreground", "background", "composite"):
        assert out[k].shape == (2, 3, 32, 32), k
        assert out[k].abs().max() <= 1, k
    for k in ("mask", "bg_saliency"):
        assert out[k].shape == (2, 1, 32, 32), k
    assert out["mask"].min() >= MASK_MIN and out["mask"].max() <= MASK_MAX
    assert not out["x_gt"].requires_grad and out["composite"].requires_grad
    # The mechanisms start as copies of the teacher, so in eval mode the composite
    # reconstructs the teacher output exactly (m*x + (1-m)*x).
    cgn.eval()
    with torch.no_grad():
        out = cgn(u, y, 1.0)
    assert torch.allclose(out["composite"], out["x_gt"], atol=1e-5)


def test_generate_equals_training_composite(cgn):
    cgn.eval()
    u, y = _inputs(batch=3)
    with torch.no_grad():
        out = cgn(u, y, 0.6)
        assert torch.equal(cgn.generate(u, y, y, y, 0.6), out["composite"])
        layers = cgn.generate(u, y, y, y, 0.6, return_layers=True)
        for k in ("premask", "mask", "foreground", "background", "composite"):
            assert torch.equal(layers[k], out[k]), k
        # Different classes per mechanism change the result.
        cf = cgn.generate(u, class_vector([1], 10), class_vector([5], 10), class_vector([8], 10), 0.6)
    assert cf.shape == (3, 3, 32, 32) and not torch.equal(cf, out["composite"])


def test_frozen_parts_stay_eval_and_untrainable(cgn):
    cgn.train()
    assert cgn.mechanisms.training and cgn.f_shape.training
    assert not cgn.biggan_gt.training and not cgn.u2net.training
    assert not any(m.training for m in cgn.u2net.modules())
    assert all(not p.requires_grad for p in cgn.biggan_gt.parameters())
    assert all(not p.requires_grad for p in cgn.u2net.parameters())
    trainable = {id(p) for p in cgn.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in cgn.mechanisms.parameters()}


def test_input_errors(cgn):
    u, y = _inputs()
    with pytest.raises(ValueError, match="truncation"):
        cgn(u, y, 0.0)
    with pytest.raises(ValueError, match="class input"):
        cgn(u, class_vector([1], 1000), 1.0)
    with pytest.raises(ValueError, match="noise"):
        cgn(torch.zeros(2, 7), y, 1.0)
    with pytest.raises(ValueError, match="batch"):
        cgn.generate(u, class_vector([1, 2, 3], 10), y, y)


def test_trainable_checkpoint_roundtrip(cgn, tmp_path):
    sd = cgn.trainable_state_dict()
    assert {k.split(".")[0] for k in sd} == {"f_shape", "f_text", "f_bg"}
    with torch.no_grad():
        cgn.f_text.embeddings.weight.add_(0.5)
    path = cgn.save_trainable(tmp_path / "ckpt" / "mechanisms.pt")
    other = build_cgn_imagenet("tiny", "tiny")
    other.load_trainable(path)
    assert torch.equal(other.f_text.embeddings.weight, cgn.f_text.embeddings.weight)
    with pytest.raises(ValueError, match="missing keys"):
        other.load_trainable_state_dict({k: v for k, v in sd.items() if not k.startswith("f_bg.")})
    with pytest.raises(FileNotFoundError):
        other.load_trainable(tmp_path / "nope.pt")


def test_build_optimizer_groups(cgn):
    opt = build_optimizer(cgn.mechanisms)
    assert [g["name"] for g in opt.param_groups] == ["shape", "text", "bg"]
    assert [g["lr"] for g in opt.param_groups] == [8e-6, 3e-5, 1e-5]
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in cgn.mechanisms.parameters()}
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in cgn.f_shape.parameters()}


def test_sample_inputs_one_class_per_batch():
    u, y, cls = sample_inputs(4, 10, 16, 0.5, torch.Generator().manual_seed(1))
    assert u.shape == (4, 16) and y.shape == (4, 10)
    assert (y.argmax(1) == cls).all() and not torch.equal(u[0], u[1])
    u2, _, cls2 = sample_inputs(4, 10, 16, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(u, u2) and cls == cls2


def test_losses_keys_weights_and_total(cgn, vgg):
    u, y = _inputs()
    out = cgn(u, y, 1.0)
    w = ImagenetLossWeights()
    assert (w.l1, w.perceptual, w.binary, w.mask_area, w.texture, w.background) == (
        100, (4, 4, 4, 4), 300, 500, (0, 5, 5, 0), 2000)
    losses = imagenet_losses(out, vgg, w, generator=torch.Generator().manual_seed(0))
    assert set(losses) == LOSS_KEYS
    assert torch.allclose(losses["total"], sum(v for k, v in losses.items() if k != "total"))
    # Weights scale their terms linearly.
    half = imagenet_losses(out, vgg, ImagenetLossWeights(binary=150.0, background=0.0),
                           generator=torch.Generator().manual_seed(0))
    assert torch.allclose(half["binary"], losses["binary"] / 2) and half["background"] == 0


def test_training_steps_lower_the_loss_and_reach_every_mechanism(vgg):
    # Mechanisms start away from the teacher (other seed) so reconstruction has work to do.
    start = build_biggan("tiny", seed=0)
    cgn = CGNImageNet(build_biggan("tiny", seed=1), clone_biggan(start), clone_biggan(start),
                      clone_biggan(start), build_u2net("tiny")).train()
    opt = build_optimizer(cgn.mechanisms, lr_shape=1e-3, lr_text=1e-3, lr_bg=1e-3)
    teacher = {k: v.clone() for k, v in cgn.biggan_gt.state_dict().items()}
    totals = []
    for step in range(5):
        # Same generator seed each step: same class, noise and collage, so the loss is comparable.
        losses = imagenet_train_step(cgn, vgg, 2, 1.0, torch.Generator().manual_seed(0))
        assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
        if step == 0:
            for g in opt.param_groups:
                assert sum(p.grad.abs().sum() for p in g["params"] if p.grad is not None) > 0, g["name"]
        opt.step()
        opt.zero_grad()
        totals.append(losses["total"].item())
    assert totals[-1] < totals[0]
    assert all(torch.equal(v, cgn.biggan_gt.state_dict()[k]) for k, v in teacher.items())
