"""An exponential moving average of the generator's weights, kept beside the training engine.

A GAN's live weights wander from update to update; their running average samples better long before the
live ones settle (the practice of BigGAN and StyleGAN), which matters most on a short schedule. The
average only reads the trained weights, so the losses and the update are unchanged.

It checkpoints like an engine (``save(dir, name)`` / ``load(dir, name)``): ``<name>.pt`` holds
``{"module": state_dict, "n_averaged": n}``, the layout generation reads, so a checkpoint's
``generator_ema.pt`` is what counterfactuals are drawn from when it is there.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cgn_dist.errors import InputNotFound

EMA_NAME = "generator_ema"


class EmaWeights:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta after each update; buffers (BatchNorm's running
    statistics) are averaged the same way. The first update copies the weights."""

    def __init__(self, module: nn.Module, decay: float, is_main: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay, self.is_main = decay, is_main
        self.averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        for p in self.averaged.parameters():
            p.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def n_averaged(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.averaged.update_parameters(module)

    def save(self, directory: Path, name: str = EMA_NAME) -> None:
        if self.is_main:
            torch.save({"module": self.module.state_dict(), "n_averaged": self.n_averaged},
                       Path(directory) / f"{name}.pt")

    def load(self, directory: Path, name: str = EMA_NAME) -> None:
        file = Path(directory) / f"{name}.pt"
        if not file.is_file():
            raise InputNotFound(f"{file} missing: the checkpoint is incomplete (or was written without "
                                "mnist.ema_decay); resume from another checkpoint or with the run's own settings")
        device = next(self.module.parameters()).device
        state = torch.load(file, map_location=device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.averaged.n_averaged.fill_(int(state["n_averaged"]))


__all__ = ["EmaWeights", "EMA_NAME"]
