"""Nearest 2x upsample + 3x3 conv computed as phase convolutions of the low-res map (cgn_dist.models.upconv)
against the two-step reference: nn.Upsample then the same nn.Conv2d."""
import pytest
import torch
from torch import nn

from cgn_dist.models.cgn_mnist import CGNMnist
from cgn_dist.models.upconv import phase_kernels, upsample_conv


def test_phase_kernels_by_hand():
    # one input and output channel, taps w[u, v] = 10u + v: phase (0, 1) reads rows {i-1: tap 0, i: taps 1+2}
    # and columns {j: taps 0+1, j+1: tap 2}
    w = torch.tensor([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0], [20.0, 21.0, 22.0]])[None, None]
    k = phase_kernels(w)
    assert k.shape == (4, 1, 2, 2)
    assert torch.equal(k[1, 0], torch.tensor([[0.0 + 1.0, 2.0], [10.0 + 11.0 + 20.0 + 21.0, 12.0 + 22.0]]))
    assert torch.equal(k[0, 0], torch.tensor([[0.0, 1.0 + 2.0], [10.0 + 20.0, 11.0 + 12.0 + 21.0 + 22.0]]))
    assert k.sum() == 4 * w.sum()  # every 3x3 tap appears once in each phase


@pytest.mark.parametrize("cin,cout,size,bias,channels_last",
                         [(64, 32, 8, False, True), (5, 3, 7, True, True), (3, 1, 4, True, False), (1, 7, 5, False, True)])
def test_upsample_conv_matches_upsample_then_conv(cin, cout, size, bias, channels_last):
    g = torch.Generator().manual_seed(cin * 100 + cout)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, cin, size, size + 1, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, cout, 2 * size, 2 * size + 2, generator=g)

    def run(fn):
        xi = x.clone().requires_grad_()
        conv.zero_grad()
        y = fn(xi)
        y.backward(grad_out)
        return y.detach(), xi.grad, conv.weight.grad.clone(), None if conv.bias is None else conv.bias.grad.clone()

    ref = run(lambda t: conv(nn.Upsample(scale_factor=2, mode="nearest")(t)))
    new = run(lambda t: upsample_conv(t, conv))
    for a, b in zip(ref, new):
        if a is not None:
            scale = a.abs().max().item()
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * scale)


def test_generator_with_phase_upsampling_is_the_same_function():
    torch.manual_seed(0)
    g1 = CGNMnist(init_type="orthogonal", init_gain=1.0)
    g2 = CGNMnist(init_type=None)
    g2.load_state_dict(g1.state_dict())
    g2.to(memory_format=torch.channels_last).use_phase_upsampling()
    assert g2.state_dict().keys() == g1.state_dict().keys()
    y = torch.arange(8) % 10
    u = torch.randn(8, g1.latent_dim)
    out1, out2 = g1(y, u=u, shuffle=False), g2(y, u=u, shuffle=False)
    for a, b in zip(out1, out2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    out1[3].square().sum().backward()
    out2[3].square().sum().backward()
    for (name, p1), p2 in zip(g1.named_parameters(), g2.parameters()):
        # f_shape's BatchNorm scales are followed by LReLU and InstanceNorm, which undo any scale: their true
        # gradient is 0 and what backward returns is rounding, so tolerances are relative to the module's largest
        mech = name.split(".")[0]
        largest = max(q.grad.abs().max().item() for n, q in g1.named_parameters() if n.startswith(mech))
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-3, atol=1e-4 * largest, msg=name)


def test_upsample_conv_rejects_other_convs():
    with pytest.raises(ValueError, match="3x3 conv with padding 1"):
        upsample_conv(torch.zeros(1, 2, 4, 4), nn.Conv2d(2, 2, 3, padding=0))


def test_upsample_conv_under_bf16_autocast_stays_near_fp32():
    # the fast bf16 layout runs the texture mechanisms under autocast: phase kernels are summed in fp32 and
    # cast once, so the result is as close to the fp32 reference as the two-step bf16 computation is
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 16, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    ref = conv(nn.Upsample(scale_factor=2, mode="nearest")(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        two_step = conv(nn.Upsample(scale_factor=2, mode="nearest")(x))
        phases = upsample_conv(x, conv)
    assert phases.dtype == torch.bfloat16
    err_two_step = (two_step.float() - ref).abs().max()
    assert (phases.float() - ref).abs().max() <= 2 * err_two_step
