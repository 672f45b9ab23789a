"""Import the authors' released MNIST CGN checkpoints (`ckp.pth`) into CGNMnist.

The released files are plain generator state dicts (57 entries) of the original
nn.Sequential layout; the original training script saves only the generator, so they hold
no discriminator and no optimizer state. Fine-tuning from one starts a fresh discriminator.
Any key we do not map (a discriminator's, an optimizer's, ...) is an error that names it,
rather than being dropped silently.

Key map (original Sequential index -> our module; f_text1 -> f_text, f_text2 -> f_bg):
  label_emb                     -> label_emb
  f_shape.{0,4,5,9,10}          -> f_shape.{fc,conv1,bn1,conv2,bn2}
  f_text{1,2}.{0,3,4,7,8,10,11} -> f_{text,bg}.{fc,conv1,bn1,conv2,bn2,conv3,bn3}
The missing Sequential indices are parameter-free (reshape, InstanceNorm without affine or
running stats, upsample, LeakyReLU, tanh).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from cgn_dist.errors import InputNotFound, UserError
from cgn_dist.models.cgn_mnist import CGNMnist
from cgn_dist.weights import TORCH_LOAD_ERRORS

_SHAPE_MAP = {"0": "fc", "4": "conv1", "5": "bn1", "9": "conv2", "10": "bn2"}
_TEXT_MAP = {"0": "fc", "3": "conv1", "4": "bn1", "7": "conv2", "8": "bn2", "10": "conv3", "11": "bn3"}
_MECH_MAP = {"f_shape": ("f_shape", _SHAPE_MAP), "f_text1": ("f_text", _TEXT_MAP),
             "f_text2": ("f_bg", _TEXT_MAP)}
_BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class OriginalCheckpointError(UserError, ValueError):
    """The file is not an original CGN-MNIST generator checkpoint."""


def expected_original_keys() -> list[str]:
    keys = ["label_emb.weight"]
    for orig, (_, mapping) in _MECH_MAP.items():
        for idx, ours in mapping.items():
            if ours == "fc":
                entries = ("weight", "bias")
            elif ours.startswith("bn"):
                entries = _BN_ENTRIES
            elif ours == "conv3":
                entries = ("weight", "bias")
            else:
                entries = ("weight",)
            keys += [f"{orig}.{idx}.{e}" for e in entries]
    return keys


def _map_key(key: str) -> str | None:
    if key == "label_emb.weight":
        return key
    parts = key.split(".")
    if len(parts) != 3 or parts[0] not in _MECH_MAP:
        return None
    mech, mapping = _MECH_MAP[parts[0]]
    if parts[1] not in mapping:
        return None
    return f"{mech}.{mapping[parts[1]]}.{parts[2]}"


def _strip_module_prefix(sd: Mapping) -> dict:
    # Checkpoints saved from nn.DataParallel carry a "module." prefix on every key.
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def infer_original_hparams(sd: Mapping) -> dict:
    """n_classes, latent_dim, ngf, img_size from the tensor shapes of an original state dict."""
    try:
        n_classes = sd["label_emb.weight"].shape[0]
        in_dim = sd["f_shape.0.weight"].shape[1]
        ngf = sd["f_text1.7.weight"].shape[0]
        fc_out = sd["f_shape.0.weight"].shape[0]
    except (KeyError, AttributeError, IndexError) as err:
        raise OriginalCheckpointError(f"cannot infer model sizes: {err!r} missing or malformed") from err
    init_sq = fc_out // (2 * ngf)
    init_size = int(round(init_sq ** 0.5))
    if init_size * init_size * 2 * ngf != fc_out:
        raise OriginalCheckpointError(f"f_shape.0.weight has {fc_out} outputs, not 2*ngf*s*s for ngf={ngf}")
    return {"n_classes": int(n_classes), "latent_dim": int(in_dim - n_classes), "ngf": int(ngf),
            "img_size": 4 * init_size}


def convert_original_mnist_state_dict(sd: Mapping, model: CGNMnist | None = None) -> dict:
    """Original CGN-MNIST generator state dict -> CGNMnist state dict.

    Shapes are checked against `model` (or against a CGNMnist with the sizes inferred from
    `sd`). Raises OriginalCheckpointError naming missing, unexpected or mis-shaped entries.
    """
    if not isinstance(sd, Mapping):
        raise OriginalCheckpointError(f"expected a state dict (mapping of names to tensors), got "
                                      f"{type(sd).__name__}")
    sd = _strip_module_prefix(sd)
    expected = set(expected_original_keys())
    missing = sorted(expected - set(sd))
    unexpected = sorted(str(k) for k in set(sd) - expected)
    if missing or unexpected:
        msg = ["not an original CGN-MNIST generator checkpoint:"]
        if missing:
            msg.append(f"missing keys {missing[:12]}{' ...' if len(missing) > 12 else ''}")
        if unexpected:
            msg.append(f"unexpected keys {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}")
        raise OriginalCheckpointError(" ".join(msg))
    non_tensor = sorted(str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if non_tensor:
        raise OriginalCheckpointError(f"entries that are not tensors: {non_tensor[:10]}; an original "
                                      "ckp.pth holds only generator tensors")
    if model is None:
        model = CGNMnist(**infer_original_hparams(sd), init_type=None)
    target = model.state_dict()
    out = {}
    bad_shapes = []
    for key, value in sd.items():
        ours = _map_key(key)
        if tuple(value.shape) != tuple(target[ours].shape):
            bad_shapes.append(f"{key}: {tuple(value.shape)} vs expected {tuple(target[ours].shape)}")
        out[ours] = value
    if bad_shapes:
        raise OriginalCheckpointError("shape mismatch: " + "; ".join(bad_shapes[:8]))
    return out


def load_original_mnist_checkpoint(path: str | os.PathLike, model: CGNMnist | None = None,
                                   map_location: str | torch.device = "cpu") -> CGNMnist:
    """Load a released `ckp.pth` into `model` (built with the checkpoint's sizes if None).

    A model built here is returned in eval mode (BatchNorm running stats, as the original
    sampler used); a model passed in keeps its train/eval mode, so fine-tuning from a
    released checkpoint trains as usual.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"checkpoint {path} does not exist")
    try:
        sd = torch.load(path, map_location=map_location, weights_only=True)
    except TORCH_LOAD_ERRORS as err:
        from cgn_dist.weights import unreadable_reason

        raise OriginalCheckpointError(f"{path} is not a CGN-MNIST checkpoint: {unreadable_reason(path, err)}; the "
                                      "released ckp.pth files are plain state dicts") from err
    converted = convert_original_mnist_state_dict(sd, model)
    if model is None:
        model = CGNMnist(**infer_original_hparams(_strip_module_prefix(sd)), init_type=None).eval()
    model.load_state_dict(converted, strict=True)
    return model


# Name used by the training entry point (`init_from`).
load_mnist_weights = load_original_mnist_checkpoint


__all__ = ["convert_original_mnist_state_dict", "load_original_mnist_checkpoint", "load_mnist_weights",
           "expected_original_keys", "infer_original_hparams", "OriginalCheckpointError"]
