"""CGN losses against hand-computed values on tiny tensors (spec §1.4, §2.3)."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from cgn_dist import losses
from cgn_dist.losses import (VGG16Features, background_loss, binary_entropy_loss, gram, l1_loss, lsgan_loss,
                             mask_area_loss, perceptual_loss, style_loss, texture_collage_target)


@pytest.fixture(scope="module")
def vgg():
    return VGG16Features("random")


def test_gram_hand_computed():
    f = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    torch.testing.assert_close(gram(f), torch.tensor([[[30.0 / 4]]]))
    f = torch.tensor([[1.0, 2.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # C=2, H=1, W=2
    torch.testing.assert_close(gram(f), torch.tensor([[[5.0, 2.0], [2.0, 1.0]]]) / 4)


def test_style_loss_squares_weights_scales_by_5000_and_skips_zero_layers():
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    b = torch.zeros_like(a)
    junk = torch.randn(1, 3, 2, 2)  # a layer with weight 0 is never looked at
    loss = style_loss([a, junk], [b, torch.randn(1, 5, 2, 2)], [0.5, 0.0])
    # 0.5^2 * 5000 * mean(|[1.25, .5, .5, .25]|) = 1250 * 0.625
    torch.testing.assert_close(loss, torch.tensor(781.25))
    assert style_loss([a], [a], [3.0]).item() == 0.0


def test_binary_entropy_loss():
    assert binary_entropy_loss(torch.full((2, 1, 3, 3), 0.5)).item() == pytest.approx(1.0)
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))  # 0.8113
    m = torch.tensor([0.25, 0.5]).view(1, 1, 1, 2)
    assert binary_entropy_loss(m).item() == pytest.approx((h + 1.0) / 2, rel=1e-6)


def test_mask_area_loss_is_per_sample_hinge_then_batch_mean():
    m = torch.stack([torch.full((1, 2, 2), 0.05), torch.full((1, 2, 2), 0.95), torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])])
    # sample means 0.05, 0.95, 0.5 -> hinges 0.05, 0.05, 0
    assert mask_area_loss(m).item() == pytest.approx(0.1 / 3)
    assert mask_area_loss(m, lo=0.0, hi=1.0).item() == 0.0


def test_background_l1_lsgan():
    assert background_loss(torch.tensor([-1.0, 0.5, 1.5, 0.0])).item() == pytest.approx(0.5)
    assert l1_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])).item() == pytest.approx(1.5)
    p = torch.tensor([0.5, 2.0])
    assert lsgan_loss(p, True).item() == pytest.approx(0.625)
    assert lsgan_loss(p, False).item() == pytest.approx(2.125)


def test_vgg_layers_match_torchvision_vgg16(vgg):
    # torchvision vgg16().features: convs at these indices (its state-dict keys), ReLU after
    # each, max-pools at 4, 9, 16; relu1_2/2_2/3_3/4_3 are 3, 8, 15, 22.
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21]
    assert sorted(vgg.features.state_dict()) == sorted(f"{i}.{p}" for i in convs for p in ("weight", "bias"))
    assert [i for i, m in enumerate(vgg.features) if isinstance(m, torch.nn.MaxPool2d)] == [4, 9, 16]
    assert len(vgg.features) == 23
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    outs = vgg(x)
    assert [o.shape[1:] for o in outs] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    for o, idx in zip(outs, (3, 8, 15, 22)):
        torch.testing.assert_close(o, vgg.features[: idx + 1](x))
        assert o.min() >= 0  # taken after the ReLU


def test_vgg_random_is_deterministic_frozen_and_stays_eval(vgg, tmp_path):
    other = VGG16Features("random")
    for a, b in zip(vgg.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in vgg.parameters())
    vgg.train()
    assert not vgg.training
    path = tmp_path / "vgg.pth"
    torch.save({f"features.{k}": v for k, v in vgg.features.state_dict().items()}, path)
    loaded = VGG16Features(path)
    assert loaded.weights_source == str(path)
    assert torch.equal(loaded.features[0].weight, vgg.features[0].weight)
    with pytest.raises(FileNotFoundError):
        VGG16Features(tmp_path / "missing.pth")


def test_vgg_auto_falls_back_with_one_warning(monkeypatch, caplog):
    def unavailable(allow_download):
        raise OSError("offline")

    monkeypatch.setattr(losses, "_load_imagenet_vgg16_state", unavailable)
    with caplog.at_level(logging.WARNING, logger="cgn_dist.losses"):
        v = VGG16Features("auto")
    assert v.weights_source == "random"
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    with pytest.raises(RuntimeError, match="ImageNet weights are unavailable"):
        VGG16Features("imagenet")


def test_perceptual_loss(vgg):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).requires_grad_()
    t = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    w = [0.05, 0.1, 0.01, 0.0]
    loss = perceptual_loss(vgg, x, t, w)
    ref = style_loss(vgg(x), vgg(t), w)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert x.grad.abs().sum() > 0
    assert perceptual_loss(vgg, t, t, w).item() == 0.0
    assert perceptual_loss(vgg, x, t, [0, 0, 0, 0]).item() == 0.0
    assert len(vgg(x, num_outputs=2)) == 2


def test_texture_collage_hand_computed():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 2:4, 1:3] = 1.0  # the only fully-masked 2x2 window starts at (2, 1)
    out = texture_collage_target(x, mask, generator=torch.Generator().manual_seed(0), patch=2, top_k=1,
                                 grid=2, work_size=4, out_size=4)
    p = torch.tensor([[9.0, 10.0], [13.0, 14.0]])
    torch.testing.assert_close(out[0, 0], p.repeat(2, 2))


def test_texture_collage_samples_from_top_k_deterministically():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=g)
    mask = torch.zeros(2, 1, 6, 6)
    mask[:, :, :2, :] = 1.0  # the top windows are the 5 in row 0 (patch 2, stride 1)
    kw = dict(patch=2, top_k=5, grid=3, work_size=6, out_size=6)
    a = texture_collage_target(x, mask, generator=torch.Generator().manual_seed(1), **kw)
    b = texture_collage_target(x, mask, generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (2, 3, 6, 6) and torch.equal(a, b) and not a.requires_grad
    allowed = [x[:, :, 0:2, c:c + 2] for c in range(5)]
    for i in range(3):
        for j in range(3):
            tile = a[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
            for bi in range(2):
                assert any(torch.allclose(tile[bi], al[bi], atol=1e-5) for al in allowed)
    with pytest.raises(ValueError, match="top_k"):
        texture_collage_target(x, mask, patch=2, top_k=26, grid=3, work_size=6, out_size=6)


def test_texture_collage_paper_sizes():
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    mask = torch.rand(1, 1, 256, 256)
    out = texture_collage_target(x, mask, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 256, 256)
    # 36 patches of 15 px from a 128 px work image -> 90 px collage -> 256 px
    ref_small = F.interpolate(x, size=(128, 128), mode="bicubic", align_corners=False)
    assert out.abs().max() <= ref_small.abs().max() * 1.3
