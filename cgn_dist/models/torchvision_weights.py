"""torchvision ImageNet weights offline-first: the hub cache, one short download try, a local file, or random.

One rule for every torchvision network cgn_dist loads (ResNet-50 of the invariant classifier,
Inception v3 of the Inception Score, any baseline classifier):
  "imagenet": the enum's default weights from the torch hub cache, else downloaded (short socket timeout);
              a WeightsError when neither works (evaluations only accept this, never a random fallback).
  "auto":     "imagenet" when it works, otherwise random init with ONE warning in the log.
  "random":   the architecture's own init (seeded by the caller).
  a path:     a state dict file (a bare state dict, or a dict holding one under "state_dict"/"model"/"module"),
              or a `cgn-dist weights` registry name (resnet50, inception-v3: the file in torch's hub cache).
"""
from __future__ import annotations

import logging
import socket
from pathlib import Path

import torch

from cgn_dist.errors import InputError, InputNotFound

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 10.0
_warned: set[str] = set()


def _hub_file(weights_enum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name


def _imagenet_state(weights_enum) -> dict:
    cached = _hub_file(weights_enum)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return weights_enum.get_state_dict(progress=False)
    finally:
        socket.setdefaulttimeout(old)


def _last_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def _registry_name(weights_enum) -> str:
    """The `cgn-dist weights` name of torchvision's file (resnet50, inception-v3), else the file's name."""
    from cgn_dist import weights as registry

    filename = Path(weights_enum.url).name
    return next((w.name for w in registry.REGISTRY.values() if w.filename == filename), filename)


def read_state_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"weights file {str(p)!r} does not exist")
    from cgn_dist.weights import TORCH_LOAD_ERRORS, unreadable_reason

    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as e:  # a text file ends in "IndexError: pop from empty list" deep in torch
        raise InputError(f"weights file {p} is not a state dict: {unreadable_reason(p, e)}") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InputError(f"weights file {p} must hold a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def resolve_weights(spec: str, weights_enum, what: str) -> tuple[dict | None, str]:
    """(state dict or None for random init, the source actually used) for ``spec``."""
    spec = str(spec)
    if spec in ("imagenet", "auto"):
        try:
            return _imagenet_state(weights_enum), "imagenet"
        except Exception as err:  # noqa: BLE001 - any failure means "not available here"
            if spec == "imagenet":
                from cgn_dist.weights import WeightsError

                # the download's own error (urllib's chain) stays behind --debug; its last line says enough
                raise WeightsError(
                    f"{what}: ImageNet weights unavailable: not in the torch hub cache ({_hub_file(weights_enum)}) "
                    f"and the download failed ({_last_line(err)}). Put the file there (cgn-dist weights fetch "
                    f"{_registry_name(weights_enum)}), give a local path, or use 'random'."
                ) from err
            if what not in _warned:
                _warned.add(what)
                log.warning("%s: ImageNet weights unavailable (%s); using RANDOM weights. Numbers will not "
                            "match the paper.", what, err)
            return None, "random"
    if spec == "random":
        return None, "random"
    from cgn_dist import weights as registry

    path = registry.resolve(spec) if registry.is_name(spec) else spec  # a `cgn-dist weights` name, or a path
    return read_state_file(path), str(path)
