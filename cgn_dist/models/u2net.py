"""U^2-Net salient-object detector (Qin et al., "U^2-Net: Going deeper with nested
U-structure for salient object detection", Pattern Recognition 2020).

CGN-ImageNet uses the full U^2-Net, frozen, to turn the shape mechanism's RGB "pre-mask"
into a soft mask and to measure the saliency left in the generated background. Parameter
names follow the upstream release (`u2net.pth`, 176 MB) so that file loads unchanged.

`width` scales every channel count, which gives a small random-init variant of the same
structure for tests. Only the fused side output `sigmoid(d0)` is returned: it is the only
one CGN uses.

Upsampling is bilinear with `align_corners=True` by default: the U^2-Net copy that the CGN
authors trained their `cgn.pth` with does this, so their masks need it. Upstream U-2-Net
(`F.upsample` without the argument) uses `align_corners=False`; `align_corners=False`
gives that behaviour (config `imagenet.u2net_align_corners`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cgn_dist.errors import InputError, InputNotFound

__all__ = ["U2Net", "load_u2net", "build_u2net", "check_state_dict", "fold_batchnorm", "U2NET_WEIGHTS_HELP", "TINY_U2NET_WIDTH"]

# Width of the small random variant used by tests and smoke runs (512 channels -> 32).
TINY_U2NET_WIDTH = 1 / 16

U2NET_WEIGHTS_HELP = (
    "Get the full U^2-Net weights 'u2net.pth' (176 MB) from the upstream U-2-Net project "
    "(github.com/xuebinqin/U-2-Net, README 'u2net.pth' download, Google Drive id "
    "1ao1ovG1Qtx4b7EoskHXmi2E9rp5CHLcZ; `cgn-dist weights fetch u2net`); the link in the CGN README is dead."
)


class ConvBNReLU(nn.Module):
    """3x3 (dilated) conv -> BN -> ReLU; attribute names match upstream `REBNCONV`."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1):
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


def fold_batchnorm(model: nn.Module) -> int:
    """Frozen inference (generation): each ConvBNReLU's BatchNorm, in eval mode a per-channel affine of running
    statistics, folded into its convolution's weight and bias (computed in fp32, before any cast) and replaced by
    an identity: one pass over each activation fewer, the same function within rounding. Returns the count."""
    n = 0
    for m in model.modules():
        if not (isinstance(m, ConvBNReLU) and isinstance(m.bn_s1, nn.BatchNorm2d)):
            continue
        bn, conv = m.bn_s1, m.conv_s1
        if bn.training:
            raise ValueError("fold_batchnorm folds eval-mode BatchNorm: call model.eval() first")
        with torch.no_grad():
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
            conv.weight.copy_(conv.weight.double() * scale[:, None, None, None])
            new_bias = (bias - bn.running_mean.double()) * scale + bn.bias.double()
            if conv.bias is None:
                conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)
            else:
                conv.bias.copy_(new_bias)
        m.bn_s1 = nn.Identity()
        n += 1
    return n


def _upsample_to(x: torch.Tensor, ref: torch.Tensor, align_corners: bool) -> torch.Tensor:
    if x.shape[-2:] == ref.shape[-2:]:
        return x  # bilinear to the same size is the identity either way
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=align_corners)


def _pool(x: torch.Tensor) -> torch.Tensor:
    # ceil_mode keeps odd sizes alive down to 1x1 (any input size works).
    return F.max_pool2d(x, 2, stride=2, ceil_mode=True)


