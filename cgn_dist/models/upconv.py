"""Nearest 2x upsampling followed by a 3x3 convolution (padding 1), computed on the low-resolution input.

After a nearest 2x upsample, the output pixel (2i + a, 2j + b) of a 3x3 convolution sees only a 2 x 2
neighbourhood of the low-resolution input: along each axis, phase 0 reads rows i - 1 (tap 0) and i (taps 1 + 2),
phase 1 reads rows i (taps 0 + 1) and i + 1 (tap 2). So the four output phases are four 2x2 convolutions of the
low-resolution map with kernels that are sums of the 3x3 taps: 16 multiply-adds per output pixel and input
channel instead of 36. The zero padding carries over: the upsampled map's padding row is the low-resolution
map's padding row.

Here the four phase kernels are stacked into one convolution with 4 x Cout output channels on the input padded
by one pixel ((H + 1) x (W + 1) outputs: phase 0 takes outputs 0..H-1, phase 1 outputs 1..H), then interleaved.
The kernels are derived from the module's own 3x3 weight at every call (differentiably), so the parameters,
their state_dict keys and the optimiser's view of them are the 3x3 conv's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# _PHASE_TAPS[a, p, u]: the weight of 3x3 tap u (along one axis) in phase a's 2-tap kernel at position p
_PHASE_TAPS = ((((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)),
                ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))))


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """3x3 weight Cout x Cin x 3 x 3 -> the four phase kernels as one (2 * 2 * Cout) x Cin x 2 x 2 weight,
    output channels ordered (row phase, column phase, Cout). In the weight's dtype, also under autocast (a
    bf16 einsum would round the sums; the convolution casts the fp32 result once)."""
    taps = weight.new_tensor(_PHASE_TAPS)  # 2 x 2 x 3
    cout, cin = weight.shape[:2]
    with torch.autocast(weight.device.type, enabled=False):
        k = torch.einsum("apu,oiuv,bqv->aboipq", taps, weight, taps)
    return k.reshape(4 * cout, cin, 2, 2)


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(F.interpolate(x, scale_factor=2, mode="nearest")) for a 3x3, stride 1, padding 1 conv (within
    fp32 rounding: each phase kernel is a sum of taps). The result is channels-last (the fast layout's)."""
    if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1) or conv.dilation != (1, 1) \
            or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(f"upsample_conv needs a plain 3x3 conv with padding 1, got {conv}")
    bias = None if conv.bias is None else conv.bias.repeat(4)
    return phase_conv(x, phase_kernels(conv.weight).contiguous(memory_format=torch.channels_last), bias)


def phase_conv(x: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The four phase convolutions given their stacked kernels (phase_kernels; computed once where the weight is
    frozen) and the bias repeated 4x; the result channels-last."""
    b, _, h, w = x.shape
    cout = kernels.shape[0] // 4
    out = F.conv2d(x.contiguous(memory_format=torch.channels_last), kernels, bias, padding=1)
    o = out.permute(0, 2, 3, 1).unflatten(3, (2, 2, cout))  # B x (H+1) x (W+1) x a x b x Cout, a view
    y = _Interleave.apply(o)  # B x H x 2 x W x 2 x Cout
    return y.reshape(b, 2 * h, 2 * w, cout).permute(0, 3, 1, 2)


class _Interleave(torch.autograd.Function):
    """Phase (a, b) at low-res (i, j) is o[:, i + a, j + b, a, b]: four strided copies into the NHWC result.
    By hand rather than slices and stacks, whose backward zero-fills a full-size gradient per slice."""

    @staticmethod
    def forward(ctx, o):
        b, h1, w1, _, _, c = o.shape
        h, w = h1 - 1, w1 - 1
        y = o.new_empty(b, h, 2, w, 2, c)
        for a in (0, 1):
            for e in (0, 1):
                y[:, :, a, :, e] = o[:, a:a + h, e:e + w, a, e]
        ctx.shape = o.shape
        return y

    @staticmethod
    def backward(ctx, g):
        b, h1, w1, _, _, c = ctx.shape
        h, w = h1 - 1, w1 - 1
        # laid out as the conv's channels-last output, B x (H+1) x (W+1) x (2 * 2 * Cout)
        grad = g.new_empty(ctx.shape)
        for a in (0, 1):
            for e in (0, 1):
                grad[:, a:a + h, e:e + w, a, e] = g[:, :, a, :, e]
                grad[:, h if a == 0 else 0, :, a, e] = 0  # the one row and column this phase does not use
                grad[:, :, w if e == 0 else 0, a, e] = 0
        return grad


__all__ = ["upsample_conv", "phase_conv", "phase_kernels"]
