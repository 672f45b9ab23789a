"""One CGN-MNIST micro step (G then D), in the plain layout or the fast one (`mnist.fast_update`).

Same losses either way: LSGAN on D(x_gen, y_gen), lambda_mask * binary entropy of the mask,
the Gram-only VGG16 style loss against a real batch, then D on (real, 1) and (fake, 0).

The fast layout changes only how it is computed:
  * the VGG16 convolutions of the style loss and its Gram matrices run in bf16 (AMX on this CPU; tensor
    cores on a GPU), the VGG held as a bf16 channels-last copy; the L1 between Grams is fp32. The
    features' own bf16 rounding dominates: fp32 Grams of bf16 features gave the same loss and gradient to
    the third digit, even for nearly equal Grams (tests/test_mnist_step.py checks both against fp32);
  * so do the texture mechanisms and D (bf16 autocast); the mask mechanism stays fp32 (CGNMnist
    disables autocast for it: its entropy needs 1 - m > 0 and its gradient drifts in bf16), and the
    composite and every loss are fp32 (tests check the generator's loss and gradient against fp32);
  * the discriminator update runs one forward over real + fake together where that is exact: a D
    without BatchNorm treats every row on its own (dropout masks are drawn per element), so one pass
    over the concatenation is two passes' math. DiscConv has BatchNorm, whose batch statistics would
    mix real and fake rows: it keeps two passes;
  * batches come as tensors (cgn_dist.data.mnist_fast.TensorBatches), not per-item Python.
  * in either precision, G's nearest-upsample + 3x3 convolutions run as phase convolutions of the low-res map
    (cgn_dist.models.upconv, 2.25x fewer multiply-adds, same weights), and the style loss folds the Gram's
    scale into the smaller tensor and takes one pass fewer over each Gram in backward (losses.gram's
    fold_scale, losses.mean_abs_diff): the same math within fp32 rounding;
  * where the real images are fixed (colored MNIST), their target Grams are computed once and looked up
    (cgn_dist.train.target_grams, within mnist.target_gram_cache_gb): the real batch's VGG pass is skipped.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from cgn_dist.losses import (binary_entropy_loss, lsgan_loss, mask_area_loss, perceptual_loss, style_loss,
                             style_loss_to_grams, _last_used_layer)
from cgn_dist.train.target_grams import TargetGrams


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def fast_vgg(vgg: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A frozen copy of the VGG16 trunk held in ``dtype`` (bf16, or fp32 where bf16 is slower) and channels-last.

    bf16 weights: autocast would otherwise cast every weight at every update. Channels-last: oneDNN's
    bf16 convolutions skip a layout reorder per call, and max-pooling with indices (what backward needs)
    runs ~15x faster in NHWC than in NCHW on this CPU, where it was 14 % of the whole update.
    """
    out = copy.deepcopy(vgg).to(dtype=dtype, memory_format=torch.channels_last)
    return out.requires_grad_(False).eval()


