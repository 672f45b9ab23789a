"""CGN-ImageNet weights for generation: which file a checkpoint path means, what it holds, and the model
built from it (eval mode, frozen)."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cgn_dist.data.shards import sha256_file as sha256_of  # noqa: F401  (re-exported)
from cgn_dist.errors import InputNotFound, UserError
from cgn_dist.generate.imagenet.labels import IMAGENET_CLASSES
from cgn_dist.weights import TORCH_LOAD_ERRORS

MECHANISMS_FILE = "mechanisms.pt"  # what the ImageNet training loop's torch engine saves per checkpoint
DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"

CHECKPOINT_HELP = (
    "pass a training run directory (runs/<name>/, its latest checkpoint), a step directory "
    "(runs/<name>/checkpoints/step_XXXXXXX/), its mechanisms.pt, a file written by `cgn-dist import`, or "
    "the authors' cgn.pth (`cgn-dist weights fetch cgn-imagenet`, or Google Drive id "
    "12yVFHPUjKmUFGnO2D4xVlTSpF8CUj136; then generate.checkpoint=cgn-imagenet)")


class CGNCheckpointError(UserError, ValueError):
    """The path given as a CGN-ImageNet checkpoint is not one we can load."""


# --- checkpoints ------------------------------------------------------------------------------------------

def resolve_cgn_checkpoint(path: str | os.PathLike) -> Path:
    """The weights file behind any accepted kind of path (a run directory resolves to its LATEST completed
    checkpoint at the time of the call: resolve once, in the driver, so all workers load the same one)."""
    p = Path(path).expanduser()
    if not str(path):
        raise CGNCheckpointError(f"no CGN checkpoint given; {CHECKPOINT_HELP}")
    if not p.exists():
        raise InputNotFound(f"CGN checkpoint {p} does not exist; {CHECKPOINT_HELP}")
    if p.is_file():
        return p
    if (p / "checkpoints").is_dir() and not (p / "meta.json").is_file():
        from cgn_dist.train.checkpoint import latest_checkpoint

        step = latest_checkpoint(p)
        if step is None:
            raise InputNotFound(f"run directory {p} has no completed checkpoint under checkpoints/ (a "
                                "completed one has meta.json); train longer or pass a checkpoint file")
        p = step
    if (p / "meta.json").is_file():
        engines = json.loads((p / "meta.json").read_text()).get("engines", [])
        if engines and "mechanisms" not in engines:
            hint = " (an MNIST run: set task=mnist)" if "generator" in engines else ""
            raise CGNCheckpointError(f"checkpoint {p} holds engines {engines}, no 'mechanisms'{hint}")
        if (p / MECHANISMS_FILE).is_file():
            return p / MECHANISMS_FILE
        found = sorted((p / "mechanisms").glob(f"**/{DEEPSPEED_MODEL_FILE}"))
        if found:
            return found[0]
        raise CGNCheckpointError(f"checkpoint {p} has no {MECHANISMS_FILE} (torch engine) and no "
                                 f"mechanisms/{DEEPSPEED_MODEL_FILE} (DeepSpeed engine)")
    raise CGNCheckpointError(f"{p} is a directory but neither a run directory (with checkpoints/) nor a "
                             f"checkpoint step directory (with meta.json); {CHECKPOINT_HELP}")


def _torch_load(file: Path) -> Any:
    try:
        # mmap: a torch-engine mechanisms.pt also holds Adam's state (2x the weights), never read here.
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  the plain load below says what is wrong
        pass
    try:  # files in torch's legacy (non-zip) format cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as err:
        from cgn_dist.weights import unreadable_reason

        raise CGNCheckpointError(f"generate.checkpoint={file} is not a CGN checkpoint: {unreadable_reason(file, err)}; "
                                 f"{CHECKPOINT_HELP}") from err


def _strip(sd: Mapping[str, Any], prefixes: Sequence[str] = ("module.", "_orig_mod.")) -> dict[str, Any]:
    out = dict(sd)
    for prefix in prefixes:
        if out and all(isinstance(k, str) and k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def read_cgn_weights(file: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """("mechanisms", state dict of f_shape/f_text/f_bg) for our files, or ("original", the authors' full
    state dict with all five networks) for their cgn.pth."""
    file = Path(file)
    obj = _torch_load(file)
    if not isinstance(obj, Mapping):
        raise CGNCheckpointError(f"{file} holds a {type(obj).__name__}, not a state dict; {CHECKPOINT_HELP}")
    if isinstance(obj.get("module"), Mapping):  # torch engine, DeepSpeed engine, `cgn-dist import`
        if obj.get("kind") == "cgn_mnist":
            raise CGNCheckpointError(f"{file} is an imported CGN-MNIST checkpoint: set task=mnist")
        sd = _strip(obj["module"])
    else:
        sd = _strip(obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj, ("module.",))
    keys = [str(k) for k in sd]
    if any(k.startswith(("biggan_GT.", "u2net.")) for k in keys):
        return "original", dict(sd)
    if keys and all(k.startswith("mechanisms.") for k in keys):  # a whole CGNImageNet state dict
        sd = {k[len("mechanisms."):]: v for k, v in sd.items() if k.startswith("mechanisms.")}
        keys = list(sd)
    if "label_emb.weight" in sd:
        raise CGNCheckpointError(f"{file} is a CGN-MNIST generator checkpoint: set task=mnist")
    if keys and all(k.startswith(("f_shape.", "f_text.", "f_bg.")) for k in keys):
        return "mechanisms", dict(sd)
    raise CGNCheckpointError(f"{file} is neither a cgn_dist CGN-ImageNet checkpoint (mechanisms f_shape / "
                             f"f_text / f_bg) nor the authors' cgn.pth; its keys start {sorted(keys)[:6]}")


def checkpoint_kind(file: str | os.PathLike) -> str:
    """"mechanisms" or "original" (cheap: the file is memory-mapped, tensors are not read)."""
    return read_cgn_weights(file)[0]


def _layout_source(biggan: str) -> str:
    # Generation never runs the teacher and takes the mechanisms from the checkpoint: the pretrained
    # BigGAN-deep-256 weights are not needed (nor downloaded), only its layout.
    return "random-256" if biggan == "biggan-deep-256" else biggan


def biggan_num_classes(biggan: str) -> int:
    """Classes of a BigGAN source without building it."""
    from cgn_dist.models.biggan import tiny_biggan_config

    if biggan == "tiny":
        return tiny_biggan_config().num_classes
    if biggan == "random-256" or biggan.startswith("biggan-deep-"):
        return IMAGENET_CLASSES
    config = Path(biggan) / "config.json"
    if not config.is_file():
        raise InputNotFound(f"BigGAN source {biggan!r} is not 'tiny', 'random-256', a biggan-deep-* name, "
                            "nor a directory with config.json + pytorch_model.bin")
    return int(json.loads(config.read_text())["num_classes"])


def build_generation_model(checkpoint: str = "", biggan: str = "biggan-deep-256", u2net: str = "u2net",
                           cache_dir: str = "", seed: int = 0, u2net_align_corners: bool = True):
    """A CGNImageNet (eval mode, frozen, on CPU) for generation; returns (model, weights file or None).

    checkpoint "" -> no weights: the mechanisms are copies of the BigGAN source (random init from
    ``seed`` for "tiny" / "random-256": tests and timing only). Ours (mechanisms only): the model is laid
    out after ``biggan`` (not downloaded: only the layout is needed) and U²-Net loads from ``u2net``.
    The authors' cgn.pth holds all five networks: ``u2net`` is not read ("tiny" keeps the small layout).
    ``u2net_align_corners``: True = the CGN authors' U²-Net upsampling (what their cgn.pth was trained with).
    """
    from cgn_dist.models.cgn_imagenet import build_cgn_imagenet
    from cgn_dist.models.original_imagenet import load_original_state_dict

    if not checkpoint:
        cgn = build_cgn_imagenet(biggan, u2net, cache_dir=cache_dir or None, seed=seed,
                                 u2net_align_corners=u2net_align_corners)
        file = None
    else:
        file = resolve_cgn_checkpoint(checkpoint)
        kind, state = read_cgn_weights(file)
        if kind == "original":
            cgn = build_cgn_imagenet("tiny" if biggan == "tiny" else _layout_source(biggan),
                                     "tiny" if u2net == "tiny" else "random", cache_dir=cache_dir or None, seed=seed,
                                     u2net_align_corners=u2net_align_corners)
            load_original_state_dict(cgn, state)
        else:
            cgn = build_cgn_imagenet(_layout_source(biggan), u2net, cache_dir=cache_dir or None, seed=seed,
                                     u2net_align_corners=u2net_align_corners)
            cgn.load_trainable_state_dict({k: v.float() for k, v in state.items()})  # bf16 DeepSpeed files too
        del state
    cgn.eval().requires_grad_(False)
    return cgn, file

