"""CGN generator for the MNIST variants (Sauer & Geiger, ICLR 2021).

Three independent mechanisms share one label embedding:
  f_shape(u, y_s) -> mask m in [1e-4, 0.9999], 1 x H x W
  f_text(u, y_t)  -> foreground texture in [-1, 1], 3 x H x W
  f_bg(u, y_b)    -> background texture in [-1, 1], 3 x H x W
and the analytic composer x = m * f + (1 - m) * b.

The mechanism input is concat(u, embedding(y)) with u FIRST: the released checkpoints
were trained with that order, so it must not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cgn_dist.models.upconv import upsample_conv

MASK_MIN = 1e-4
MASK_MAX = 0.9999


def _up_conv_bn(cin: int, cout: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)


def _up_then_conv(h: torch.Tensor, conv: nn.Conv2d, phases: bool) -> torch.Tensor:
    # phases (the fast layout): the same math on the low-res map, 2.25x fewer multiply-adds (models/upconv.py)
    if phases:
        return upsample_conv(h, conv)
    return conv(F.interpolate(h, scale_factor=2, mode="nearest"))


class ShapeMechanism(nn.Module):
    """f_shape: Linear -> IN -> [up, conv, BN, LReLU, IN] x 2. Output is NOT squashed.

    The mask comes out of an InstanceNorm and is clamped by the caller; there is no
    sigmoid. InstanceNorms have no affine parameters and no running stats.
    """
    phase_upsample = False  # CGNMnist.use_phase_upsampling; not state, so checkpoints load either way

    def __init__(self, in_dim: int, ngf: int, init_size: int):
        super().__init__()
        self.ngf, self.init_size = ngf, init_size
        self.fc = nn.Linear(in_dim, 2 * ngf * init_size * init_size)
        self.conv1, self.bn1 = _up_conv_bn(2 * ngf, ngf)
        self.conv2, self.bn2 = _up_conv_bn(ngf, 1)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        h = self.fc(inp).view(-1, 2 * self.ngf, self.init_size, self.init_size)
        h = F.instance_norm(h)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2)):
            h = F.leaky_relu(bn(_up_then_conv(h, conv, self.phase_upsample)), 0.2)
            h = F.instance_norm(h)
        return h


class TextureMechanism(nn.Module):
    """f_text / f_bg: Linear -> [up, conv, BN, LReLU] x 2 -> conv(bias) -> BN -> tanh."""
    phase_upsample = False

    def __init__(self, in_dim: int, ngf: int, init_size: int, out_channels: int = 3):
        super().__init__()
        self.ngf, self.init_size = ngf, init_size
        self.fc = nn.Linear(in_dim, 2 * ngf * init_size * init_size)
        self.conv1, self.bn1 = _up_conv_bn(2 * ngf, 2 * ngf)
        self.conv2, self.bn2 = _up_conv_bn(2 * ngf, ngf)
        self.conv3 = nn.Conv2d(ngf, out_channels, 3, padding=1, bias=True)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        h = self.fc(inp).view(-1, 2 * self.ngf, self.init_size, self.init_size)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2)):
            h = F.leaky_relu(bn(_up_then_conv(h, conv, self.phase_upsample)), 0.2)
        # NCHW for the 3-channel BatchNorm and tanh (a no-op unless channels-last): PyTorch's channels-last
        # BatchNorm with 3 channels is ~4x slower on CPU than the NCHW one, and the shuffler returns NCHW anyway
        return torch.tanh(self.bn3(self.conv3(h).contiguous()))


def draw_crop_offsets(batch: int, height: int, width: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Per-sample (dy, dx) crop offsets, dy uniform in 0..height and dx in 0..width
    (inclusive; B x 2, int64).

    0..size inclusive is what a size-px random crop of the 2x2-tiled map allows; offsets 0
    and size give the same cyclic shift, exactly as in the original shuffler.
    """
    gen_device = generator.device if generator is not None else "cpu"
    dy = torch.randint(0, height + 1, (batch,), generator=generator, device=gen_device)
    dx = torch.randint(0, width + 1, (batch,), generator=generator, device=gen_device)
    offsets = torch.stack([dy, dx], dim=1)
    return offsets.to(device) if device is not None else offsets