def to_channels_last(*modules: nn.Module) -> None:
    """The fast layout for G and D too: their convolutions, BatchNorms and the shuffler's crop run NHWC
    (5 % of the colored update, 10 % of wildlife's with its convolutional D, on this CPU). Same weights,
    same math; checkpoints load into either layout."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def to_fast_layout(gen: nn.Module, disc: nn.Module) -> None:
    """Everything the fast layout changes in G and D: channels-last, and G's upsample + conv as phase
    convolutions of the low-res map (CGNMnist.use_phase_upsampling). Same parameters and math."""
    to_channels_last(gen, disc)
    gen.use_phase_upsampling()


def style_loss_bf16(vgg, x: torch.Tensor, target: torch.Tensor, weights, bf16: bool = True,
                    target_grams: list | None = None) -> torch.Tensor:
    """perceptual_loss with the VGG convolutions and the Grams in bf16 and their L1 in fp32 (any
    VGG16Features; fastest with fast_vgg's copy). bf16=False: the same channels-last pass in fp32.
    target_grams: the target's Grams already computed (TargetGrams.lookup); the target is then not run."""
    n = _last_used_layer(weights)
    if n == 0:
        return x.new_zeros(())
    cl = torch.channels_last
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        feats_x = vgg(x.contiguous(memory_format=cl), num_outputs=n)
        if target_grams is not None:
            return style_loss_to_grams(feats_x, target_grams, list(weights)[:n])
        with torch.no_grad():
            feats_t = vgg(target.contiguous(memory_format=cl), num_outputs=n)
        return style_loss(feats_x, feats_t, list(weights)[:n], fast=True)


class MnistUpdate:
    """Callable micro step: (x_real, y_real, y_gen) -> losses, mask and the generated batch."""

    def __init__(self, m, eng_g, eng_d, disc: nn.Module, vgg, fast: bool = False, bf16_models: bool = True,
                 precision: str = "bf16"):
        # precision: the fast layout's (cgn_dist.precision.resolve_precision's answer). fp32 keeps everything
        # else the fast layout does (tensor batches, one D pass, fused Adam, channels-last, NHWC pooling):
        # where a bf16 conv is slower than fp32 (AVX2; some AVX-512 BF16 CPUs), this is never slower than plain
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"mnist.precision must resolve to fp32 or bf16, got {precision!r}")
        self.m, self.eng_g, self.eng_d, self.fast = m, eng_g, eng_d, fast
        self.bf16 = fast and precision == "bf16"
        self.vgg = fast_vgg(vgg, torch.bfloat16 if self.bf16 else torch.float32) if fast else vgg
        self.disc = disc
        self.joint_d = fast and not has_batchnorm(self.disc)
        self.bf16_models = bf16_models
        self.target_grams: TargetGrams | None = None

    def cache_target_grams(self, images: torch.Tensor, budget_gb: float) -> TargetGrams | None:
        """Compute the target Grams of fixed real images (the whole train set, indexed as the batches'
        indices) once, within budget_gb; the fast layout only (the plain one is the reference)."""
        if not self.fast or budget_gb <= 0 or _last_used_layer(self.m.style_weights) == 0:
            return None
        device = images.device.type
        self.target_grams = TargetGrams(
            self.vgg, images, self.m.style_weights,
            lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=self.bf16), int(budget_gb * 1e9))
        return self.target_grams

    def _autocast(self, eng, device_type: str):
        # fast: the generator's and D's convolutions and linears in bf16 as well; the mechanisms' outputs, the
        # composite and every loss stay fp32 (CGNMnist casts before clamp and compose; MSE is fp32 in autocast)
        if self.bf16 and self.bf16_models:
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return eng.autocast()

    def _style(self, x_gen, x_real, real_index):
        if self.fast:
            grams = None
            if self.target_grams is not None and real_index is not None:
                grams = self.target_grams.lookup(real_index, x_real)
            return style_loss_bf16(self.vgg, x_gen, x_real, self.m.style_weights, bf16=self.bf16, target_grams=grams)
        return perceptual_loss(self.vgg, x_gen, x_real, self.m.style_weights)

    def __call__(self, x_real: torch.Tensor, y_real: torch.Tensor, y_gen: torch.Tensor,
                 real_index: torch.Tensor | None = None) -> dict:
        # real_index: x_real's rows in the train set, for the cached target Grams (cache_target_grams)
        m, eng_g, eng_d = self.m, self.eng_g, self.eng_d
        for p in self.disc.parameters():
            p.requires_grad_(False)
        with self._autocast(eng_g, x_real.device.type):
            mask, fg, bg, x_gen = eng_g(y_gen)
            # the raw module, not the engine: D is not being trained in this step
            l_adv = lsgan_loss(eng_d.call_module(x_gen, y_gen), True)
            l_bin = m.lambda_mask * binary_entropy_loss(mask)
            l_perc = self._style(x_gen, x_real, real_index)
            loss_g = l_adv + l_bin + l_perc
            l_area = None
            if m.mask_area_weight:
                lo, hi = m.mask_area_bounds
                l_area = m.mask_area_weight * mask_area_loss(mask, lo=lo, hi=hi)
                loss_g = loss_g + l_area
        eng_g.backward(loss_g)
        eng_g.step()
        for p in self.disc.parameters():
            p.requires_grad_(True)

        with self._autocast(eng_d, x_real.device.type):
            if self.joint_d:
                b = x_real.shape[0]
                out = eng_d(torch.cat([x_real, x_gen.detach()]), torch.cat([y_real, y_gen]))
                loss_d = (lsgan_loss(out[:b], True) + lsgan_loss(out[b:], False)) / 2
            else:
                loss_d = (lsgan_loss(eng_d(x_real, y_real), True)
                          + lsgan_loss(eng_d(x_gen.detach(), y_gen), False)) / 2
        eng_d.backward(loss_d)
        eng_d.step()
        out = {"l_adv": l_adv, "l_bin": l_bin, "l_perc": l_perc, "loss_g": loss_g, "loss_d": loss_d, "mask": mask,
               "x_gen": x_gen.detach()}
        if l_area is not None:
            out["l_area"] = l_area
        return out


def make_batches(dataset, batch_size: int, seed: int, rank: int, world: int, fast: bool):
    if fast:
        from cgn_dist.data.mnist_fast import TensorBatches

        return TensorBatches(dataset, batch_size, seed, rank, world)
    from cgn_dist.data.batch_order import BatchStream

    return BatchStream(dataset, batch_size, seed, rank, world)


__all__ = ["MnistUpdate", "fast_vgg", "to_channels_last", "to_fast_layout", "style_loss_bf16", "has_batchnorm", "make_batches"]
