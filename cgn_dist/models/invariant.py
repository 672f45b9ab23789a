"""The invariant classifier: one torchvision ResNet trunk, three fresh linear heads.

Outputs (a dict of logits): ``shape``, ``texture``, ``bg`` (each head), ``avg`` (mean of the three,
what real ImageNet images supervise) and ``shape_texture`` (mean of shape and texture, the BG-gap's
predictor). All BatchNorm layers stay in eval mode in training, as in the authors' code: running
statistics frozen at their ImageNet values, affine parameters still trained.

Any torchvision classifier can be evaluated by the same code through ``TorchvisionClassifier``
(one output, ``logits``), so the published baselines can be reproduced.
"""
from __future__ import annotations

import logging

import torch
import torchvision
from torch import nn

from cgn_dist.errors import InputError
from cgn_dist.models.torchvision_weights import read_state_file, resolve_weights

log = logging.getLogger(__name__)

HEADS = ("shape", "texture", "bg")
OUTPUTS = ("avg", "shape_texture", "shape", "texture", "bg")


def _weights_enum(arch: str):
    """IMAGENET1K_V1 where torchvision has it: what `pretrained=True` meant in the authors' torchvision 0.8
    and what the published baselines used (ResNet-50 V1: 76.13 % top-1); DEFAULT (e.g. V2) otherwise."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError, AttributeError):
        return None
    return getattr(enum, "IMAGENET1K_V1", None) or enum.DEFAULT


def build_torchvision(arch: str, weights: str = "auto", seed: int = 0, **kwargs) -> tuple[nn.Module, str]:
    """A torchvision classifier ``arch`` with weights per cgn_dist.models.torchvision_weights; (model, source)."""
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise InputError(f"unknown torchvision classifier {arch!r}; e.g. resnet50, resnet18, vgg16, inception_v3")
    enum = _weights_enum(arch)
    if enum is None and weights == "imagenet":
        raise InputError(f"torchvision has no ImageNet weights for {arch!r}")
    if enum is None and weights in ("auto", "random"):
        state, source = None, "random"
    else:
        state, source = resolve_weights(weights, enum, f"{arch} weights")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
    if state is not None:
        model.load_state_dict(state)
    return model, source


class InvariantClassifier(nn.Module):
    def __init__(self, backbone: str = "resnet50", n_classes: int = 1000, weights: str = "auto", seed: int = 0,
                 freeze_bn: bool = True):
        super().__init__()
        trunk, self.weights_source = build_torchvision(backbone, weights, seed)
        if not isinstance(getattr(trunk, "fc", None), nn.Linear):
            raise InputError(f"invariant.backbone={backbone!r}: need a ResNet-style network with an 'fc' layer")
        dim = trunk.fc.in_features
        trunk.fc = nn.Identity()  # the trunk ends after global average pooling (2048-d for ResNet-50)
        self.backbone = trunk
        self.freeze_bn = freeze_bn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.heads = nn.ModuleDict({h: nn.Linear(dim, n_classes) for h in HEADS})
        self.n_classes = n_classes
        self.train()

    def train(self, mode: bool = True) -> "InvariantClassifier":
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone(x)
        out = {h: self.heads[h](f) for h in HEADS}
        out["avg"] = (out["shape"] + out["texture"] + out["bg"]) / 3
        out["shape_texture"] = (out["shape"] + out["texture"]) / 2
        return out


class TorchvisionClassifier(nn.Module):
    """A plain torchvision classifier, its logits under the single output name ``logits``."""

    def __init__(self, arch: str = "resnet50", weights: str = "auto", seed: int = 0):
        super().__init__()
        self.net, self.weights_source = build_torchvision(arch, weights, seed)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


def build_invariant_classifier(backbone: str = "resnet50", weights: str = "auto", n_classes: int = 1000,
                               seed: int = 0, init_from: str = "", freeze_bn: bool = True) -> InvariantClassifier:
    model = InvariantClassifier(backbone, n_classes, weights, seed, freeze_bn)
    if init_from:
        model.load_state_dict(read_state_file(init_from))
        model.weights_source = init_from
    log.info("invariant classifier: %s trunk, weights %s, %d classes", backbone, model.weights_source, n_classes)
    return model


def as_outputs(out) -> dict[str, torch.Tensor]:
    """Model output as a dict of logits: an invariant classifier's dict, or a plain tensor as ``logits``."""
    if isinstance(out, dict):
        return out
    if isinstance(out, torch.Tensor):
        return {"logits": out}
    if hasattr(out, "logits"):  # torchvision InceptionOutputs in train mode
        return {"logits": out.logits}
    raise TypeError(f"classifier output must be a tensor or a dict of logits, got {type(out).__name__}")


__all__ = ["InvariantClassifier", "TorchvisionClassifier", "build_invariant_classifier", "build_torchvision",
           "as_outputs", "HEADS", "OUTPUTS"]
