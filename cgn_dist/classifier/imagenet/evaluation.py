"""What every ImageNet evaluation shares: preprocessing, a rank's part of the work, summed counts, the forward.

Distributed evaluation splits the items (files or shards) over ranks, never coordinating: rank r takes
items r, r+world, ... Each rank counts hits and totals; counts are SUMMED over ranks (all_reduce), never
averaged, and per-item rows are gathered to rank 0 and sorted by item. So any world size gives the same
numbers and the same files.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError

from cgn_dist.errors import InputError
from cgn_dist.models.invariant import as_outputs
from cgn_dist.distributed.env import rank_world

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_eval_transform(size: int = 224):
    """Resize(256) + CenterCrop(224) + ImageNet normalisation (scaled alike when ``size`` differs)."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# --------------------------------------------------------------------------- ranks


def rank_part(items: Sequence, rank: int | None = None, world: int | None = None) -> list:
    r, w = rank_world()
    r, w = (r if rank is None else rank), (w if world is None else world)
    return list(items)[r::w]


def sum_counts(counts: dict[str, int | float], keys: Iterable[str]) -> dict[str, int | float]:
    """Sum ``counts[k]`` over ranks for every k in ``keys`` (all ranks pass the same keys); 0 where absent."""
    keys = list(keys)
    is_int = all(isinstance(counts.get(k, 0), int) for k in keys)
    t = torch.tensor([counts.get(k, 0) for k in keys], dtype=torch.int64 if is_int else torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: (int(v) if is_int else float(v)) for k, v in zip(keys, t.tolist())}


def gather_rows(rows: list) -> list:
    """Every rank's rows, concatenated (on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(rows)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for p in parts for r in p]


# --------------------------------------------------------------------------- images and forwards


class ImageFiles(torch.utils.data.Dataset):
    """Image files through ``transform``; item = (tensor, index)."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable):
        self.paths, self.transform = [Path(p) for p in paths], transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            im = Image.open(self.paths[i])
        except (UnidentifiedImageError, OSError) as e:  # the user's folder holds a file that is no image
            raise InputError(f"{self.paths[i]} cannot be read as an image ({e}); remove or replace it") from e
        with im:
            return self.transform(im.convert("RGB")), i


def image_batches(paths: Sequence[str | Path], transform: Callable, batch_size: int, num_workers: int = 0):
    ds = ImageFiles(paths, transform)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def autocast_for(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def forward_outputs(model: torch.nn.Module, x: torch.Tensor, device: torch.device | str = "cpu",
                    precision: str = "fp32") -> dict[str, torch.Tensor]:
    """The model's logits per output name, fp32 on the CPU."""
    device = torch.device(device)
    with autocast_for(device, precision):
        out = as_outputs(model(x.to(device)))
    return {k: v.float().cpu() for k, v in out.items()}


def run_model(model: torch.nn.Module, batches: Iterable, device="cpu", precision: str = "fp32"):
    """Yield (outputs, rest) per batch, ``rest`` being what the loader gave beside the images."""
    was = model.training
    model.eval()
    try:
        for batch in batches:
            x, *rest = batch
            yield forward_outputs(model, x, device, precision), rest
    finally:
        model.train(was)


def model_info(model: torch.nn.Module) -> dict[str, Any]:
    return {"class": type(model).__name__, "weights": getattr(model, "weights_source", "unknown")}


__all__ = ["imagenet_eval_transform", "rank_world", "rank_part", "sum_counts", "gather_rows", "ImageFiles",
           "image_batches", "forward_outputs", "run_model", "model_info", "IMAGENET_MEAN", "IMAGENET_STD"]
