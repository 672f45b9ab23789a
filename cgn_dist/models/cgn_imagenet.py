"""CGN-ImageNet: three trainable BigGAN-deep copies as independent
mechanisms (shape, texture, background), a frozen BigGAN teacher and a frozen U^2-Net.

    premask = f_shape(u, y_s)            mask = clamp(U2Net(premask), 1e-4, 0.9999)
    fg      = f_text(u, y_t)             bg   = f_bg(u, y_b)
    x       = mask * fg + (1 - mask) * bg

Only `mechanisms` (one submodule holding the three copies) is trainable, so one optimizer
with three parameter groups, or one DeepSpeed engine, wraps exactly the trainable part;
teacher and U^2-Net stay outside it and out of checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cgn_dist.errors import InputNotFound
from cgn_dist.models.biggan import BigGAN, build_biggan, check_truncation, clone_biggan
from cgn_dist.models.u2net import U2Net, build_u2net, check_state_dict

__all__ = ["Mechanisms", "CGNImageNet", "build_cgn_imagenet", "MASK_MIN", "MASK_MAX"]

# The mask is clamped away from 0 and 1 so the binary-entropy loss never takes log(0).
MASK_MIN, MASK_MAX = 1e-4, 0.9999


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


class Mechanisms(nn.Module):
    """The three trainable BigGAN copies. forward(u, y_shape, y_text, y_bg, truncation)
    -> (premask, foreground, background), each B x 3 x H x W in [-1, 1]."""

    def __init__(self, f_shape: BigGAN, f_text: BigGAN, f_bg: BigGAN):
        super().__init__()
        self.f_shape, self.f_text, self.f_bg = f_shape, f_text, f_bg

    def forward(self, u, y_shape, y_text, y_bg, truncation: float):
        return (
            self.f_shape(u, y_shape, truncation),
            self.f_text(u, y_text, truncation),
            self.f_bg(u, y_bg, truncation),
        )


class CGNImageNet(nn.Module):
    """CGN on BigGAN-deep. Attributes: `biggan_gt` (frozen teacher), `mechanisms`
    (f_shape, f_text, f_bg; trainable), `u2net` (frozen).

    Class inputs are dense B x n_classes vectors (one-hot or soft, see
    `cgn_dist.models.biggan.class_vector`); a 1 x n_classes vector is broadcast over the
    batch. `u` (B x z_dim) is shared by the three mechanisms, as in the original code.
    """

    def __init__(self, biggan_gt: BigGAN, f_shape: BigGAN, f_text: BigGAN, f_bg: BigGAN, u2net: U2Net):
        super().__init__()
        self.biggan_gt = _freeze(biggan_gt)
        self.mechanisms = Mechanisms(f_shape, f_text, f_bg)
        self.u2net = _freeze(u2net)

    @classmethod
    def from_teacher(cls, biggan: BigGAN, u2net: U2Net) -> "CGNImageNet":
        """Teacher = `biggan`; the three mechanisms start as independent copies of it."""
        return cls(biggan, clone_biggan(biggan), clone_biggan(biggan), clone_biggan(biggan), u2net)

    # --- conveniences -------------------------------------------------------------------
    @property
    def f_shape(self) -> BigGAN:
        return self.mechanisms.f_shape

    @property
    def f_text(self) -> BigGAN:
        return self.mechanisms.f_text

    @property
    def f_bg(self) -> BigGAN:
        return self.mechanisms.f_bg

    @property
    def n_classes(self) -> int:
        return self.biggan_gt.config.num_classes

    @property
    def z_dim(self) -> int:
        return self.biggan_gt.config.z_dim

    @property
    def image_size(self) -> int:
        return self.biggan_gt.config.output_dim

    def train(self, mode: bool = True) -> "CGNImageNet":
        super().train(mode)
        # Frozen parts stay in eval: U^2-Net has batch norm whose batch statistics would
        # otherwise be used; the teacher's spectral norm would keep power-iterating.
        self.biggan_gt.eval()
        self.u2net.eval()
        return self

    # --- forward passes -----------------------------------------------------------------
    def _classes(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        if y.dim() != 2 or y.shape[1] != self.n_classes:
            raise ValueError(
                f"class input must be B x {self.n_classes} (one-hot or soft), got {tuple(y.shape)}; "
                "build it with cgn_dist.models.biggan.class_vector"
            )
        if y.shape[0] == batch:
            return y
        if y.shape[0] == 1:
            return y.expand(batch, -1)
        raise ValueError(f"class input batch {y.shape[0]} does not match noise batch {batch}")

    def _check_noise(self, u: torch.Tensor) -> None:
        if u.dim() != 2 or u.shape[1] != self.z_dim:
            raise ValueError(f"noise u must be B x {self.z_dim}, got {tuple(u.shape)}")

    def _compose(self, u, y_shape, y_text, y_bg, truncation, mechanisms=None) -> dict:
        mechanisms = self.mechanisms if mechanisms is None else mechanisms
        premask, foreground, background = mechanisms(u, y_shape, y_text, y_bg, truncation)
        # U^2-Net sees the raw [-1, 1] image (no resize / normalisation), as in the
        # original; gradients flow through the frozen U^2-Net into f_shape.
        mask = self.u2net(premask).clamp(MASK_MIN, MASK_MAX)
        composite = mask * foreground + (1 - mask) * background
        return dict(premask=premask, mask=mask, foreground=foreground, background=background,
                    composite=composite)

    def forward(self, u: torch.Tensor, y: torch.Tensor, truncation: float = 1.0, mechanisms=None) -> dict:
        """Training forward: one class input `y` shared by the three mechanisms.

        Returns dict(x_gt (teacher output, detached), premask, mask, foreground,
        background, bg_saliency = U2Net(background), composite). `mechanisms` may replace
        `self.mechanisms` by a wrapper of it (e.g. a DeepSpeed engine) with the same call.
        """
        truncation = check_truncation(truncation)
        self._check_noise(u)
        y = self._classes(y, u.shape[0])
        with torch.no_grad():
            x_gt = self.biggan_gt(u, y, truncation)
        out = self._compose(u, y, y, y, truncation, mechanisms)
        out["x_gt"] = x_gt.detach()
        out["bg_saliency"] = self.u2net(out["background"])
        return out

    def generate(self, u: torch.Tensor, y_shape: torch.Tensor, y_text: torch.Tensor, y_bg: torch.Tensor,
                 truncation: float = 1.0, return_layers: bool = False):
        """Counterfactual generation: a class input per mechanism, shared noise. Skips the
        teacher and the background saliency pass. Returns the composite B x 3 x H x W in
        [-1, 1], or with `return_layers` the dict (premask, mask, foreground, background,
        composite). Call under torch.no_grad() and in eval mode for generation."""
        truncation = check_truncation(truncation)
        self._check_noise(u)
        b = u.shape[0]
        out = self._compose(u, self._classes(y_shape, b), self._classes(y_text, b), self._classes(y_bg, b),
                            truncation)
        return out if return_layers else out["composite"]

    # --- checkpoints (trainable part only) ----------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State of the three mechanisms only (keys f_shape.*, f_text.*, f_bg.*): the
        teacher and U^2-Net are rebuilt from their own weights, never checkpointed."""
        return self.mechanisms.state_dict()

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a `trainable_state_dict` (every key and shape checked)."""
        check_state_dict(self.mechanisms, state_dict, "CGN mechanisms state dict")
        self.mechanisms.load_state_dict(state_dict)

    def save_trainable(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.trainable_state_dict(), tmp)
        tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
        return path

    def load_trainable(self, path: str | Path, map_location: str | torch.device = "cpu") -> None:
        path = Path(path)
        if not path.is_file():
            raise InputNotFound(f"CGN mechanisms checkpoint '{path}' not found")
        self.load_trainable_state_dict(torch.load(path, map_location=map_location, weights_only=True))


def build_cgn_imagenet(
    biggan_source: str | Path = "biggan-deep-256",
    u2net_path: str | Path = "u2net.pth",
    cache_dir: str | Path | None = None,
    seed: int = 0,
    u2net_align_corners: bool = True,
) -> CGNImageNet:
    """Build CGN-ImageNet: the BigGAN is loaded ONCE (see `build_biggan` for the accepted
    sources: a model name, a local directory, "tiny", "random-256") and copied into the
    teacher and the three mechanisms; `u2net_path` is the upstream `u2net.pth`, or
    "tiny" / "random" for a random U^2-Net (small / full size). `seed` fixes random inits.
    `u2net_align_corners`: True = the CGN authors' U^2-Net upsampling, False = upstream's."""
    biggan = build_biggan(biggan_source, cache_dir=cache_dir, seed=seed)
    u2net = build_u2net(u2net_path, seed=seed, align_corners=u2net_align_corners)
    return CGNImageNet.from_teacher(biggan, u2net)
