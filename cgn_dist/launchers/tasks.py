"""Which training loop runs a config's ``task``: the one table both launchers (a plain call / torchrun and
Ray Train) read. The loops are imported on use: each pulls in its own models and data."""
from __future__ import annotations

import importlib
from typing import Callable

from cgn_dist.errors import InputError

LOOPS = {
    "mnist": "cgn_dist.train.mnist:train_mnist",  # CGN-MNIST
    "imagenet": "cgn_dist.train.imagenet:train_imagenet",  # CGN-ImageNet (three BigGANs, teacher, U²-Net)
    "invariant": "cgn_dist.classifier.imagenet.train:train_invariant",  # the invariant ResNet-50 (invariant:)
}


def training_loop(task: str) -> Callable:
    """The loop ``fn(cfg, env=None, reporter=None) -> summary`` for ``task``."""
    if task not in LOOPS:
        raise InputError(f"task={task!r}: no training loop; accepted: {', '.join(LOOPS)}")
    module, name = LOOPS[task].split(":")
    return getattr(importlib.import_module(module), name)
