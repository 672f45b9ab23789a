"""``cgn-dist import``: turn an authors' released checkpoint into a cgn_dist weights file.

The output has the layout of a torch-engine file in our checkpoints (``{"module": state_dict}``),
so everything that loads our generators (``generate.checkpoint``, ``mnist.init_from``) takes it.
For ImageNet only the three trainable mechanisms are kept: the frozen teacher and U²-Net come
from their own pretrained weights, as in every cgn_dist checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cgn_dist.errors import InputError, InputNotFound
from cgn_dist.models.original_imagenet import _read_checkpoint, convert_original_state_dict
from cgn_dist.models.original_mnist import load_original_mnist_checkpoint


def detect_kind(state: dict) -> str:
    keys = [k.removeprefix("module.") for k in state]
    # MNIST's released files name their texture mechanisms f_text1 / f_text2; ImageNet's have f_bg.
    if any(k.startswith(("f_bg.", "biggan_GT.", "u2net.")) for k in keys):
        return "imagenet"
    return "mnist"


def import_original_checkpoint(src: str | Path, dst: str | Path, kind: str = "auto") -> Path:
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputNotFound(f"{src} does not exist")
    try:
        state = _read_checkpoint(src, "cpu")
    except ValueError as e:
        raise InputError(f"{src} is not an authors' CGN checkpoint (MNIST ckp.pth or ImageNet cgn.pth): "
                         f"{str(e).splitlines()[0][:200]}") from None
    kind = detect_kind(dict(state)) if kind == "auto" else kind
    if kind == "mnist":
        module = load_original_mnist_checkpoint(src).state_dict()
    else:
        converted = convert_original_state_dict(state)
        module = {k.removeprefix("mechanisms."): v for k, v in converted.items() if k.startswith("mechanisms.")}
        if not module:
            raise InputError(f"{src} holds no f_shape / f_text / f_bg weights")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save({"module": module, "kind": f"cgn_{kind}", "imported_from": src.name}, tmp)
    tmp.replace(dst)
    return dst
