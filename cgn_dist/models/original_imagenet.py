"""Import the authors' released CGN-ImageNet checkpoint (`cgn.pth`).

That file is the full state dict of their CGN module: `biggan_GT.*`, `f_shape.*`,
`f_text.*`, `f_bg.*` (four BigGAN-deep-256, 602 keys each) and `u2net.*` (798 keys),
sometimes with a `module.` prefix from DataParallel. The BigGAN and U^2-Net parameter
names inside are those of pytorch-pretrained-biggan and upstream U^2-Net, which our
modules keep, so the import is a renaming of the top-level prefixes.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from cgn_dist.errors import InputError, InputNotFound
from cgn_dist.models.biggan import refresh_spectral_weights
from cgn_dist.models.cgn_imagenet import CGNImageNet, build_cgn_imagenet
from cgn_dist.models.u2net import check_state_dict

__all__ = [
    "ORIGINAL_PREFIXES",
    "CGN_WEIGHTS_HELP",
    "convert_original_state_dict",
    "to_original_state_dict",
    "load_original_state_dict",
    "load_original_cgn_imagenet",
    "load_original_cgn_checkpoint",
]

# authors' top-level name -> ours
ORIGINAL_PREFIXES = {
    "biggan_GT.": "biggan_gt.",
    "f_shape.": "mechanisms.f_shape.",
    "f_text.": "mechanisms.f_text.",
    "f_bg.": "mechanisms.f_bg.",
    "u2net.": "u2net.",
}

CGN_WEIGHTS_HELP = (
    "The released CGN-ImageNet weights are 'cgn.pth' from the authors' "
    "counterfactual_generative_networks README (Google Drive id 12yVFHPUjKmUFGnO2D4xVlTSpF8CUj136; "
    "`cgn-dist weights fetch cgn-imagenet` puts it in the weights cache, then imagenet.init_from=cgn-imagenet)."
)


def convert_original_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the authors' keys to `CGNImageNet` keys. ValueError on a key that belongs
    to none of the five sub-networks (i.e. not a CGN-ImageNet checkpoint)."""
    out, foreign = {}, []
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        for old, new in ORIGINAL_PREFIXES.items():
            if k.startswith(old):
                out[new + k[len(old):]] = value
                break
        else:
            foreign.append(key)
    if foreign:
        raise InputError(
            f"not a CGN-ImageNet checkpoint: {len(foreign)} keys outside "
            f"{sorted(ORIGINAL_PREFIXES)} (e.g. {foreign[:3]}). {CGN_WEIGHTS_HELP}"
        )
    return out


def to_original_state_dict(cgn: CGNImageNet) -> dict[str, torch.Tensor]:
    """Our full state dict under the authors' key names (the inverse of the import)."""
    inverse = {new: old for old, new in ORIGINAL_PREFIXES.items()}
    out = {}
    for key, value in cgn.state_dict().items():
        for new, old in inverse.items():
            if key.startswith(new):
                out[old + key[len(new):]] = value
                break
    return out


def _read_checkpoint(path: Path, map_location) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise InputNotFound(f"CGN-ImageNet checkpoint '{path}' not found. {CGN_WEIGHTS_HELP}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        from cgn_dist.weights import unreadable_reason

        raise InputError(f"'{path}' is not a CGN checkpoint: {unreadable_reason(path, e)}. {CGN_WEIGHTS_HELP}") from e
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise InputError(f"'{path}' does not hold a state dict of tensors. {CGN_WEIGHTS_HELP}")
    return state


def load_original_state_dict(cgn: CGNImageNet, state: Mapping[str, torch.Tensor]) -> CGNImageNet:
    """Load an authors'-format state dict into `cgn` in place; every key and shape of all
    five sub-networks must match (the original loaded with strict=False; we do not)."""
    mapped = convert_original_state_dict(state)
    check_state_dict(cgn, mapped, "CGN-ImageNet checkpoint")
    cgn.load_state_dict(mapped)
    # Loading replaces the spectral-norm u/v buffers; recompute the normalised weights
    # so a deepcopy sees the loaded ones.
    refresh_spectral_weights(cgn)
    return cgn


def load_original_cgn_imagenet(path: str | Path, cgn: CGNImageNet | None = None,
                               map_location: str | torch.device = "cpu") -> CGNImageNet:
    """Load the authors' `cgn.pth` (all five sub-networks). Without `cgn`, a
    BigGAN-deep-256 / full U^2-Net model is built for it (no download: every weight
    comes from the file). Returned in eval mode."""
    state = _read_checkpoint(Path(path), map_location)
    if cgn is None:
        cgn = build_cgn_imagenet("random-256", "random")
    return load_original_state_dict(cgn, state).eval()


# Alias under the name the training entry point imports.
load_original_cgn_checkpoint = load_original_cgn_imagenet
