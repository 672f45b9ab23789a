"""CGN losses (MNIST and ImageNet) as pure functions of tensors.

Unweighted: callers multiply by their lambdas. The "perceptual" losses of CGN are
Gram/style-only (content weight 0), with the per-layer weight SQUARED and an extra x5000,
on VGG16 relu1_2/2_2/3_3/4_3 of images fed at [-1, 1] without ImageNet normalisation.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cgn_dist.errors import InputError, InputNotFound, SetupError

log = logging.getLogger(__name__)

STYLE_SCALE = 5000.0
# torchvision vgg16().features indices of relu1_2, relu2_2, relu3_3, relu4_3: the layer just
# before each of the first four max-pools.
VGG_LAYER_INDICES = (3, 8, 15, 22)
VGG16_IMAGENET_FILE = "vgg16-397923af.pth"  # torchvision VGG16_Weights.IMAGENET1K_V1
RANDOM_VGG_SEED = 0
DOWNLOAD_TIMEOUT_S = 10.0


# --- style / Gram losses -------------------------------------------------------------------

def gram(features: torch.Tensor, fold_scale: bool = False) -> torch.Tensor:
    """Gram matrix F F^T / (C H W) per sample: B x C x H x W -> B x C x C.

    fold_scale (the fast layout's): the same value within fp32 rounding with less work. Where the features are
    smaller than the Gram (C > H W: VGG blocks 3 and 4) they are scaled by 1 / sqrt(C H W) before the product
    instead of dividing the Gram after it, and backward is F (G' + G'^T) (one product for a small Gram) rather than
    autograd's two products and their sum.
    """
    b, c, h, w = features.shape
    if not features.is_contiguous() and features.is_contiguous(memory_format=torch.channels_last):
        f = features.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view of NHWC, no copy
        if fold_scale:
            return _ScaledGram.apply(f, 1.0 / (c * h * w))
        return torch.bmm(f.transpose(1, 2), f) / (c * h * w)
    f = features.reshape(b, c, h * w)
    if fold_scale:
        return _ScaledGram.apply(f.transpose(1, 2), 1.0 / (c * h * w))
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


class _ScaledGram(torch.autograd.Function):
    """scale * F^T F for F: B x N x C, the scale applied to whichever of F (N x C) and the Gram (C x C) is smaller;
    d/dF of <G', scale F^T F> = scale * F (G' + G'^T)."""

    @staticmethod
    def forward(ctx, f, scale):
        ctx.save_for_backward(f)
        ctx.scale = scale
        n, c = f.shape[1:]
        if c > n:
            fs = f * scale ** 0.5
            return torch.bmm(fs.transpose(1, 2), fs)
        return torch.bmm(f.transpose(1, 2), f).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (f,) = ctx.saved_tensors
        n, c = f.shape[1:]
        if c > n:  # a large Gram: two products reading it beat writing G' + G'^T
            fs = f * ctx.scale
            return torch.bmm(fs, grad).baddbmm_(fs, grad.transpose(1, 2)), None
        return torch.bmm(f, (grad + grad.transpose(1, 2)).mul_(ctx.scale)), None


class _MeanAbsDiff(torch.autograd.Function):
    """mean|a - b| with its gradient sign(a - b) / n for a only (b is a constant target), as F.l1_loss. Its
    backward turns the saved difference into the gradient in place: two fewer passes over a Gram (16 MB for
    VGG block 4 at batch 16) than autograd's sgn and mul."""

    @staticmethod
    def forward(ctx, a, b):
        d = a - b
        ctx.save_for_backward(d)
        return d.abs().mean()

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        return d.sign_().mul_(grad / d.numel()), None


def mean_abs_diff(a: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """F.l1_loss(a, target) for a constant target (no gradient reaches it), computed with fewer temporaries."""
    if target.requires_grad:
        raise ValueError("mean_abs_diff takes a constant target; use F.l1_loss when both sides need gradients")
    return _MeanAbsDiff.apply(a, target)


def style_loss(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor],
               weights: Sequence[float], fast: bool = False) -> torch.Tensor:
    """sum_k w_k^2 * 5000 * mean|Gram(a_k) - Gram(b_k)|, skipping layers with w_k == 0.

    fast: the same loss with fewer passes over the Grams (gram's fold_scale, mean_abs_diff; feats_b constant)."""
    if not (len(feats_a) >= len(weights) and len(feats_b) >= len(weights)):
        raise ValueError(f"need at least {len(weights)} feature maps per side, got "
                         f"{len(feats_a)} and {len(feats_b)}")
    if fast:
        return style_loss_to_grams(feats_a, [gram(fb, True) if w != 0 else None for fb, w in zip(feats_b, weights)],
                                   weights)
    total = feats_a[0].new_zeros((), dtype=torch.float32)
    for fa, fb, w in zip(feats_a, feats_b, weights):
        if w == 0:
            continue
        # Grams of bf16 features stay bf16 (AMX / tensor cores); their L1 is taken in fp32
        ga, gb = gram(fa).float(), gram(fb).float()
        total = total + (w ** 2) * STYLE_SCALE * F.l1_loss(ga, gb)
    return total


def style_loss_to_grams(feats_a: Sequence[torch.Tensor], grams_b: Sequence[torch.Tensor | None],
                        weights: Sequence[float]) -> torch.Tensor:
    """style_loss(fast=True) against the target's Grams (gram(fb, fold_scale=True), None where w == 0), given
    rather than computed: what the cached target Grams of fixed real images feed (train/target_grams.py)."""
    total = feats_a[0].new_zeros((), dtype=torch.float32)
    for fa, gb, w in zip(feats_a, grams_b, weights):
        if w == 0:
            continue
        total = total + (w ** 2) * STYLE_SCALE * mean_abs_diff(gram(fa, True).float(), gb.float())
    return total


def _last_used_layer(weights: Sequence[float]) -> int:
    used = [i for i, w in enumerate(weights) if w != 0]
    return used[-1] + 1 if used else 0


def perceptual_loss(vgg: "VGG16Features", x: torch.Tensor, target: torch.Tensor,
                    weights: Sequence[float]) -> torch.Tensor:
    """Gram-only style loss of x against target through `vgg`.

    The target is a constant (its features are computed without gradient), which is how
    every CGN use treats it (real batch, BigGAN teacher output, texture collage). VGG stops
    after the last layer with a non-zero weight.
    """
    n = _last_used_layer(weights)
    if n == 0:
        return x.new_zeros(())
    feats_x = vgg(x, num_outputs=n)
    with torch.no_grad():
        feats_t = vgg(target, num_outputs=n)
    return style_loss(feats_x, feats_t, list(weights)[:n])


# --- VGG16 feature extractor ---------------------------------------------------------------

def _vgg16_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_IMAGENET_FILE


def _load_imagenet_vgg16_state(allow_download: bool) -> dict:
    """torchvision's ImageNet VGG16 state dict, from the hub cache or (if allowed) downloaded
    with a short socket timeout so an offline machine fails in seconds instead of hanging."""
    cached = _vgg16_cache_path()
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    if not allow_download:
        raise FileNotFoundError(f"VGG16 ImageNet weights not in the torch hub cache ({cached})")
    from torchvision.models import VGG16_Weights

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    finally:
        socket.setdefaulttimeout(old)


def _build_vgg16_trunk() -> nn.Sequential:
    """torchvision's vgg16().features[:23] layout (same indices, so its state dict keys load),
    built directly to skip allocating and initialising the 120M-parameter classifier."""
    layers: list[nn.Module] = []
    cin = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    assert len(layers) == VGG_LAYER_INDICES[-1] + 1
    return nn.Sequential(*layers)


def _random_vgg16_features() -> nn.Sequential:
    """VGG16 trunk with a fixed-seed init (torchvision's scheme: kaiming_normal fan_out,
    zero bias), identical on every machine and run."""
    features = _build_vgg16_trunk()
    g = torch.Generator().manual_seed(RANDOM_VGG_SEED)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=g)
            nn.init.zeros_(m.bias)
    return features


