"""One CGN-ImageNet training iteration: losses, the optimizer of the
three mechanisms (§2.4) and a forward + backward step. The loop (accumulation, optimizer
step, logging, checkpoints) lives with the caller."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cgn_dist.losses import (
    VGG16Features,
    background_loss,
    binary_entropy_loss,
    l1_loss,
    mask_area_loss,
    perceptual_loss,
    texture_collage_target,
)
from cgn_dist.models.biggan import class_vector, truncated_noise
from cgn_dist.models.cgn_imagenet import CGNImageNet, Mechanisms

__all__ = ["ImagenetLossWeights", "imagenet_losses", "build_optimizer", "imagenet_train_step", "sample_inputs"]


@dataclass
class ImagenetLossWeights:
    """Loss weights of CGN-ImageNet (the authors' code values)."""

    l1: float = 100.0  # L1 reconstruction against the teacher
    perceptual: tuple[float, ...] = (4.0, 4.0, 4.0, 4.0)  # Gram loss per VGG layer (paper: 5)
    binary: float = 300.0  # mask binary entropy
    mask_area: float = 500.0  # hinge on the mean mask
    mask_area_bounds: tuple[float, float] = (0.1, 0.9)
    texture: tuple[float, ...] = (0.0, 5.0, 5.0, 0.0)  # Gram loss fg vs patch collage
    background: float = 2000.0  # mean U^2-Net saliency of the background
    # Texture collage: 15 px patches at 128 px work size, top 100, 6x6 grid.
    collage_patch: int = 15
    collage_top_k: int = 100
    collage_grid: int = 6
    collage_work_size: int = 128

    @classmethod
    def from_config(cls, cfg) -> "ImagenetLossWeights":
        """From a `cgn_dist.config.ImagenetConfig` (fields w_l1, w_perceptual, ...)."""
        return cls(
            l1=cfg.w_l1,
            perceptual=tuple(cfg.w_perceptual),
            binary=cfg.w_binary,
            mask_area=cfg.w_mask_area,
            mask_area_bounds=tuple(cfg.mask_area_bounds),
            texture=tuple(cfg.w_texture),
            background=cfg.w_background,
        )


def imagenet_losses(out: dict, vgg: VGG16Features, weights: ImagenetLossWeights | None = None,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Weighted loss terms of one forward `out` (from `CGNImageNet.forward`) and their sum.

    Keys: l1, perceptual, binary, mask_area, texture, background, total. Every entry is
    already multiplied by its weight (the Gram terms carry w^2 * 5000 per layer inside
    `perceptual_loss`). `generator` drives the texture collage's patch draws.
    """
    w = weights or ImagenetLossWeights()
    x, x_gt, mask, fg = out["composite"], out["x_gt"], out["mask"], out["foreground"]
    with torch.no_grad():
        collage = texture_collage_target(
            x_gt, mask.detach(), generator=generator, patch=w.collage_patch, top_k=w.collage_top_k,
            grid=w.collage_grid, work_size=w.collage_work_size, out_size=fg.shape[-1],
        )
    lo, hi = w.mask_area_bounds
    losses = {
        "l1": w.l1 * l1_loss(x, x_gt),
        "perceptual": perceptual_loss(vgg, x, x_gt, w.perceptual),
        "binary": w.binary * binary_entropy_loss(mask),
        "mask_area": w.mask_area * mask_area_loss(mask, lo=lo, hi=hi),
        "texture": perceptual_loss(vgg, fg, collage, w.texture),
        "background": w.background * background_loss(out["bg_saliency"]),
    }
    losses["total"] = sum(losses.values())
    return losses


def build_optimizer(mechanisms: Mechanisms, lr_shape: float = 8e-6, lr_text: float = 3e-5,
                    lr_bg: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """One Adam over the three mechanisms, one parameter group each (names "shape",
    "text", "bg"). Defaults are the authors' code; the paper uses lr_text = 1e-5.
    No weight decay, as in the original."""
    if isinstance(mechanisms, CGNImageNet):
        mechanisms = mechanisms.mechanisms
    groups = [
        {"name": "shape", "params": list(mechanisms.f_shape.parameters()), "lr": lr_shape},
        {"name": "text", "params": list(mechanisms.f_text.parameters()), "lr": lr_text},
        {"name": "bg", "params": list(mechanisms.f_bg.parameters()), "lr": lr_bg},
    ]
    return torch.optim.Adam(groups, lr=lr_text, betas=tuple(betas), weight_decay=0.0)


def sample_inputs(batch_size: int, n_classes: int, z_dim: int, truncation: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Training inputs: ONE class for the whole batch (shared by the three mechanisms, as
    in the original training) and per-sample truncated noise. Returns (u, y, class_id);
    every draw comes from `generator` (None: torch's global RNG)."""
    cls = int(torch.randint(n_classes, (1,), generator=generator).item())
    seeds = torch.randint(0, 2**62, (batch_size,), generator=generator).tolist()
    u = truncated_noise(batch_size, z_dim, truncation, seed=seeds)
    y = class_vector([cls] * batch_size, n_classes)
    return u, y, cls


def imagenet_train_step(cgn: CGNImageNet, vgg: VGG16Features, batch_size: int, truncation: float = 1.0,
                        generator: torch.Generator | None = None, weights: ImagenetLossWeights | None = None,
                        loss_scale: float = 1.0, mechanisms=None) -> dict[str, torch.Tensor]:
    """Sample inputs, forward, losses and `(loss_scale * total).backward()`. Gradients
    accumulate in the mechanisms; the caller steps and zeroes the optimizer (the original
    sums, not averages, gradients over its accumulation steps: loss_scale=1).
    `mechanisms` may be a wrapper of `cgn.mechanisms` (e.g. a DeepSpeed engine); then
    the caller runs the backward through it, and this function returns before backward.
    Returns the detached loss terms."""
    device = next(cgn.mechanisms.parameters()).device
    u, y, _ = sample_inputs(batch_size, cgn.n_classes, cgn.z_dim, truncation, generator)
    out = cgn(u.to(device), y.to(device), truncation, mechanisms=mechanisms)
    losses = imagenet_losses(out, vgg, weights, generator=generator)
    if mechanisms is None:
        (loss_scale * losses["total"]).backward()
        return {k: v.detach() for k, v in losses.items()}
    return losses
