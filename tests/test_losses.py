"""CGN losses against hand-computed values on tiny tensors (spec §1.4, §2.3)."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from cgn_dist import losses
from cgn_dist.losses import (VGG16Features, background_loss, binary_entropy_loss, gram, l1_loss, lsgan_loss,
                             mean_abs_diff,
                             mask_area_loss, perceptual_loss, style_loss, texture_collage_target)


@pytest.fixture(scope="module")
def vgg():
    return VGG16Features("random")


def test_gram_hand_computed():
    f = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    torch.testing.assert_close(gram(f), torch.tensor([[[30.0 / 4]]]))
    f = torch.tensor([[1.0, 2.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # C=2, H=1, W=2
    torch.testing.assert_close(gram(f), torch.tensor([[[5.0, 2.0], [2.0, 1.0]]]) / 4)
    # channels-last features (what the fast update's VGG gives) take another path: a sum over pixels by hand
    f = torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last)
    by_hand = torch.stack([sum(f[b, :, i, j][:, None] * f[b, :, i, j][None, :] for i in range(3) for j in range(4))
                           for b in range(2)]) / (5 * 3 * 4)
    torch.testing.assert_close(gram(f), by_hand)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gram_with_the_scale_folded_into_the_features(channels_last):
    # C > H W (where the fast path folds 1 / sqrt(CHW) into the features), and C <= H W (where it does not)
    for shape in ((2, 7, 2, 3), (2, 3, 2, 3)):
        f = torch.randn(*shape)
        if channels_last:
            f = f.contiguous(memory_format=torch.channels_last)
        b, c, h, w = shape
        by_hand = torch.einsum("bchw,bdhw->bcd", f, f) / (c * h * w)
        torch.testing.assert_close(gram(f, fold_scale=True), by_hand)


def test_mean_abs_diff_value_and_gradient_by_hand():
    a = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0], [0.5, 1.0]])
    loss = mean_abs_diff(a, t)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor((1.0 + 3.0 + 0.0 + 2.0) / 4))
    # sign(a - t) / n, 0 where equal (as F.l1_loss)
    torch.testing.assert_close(a.grad, torch.tensor([[1.0, -1.0], [0.0, 1.0]]) / 4)
    with pytest.raises(ValueError, match="constant target"):
        mean_abs_diff(a, a)


def test_fast_style_loss_equals_the_plain_one():
    g = torch.Generator().manual_seed(0)
    # the shapes of VGG blocks 1-4 for a 32 px input, shrunk in batch and channels but keeping C vs H W
    shapes = [(2, 8, 16, 16), (2, 16, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    fa = [torch.relu(torch.randn(s, generator=g)).contiguous(memory_format=torch.channels_last) for s in shapes]
    fb = [torch.relu(torch.randn(s, generator=g)).contiguous(memory_format=torch.channels_last) for s in shapes]
    weights = [0.05, 0.1, 0.01, 0.02]
    grads = []
    for fast in (False, True):
        xs = [f.clone().requires_grad_() for f in fa]
        loss = style_loss(xs, fb, weights, fast=fast)
        loss.backward()
        grads.append((loss.detach(), [x.grad for x in xs]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=0)
    for new, ref in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(new, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_style_loss_squares_weights_scales_by_5000_and_skips_zero_layers():
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    b = torch.zeros_like(a)
    junk = torch.randn(1, 3, 2, 2)  # a layer with weight 0 is never looked at
    loss = style_loss([a, junk], [b, torch.randn(1, 5, 2, 2)], [0.5, 0.0])
    # 0.5^2 * 5000 * mean(|[1.25, .5, .5, .25]|) = 1250 * 0.625
    torch.testing.assert_close(loss, torch.tensor(781.25))
    assert style_loss([a], [a], [3.0]).item() == 0.0
    torch.testing.assert_close(style_loss([a, junk], [b, torch.randn(1, 5, 2, 2)], [0.5, 0.0], fast=True),
                               torch.tensor(781.25))


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
    # torchvision's own VGG16 ("D") feature stack with the same weights, read at relu1_2/2_2/3_3/4_3
    from torchvision.models.vgg import cfgs, make_layers

    tv = make_layers(cfgs["D"]).eval()
    missing, _ = tv.load_state_dict(vgg.features.state_dict(), strict=False)
    assert not missing or all(int(k.split(".")[0]) > 22 for k in missing)
    h, ref = x, []
    with torch.no_grad():
        for i, layer in enumerate(tv[:23]):
            h = layer(h)
            if isinstance(layer, torch.nn.ReLU) and isinstance(tv[i + 1], torch.nn.MaxPool2d | type(None)) \
                    or i == 22:
                ref.append(h)
    assert len(ref) == 4
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r)
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
    # Written out separately: sum_k w_k^2 * 5000 * mean |G_k(x) - G_k(t)|, G = F F^T / (C H W) by einsum.
    ref = 0.0
    with torch.no_grad():
        for wk, fx, ft in zip(w, vgg(x), vgg(t)):
            c, hw = fx.shape[1], fx.shape[2] * fx.shape[3]
            gx = torch.einsum("bchw,bdhw->bcd", fx, fx) / (c * hw)
            gt = torch.einsum("bchw,bdhw->bcd", ft, ft) / (c * hw)
            ref = ref + wk * wk * 5000 * (gx - gt).abs().mean()
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-4, atol=1e-6)
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


def _collage_by_unfold(x, mask, generator, patch=15, top_k=100, grid=6, work=128, out=256):
    """Spec §2.3 written separately: unfold every 15x15 window of the 128 px image and mask, rank windows
    by mean mask (argsort), draw grid^2 of the top 100 with replacement, tile row by row with cat, resize."""
    xs = F.interpolate(x, size=(work, work), mode="bicubic", align_corners=False)
    ms = F.interpolate(mask, size=(work, work), mode="bicubic", align_corners=False)
    b, c = x.shape[:2]
    windows = F.unfold(xs, patch).view(b, c, patch, patch, -1)  # B x C x p x p x L
    score = F.unfold(ms, patch).mean(dim=1)  # B x L
    picks = torch.randint(0, top_k, (b, grid * grid), generator=generator)
    res = []
    for i in range(b):
        best = torch.argsort(score[i], descending=True)[:top_k]
        tiles = [windows[i, ..., best[k]] for k in picks[i].tolist()]
        rows = [torch.cat(tiles[r * grid:(r + 1) * grid], dim=2) for r in range(grid)]
        res.append(torch.cat(rows, dim=1))
    return F.interpolate(torch.stack(res), size=(out, out), mode="bicubic", align_corners=False)


def test_texture_collage_equals_an_independent_patch_sampler():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 256, 256, generator=g) * 2 - 1
    # A tilted ramp: window means differ by >= ~1e-5 (no near-ties whose order float rounding could flip),
    # and the top 100 windows span several rows and columns near one corner (a different one per image).
    i, j = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    ramp = (i + 0.37 * j) / (1.37 * 256)
    mask = torch.stack([ramp, ramp.flip(0, 1)])[:, None]
    out = texture_collage_target(x, mask, generator=torch.Generator().manual_seed(9))
    ref = _collage_by_unfold(x, mask, torch.Generator().manual_seed(9))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
