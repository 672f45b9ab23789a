"""BigGAN-deep blocks rewritten for frozen inference (generation): the same function, fewer passes over memory.

Profiled at full size (batch 4, fp32, channels-last, 2-core AVX2 CPU): the convolutions are half of a
forward; the other ~40 % is the package's conditional BatchNorm, ``(x - mean) / sqrt(var + eps) * (1 + s(y))
+ o(y)`` and the ReLU after it, five elementwise passes over each activation, each writing a new tensor.
``InferenceGenBlock`` computes them as one per-(sample, channel) affine, ``x * a + d`` with ``a = (1 + s(y)) /
sqrt(var + eps)`` and ``d = o(y) - mean * a`` (a B x C pair, fp32), then the ReLU in place: two passes.

The up-sampling blocks' nearest 2x upsample + 3x3 convolution runs as four 2x2 phase convolutions of the
low-resolution map (cgn_dist.models.upconv: 2.25x fewer multiply-adds), with the phase kernels computed once
from the frozen weight (in fp32, before any cast) and held as a buffer; the skip path's upsample + residual
add is one broadcast add into the output's 2 x 2 phases.

Same math within rounding, not the same bytes: generation records ``fused`` in its provenance. Only for
frozen models whose spectral norm is already folded into plain weights (generate/speed.py's prepare_model):
training keeps the package's blocks, whose weights change and whose spectral norm runs in hooks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_pretrained_biggan.model import GenBlock
from torch import nn

from cgn_dist.models.upconv import phase_conv, phase_kernels


def _bn_relu(bn: nn.Module, x: torch.Tensor, truncation: float, cond: torch.Tensor) -> torch.Tensor:
    """relu(BigGANBatchNorm(x, truncation, cond)) for a conditional BatchNorm, as one affine pass."""
    coef, start = math.modf(truncation / bn.step_size)
    start = int(start)
    mean, var = bn.running_means[start].float(), bn.running_vars[start].float()
    if coef != 0.0:  # the package's interpolation between the two nearest truncation statistics
        mean = mean * coef + bn.running_means[start + 1].float() * (1 - coef)
        var = var * coef + bn.running_vars[start + 1].float() * (1 - coef)
    a = (1 + bn.scale(cond).float()) * torch.rsqrt(var + bn.eps)
    d = bn.offset(cond).float() - mean * a
    out = torch.addcmul(d.to(x.dtype)[:, :, None, None], x, a.to(x.dtype)[:, :, None, None])
    return out.relu_()


class InferenceGenBlock(GenBlock):
    """A GenBlock whose forward fuses BatchNorm + ReLU and, when up-sampling, uses phase convolutions. Made by
    converting a loaded block (``to_inference_blocks``): same parameters and state-dict keys, one buffer more."""

    def forward(self, x, cond_vector, truncation):
        x0 = x
        x = self.conv_0(_bn_relu(self.bn_0, x, truncation, cond_vector))
        x = _bn_relu(self.bn_1, x, truncation, cond_vector)
        if self.up_sample:
            bias = None if self.conv_1.bias is None else self.conv_1.bias.repeat(4)
            x = phase_conv(x, self.phase_kernels, bias)
        else:
            x = self.conv_1(x)
        x = self.conv_2(_bn_relu(self.bn_2, x, truncation, cond_vector))
        x = self.conv_3(_bn_relu(self.bn_3, x, truncation, cond_vector))
        if self.drop_channels:
            x0 = x0[:, :x0.shape[1] // 2, ...]
        if self.up_sample and x.is_contiguous(memory_format=torch.channels_last):
            # the skip's nearest upsample + add as one broadcast add into x's NHWC 2 x 2 phases: the upsampled
            # skip is never written (it was the block's slowest elementwise step, mixed layouts included)
            b, c, h, w = x0.shape
            x.permute(0, 2, 3, 1).view(b, h, 2, w, 2, c).add_(x0.permute(0, 2, 3, 1)[:, :, None, :, None, :])
            return x
        if self.up_sample:
            x0 = F.interpolate(x0, scale_factor=2, mode="nearest")
        return x.add_(x0)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks) or any(k.endswith("_orig") for k, _ in module.named_parameters())


def to_inference_blocks(model: nn.Module) -> int:
    """Convert every GenBlock in ``model`` in place (call before the dtype cast: the phase kernels are summed
    in the weight's fp32). Returns how many were converted. Refuses blocks that still carry spectral norm."""
    n = 0
    for block in model.modules():
        if type(block) is not GenBlock:
            continue
        for conv in (block.conv_0, block.conv_1, block.conv_2, block.conv_3):
            if _has_hooks(conv):
                raise ValueError("to_inference_blocks needs spectral norm folded into plain weights first "
                                 "(cgn_dist.generate.speed.fold_spectral_norm)")
        if block.up_sample:
            with torch.no_grad():
                block.register_buffer("phase_kernels", phase_kernels(block.conv_1.weight.detach()).clone(),
                                      persistent=False)
        block.__class__ = InferenceGenBlock  # same attributes; only forward differs
        n += 1
    return n


__all__ = ["InferenceGenBlock", "to_inference_blocks"]
