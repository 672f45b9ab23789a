"""CGN-MNIST generator and discriminators: shapes, ranges, shuffler, init, sizes (spec §1.2-1.3)."""
import pytest
import torch
from torch import nn

from cgn_dist.models.cgn_mnist import (MASK_MAX, MASK_MIN, CGNMnist, count_parameters, draw_crop_offsets,
                                       init_cgn_weights, shuffle_texture, tile_and_crop)
from cgn_dist.models.discriminator import DiscConv, DiscLin


@pytest.fixture(scope="module")
def cgn():
    torch.manual_seed(0)
    return CGNMnist()


def test_parameter_count_matches_released_checkpoints(cgn):
    # 659,992 = the parameter count of the authors' released ckp.pth files (2.66 MB).
    assert count_parameters(cgn) == 659_992


def test_forward_shapes_ranges_and_composite(cgn):
    g = torch.Generator().manual_seed(1)
    y = torch.arange(10)
    mask, fg, bg, x = cgn(y, generator=g)
    assert mask.shape == (10, 1, 32, 32)
    assert fg.shape == bg.shape == x.shape == (10, 3, 32, 32)
    assert mask.min() >= MASK_MIN and mask.max() <= MASK_MAX
    for t in (fg, bg, x):
        assert t.min() >= -1 and t.max() <= 1
    torch.testing.assert_close(x, mask * fg + (1 - mask) * bg)


def test_mask_is_clamped_instance_norm_output_without_sigmoid(cgn):
    # InstanceNorm output has unit variance per sample, so plenty of values are outside
    # [1e-4, 0.9999] and land exactly on the bounds (a sigmoid would never reach them).
    cgn.train()
    mask, *_ = cgn(torch.arange(4), generator=torch.Generator().manual_seed(0))
    assert (mask == MASK_MIN).any() and (mask == MASK_MAX).any()


def test_forward_is_deterministic_given_generator(cgn):
    cgn.eval()
    y = torch.tensor([3, 1, 4, 1])
    a = cgn(y, generator=torch.Generator().manual_seed(5))
    b = cgn(y, generator=torch.Generator().manual_seed(5))
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    cgn.train()


def test_shared_input_in_training_and_separate_inputs_in_counterfactuals(cgn):
    cgn.eval()
    y = torch.tensor([2, 7])
    u = cgn.sample_noise(2, torch.Generator().manual_seed(0))
    m1, f1, b1, _ = cgn(y, u=u, shuffle=False)
    # Same labels and noise passed explicitly per mechanism == the default shared input.
    m2, f2, b2, _ = cgn(y, y, y, u=u, u_text=u, u_bg=u, shuffle=False)
    assert torch.equal(m1, m2) and torch.equal(f1, f2) and torch.equal(b1, b2)
    # Changing only the texture label changes only the foreground.
    m3, f3, b3, _ = cgn(y, y_text=torch.tensor([5, 5]), u=u, shuffle=False)
    assert torch.equal(m1, m3) and torch.equal(b1, b3) and not torch.equal(f1, f3)
    out = cgn.counterfactual(y, torch.tensor([0, 1]), torch.tensor([8, 9]), generator=torch.Generator().manual_seed(3))
    assert out[3].shape == (2, 3, 32, 32)
    cgn.train()


def test_shuffler_is_a_cyclic_shift_of_the_tiled_map():
    x = torch.randn(6, 3, 32, 32)
    offsets = torch.tensor([[0, 0], [32, 32], [5, 17], [31, 0], [0, 1], [16, 16]])
    out = tile_and_crop(x, offsets)
    for b, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[b], torch.roll(x[b], shifts=(-dy, -dx), dims=(1, 2)))


def test_shuffler_offsets_cover_0_to_32_per_axis_and_keep_gradients():
    g = torch.Generator().manual_seed(0)
    off = draw_crop_offsets(4000, 32, 32, g)
    assert off.min() == 0 and off.max() == 32
    assert not torch.equal(off[:, 0], off[:, 1])  # both axes drawn independently
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    y = shuffle_texture(x, torch.Generator().manual_seed(1))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # a permutation: every pixel used once


def test_init_cgn_weights():
    m = CGNMnist(init_type=None)
    emb_before = m.label_emb.weight.clone()
    init_cgn_weights(m, "orthogonal", 0.2, generator=torch.Generator().manual_seed(0))
    w = m.f_shape.fc.weight  # 4096 x 42: orthogonal columns scaled by the gain
    torch.testing.assert_close(w.T @ w, 0.04 * torch.eye(42), atol=1e-4, rtol=0)
    assert torch.count_nonzero(m.f_shape.fc.bias) == 0 and torch.count_nonzero(m.f_text.conv3.bias) == 0
    bn = torch.cat([m.f_text.bn1.weight, m.f_text.bn2.weight, m.f_bg.bn1.weight])
    assert abs(bn.mean().item() - 1) < 0.1 and 0.1 < bn.std().item() < 0.3
    assert torch.equal(m.label_emb.weight, emb_before)  # embedding keeps its default init
    init_cgn_weights(m, "normal", 0.03)
    assert abs(m.f_bg.fc.weight.std().item() - 0.03) < 0.002
    with pytest.raises(ValueError, match="init_type"):
        init_cgn_weights(m, "uniform", 0.1)


def test_disc_lin():
    d = DiscLin()
    linears = [m for m in d.model if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(3082, 512), (512, 512), (512, 512), (512, 1)]
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.4 for m in d.model) == 2
    out = d(torch.randn(5, 3, 32, 32), torch.arange(5))
    assert out.shape == (5,)


def test_disc_conv_shapes_and_init():
    d = DiscConv(init_generator=torch.Generator().manual_seed(0))
    sizes, h = [], torch.randn(3, 4, 32, 32)
    for m in d.model:
        h = m(h)
        if isinstance(m, (nn.Conv2d, nn.AvgPool2d)):
            sizes.append(h.shape[-1])
    assert sizes == [30, 28, 13, 5, 1, 1]
    convs = [m for m in d.model if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None and c.padding == (0, 0) for c in convs)
    w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(w.std().item() - 0.02) < 0.002
    assert d(torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 9])).shape == (3,)


def test_shuffler_equals_tile_then_random_crop():
    # The spec's formulation, written separately: tile 2x2 with cat, then crop 32x32 at an offset drawn
    # uniformly in 0..32 per axis (torchvision's crop), per sample; offsets drawn as documented (all dy,
    # then all dx, from the same generator).
    from torchvision.transforms.v2.functional import crop

    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = shuffle_texture(x, torch.Generator().manual_seed(42))
    g = torch.Generator().manual_seed(42)
    dy, dx = torch.randint(0, 33, (8,), generator=g), torch.randint(0, 33, (8,), generator=g)
    tiled = torch.cat([torch.cat([x, x], dim=3)] * 2, dim=2)
    for b in range(8):
        assert torch.equal(out[b], crop(tiled[b], int(dy[b]), int(dx[b]), 32, 32)), b