def _features_state(sd: dict) -> dict:
    """Accept a full torchvision vgg16 state dict ("features.N.*") or a features-only one."""
    if not isinstance(sd, dict):
        raise InputError(f"VGG16 weights file must hold a state dict, got {type(sd).__name__}")
    if any(k.startswith("features.") for k in sd):
        return {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    return dict(sd)


def _trunk_state(sd: dict) -> dict:
    """Keep the conv layers up to relu4_3 (indices <= 22)."""
    last = VGG_LAYER_INDICES[-1]
    return {k: v for k, v in sd.items() if k.split(".")[0].isdigit() and int(k.split(".")[0]) <= last}


class VGG16Features(nn.Module):
    """Frozen VGG16 trunk up to relu4_3 returning [relu1_2, relu2_2, relu3_3, relu4_3].

    Inputs are used as given ([-1, 1] in CGN): no ImageNet normalisation.

    weights:
      "imagenet": torchvision IMAGENET1K_V1, from the torch hub cache or downloaded (10 s
                  socket timeout); raises RuntimeError if neither works.
      "random":   deterministic fixed-seed random init. Only a fallback for offline tests
                  and smoke runs: Gram statistics of a random VGG are NOT the paper's loss.
      "auto":     "imagenet" if the file is in the hub cache, otherwise one download
                  attempt with the short timeout; on failure, ONE warning and "random".
      a path:     a local state dict file (full vgg16 or features-only keys).
    The choice made is in `self.weights_source`.
    """

    def __init__(self, weights: str | os.PathLike = "auto"):
        super().__init__()
        source = str(weights)
        from cgn_dist import weights as registry

        if registry.is_name(source):  # "vgg16": torchvision's file in torch's hub cache
            source = registry.resolve(source, "vgg_weights")
        if source in ("imagenet", "auto"):
            try:
                state = _load_imagenet_vgg16_state(allow_download=True)
                features = _build_vgg16_trunk()
                features.load_state_dict(_trunk_state(_features_state(state)))
                source = "imagenet"
            except Exception as err:  # noqa: BLE001 - any failure means "not available"
                if weights == "imagenet":
                    raise SetupError(
                        "VGG16 ImageNet weights are unavailable: not in the torch hub cache "
                        f"({_vgg16_cache_path()}) and the download failed ({err}). Put "
                        f"{VGG16_IMAGENET_FILE} there, pass a local path, or use weights='random'."
                    ) from err
                log.warning("VGG16 ImageNet weights unavailable (%s); using a fixed-seed RANDOM "
                            "VGG16 for the style losses. Results will not match the paper.", err)
                features = _random_vgg16_features()
                source = "random"
        elif source == "random":
            features = _random_vgg16_features()
        else:
            path = Path(source)
            if not path.is_file():
                raise InputNotFound(f"VGG16 weights: {source!r} is neither 'imagenet', 'random', "
                                    "'auto' nor an existing state dict file")
            features = _build_vgg16_trunk()
            from cgn_dist.weights import load_user_file

            state = _trunk_state(_features_state(load_user_file(path, "VGG16 weights (mnist/imagenet.vgg_weights)")))
            missing = [k for k in features.state_dict() if k not in state]
            if missing:
                raise InputError(f"VGG16 weights file {source} lacks {missing}")
            features.load_state_dict(state)
            source = str(path)
        self.weights_source = source
        self.features = features
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG16Features":
        # Frozen feature extractor: always eval, whatever the parent module's mode.
        return super().train(False)

    def forward(self, x: torch.Tensor, num_outputs: int = 4) -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []
        if num_outputs <= 0:
            return outs
        stop = VGG_LAYER_INDICES[num_outputs - 1]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG_LAYER_INDICES:
                outs.append(x)
            if i == stop:
                break
        return outs


# --- mask, background, reconstruction, adversarial ------------------------------------------

def binary_entropy_loss(mask: torch.Tensor) -> torch.Tensor:
    """mean H2(m), H2(p) = -p log2 p - (1-p) log2(1-p). Masks are clamped to [1e-4, 0.9999]
    upstream, so no log(0)."""
    return (-(mask * torch.log2(mask) + (1 - mask) * torch.log2(1 - mask))).mean()


def mask_area_loss(mask: torch.Tensor, lo: float = 0.1, hi: float = 0.9) -> torch.Tensor:
    """Hinge on each sample's mean mask: relu(lo - mean) + relu(mean - hi), batch-averaged."""
    m = mask.flatten(1).mean(dim=1)
    return (F.relu(lo - m) + F.relu(m - hi)).mean()


def background_loss(saliency: torch.Tensor) -> torch.Tensor:
    """Mean saliency of the generated background, clipped at >= 0 (a no-op for sigmoid output)."""
    return saliency.clamp(min=0).mean()


def l1_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (x - target).abs().mean()


def lsgan_loss(pred: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """MSE against all-ones (real) or all-zeros (fake)."""
    target = torch.ones_like(pred) if target_is_real else torch.zeros_like(pred)
    return F.mse_loss(pred, target)


# --- ImageNet texture target ----------------------------------------------------------------

@torch.no_grad()
def texture_collage_target(x_gt: torch.Tensor, mask: torch.Tensor,
                           generator: torch.Generator | None = None, patch: int = 15,
                           top_k: int = 100, grid: int = 6, work_size: int = 128,
                           out_size: int = 256) -> torch.Tensor:
    """Patch collage of object-interior texture, no gradient.

    x_gt (B x C x H x W) and mask (B x 1|C x H x W) are resized bicubically to work_size;
    every patch x patch window (stride 1, no padding) is ranked by its mean mask value; per
    image, grid*grid windows are drawn with replacement from the top_k, tiled row-major into
    a (grid*patch)^2 collage and resized bicubically to out_size.
    """
    if x_gt.dim() != 4 or mask.dim() != 4 or mask.shape[0] != x_gt.shape[0]:
        raise ValueError(f"expected x_gt B x C x H x W and mask B x 1 x H x W, got "
                         f"{tuple(x_gt.shape)} and {tuple(mask.shape)}")
    n_pos = work_size - patch + 1
    if n_pos <= 0 or top_k > n_pos * n_pos:
        raise ValueError(f"top_k={top_k} exceeds the {max(n_pos, 0) ** 2} patch positions of a "
                         f"{work_size}px image with {patch}px patches")
    b, c = x_gt.shape[:2]
    x = F.interpolate(x_gt.detach().float(), size=(work_size, work_size), mode="bicubic",
                      align_corners=False)
    m = F.interpolate(mask.detach().float().mean(dim=1, keepdim=True), size=(work_size, work_size),
                      mode="bicubic", align_corners=False)
    score = F.avg_pool2d(m, patch, stride=1).flatten(1)  # B x n_pos^2
    top = score.topk(top_k, dim=1).indices  # B x top_k
    gen_device = generator.device if generator is not None else x.device
    pick = torch.randint(0, top_k, (b, grid * grid), generator=generator, device=gen_device).to(x.device)
    loc = top.gather(1, pick)  # B x grid^2
    r0, c0 = loc // n_pos, loc % n_pos
    ar = torch.arange(patch, device=x.device)
    rows = (r0[..., None] + ar)[..., :, None]  # B x K x p x 1
    cols = (c0[..., None] + ar)[..., None, :]  # B x K x 1 x p
    bidx = torch.arange(b, device=x.device)[:, None, None, None]
    patches = x.permute(0, 2, 3, 1)[bidx, rows, cols]  # B x K x p x p x C
    collage = (patches.view(b, grid, grid, patch, patch, c)
               .permute(0, 5, 1, 3, 2, 4)
               .reshape(b, c, grid * patch, grid * patch))
    out = F.interpolate(collage, size=(out_size, out_size), mode="bicubic", align_corners=False)
    return out.to(x_gt.dtype)


__all__ = ["gram", "mean_abs_diff", "style_loss", "style_loss_to_grams", "perceptual_loss", "VGG16Features", "binary_entropy_loss",
           "mask_area_loss", "background_loss", "l1_loss", "lsgan_loss", "texture_collage_target",
           "VGG_LAYER_INDICES", "STYLE_SCALE"]