class RSU(nn.Module):
    """Residual U-block of `depth` levels (RSU-7 ... RSU-4).

    Encoder: conv (in->out), conv (out->mid), then depth-2 pooled convs (mid->mid) and
    one dilated (x2) bottom conv; decoder: depth-1 convs on [up(prev), skip] (2*mid->mid,
    the last 2*mid->out); output = decoder + input projection (residual).
    Attribute names are those of the upstream weights: rebnconvin, rebnconv1..depth,
    rebnconv{depth-1}d..1d.
    """

    def __init__(self, depth: int, in_ch: int, mid_ch: int, out_ch: int, align_corners: bool = True):
        super().__init__()
        self.depth, self.align_corners = depth, align_corners
        self.rebnconvin = ConvBNReLU(in_ch, out_ch)
        self.rebnconv1 = ConvBNReLU(out_ch, mid_ch)
        for i in range(2, depth):
            setattr(self, f"rebnconv{i}", ConvBNReLU(mid_ch, mid_ch))
        setattr(self, f"rebnconv{depth}", ConvBNReLU(mid_ch, mid_ch, dilation=2))
        for i in range(depth - 1, 1, -1):
            setattr(self, f"rebnconv{i}d", ConvBNReLU(2 * mid_ch, mid_ch))
        self.rebnconv1d = ConvBNReLU(2 * mid_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        skips = [self.rebnconv1(hxin)]
        for i in range(2, self.depth):
            skips.append(getattr(self, f"rebnconv{i}")(_pool(skips[-1])))
        hx = getattr(self, f"rebnconv{self.depth}")(skips[-1])  # bottom: no pooling
        hx = getattr(self, f"rebnconv{self.depth - 1}d")(torch.cat([hx, skips[-1]], 1))
        for i in range(self.depth - 2, 0, -1):
            skip = skips[i - 1]
            hx = getattr(self, f"rebnconv{i}d")(torch.cat([_upsample_to(hx, skip, self.align_corners), skip], 1))
        return hx + hxin


class RSUDilated(nn.Module):
    """RSU-4F: the 4-level residual block with dilations 1/2/4/8 instead of pooling
    (used at the two lowest resolutions)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.rebnconvin = ConvBNReLU(in_ch, out_ch)
        self.rebnconv1 = ConvBNReLU(out_ch, mid_ch, dilation=1)
        self.rebnconv2 = ConvBNReLU(mid_ch, mid_ch, dilation=2)
        self.rebnconv3 = ConvBNReLU(mid_ch, mid_ch, dilation=4)
        self.rebnconv4 = ConvBNReLU(mid_ch, mid_ch, dilation=8)
        self.rebnconv3d = ConvBNReLU(2 * mid_ch, mid_ch, dilation=4)
        self.rebnconv2d = ConvBNReLU(2 * mid_ch, mid_ch, dilation=2)
        self.rebnconv1d = ConvBNReLU(2 * mid_ch, out_ch, dilation=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat([hx4, hx3], 1))
        hx2d = self.rebnconv2d(torch.cat([hx3d, hx2], 1))
        hx1d = self.rebnconv1d(torch.cat([hx2d, hx1], 1))
        return hx1d + hxin


def _make_stage(kind: str, in_ch: int, mid_ch: int, out_ch: int, align_corners: bool) -> nn.Module:
    if kind == "4F":
        return RSUDilated(in_ch, mid_ch, out_ch)
    return RSU(int(kind), in_ch, mid_ch, out_ch, align_corners)


# (name, block kind, in, mid, out) of the full model, channels at width 1.
_ENCODER = [
    ("stage1", "7", None, 32, 64),
    ("stage2", "6", 64, 32, 128),
    ("stage3", "5", 128, 64, 256),
    ("stage4", "4", 256, 128, 512),
    ("stage5", "4F", 512, 256, 512),
    ("stage6", "4F", 512, 256, 512),
]
_DECODER = [
    ("stage5d", "4F", 1024, 256, 512),
    ("stage4d", "4", 1024, 128, 256),
    ("stage3d", "5", 512, 64, 128),
    ("stage2d", "6", 256, 32, 64),
    ("stage1d", "7", 128, 16, 64),
]
_SIDE_IN = [64, 64, 128, 256, 512, 512]  # side1..side6 (decoder 1..5 outputs, stage6)


class U2Net(nn.Module):
    """U^2-Net. forward(x: B x in_ch x H x W, any H, W) -> sigmoid(d0): B x out_ch x H x W.

    `width` multiplies every channel count (1.0 = the released 44.0M-parameter model).
    `align_corners` of every upsampling: True = the CGN authors' copy, False = upstream U-2-Net.
    The input is used as given; CGN feeds raw [-1, 1] BigGAN images, as the original
    CGN code does (no resizing or ImageNet normalisation).
    """

    def __init__(self, in_ch: int = 3, out_ch: int = 1, width: float = 1.0, align_corners: bool = True):
        super().__init__()
        if not width > 0:
            raise ValueError(f"U2Net width must be > 0, got {width}")
        self.in_ch, self.out_ch, self.width, self.align_corners = in_ch, out_ch, width, align_corners

        def c(n: int) -> int:
            return max(1, int(round(n * width)))

        for name, kind, cin, mid, cout in _ENCODER:
            setattr(self, name, _make_stage(kind, in_ch if cin is None else c(cin), c(mid), c(cout), align_corners))
        for name, kind, cin, mid, cout in _DECODER:
            # Decoder inputs are concatenations of two width-scaled maps.
            setattr(self, name, _make_stage(kind, 2 * c(cin // 2), c(mid), c(cout), align_corners))
        for i, cin in enumerate(_SIDE_IN, start=1):
            setattr(self, f"side{i}", nn.Conv2d(c(cin), out_ch, 3, padding=1))
        self.outconv = nn.Conv2d(6 * out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def up(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
            return _upsample_to(a, ref, self.align_corners)

        hx1 = self.stage1(x)
        hx2 = self.stage2(_pool(hx1))
        hx3 = self.stage3(_pool(hx2))
        hx4 = self.stage4(_pool(hx3))
        hx5 = self.stage5(_pool(hx4))
        hx6 = self.stage6(_pool(hx5))

        hx5d = self.stage5d(torch.cat([up(hx6, hx5), hx5], 1))
        hx4d = self.stage4d(torch.cat([up(hx5d, hx4), hx4], 1))
        hx3d = self.stage3d(torch.cat([up(hx4d, hx3), hx3], 1))
        hx2d = self.stage2d(torch.cat([up(hx3d, hx2), hx2], 1))
        hx1d = self.stage1d(torch.cat([up(hx2d, hx1), hx1], 1))

        d1 = self.side1(hx1d)
        sides = [d1] + [
            up(getattr(self, f"side{i}")(h), d1)
            for i, h in zip(range(2, 7), (hx2d, hx3d, hx4d, hx5d, hx6))
        ]
        return torch.sigmoid(self.outconv(torch.cat(sides, 1)))


def _strip_prefix(state_dict: dict, prefix: str) -> dict:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def check_state_dict(module: nn.Module, state_dict: dict, what: str) -> None:
    """Raise ValueError naming missing / unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or wrong:
        def head(xs):
            return ", ".join(xs[:5]) + (f" ... (+{len(xs) - 5})" if len(xs) > 5 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys [{head(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys [{head(unexpected)}]")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches [{head(wrong)}]")
        raise InputError(f"{what} does not match the model: " + "; ".join(parts))


def build_u2net(source: str | Path = "u2net.pth", seed: int = 0, align_corners: bool = True) -> U2Net:
    """"tiny" -> random small U^2-Net (deterministic from `seed`); "random" -> random
    full-size; "u2net" -> the weights cache's file (cgn_dist.weights); anything else is a path to the
    upstream `u2net.pth`. Returned in eval mode."""
    if str(source) in ("tiny", "random"):
        width = TINY_U2NET_WIDTH if str(source) == "tiny" else 1.0
        with torch.random.fork_rng(devices=[]):  # leave the global RNG untouched
            torch.manual_seed(seed)
            net = U2Net(width=width, align_corners=align_corners)
        return net.eval()
    from cgn_dist import weights

    return load_u2net(weights.resolve(str(source), "imagenet.u2net"), align_corners=align_corners)


def load_u2net(path: str | Path, map_location: str | torch.device = "cpu", align_corners: bool = True) -> U2Net:
    """Load the full upstream U^2-Net weights (`u2net.pth`). Returned in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"U^2-Net weights not found at '{path}'. {U2NET_WEIGHTS_HELP}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle / zip errors: not a torch state dict
        from cgn_dist.weights import unreadable_reason

        raise InputError(f"'{path}' is not U^2-Net weights: {unreadable_reason(path, e)}. {U2NET_WEIGHTS_HELP}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"'{path}' does not hold a U^2-Net state dict. {U2NET_WEIGHTS_HELP}")
    state = _strip_prefix(state, "module.")
    net = U2Net(align_corners=align_corners)
    check_state_dict(net, state, f"U^2-Net weights '{path}'")
    net.load_state_dict(state)
    return net.eval()