def tile_and_crop(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Tile each map 2x2 and crop an H x W window at the given per-sample offsets.

    Equivalent to a per-sample cyclic shift: out[b] == torch.roll(x[b], (-dy, -dx), (1, 2)).
    Row r of the tiled map is row r mod H of the map, so the tiling is never built: explicit (modular) indexing
    into the map on both axes, the same values, and gradients reach every pixel (backward is one scatter,
    with no sum over four tiles).
    """
    b, _, h, w = x.shape
    offsets = offsets.to(x.device)
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)) % h  # B x H
    cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)) % w  # B x W
    batch_idx = torch.arange(b, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]]  # B x H x W x C
    return out.permute(0, 3, 1, 2).contiguous()


def shuffle_texture(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The texture "shuffler": a random cyclic translation per sample, so a
    texture map cannot carry the digit's shape."""
    offsets = draw_crop_offsets(x.shape[0], x.shape[-2], x.shape[-1], generator, x.device)
    return tile_and_crop(x, offsets)


class CGNMnist(nn.Module):
    """Counterfactual generator for colored / double-colored / wildlife MNIST.

    init_type / init_gain: pix2pix-style initialisation applied at construction
    (colored: orthogonal 0.1, double-colored: orthogonal 0.2, wildlife: normal 0.03);
    init_type=None keeps PyTorch's default initialisation.
    """

    def __init__(self, n_classes: int = 10, latent_dim: int = 32, ngf: int = 32, img_size: int = 32,
                 init_type: str | None = "orthogonal", init_gain: float = 0.1,
                 init_generator: torch.Generator | None = None):
        super().__init__()
        if img_size % 4 != 0:
            raise ValueError(f"img_size must be divisible by 4 (two 2x upsamplings), got {img_size}")
        self.n_classes, self.latent_dim, self.ngf, self.img_size = n_classes, latent_dim, ngf, img_size
        init_size = img_size // 4
        in_dim = latent_dim + n_classes
        self.label_emb = nn.Embedding(n_classes, n_classes)
        self.f_shape = ShapeMechanism(in_dim, ngf, init_size)
        self.f_text = TextureMechanism(in_dim, ngf, init_size)
        self.f_bg = TextureMechanism(in_dim, ngf, init_size)
        if init_type is not None:
            init_cgn_weights(self, init_type, init_gain, generator=init_generator)

    def use_phase_upsampling(self, enabled: bool = True) -> "CGNMnist":
        """Compute each mechanism's nearest-upsample + 3x3 conv as four 2x2 phase convolutions of the
        low-res map (models/upconv.py): the same parameters and math, fewer multiply-adds; the fast layout's."""
        for mech in (self.f_shape, self.f_text, self.f_bg):
            mech.phase_upsample = enabled
        return self

    def sample_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """u ~ N(0, I) of shape B x latent_dim, on the model's device."""
        device = self.label_emb.weight.device
        gen_device = generator.device if generator is not None else device
        u = torch.randn(batch, self.latent_dim, generator=generator, device=gen_device)
        # drawn in fp32 whatever the weights' precision, so a sample's noise never depends on it
        return u.to(device=device, dtype=self.label_emb.weight.dtype)

    def mechanism_input(self, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.cat([u, self.label_emb(y)], dim=-1)

    def forward(self, y_shape: torch.Tensor, y_text: torch.Tensor | None = None,
                y_bg: torch.Tensor | None = None, u: torch.Tensor | None = None,
                u_text: torch.Tensor | None = None, u_bg: torch.Tensor | None = None,
                shuffle: bool = True, generator: torch.Generator | None = None):
        """Returns (mask B x 1 x H x W, foreground, background, composite).

        Missing labels default to y_shape; missing u is drawn from `generator`; missing
        u_text / u_bg default to u. So forward(y) is the training pass (one input for all
        three mechanisms), and a counterfactual passes its own labels and noise per
        mechanism. Random draws happen in this order: u (if missing), then the
        foreground crop offsets, then the background crop offsets.
        """
        y_text = y_shape if y_text is None else y_text
        y_bg = y_shape if y_bg is None else y_bg
        if u is None:
            u = self.sample_noise(y_shape.shape[0], generator)
        u_text = u if u_text is None else u_text
        u_bg = u if u_bg is None else u_bg

        # The mask mechanism always runs in fp32, also under a bf16 autocast: in bf16 0.9999 rounds to 1 (the
        # entropy's log2(1 - m) would be -inf) and its gradient drifts (cosine 0.91 to fp32 on wildlife).
        # The texture mechanisms may run in bf16; composing is fp32 (.float() is a no-op for fp32).
        with torch.autocast(u.device.type, enabled=False):
            mask = self.f_shape(self.mechanism_input(y_shape, u).float()).clamp(MASK_MIN, MASK_MAX)
        foreground = self.f_text(self.mechanism_input(y_text, u_text)).float()
        background = self.f_bg(self.mechanism_input(y_bg, u_bg)).float()
        if shuffle:
            foreground = shuffle_texture(foreground, generator)
            background = shuffle_texture(background, generator)
        composite = mask * foreground + (1 - mask) * background
        return mask, foreground, background, composite

    def counterfactual(self, y_shape: torch.Tensor, y_text: torch.Tensor, y_bg: torch.Tensor,
                       generator: torch.Generator | None = None, shuffle: bool = True):
        """Counterfactual pass with fresh noise per mechanism (as the original MNIST sampler)."""
        b = y_shape.shape[0]
        u, u_text, u_bg = (self.sample_noise(b, generator) for _ in range(3))
        return self(y_shape, y_text, y_bg, u=u, u_text=u_text, u_bg=u_bg, shuffle=shuffle,
                    generator=generator)


def init_cgn_weights(module: nn.Module, init_type: str = "normal", gain: float = 0.02,
                     generator: torch.Generator | None = None) -> nn.Module:
    """pix2pix-style init: Conv/Linear weights by `init_type` with `gain`, biases 0,
    BatchNorm2d weights ~ N(1, gain) and biases 0. Embeddings keep their default N(0, 1).

    init_type: "normal" (N(0, gain)), "xavier" (xavier_normal, gain), "kaiming"
    (kaiming_normal, fan_in, a=0), "orthogonal" (gain).
    """
    valid = ("normal", "xavier", "kaiming", "orthogonal")
    if init_type not in valid:
        raise ValueError(f"unknown init_type {init_type!r}; choose one of {valid}")
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if init_type == "normal":
                nn.init.normal_(m.weight, 0.0, gain, generator=generator)
            elif init_type == "xavier":
                nn.init.xavier_normal_(m.weight, gain=gain, generator=generator)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in", generator=generator)
            else:
                nn.init.orthogonal_(m.weight, gain=gain, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain, generator=generator)
            nn.init.zeros_(m.bias)
    return module


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["CGNMnist", "ShapeMechanism", "TextureMechanism", "init_cgn_weights", "draw_crop_offsets",
           "tile_and_crop", "shuffle_texture", "count_parameters", "MASK_MIN", "MASK_MAX"]
